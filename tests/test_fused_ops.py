"""bf16 CPU products and kernels of the fast package: oneDNN's linear, the fused multimodal gate
(fast/cpu_kernels.py)."""
import os
import shutil

import pytest
import torch

from fast import accelerate, cpu_kernels, layers
from model import VEGA, MultimodalGate

needs_kernels = pytest.mark.skipif(os.environ.get("VEGA_CPU_KERNELS") == "0" or
                                   (shutil.which("gcc") is None and shutil.which("cc") is None),
                                   reason="the CPU kernels are switched off or cannot be built here")
BF16_STEP = 2 ** -7   # relative rounding step of bfloat16 (8 significant bits): results are rounded once


def close(actual, expected, atol=1e-30):
    """actual (bf16) within a rounding step of expected (float64), plus atol (a number or a tensor)."""
    assert actual.dtype == torch.bfloat16
    err = (actual.double() - expected).abs()
    bound = BF16_STEP * expected.abs() + atol
    assert (err <= bound).all(), f"{int((err > bound).sum())} elements off, worst {(err - bound).max().item():.3g}"


def extreme_inputs(*shape):
    torch.manual_seed(0)
    a = torch.randn(*shape) * 4
    a.view(-1)[:8] = torch.tensor([-100.0, -30.0, -1e-3, 0.0, 1e-3, 5.0, 30.0, 100.0])   # both tails, zero
    return a.bfloat16()


@needs_kernels
def test_softmax_mix3_kernel():
    logits, s = extreme_inputs(200, 3, 768), torch.randn(200, 3, 768).bfloat16()
    g = torch.randn(200, 768).bfloat16()
    l_ref, s_ref = logits.double().requires_grad_(), s.double().requires_grad_()
    y_ref = (torch.softmax(l_ref, dim=1) * s_ref).sum(1)
    y_ref.backward(g.double())
    l_k, s_k = logits.clone().requires_grad_(), s.clone().requires_grad_()
    y = cpu_kernels.softmax_mix3(l_k, s_k)
    # y is a weighted sum of terms of both signs: its error is relative to the terms, not to y
    close(y, y_ref.detach(), atol=1e-5 * s.double().abs().amax(1))
    y.backward(g)
    close(s_k.grad, s_ref.grad)
    scale = (g.double()[:, None] * s.double()).abs().amax(1, keepdim=True)   # dl_k = g w_k (s_k - y)
    close(l_k.grad, l_ref.grad, atol=1e-5 * scale)
    assert cpu_kernels.softmax_mix3(l_k[:, :2], s_k[:, :2]) is None        # three modalities only


@needs_kernels
def test_gate_takes_the_kernel_in_bf16_and_agrees_with_float32():
    torch.manual_seed(1)
    gate = accelerate(MultimodalGate(64))
    hs = [torch.randn(50, 64) for _ in range(3)]
    ref = gate(*hs)                                                            # float32: torch's ops
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gate(*[h.bfloat16() for h in hs])
    assert y.dtype == torch.bfloat16 and y.grad_fn.name() == "SoftmaxMix3FnBackward"
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)           # bf16 products and inputs


@needs_kernels
def test_float32_gate_kernel_in_training_only():
    """float32: the gate's one-pass kernel in training, to float32 accuracy (forward and gradients); torch's ops
    in evaluation, so evaluation keeps the reference's numbers exactly."""
    torch.manual_seed(8)
    logits, s = torch.randn(200, 3, 768) * 4, torch.randn(200, 3, 768)
    assert cpu_kernels.softmax_mix3(logits, s) is None                       # evaluation: torch's ops
    l_k, s_k = logits.clone().requires_grad_(), s.clone().requires_grad_()
    y = cpu_kernels.softmax_mix3(l_k, s_k, training=True)
    l64, s64 = logits.double().requires_grad_(), s.double().requires_grad_()
    ref = (torch.softmax(l64, dim=1) * s64).sum(1)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    g = torch.randn(200, 768)
    y.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(s_k.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)
    # dl_k = g w_k (s_k - y): s_k - y cancels, so its error is relative to the terms, as torch's float32 is
    scale = (g.double()[:, None] * s64.detach()).abs().amax(1, keepdim=True)
    err = (l_k.grad.double() - l64.grad).abs()
    assert (err <= 1e-5 * l64.grad.abs() + 1e-6 * scale).all()
    gate = accelerate(MultimodalGate(64))
    hs = [torch.randn(50, 64) for _ in range(3)]
    assert gate.train()(*hs).grad_fn.name() == "SoftmaxMix3FnBackward"
    assert gate.eval()(*hs).grad_fn.name() != "SoftmaxMix3FnBackward"


@pytest.mark.skipif(not layers.ONEDNN_LINEAR, reason="this torch build has no oneDNN linear")
def test_bf16_linear_is_addmm_without_the_bias_copy():
    torch.manual_seed(2)
    x, w, b = torch.randn(333, 768), torch.randn(512, 768), torch.randn(512)
    expected = torch.nn.functional.linear(x.bfloat16(), w.bfloat16(), b.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layers.linear(x, w, b)                               # autocast's casts, then oneDNN's linear
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)
    assert torch.equal(layers.linear(x, w, b), torch.nn.functional.linear(x, w, b))   # float32: aten's own


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_rows_kernel(dtype):
    torch.manual_seed(3)
    total, width = 50, 24
    index = torch.randperm(total)[:30]
    uncovered = torch.tensor(sorted(set(range(total)) - set(index.tolist())))
    x = torch.randn(30, width).to(dtype).requires_grad_()
    out = cpu_kernels.scatter_rows(x, index, uncovered, total)
    expected = torch.zeros(total, width, dtype=dtype).index_copy_(0, index, x.detach())
    assert torch.equal(out, expected)                               # every row written: copied rows and zeros
    g = torch.randn(total, width).to(dtype)
    out.backward(g)
    assert torch.equal(x.grad, g[index])
    scratch = torch.full((total, width), 7.0, dtype=dtype)
    with torch.no_grad():
        cpu_kernels.scatter_rows(x, index, None, total, out=scratch)   # into a buffer: other rows untouched
    assert torch.equal(scratch[index], x.detach()) and (scratch[uncovered] == 7).all()


def nan_filled_training_step(amp):
    """One training forward and backward of a small model through every kernel (dropout, activation + dropout,
    the gate, the row scatter) with the kernels' buffers NaN-filled; its outputs and gradients."""
    from dataloader import Batch
    from vega_utils.runs.config import load_preset, resolve
    cfg = resolve(load_preset("IEMOCAP").replace(hidden_dim=64, n_head=4, clip_dim=16))
    torch.manual_seed(0)
    net = accelerate(VEGA(cfg)).train()
    lengths = [110, 9, 100, 20, 8, 57]   # several grids, spare rows, padding positions in the grids
    pad = torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]
    feats = {k: torch.randn(len(lengths), max(lengths), d) * (~pad)[..., None]
             for k, d in (("text", cfg.text_dim), ("audio", cfg.audio_dim), ("visual", cfg.visual_dim))}
    speakers = torch.where(pad, cfg.n_speakers, torch.randint(0, cfg.n_speakers, pad.shape))
    batch = Batch(**feats, speakers=speakers, pad_mask=pad, labels=torch.where(pad, -1, 0),
                  dialogue_ids=list(range(len(lengths))))
    anchors = torch.nn.functional.normalize(torch.randn(cfg.n_classes, cfg.clip_dim), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = net(batch, anchors)
    valid = ~pad
    outputs = [out[k][valid].float() for k in out if k.endswith("_logit")]
    sum(o.square().mean() for o in outputs).backward()
    return outputs, [p.grad for p in net.parameters() if p.grad is not None]


@needs_kernels
@pytest.mark.parametrize("amp", [True, False])
def test_kernels_write_every_position_they_read(monkeypatch, amp):
    """Under DEBUG_NAN_FILL the kernels' buffers start as NaN: a step that ends finite read no unwritten memory."""
    monkeypatch.setattr(cpu_kernels, "DEBUG_NAN_FILL", True)
    assert torch.isnan(cpu_kernels.empty((2, 3), torch.zeros(1, dtype=torch.bfloat16))).all()
    outputs, grads = nan_filled_training_step(amp)
    assert len(grads) > 100
    assert all(torch.isfinite(t).all() for t in outputs + grads)

    # the check can fail: a scatter that leaves the grids' padding positions unwritten shows up
    real = cpu_kernels._scatter_rows_into
    monkeypatch.setattr(cpu_kernels, "_scatter_rows_into", lambda out, x, index, zero: real(out, x, index, None))
    outputs, grads = nan_filled_training_step(amp)
    assert not all(torch.isfinite(t).all() for t in outputs + grads)
