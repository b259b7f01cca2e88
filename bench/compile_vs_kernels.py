"""torch.compile against the hand-written C kernels (fast/cpu_kernels.c), forward + backward, on the CPU.

    python bench/compile_vs_kernels.py                    # bf16; a few minutes: each function is compiled first
    python bench/compile_vs_kernels.py --dtype float32 --no_compile    # the float32 kernels against eager torch

The question here: whether a well-kept compiler can replace our own kernels. Each kernel is timed against the same
computation in eager torch and under torch.compile (inductor, the default mode), on the shapes of a default
IEMOCAP training step: rows (2048, 768) for dropout and activation + dropout, (2048, 3, 768) for the gate.
Not a test: it prints a table; bench/README.md has the figures.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fast import cpu_kernels  # noqa: E402

ROWS, H, P = 2048, 768, 0.1


def gelu_dropout(x):
    return F.dropout(F.gelu(x, approximate="tanh"), P, True)


def dropout(x):
    return F.dropout(x, P, True)


def gate(logits, stacked):
    return (torch.softmax(logits, dim=1) * stacked).sum(1)


CASES = {   # name: (eager function, the kernel's function, input shapes)
    "dropout": (dropout, lambda x: cpu_kernels.dropout(x, P), [(ROWS, H)]),
    "gelu_tanh + dropout": (gelu_dropout, lambda x: cpu_kernels.activation_dropout(x, "gelu_tanh", P, True),
                            [(ROWS, H)]),
    "gate softmax-mix": (gate, lambda logits, stacked: cpu_kernels.softmax_mix3(logits, stacked, training=True),
                         [(ROWS, 3, H), (ROWS, 3, H)]),
}


def fwd_bwd_ms(fn, shapes, dtype, reps=30):
    inputs = [torch.randn(*s, dtype=dtype, requires_grad=True) for s in shapes]
    grad = None

    def once():
        nonlocal grad
        y = fn(*inputs)
        grad = torch.ones_like(y) if grad is None else grad
        y.backward(grad)
    for _ in range(5):
        once()
    start = time.perf_counter()
    for _ in range(reps):
        once()
    return (time.perf_counter() - start) / reps * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--no_compile", dest="compile", action="store_false", help="eager torch and the kernels only")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if cpu_kernels.kernel() is None:
        raise SystemExit("the C kernels are not available here (no compiler, or VEGA_CPU_KERNELS=0)")
    from vega_utils.cpu import native_bf16
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {native_bf16()[1]}; forward + backward, "
          f"{args.dtype}, ms (mean of 30 after 5 warm-ups)\n")
    print("| computation | eager torch | torch.compile | C kernel | compile time | eager / kernel |")
    print("|---|---|---|---|---|---|")
    for name, (eager, kernel, shapes) in CASES.items():
        compiled_ms, compile_s = "-", "-"
        if args.compile:
            t0 = time.perf_counter()
            compiled = torch.compile(eager)
            fwd_bwd_ms(compiled, shapes, dtype, reps=1)   # includes the compilation
            compile_s = f"{time.perf_counter() - t0:.0f} s"
            compiled_ms = f"{fwd_bwd_ms(compiled, shapes, dtype):.2f}"
        eager_ms, kernel_ms = fwd_bwd_ms(eager, shapes, dtype), fwd_bwd_ms(kernel, shapes, dtype)
        print(f"| {name} | {eager_ms:.2f} | {compiled_ms} | {kernel_ms:.2f} | {compile_s} | "
              f"{eager_ms / kernel_ms:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
