"""model.distill_kl when the teacher is confident enough that its softmax underflows to exact zeros (a default bf16
MELD run died of it at epoch 60: NaN gradients from a finite loss)."""
import math

import pytest
import torch
import torch.nn.functional as F

import main
import train
from dataloader import load_dialogues, make_loaders
from model import compute_losses, distill_kl, pick_anchors
from vega_utils.data.datasets import dataset_info
from vega_utils.data.synthetic import make_synthetic_anchor_cache, make_synthetic_dataset
from vega_utils.runs import step_guard
from vega_utils.runs.config import load_preset, resolve


def spec_kl(student, teacher, temperature):
    """The spec's formula, as F.kl_div(log q, p) computes it, in float64."""
    log_q = F.log_softmax(student.double() / temperature, dim=-1)
    p = F.softmax(teacher.double() / temperature, dim=-1)
    return F.kl_div(log_q, p, reduction="none").mean() * temperature * temperature


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_gradients_are_finite_where_the_teacher_probability_is_zero():
    # the measured case: teacher logits up to 57.5, T = exp(t_cls_temp) = 0.63 -> gaps of 121 T; p underflows
    torch.manual_seed(0)
    teacher = (torch.randn(6, 7) * 3).index_put_((torch.tensor([2]), torch.tensor([4])), torch.tensor(57.5))
    teacher[2, 1] = -19.4
    student = torch.randn(6, 7) * 5
    log_temp = torch.tensor(math.log(0.6325), requires_grad=True)
    teacher.requires_grad_()
    student.requires_grad_()
    assert (F.softmax(teacher / log_temp.exp(), -1) == 0).any()   # the state the run reached
    with torch.autograd.detect_anomaly(check_nan=True):   # no NaN anywhere in the backward, not even masked
        loss = distill_kl(student, teacher, log_temp.exp())
        loss.backward()
    for name, t in (("student", student), ("teacher", teacher), ("temperature", log_temp)):
        assert torch.isfinite(t.grad).all(), name
    # and they are the right ones: float64 (where nothing underflows) gives the same
    ref = [x.detach().double().requires_grad_() for x in (student, teacher, log_temp)]
    expected = spec_kl(ref[0], ref[1], ref[2].exp())
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-6 * expected.item()
    for got, want in zip((student.grad, teacher.grad, log_temp.grad), (r.grad for r in ref)):
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_value_and_gradient_are_the_spec_formula():
    torch.manual_seed(1)
    student, teacher = torch.randn(40, 7) * 4, torch.randn(40, 7) * 4
    temperature = torch.tensor(1.7)
    ours = [x.clone().requires_grad_() for x in (student, teacher)]
    loss = distill_kl(*ours, temperature)
    loss.backward()
    kl_div = F.kl_div(F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1),
                      reduction="none").mean() * temperature * temperature
    assert torch.equal(loss.detach(), kl_div)   # float32: the very value kl_div computes (the parity tests' 1e-5)
    ref = [x.double().requires_grad_() for x in (student, teacher)]
    expected = spec_kl(*ref, temperature.double())
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-6 * expected.item()
    for got, want in zip(ours, ref):
        assert (got.grad.double() - want.grad).abs().max() <= 1e-6 * want.grad.abs().max()


@pytest.mark.parametrize("amp", ["off", "bf16"])   # bf16: the C kernel path when it is built
def test_confident_model_trains_on(tmp_path, amp):
    """The whole model in the state the run reached: a fused head confident enough that softmax(all/T) has
    exact zeros. Every gradient of the step must be finite (it was NaN, from a finite loss)."""
    make_synthetic_dataset(tmp_path / "IEMOCAP.pkl", n_train=6, n_test=3, max_len=10, signal=2.5, seed=7)
    make_synthetic_anchor_cache(tmp_path / "anchor.pt", clip_dim=512, seed=7)
    cfg = resolve(load_preset("IEMOCAP").replace(
        data_path=str(tmp_path / "IEMOCAP.pkl"), anchor_path=str(tmp_path / "anchor.pt"), output_dir=str(tmp_path),
        hidden_dim=32, n_head=4, clip_dim=512, batch_size=3, amp=amp))
    device = torch.device("cpu")
    amp_dtype = train.resolve_amp(cfg.amp, device)
    bank, cfg = main.load_anchors(cfg)
    batch = next(iter(make_loaders(load_dialogues(cfg.data_path, cfg.Dataset), cfg)["train"]))
    torch.manual_seed(0)
    model = main.build_model(cfg)
    optimizer = main.build_optimizer(cfg, model, amp_dtype, device)
    with torch.no_grad():   # class 0 by ~240 logits: over 104 T (T = 2 at the start) in every utterance
        model.all_output_layer[-1].bias.copy_(torch.tensor([120.0, -120, 0, 0, 0, 0])[:cfg.n_classes])
    model.train()
    with train.autocast(device, amp_dtype):
        out = model(batch, pick_anchors(bank, training=False, rand=0.0))
    teacher = out["all_logit"][~batch.pad_mask].float()
    assert (F.softmax(teacher / out["t_cls_temp"], -1) == 0).any()
    losses = compute_losses(out, batch, cfg, torch.tensor(dataset_info(cfg.Dataset).class_weights))
    assert torch.isfinite(losses["total"])
    losses["total"].backward()
    grads = step_guard.gradients(optimizer)
    assert len(grads) > 100 and step_guard.all_finite(grads)
