"""fast/shadow_weights.py: the optimizer's bf16 weight copies and its Adam/AdamW step."""
import os
import shutil

import pytest
import torch
import torch.nn as nn

import main
from fast import cpu_kernels
from fast.layers import FastLinear as Linear
from fast.shadow_weights import ShadowAdam, product_weight
from vega_utils.runs.config import load_preset, resolve

pytestmark = pytest.mark.skipif(os.environ.get("VEGA_CPU_KERNELS") == "0" or
                                (shutil.which("gcc") is None and shutil.which("cc") is None),
                                reason="no C compiler (or VEGA_CPU_KERNELS=0): no CPU kernels here")


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv1d(12, 16, kernel_size=1, bias=False)
        self.fc = Linear(16, 8)
        self.norm = nn.LayerNorm(8)


def shadowed(seed):
    """A TwoLayers model whose optimizer keeps bf16 copies, and an input for it."""
    torch.manual_seed(seed)
    model = TwoLayers()
    return model, ShadowAdam(model, lr=1e-2, weight_decay=0.0, decoupled=True), torch.randn(5, 16)


def close(a, b, rtol=1e-6):
    return (a - b).abs().max() <= rtol * b.abs().max()


@pytest.mark.parametrize("decoupled", [True, False])
def test_step_matches_torch_fused_adam(decoupled):
    """float32 gradients (no copies involved): the update of torch's fused AdamW/Adam, step after step."""
    torch.manual_seed(0)
    ours, ref = TwoLayers(), TwoLayers()
    ref.load_state_dict(ours.state_dict())
    opt = ShadowAdam(ours, lr=1e-2, weight_decay=0.05, decoupled=decoupled)
    ref_opt = (torch.optim.AdamW if decoupled else torch.optim.Adam)(ref.parameters(), lr=1e-2, weight_decay=0.05,
                                                                     fused=True)
    for step in range(5):
        grads = [torch.randn_like(p) * 10 ** step for p in ours.parameters()]
        for model, optimizer in ((ours, opt), (ref, ref_opt)):
            optimizer.zero_grad()
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            assert close(p, q), (step, name)
            assert close(opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"]), (step, name)
    for p in ours.parameters():   # torch's state layout: resumable by torch's optimizers and back
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"} and float(opt.state[p]["step"]) == 5
    ref_opt.load_state_dict(opt.state_dict())


def test_bf16_products_use_the_copy_and_its_gradient():
    model, opt, x = shadowed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = product_weight(model.fc, x)
        assert w is model.fc.shadow.tensor and w.dtype == torch.bfloat16
        assert torch.equal(w, model.fc.weight.detach().bfloat16())          # autocast's rounding of the weight
        assert product_weight(model.proj, x).shape == (16, 12)              # the conv weight as a matrix
        y = model.fc(x)
    assert product_weight(model.fc, x) is model.fc.weight                   # float32 products: the weight itself
    y.float().square().sum().backward()
    assert model.fc.weight.grad is None and model.fc.shadow.tensor.grad.dtype == torch.bfloat16
    assert model.fc.bias.grad.dtype == torch.float32
    before = model.fc.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.fc.weight, before)
    assert torch.equal(model.fc.shadow.tensor, model.fc.weight.detach().bfloat16())   # written by the step
    opt.zero_grad()
    assert model.fc.shadow.tensor.grad is None


def test_copy_follows_a_loaded_weight():
    model, _, x = shadowed(2)
    other = TwoLayers()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        product_weight(model.fc, x)
        model.load_state_dict(other.state_dict())
        assert torch.equal(product_weight(model.fc, x), other.fc.weight.detach().bfloat16())
        with torch.no_grad():
            model.fc.weight.mul_(2)
        assert torch.equal(product_weight(model.fc, x), (2 * other.fc.weight.detach()).bfloat16())


def test_training_in_bf16_on_the_cpu_uses_it():
    cfg = resolve(load_preset("IEMOCAP").replace(hidden_dim=32, n_head=4, clip_dim=16))
    model = main.build_model(cfg)
    opt = main.build_optimizer(cfg, model, torch.bfloat16, torch.device("cpu"))
    assert isinstance(opt, ShadowAdam) and opt.decoupled
    assert len(opt.shadows) == sum(isinstance(m, (nn.Linear, nn.Conv1d)) for m in model.modules())
    assert isinstance(main.build_optimizer(cfg, main.build_model(cfg), None, torch.device("cpu")), torch.optim.AdamW)
    assert cpu_kernels.kernel() is not None


def test_a_weight_without_gradient_keeps_its_refresh():
    """A step that skips a weight (no gradient) must not mark its copy current after an outside change."""
    model, opt, x = shadowed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        product_weight(model.fc, x)
        with torch.no_grad():
            model.fc.weight.add_(1.0)
        model.norm.weight.grad = torch.ones(8)   # only the norm has a gradient this step
        opt.step()
        assert torch.equal(product_weight(model.fc, x), model.fc.weight.detach().bfloat16())
