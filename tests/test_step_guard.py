"""vega_utils/runs/step_guard.py:
a step with a non-finite loss or gradient is skipped, counted, and ends the run only when
--max_bad_steps of them come in a row."""
import copy
import json
import os
import random

import pytest
import torch
from conftest import synthetic_files

import main
import train
from dataloader import load_dialogues, make_loaders
from fast.shadow_weights import ShadowAdam
from vega_utils.common import VegaError
from vega_utils.data.datasets import dataset_info
from vega_utils.runs import step_guard
from vega_utils.runs.config import load_preset, resolve

SMALL = dict(hidden_dim=32, n_head=4, lr=3e-3, dropout=0.1, outlayer_drop=0.1, clip_dim=512, batch_size=3)
kernels_off = os.environ.get("VEGA_CPU_KERNELS") == "0"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return synthetic_files(tmp_path_factory.mktemp("guard"),
                           {"IEMOCAP.pkl": dict(n_train=24, n_test=6, max_len=12, signal=2.5)}, seed=5, anchor_seed=5)


def small_cfg(files, out, **kw):
    return resolve(load_preset("IEMOCAP").replace(data_path=str(files / "IEMOCAP.pkl"),
                                                  anchor_path=str(files / "anchor.pt"), output_dir=str(out),
                                                  **{**SMALL, **kw}))


def setup(files, tmp_path, amp):
    """What train_run builds, for calling train_epoch directly: (model, optimizer, batches, epoch arguments)."""
    torch.manual_seed(0)
    cfg = small_cfg(files, tmp_path, amp=amp)
    device = torch.device("cpu")
    amp_dtype = train.resolve_amp(cfg.amp, device)
    bank, cfg = main.load_anchors(cfg)
    batches = list(make_loaders(load_dialogues(cfg.data_path, cfg.Dataset), cfg)["train"])[:2]
    model = main.build_model(cfg)
    optimizer = main.build_optimizer(cfg, model, amp_dtype, device)
    weights = torch.tensor(dataset_info(cfg.Dataset).class_weights)
    return model, optimizer, batches, (cfg, bank, weights, device, amp_dtype)


def snapshot(model, optimizer):
    copies = {n: s.tensor.detach().clone() for n, s in getattr(optimizer, "shadows", {}).items()}
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), copies


def identical(a, b):
    """Bit-identical nested state (tensors compared bit for bit, NaN included)."""
    if torch.is_tensor(a):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                         b.view(-1).view(torch.uint8))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b


def target(model, optimizer, where):
    """The tensor whose gradient gets the inf: a float32 gradient, or a bf16 copy's (ShadowAdam's products)."""
    if where == "embedding":
        return model.speaker_embeddings.weight
    return optimizer.shadows[model.t_t.transformer_inter[0].feed_forward.w_1.weight].tensor


CASES = [("off", "embedding")] + ([] if kernels_off else [("bf16", "embedding"), ("bf16", "bf16 copy")])


@pytest.mark.parametrize("amp,where", CASES)
def test_inf_gradient_step_is_skipped_with_state_untouched(files, tmp_path, amp, where):
    model, optimizer, batches, (cfg, bank, weights, device, amp_dtype) = setup(files, tmp_path, amp)
    assert isinstance(optimizer, ShadowAdam) == (amp == "bf16")
    messages = []
    guard = step_guard.StepGuard(cfg.max_bad_steps, log=messages.append)

    def epoch(batch):
        return train.train_epoch(model, [batch], optimizer, cfg, bank, weights, device, amp_dtype, epoch=1,
                                 progress=False, guard=guard)
    assert epoch(batches[0])["skipped_steps"] == 0   # a first step, so the optimizer has moments to keep
    before = snapshot(model, optimizer)
    handle = target(model, optimizer, where).register_hook(lambda g: g.index_fill(0, torch.tensor([1]), float("inf")))
    result = epoch(batches[1])
    handle.remove()
    assert result["skipped_steps"] == 1 and guard.total == 1 and guard.streak == 1
    assert identical(snapshot(model, optimizer), before)
    name = "speaker_embeddings.weight" if where == "embedding" else "t_t.transformer_inter.0.feed_forward.w_1.weight"
    assert len(messages) == 1 and name in messages[0] and "epoch 1, batch 1" in messages[0]
    assert epoch(batches[1])["skipped_steps"] == 0   # the same batch, finite: applied, and the streak ends
    assert not identical(snapshot(model, optimizer)[0], before[0]) and guard.streak == 0 and guard.total == 1


def test_gradscaler_skips_are_counted(files, tmp_path):
    """Under a GradScaler (CUDA's fp16; its CPU form here) the scaler skips; the guard sees its scale drop."""
    model, optimizer, batches, (cfg, bank, weights, device, amp_dtype) = setup(files, tmp_path, "off")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = step_guard.StepGuard(cfg.max_bad_steps, log=lambda m: None)

    def epoch(batch):
        return train.train_epoch(model, [batch], optimizer, cfg, bank, weights, device, amp_dtype, scaler=scaler,
                                 epoch=1, progress=False, guard=guard)
    assert epoch(batches[0])["skipped_steps"] == 0 and scaler.get_scale() == 1024.0
    before = snapshot(model, optimizer)
    handle = model.speaker_embeddings.weight.register_hook(lambda g: g.index_fill(0, torch.tensor([1]), float("nan")))
    result = epoch(batches[1])
    handle.remove()
    assert result["skipped_steps"] == 1 and guard.total == 1 and scaler.get_scale() == 512.0
    assert identical(snapshot(model, optimizer)[:2], before[:2])


def test_all_finite_sees_every_dtype_and_position():
    tensors = [torch.randn(1000), torch.randn(33, 7).bfloat16(), torch.randn(5)]
    assert step_guard.all_finite(tensors) and step_guard.all_finite([])
    for i, t in enumerate(tensors):
        for pos in (0, t.numel() // 2, t.numel() - 1):
            for bad in (float("nan"), float("inf"), float("-inf")):
                broken = [x.clone() for x in tensors]
                broken[i].view(-1)[pos] = bad
                assert not step_guard.all_finite(broken), (i, pos, bad)
    assert step_guard.all_finite([torch.full((1000,), 1e17)])   # a sum of squares of 1e37 fits float32
    # an element whose square overflows float32 (as it would in Adam's second moment) counts as non-finite
    assert not step_guard.all_finite([torch.full((4,), 3e19)])
    assert not step_guard.all_finite([torch.full((4,), 3e19).bfloat16()])


def test_consecutive_bad_steps_stop_the_run(files, tmp_path, capsys):
    # lr 1e30: the first step throws the weights so far that every later loss is non-finite
    cfg = small_cfg(files, tmp_path, lr=1e30, epochs=3, amp="off", max_bad_steps=3)
    with pytest.raises(VegaError, match=r"3 consecutive training steps skipped .*epoch 1, batch 4: loss \(term "):
        main.train_run(cfg, progress=False)
    run_dir = next(os.scandir(tmp_path / cfg.name)).path
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["skipped_steps"] == 3 and "3 consecutive" in summary["stopped"]
    assert capsys.readouterr().out.count("warning: skipped a training step") == 1


def test_skipped_steps_are_counted_per_epoch_and_in_all(files, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}

    def every_third(g):
        calls["n"] += 1
        return g.index_fill(0, torch.tensor([0]), float("inf")) if calls["n"] % 3 == 0 else g

    real_build = main.build_model

    def broken_model(cfg, device="cpu"):   # every third backward pass leaves an inf in the speaker embedding's gradient
        model = real_build(cfg, device)
        model.speaker_embeddings.weight.register_hook(every_third)
        return model
    monkeypatch.setattr(main, "build_model", broken_model)
    cfg = small_cfg(files, tmp_path, epochs=2, max_bad_steps=2)   # never two in a row: the run goes on
    summary = main.train_run(cfg, progress=False)
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    per_epoch = len(make_loaders(load_dialogues(cfg.data_path, cfg.Dataset), cfg)["train"])
    assert calls["n"] == 2 * per_epoch and per_epoch >= 6
    expected = [per_epoch // 3, 2 * per_epoch // 3 - per_epoch // 3]   # backward passes 3, 6, 9, ...
    assert [r["skipped_steps"] for r in rows] == expected
    assert summary["skipped_steps"] == json.load(open(os.path.join(summary["run_dir"], "summary.json")))[
        "skipped_steps"] == sum(expected)
    out = capsys.readouterr().out
    assert out.count("warning: skipped a training step") == 1 and "speaker_embeddings.weight" in out
    assert f"| {expected[0]} steps skipped" in out   # the epoch line says so too


def run_epoch(files, tmp_path, sync_free, poison_every=0):
    """One float32 epoch on the CPU through train_epoch's host-checked or sync-free (CUDA's) step; every
    `poison_every`-th backward pass leaves an inf in the speaker embedding's gradient."""
    model, optimizer, _, (cfg, bank, weights, device, amp_dtype) = setup(files, tmp_path, "off")
    calls = {"n": 0}

    def poison(g):
        calls["n"] += 1
        return g.index_fill(0, torch.tensor([0]), float("inf")) if poison_every and calls["n"] % poison_every == 0 \
            else g
    model.speaker_embeddings.weight.register_hook(poison)
    loader = make_loaders(load_dialogues(cfg.data_path, cfg.Dataset), cfg)["train"]
    guard = step_guard.StepGuard(cfg.max_bad_steps, log=lambda msg: None)
    torch.manual_seed(1)
    result = train.train_epoch(model, loader, optimizer, cfg, bank, weights, device, amp_dtype, progress=False,
                               guard=guard, sync_free=sync_free, rng=random.Random(0))
    return result, guard, model


@pytest.mark.parametrize("poison_every", [0, 3])
def test_sync_free_steps_train_and_skip_as_the_host_checked_ones(files, tmp_path, poison_every):
    """CUDA's step (no host sync: skips found on the device, fused AdamW told through found_inf) gives the host-
    checked step's weights, loss means and skip counts, here on the CPU with the same fused AdamW."""
    host, host_guard, host_model = run_epoch(files, tmp_path, False, poison_every)
    free, free_guard, free_model = run_epoch(files, tmp_path, True, poison_every)
    assert step_guard.sync_free_steps(torch.device("cuda"), torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))],
                                                                            fused=True))
    assert host["skipped_steps"] == free["skipped_steps"] == free_guard.total
    assert (free["skipped_steps"] > 0) == (poison_every > 0)
    assert host_guard.first == free_guard.first
    for k, v in host.items():
        if k != "seconds":
            assert free[k] == pytest.approx(v, rel=1e-6), k
    for (name, a), b in zip(host_model.state_dict().items(), free_model.state_dict().values()):
        assert torch.equal(a, b), name
