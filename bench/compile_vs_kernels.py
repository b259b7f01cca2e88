"""torch.compile against the hand-written C kernels (fast/cpu_kernels.c), forward + backward, bf16 on the CPU.

    python bench/compile_vs_kernels.py            # a few minutes: each compiled function is compiled first

The question here: whether a well-kept compiler can replace our own kernels. Each kernel is timed against the same
computation in eager torch and under torch.compile (inductor, the default mode), on the shapes of a default
IEMOCAP training step: rows (2048, 768) for dropout and activation + dropout, (2048, 3, 768) for the gate.
Not a test: it prints a table; bench/README.md has the figures.
"""
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
    "gate softmax-mix": (gate, cpu_kernels.softmax_mix3, [(ROWS, 3, H), (ROWS, 3, H)]),
}


def fwd_bwd_ms(fn, shapes, reps=30):
    inputs = [torch.randn(*s, dtype=torch.bfloat16, requires_grad=True) for s in shapes]
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
    torch.manual_seed(0)
    if cpu_kernels.kernel() is None:
        raise SystemExit("the C kernels are not available here (no compiler, or VEGA_CPU_KERNELS=0)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward + backward, bf16, ms (mean of 30 "
          f"after 5 warm-ups)\n")
    print("| computation | eager torch | torch.compile | C kernel | compile time |")
    print("|---|---|---|---|---|")
    for name, (eager, kernel, shapes) in CASES.items():
        t0 = time.perf_counter()
        compiled = torch.compile(eager)
        first = fwd_bwd_ms(compiled, shapes, reps=1)   # includes the compilation
        compile_s = time.perf_counter() - t0
        print(f"| {name} | {fwd_bwd_ms(eager, shapes):.2f} | {fwd_bwd_ms(compiled, shapes):.2f} | "
              f"{fwd_bwd_ms(kernel, shapes):.2f} | {compile_s:.0f} s |", flush=True)
        del first


if __name__ == "__main__":
    main()
