"""The CPU kernels (cpu_kernels.c): compiled at first use, cached, called through ctypes.

A training step of the default model draws 63 dropout masks; with torch's own CPU ops (a single-threaded
generator, then compare, scale and multiply passes) they were ~15% of the step. The kernels do it in one
multi-threaded pass and store no mask (the backward recomputes it from the seed); activation + dropout
(gelu, gelu_tanh, elu) is one pass too, and so are the multimodal gate and the optimizer step of
shadow_weights.py; rows go into attention grids as whole-row copies. Each kernel has a bfloat16 and a float32
version; in float32 the activation and gate kernels serve training only (evaluation keeps torch's ops, to the
parity tolerance of the reference's float32 numbers).

No compiler, a failed build, or VEGA_CPU_KERNELS=0 in the environment: `dropout` and `activation_dropout` return
None, the model keeps torch's ops (same rate and scaling, a different random stream, slower) and training uses
torch's fused AdamW instead of ShadowAdam. The reason is printed once to stderr. The library is cached in
$VEGA_KERNEL_CACHE or ~/.cache/vega-kernels, keyed by the source, compiler and CPU.
"""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.c")
# -fno-trapping-math: no floating-point exceptions are ever read, so gcc may turn the kernels' conditional selects
# into vector blends; without it the activation and gate loops stayed scalar (no value changes either way)
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"] + \
    (["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else [])   # gcc's x86-only flag
_state = {"lib": None, "tried": False}


def cache_dir():
    return os.environ.get("VEGA_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vega-kernels")


def _cpu_key():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(compiler):
    with open(SOURCE, "rb") as f:
        source = f.read()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(source + " ".join(FLAGS + [version, _cpu_key()]).encode()).hexdigest()[:16]
    folder = cache_dir()
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:   # an unwritable home: a per-user folder in the temporary directory
        folder = os.path.join(tempfile.gettempdir(), f"vega-kernels-{os.getuid()}")
        os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"cpu_kernels-{key}.so")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            proc = subprocess.run([compiler, *FLAGS, SOURCE, "-o", tmp], capture_output=True, text=True, timeout=120)
            if proc.returncode:
                raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[-300:]}")
            os.replace(tmp, path)   # atomic: a concurrent process sees a whole library or none
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    # torch has loaded its libgomp.so.1 already, so the kernel's OpenMP shares torch's threads
    lib = ctypes.CDLL(path)
    ptr, tail = ctypes.c_void_p, [ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, ctypes.c_int]
    for fn in (lib.dropout_bf16, lib.dropout_f32):
        fn.argtypes, fn.restype = [ptr] * 2 + tail, None
    for t in ("bf16", "f32"):
        for fn, pointers in ((getattr(lib, f"act_dropout_{t}"), 2), (getattr(lib, f"act_dropout_backward_{t}"), 3)):
            fn.argtypes, fn.restype = [ptr] * pointers + [ctypes.c_int64, ctypes.c_int] + tail[1:], None
        for fn, pointers in ((getattr(lib, f"softmax_mix3_{t}"), 3), (getattr(lib, f"softmax_mix3_backward_{t}"), 5)):
            fn.argtypes, fn.restype = [ptr] * pointers + [ctypes.c_int64] * 2 + [ctypes.c_int], None
    lib.scatter_rows.argtypes = [ptr] * 3 + [ctypes.c_int64] * 2 + [ptr, ctypes.c_int64, ctypes.c_int]
    lib.scatter_rows.restype = None
    f32 = ctypes.c_float
    lib.adam_step.argtypes = [ctypes.c_int] + [ptr] * 9 + [f32] * 6 + [ctypes.c_int, ctypes.c_int]
    lib.adam_step.restype = None
    return lib


def kernel():
    """The loaded library, or None (reason printed once)."""
    if not _state["tried"]:
        _state["tried"] = True
        compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if os.environ.get("VEGA_CPU_KERNELS", "1") == "0":
            return None
        if compiler is None:
            print("note: no C compiler found; CPU dropout and gelu use torch's ops (slower)", file=sys.stderr)
            return None
        try:
            _state["lib"] = _build(compiler)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            print(f"note: CPU kernels unavailable ({e}); using torch's ops (slower)", file=sys.stderr)
    return _state["lib"]


# VEGA_DEBUG_NAN_FILL=1: the buffers the kernels are to write start as NaN, not as whatever the memory held, so a
# position left unwritten and read later turns into a NaN loss or gradient. A debugging aid (the MELD-like NaN repro's
# measurements used it); off by default, it costs a pass over every buffer.
DEBUG_NAN_FILL = os.environ.get("VEGA_DEBUG_NAN_FILL") == "1"


def empty(shape, like):
    """An uninitialised contiguous tensor of like's dtype and device (NaN-filled under DEBUG_NAN_FILL)."""
    y = like.new_empty(shape)
    return y.fill_(float("nan")) if DEBUG_NAN_FILL else y


def _mask_args(p):
    """(threshold, scale) of dropout rate p; p = 0 gives (0, 1): every element kept, unscaled."""
    return round(p * 65536), 1.0 / (1.0 - p)


def _suffix(x):
    return "bf16" if x.dtype == torch.bfloat16 else "f32"


def _seed():
    # one draw from torch's generator per mask: torch.manual_seed fixes every mask, and resuming restores them
    # 63 bits: a Python int that fits int64 (autograd's and the profiler's argument handling require it)
    return int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64))


def apply_mask(x, p, seed):
    """x (contiguous, float32 or bfloat16, CPU) -> new tensor: x_i / (1-p) or 0, the mask a function of (seed, i)."""
    y, lib = empty(x.shape, x), kernel()
    fn = lib.dropout_bf16 if x.dtype == torch.bfloat16 else lib.dropout_f32
    fn(x.data_ptr(), y.data_ptr(), x.numel(), seed, *_mask_args(p), torch.get_num_threads())
    return y


class DropoutFn(torch.autograd.Function):
    """Dropout whose backward recomputes the mask from the seed (nothing stored)."""

    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p, ctx.seed = p, seed
        return apply_mask(x.contiguous(), p, seed)

    @staticmethod
    def backward(ctx, grad):
        return apply_mask(grad.contiguous(), ctx.p, ctx.seed), None, None


KERNEL_ACTIVATIONS = {"gelu_tanh": 0, "gelu": 1, "elu": 2}   # the kernel's codes; gelu = the exact (erf) form


class ActDropoutFn(torch.autograd.Function):
    """dropout(f(z)) for bfloat16 or float32 z and f in KERNEL_ACTIVATIONS, one pass each way; saves z only."""

    @staticmethod
    def forward(ctx, z, act, p, seed):
        z = z.contiguous()
        y = empty(z.shape, z)
        getattr(kernel(), f"act_dropout_{_suffix(z)}")(z.data_ptr(), y.data_ptr(), z.numel(), act, seed,
                                                       *_mask_args(p), torch.get_num_threads())
        ctx.save_for_backward(z)
        ctx.act, ctx.p, ctx.seed = act, p, seed
        return y

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        grad = grad.contiguous()
        dz = empty(z.shape, z)
        getattr(kernel(), f"act_dropout_backward_{_suffix(z)}")(grad.data_ptr(), z.data_ptr(), dz.data_ptr(),
                                                                z.numel(), ctx.act, ctx.seed, *_mask_args(ctx.p),
                                                                torch.get_num_threads())
        return dz, None, None, None


# bench/step_ops.py sets this to count, on a CPU, the ops of the CUDA path (every CUDA choice of fast/ taken)
EMULATE_CUDA = False


def torch_ops(x):
    """Whether to take torch's own ops (CUDA's choices): on CUDA, when emulating it, and inside a torch.compile
    capture (fast/capture.py), which cannot trace the C kernels or the bf16 weight copies."""
    return x.is_cuda or EMULATE_CUDA or torch.compiler.is_compiling()


def _usable(x, dtypes):
    return x.device.type == "cpu" and not torch_ops(x) and x.dtype in dtypes and kernel() is not None


def dropout(x, p):
    """Training-mode dropout of x (0 < p < 1) through the kernel, or None when the kernel cannot take x."""
    if not _usable(x, (torch.float32, torch.bfloat16)):
        return None
    return DropoutFn.apply(x, p, _seed())


def activation_dropout(z, activation, p, training):
    """dropout(activation(z)) (p applied only when training) for CPU z, activation a key of KERNEL_ACTIVATIONS:
    bfloat16, or float32 in training with dropout; None when the kernel cannot take it or torch's op is faster
    (then the caller uses torch's)."""
    f32_training = training and p > 0 and z.dtype == torch.float32
    if activation not in KERNEL_ACTIVATIONS or not _usable(z, (torch.bfloat16, torch.float32)) \
            or not (z.dtype == torch.bfloat16 or f32_training):
        return None
    if activation == "gelu" and not training:   # no dropout to fuse: torch's own bf16 gelu is 2.5x faster
        return None
    p = p if training else 0.0
    return ActDropoutFn.apply(z, KERNEL_ACTIVATIONS[activation], p, _seed() if p > 0 else 0)


class SoftmaxMix3Fn(torch.autograd.Function):
    """sum_k softmax_k(l)[:, k] * s[:, k] for bfloat16 or float32 l, s (N, 3, H) -> (N, H): one pass each way."""

    @staticmethod
    def forward(ctx, logits, stacked):
        logits, stacked = logits.contiguous(), stacked.contiguous()
        N, _, H = stacked.shape
        y = empty((N, H), stacked)
        getattr(kernel(), f"softmax_mix3_{_suffix(stacked)}")(logits.data_ptr(), stacked.data_ptr(), y.data_ptr(),
                                                              N, H, torch.get_num_threads())
        ctx.save_for_backward(logits, stacked)
        return y

    @staticmethod
    def backward(ctx, grad):
        logits, stacked = ctx.saved_tensors
        grad = grad.contiguous()
        N, _, H = stacked.shape
        dl, ds = empty(logits.shape, logits), empty(stacked.shape, stacked)
        getattr(kernel(), f"softmax_mix3_backward_{_suffix(stacked)}")(
            grad.data_ptr(), logits.data_ptr(), stacked.data_ptr(), dl.data_ptr(), ds.data_ptr(), N, H,
            torch.get_num_threads())
        return dl, ds


def softmax_mix3(logits, stacked, training=False):
    """(softmax(logits, dim=1) * stacked).sum(1) for CPU (N, 3, H) tensors, bfloat16 or (in training) float32;
    else None."""
    if logits.shape != stacked.shape or stacked.dim() != 3 or stacked.shape[1] != 3 \
            or logits.dtype != stacked.dtype or not _usable(stacked, (torch.bfloat16, torch.float32)) \
            or not (stacked.dtype == torch.bfloat16 or training):
        return None
    return SoftmaxMix3Fn.apply(logits, stacked)


def _scatter_rows_into(out, x, index, zero_rows):
    kernel().scatter_rows(x.data_ptr(), index.data_ptr(), out.data_ptr(), x.shape[0], x.stride(0) * x.element_size(),
                          None if zero_rows is None else zero_rows.data_ptr(),
                          0 if zero_rows is None else zero_rows.numel(), torch.get_num_threads())
    return out


class ScatterRowsFn(torch.autograd.Function):
    """out (total, W): out[index] = x, out[zero_rows] = 0 (together they cover every row); backward: a gather."""

    @staticmethod
    def forward(ctx, x, index, zero_rows, total):
        ctx.save_for_backward(index)
        return _scatter_rows_into(empty((total, x.shape[1]), x), x.contiguous(), index, zero_rows)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None, None


def scatter_rows(x, index, zero_rows, total, out=None):
    """Rows x (R, W) into a new (total, W) tensor at rows `index` (int64, distinct), zeros at rows `zero_rows`;
    with `out` (no gradients), into out, whose other rows are left as they are. None when the kernel cannot."""
    if index.dtype != torch.int64 or not _usable(x, (torch.float32, torch.bfloat16)):
        return None
    if out is not None:
        return _scatter_rows_into(out, x.contiguous(), index.contiguous(), None)
    return ScatterRowsFn.apply(x, index.contiguous(), zero_rows.contiguous(), total)
