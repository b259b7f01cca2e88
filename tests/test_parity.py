"""The reference's own numbers (tests/fixtures): outputs, losses and gradients, docs/method.md, section 5."""
import copy
import json

import pytest
import torch
from conftest import reference_file, rel_err

from dataloader import batch_from_reference
from fast import accelerate, is_accelerated
from model import VEGA, compute_losses, pick_anchors
from vega_utils.anchors.bank import AnchorBank
from vega_utils.data.datasets import dataset_info
from vega_utils.runs.checkpoint import backbone_state_dict, is_backbone_key
from vega_utils.runs.config import Config, load_preset, resolve

OUT_TOL, LOSS_TOL, GRAD_TOL, TINY_NORM, TINY_ABS = 1e-6, 1e-5, 1e-4, 1e-5, 1e-6


def fixture_setup(name):
    fx = torch.load(reference_file(f"parity_{name}.pt"), weights_only=False)
    ref_cfg = fx["config"]
    cfg = load_preset(ref_cfg["Dataset"]).replace(
        **{k: v for k, v in ref_cfg.items() if k in Config.__dataclass_fields__})
    info = dataset_info(cfg.Dataset)
    model = VEGA(cfg)
    model.load_state_dict(fx["state_dict"], strict=True)
    model.eval()
    batch = batch_from_reference(fx["batch"], cfg.n_speakers)
    anchors = pick_anchors(AnchorBank.from_reference_dict(fx["anchor_dict"], info.class_names), training=False,
                           rand=cfg.rand)
    return fx, cfg, model, batch, anchors, torch.tensor(info.class_weights)


@pytest.fixture(scope="module", params=["iemocap", "meld"])
def fixture(request):
    return fixture_setup(request.param)


@pytest.mark.parametrize("kind", ["plain", "fast"])
def test_outputs_losses_grads_match_reference(fixture, kind):
    """model.py's plain VEGA, and the same weights with the fast package's modules swapped in."""
    fx, cfg, model, *rest = fixture
    check_against_reference(fx, cfg, accelerate(copy.deepcopy(model)) if kind == "fast" else model, *rest)


def check_against_reference(fx, cfg, model, batch, anchors, weights):
    """Outputs, losses and gradients of `model` (plain or accelerated, on any device, float32) against the
    reference's, docs/method.md, section 5."""
    packed = is_accelerated(model)
    model.zero_grad()
    out = model(batch, anchors)
    losses = compute_losses(out, batch, cfg, weights)
    losses["total"].backward()

    valid = ~batch.pad_mask.cpu()
    for key, ref in fx["outputs"].items():
        if ref is None:       # fusion_logit / fusion_prob: always None in the reference
            continue
        ours = out[key].cpu()
        if packed and ref.dim() >= 2:
            # The packed path computes valid utterances only; padding rows are zero by design.
            ours, ref = ours[valid], ref[valid]
            assert torch.count_nonzero(out[key].cpu()[~valid]) == 0
        assert ours.shape == ref.shape, key
        assert rel_err(ours, ref) < OUT_TOL, (key, rel_err(ours, ref))

    assert set(losses) == set(fx["losses"])
    for key, ref in fx["losses"].items():
        assert rel_err(losses[key].cpu(), ref) < LOSS_TOL, (key, rel_err(losses[key].cpu(), ref))

    params = dict(model.named_parameters())
    with_grad = {k for k, p in params.items() if p.grad is not None}
    assert with_grad == set(fx["grads"]), with_grad ^ set(fx["grads"])
    for key, ref in fx["grads"].items():
        ours = params[key].grad.cpu()
        if ref.norm() < TINY_NORM:   # key biases (true gradient 0) and classifier temperatures
            assert (ours - ref).abs().max() < TINY_ABS, key
        else:
            assert rel_err(ours, ref) < GRAD_TOL, (key, rel_err(ours, ref))


def test_a_broken_loss_is_caught(fixture):
    """The comparison can fail: detaching the KL teacher (a plausible mistake) changes the gradients."""
    fx, cfg, model, batch, anchors, weights = fixture
    model.zero_grad()
    out = model(batch, anchors)
    out["all_logit"] = out["all_logit"].detach()
    compute_losses(out, batch, cfg, weights)["total"].backward()
    errs = [rel_err(p.grad, fx["grads"][k]) for k, p in model.named_parameters()
            if p.grad is not None and fx["grads"][k].norm() >= TINY_NORM]
    assert max(errs) > GRAD_TOL


def test_state_dict_names_and_shapes_match_manifest():
    manifest = json.load(open(reference_file("state_dict_manifest.json")))
    assert len(manifest) == 4
    for key, entry in manifest.items():
        dataset, clip_model = key.split("|")
        cfg = resolve(load_preset(dataset).replace(CLIP_Model=clip_model))
        model = VEGA(cfg)
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert shapes == entry["all"], key
        assert sorted(k for k in shapes if is_backbone_key(k)) == sorted(entry["checkpoint_keys"]), key
        assert set(backbone_state_dict(model)) == set(entry["checkpoint_keys"])
        assert accelerate(model).state_dict().keys() == model.state_dict().keys()
