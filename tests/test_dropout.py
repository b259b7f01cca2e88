"""The CPU kernels (fast/cpu_kernels.py): dropout and gelu_tanh + dropout, and the torch-only fallback."""
import os
import shutil

import pytest
import torch

from fast import cpu_kernels
from fast.layers import FastDropout as Dropout

P = 0.53


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    if request.param == "kernel":
        if os.environ.get("VEGA_CPU_KERNELS") == "0":
            pytest.skip("VEGA_CPU_KERNELS=0: the kernels are switched off")
        if shutil.which("gcc") is None and shutil.which("cc") is None:
            pytest.skip("no C compiler: the kernel cannot be built here")
        assert cpu_kernels.kernel() is not None, "a compiler exists, so the kernel must build"
    else:
        monkeypatch.setitem(cpu_kernels._state, "tried", True)
        monkeypatch.setitem(cpu_kernels._state, "lib", None)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rate_scale_and_freshness(path, dtype):
    torch.manual_seed(0)
    drop = Dropout(P).train()
    x = torch.randn(1000, 1001).to(dtype)                       # odd size: the kernel's partial last word
    y = drop(x)
    zero_rate = ((y == 0) & (x != 0)).float().mean().item()
    assert abs(zero_rate - P) < 2e-3                            # 1e6 draws: std of the rate is 5e-4
    kept = y != 0
    expected = (x[kept].float() * (1 / (1 - P))).to(dtype) if path == "kernel" else y[kept]
    assert torch.equal(y[kept], expected)                       # the kernel rounds x/(1-p) once
    if dtype == torch.float32:
        assert torch.allclose(y[kept], x[kept] / (1 - P), rtol=1e-6)
    assert not torch.equal(y, drop(x))
    ones = torch.ones(1000, 1000, dtype=dtype)
    assert abs(drop(ones).float().mean().item() - 1) < 5e-3    # unbiased, as nn.Dropout
    assert torch.equal(drop.eval()(x), x)


def test_kernel_decisions_are_independent(path):
    """Neighbours share a 64-bit draw in the kernel: their joint drop rate must still be p^2."""
    torch.manual_seed(1)
    y = Dropout(P).train()(torch.ones(4 * 250000))
    dropped = (y == 0).view(-1, 4).float()                      # the four lanes of one random word
    for a, b in [(0, 1), (1, 2), (2, 3), (0, 3)]:
        assert abs((dropped[:, a] * dropped[:, b]).mean().item() - P * P) < 4e-3
    assert abs((dropped[1:, 0] * dropped[:-1, 0]).mean().item() - P * P) < 4e-3   # consecutive words


def test_kernel_backward_reuses_the_mask(path):
    torch.manual_seed(2)
    drop = Dropout(P).train()
    x = torch.randn(64, 300, requires_grad=True)
    y = drop(x)
    y.backward(torch.full_like(y, 3.0))
    assert torch.equal(x.grad != 0, y != 0)                     # the same mask
    assert torch.allclose(x.grad[y != 0], torch.tensor(3.0 / (1 - P)), rtol=1e-6, atol=0)


def test_kernel_is_seeded_by_torch_and_thread_independent(path):
    if path != "kernel":
        pytest.skip("the thread-independence is the kernel's")
    drop = Dropout(P).train()
    x = torch.randn(300, 700).t()                               # non-contiguous input
    torch.manual_seed(3)
    a = drop(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(3)
        b = drop(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)
    assert all(0 <= cpu_kernels._seed() < 2 ** 63 for _ in range(100))   # int64-sized for autograd and profiler
    kept = a != 0
    assert torch.allclose(a[kept], x[kept] / (1 - P), rtol=1e-6)


def test_fallback_when_the_build_fails(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(cpu_kernels._state, "tried", False)
    monkeypatch.setitem(cpu_kernels._state, "lib", None)
    monkeypatch.delenv("VEGA_CPU_KERNELS", raising=False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("VEGA_KERNEL_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    y = Dropout(P).train()(torch.ones(1000, 1000))
    assert abs((y == 0).float().mean().item() - P) < 2e-3
    assert "using torch's ops" in capsys.readouterr().err


ACTIVATION_REFS = {"gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
                   "gelu": torch.nn.functional.gelu, "elu": torch.nn.functional.elu}


def activation_inputs(path, seed):
    """(512, 768) float32 inputs with both tails, zero and small values in the first row (the kernel's path only)."""
    if path != "kernel":
        pytest.skip("the fused activation is the kernel's")
    torch.manual_seed(seed)
    z = torch.randn(512, 768) * 3
    z[0, :8] = torch.tensor([-100.0, -10.0, -1e-3, 0.0, 1e-3, 0.1, 10.0, 100.0])
    return z


@pytest.mark.parametrize("activation", sorted(ACTIVATION_REFS))
def test_activation_dropout_kernel_matches_torch(path, activation):
    f = ACTIVATION_REFS[activation]
    z = activation_inputs(path, 4).bfloat16()
    ref = f(z.float())                                          # float32 activation of the same bf16 inputs
    y = cpu_kernels.activation_dropout(z, activation, 0.0, training=True)    # rate 0: the activation alone
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), ref, rtol=2 ** -7, atol=1e-6)   # within bf16 rounding of the exact value
    assert torch.equal(y[0, 3:8].float(), f(z[0, 3:8]).float())   # zero, small and large inputs: torch's bf16
    assert torch.allclose(y[0, :2].float(), ref[0, :2], rtol=2 ** -7, atol=1e-20)   # far negative tail

    torch.manual_seed(5)                                         # the mask plain dropout draws with this seed
    kept = Dropout(0.3).train()(torch.ones(512, 768, dtype=torch.bfloat16)) != 0
    assert abs(1 - kept.float().mean().item() - 0.3) < 5e-3
    zg = z.clone().requires_grad_()
    torch.manual_seed(5)
    y = cpu_kernels.activation_dropout(zg, activation, 0.3, training=True)
    assert not y[~kept].any()                                   # the same mask
    assert torch.allclose(y[kept].float(), ref[kept] / 0.7, rtol=2 ** -7, atol=1e-6)
    y.backward(torch.ones_like(y))
    z_ref = z.float().requires_grad_()
    f(z_ref).backward(torch.ones_like(z_ref))
    expected = torch.where(kept, z_ref.grad / 0.7, torch.zeros_like(z_ref.grad))
    assert torch.allclose(zg.grad.float(), expected, rtol=2 ** -7, atol=1e-5)
    assert cpu_kernels.activation_dropout(z, "silu", 0.3, training=True) is None   # not a kernel activation
    evaluation = cpu_kernels.activation_dropout(z, activation, 0.3, training=False)
    if activation == "gelu":
        assert evaluation is None                                # torch's gelu is faster without a dropout
    else:
        assert torch.equal(evaluation, cpu_kernels.activation_dropout(z, activation, 0.0, training=True))


@pytest.mark.parametrize("activation", sorted(ACTIVATION_REFS))
def test_float32_activation_dropout_kernel_in_training_only(path, activation):
    """float32: the fused pass in training with dropout, to float32 accuracy of torch's activation and its
    gradient; without dropout (evaluation, or rate 0) torch's own ops, so evaluation keeps the reference's numbers."""
    f = ACTIVATION_REFS[activation]
    z = activation_inputs(path, 6)
    assert cpu_kernels.activation_dropout(z, activation, 0.3, training=False) is None
    assert cpu_kernels.activation_dropout(z, activation, 0.0, training=True) is None
    torch.manual_seed(7)
    kept = Dropout(0.3).train()(torch.ones(512, 768)) != 0
    zg = z.clone().requires_grad_()
    torch.manual_seed(7)
    y = cpu_kernels.activation_dropout(zg, activation, 0.3, training=True)
    assert y.dtype == torch.float32 and y.grad_fn.name() == "ActDropoutFnBackward"
    z64 = z.double().requires_grad_()
    ref = torch.where(kept, f(z64) / 0.7, torch.zeros_like(z64))
    assert not y[~kept].any()                                   # the same mask as plain dropout
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)
    g = torch.randn(512, 768)
    y.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(zg.grad.double(), z64.grad, rtol=1e-5, atol=1e-6)
