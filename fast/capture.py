"""The training step's forward and losses captured by torch.compile (`--compile`), for GPUs.

A GPU step of this model is a few milliseconds of work spread over ~2,000 small kernels: the host launching
them is what it waits on. Captured, the forward and the loss terms run as one compiled region and their backward
as another (fullgraph: a graph break is an error, not a silent split). On CUDA the mode is `reduce-overhead`:
each region is replayed as a CUDA graph, one per shape, and the packed layout already rounds the shapes to few
buckets (rows to multiples of 32, grid lengths to multiples of 16, one grid per batch). Shapes are dynamic, so a
new bucket costs a graph capture, not a recompilation (a size of 0 or 1 would still be specialised: the layout
keeps its index sizes away from them, fast/layout.py's SENTINEL_ROWS).

On the CPU it works too, but eager with the C kernels is faster there (bench/README.md, compile_vs_kernels.py);
the compiled step takes torch's own ops (no C kernels, no bf16 weight copies) and one attention grid per batch,
so the number of grids never changes what is compiled. Dropout draws its masks from inductor's own random
stream: a compiled run is reproducible from its seed but not equal to an eager run's.
"""
import torch

BACKEND = "inductor"   # tests set "aot_eager": the same capture (dynamo + autograd) without code generation
observer = None        # bench/step_ops.py: told when a captured region runs, so it counts it as one launch


def capture(model, step_fn, device):
    """step_fn(model, ...) -> {name: loss}, as one compiled region (and its backward as another); same arguments."""
    model.single_grid = True   # read by the fast layout; the grid count would otherwise shape the graph
    mode = "reduce-overhead" if device.type == "cuda" and BACKEND == "inductor" else None
    compiled = torch.compile(step_fn, dynamic=True, fullgraph=True, backend=BACKEND, mode=mode)

    def run(*args, **kwargs):
        if device.type == "cuda":   # a new step: the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        if observer is None:
            return compiled(*args, **kwargs)
        with observer.region("forward"):
            losses = compiled(*args, **kwargs)
        node = losses["total"].grad_fn   # the compiled backward: every loss term hangs from this one node
        node.register_prehook(lambda grads: observer.enter("backward"))
        node.register_hook(lambda grad_in, grad_out: observer.leave("backward"))
        return losses
    return run
