"""--compile (fast/capture.py): the training step captured by torch.compile gives the eager step's numbers, runs as
one forward and one backward region, and trains through the whole flow.

The tests compile with the `aot_eager` backend: dynamo's and autograd's capture exactly as in a real run, without
inductor's code generation (minutes of C++ compilation on 2 cores, and no part of what is tested here)."""
import contextlib
import json
import os

import pytest
import torch
from conftest import rel_err, synthetic_files

import main
import train
from dataloader import load_dialogues, make_loaders
from fast import capture as capture_module
from fast import cpu_kernels
from model import pick_anchors
from vega_utils.anchors.bank import load_anchor_cache
from vega_utils.data.datasets import dataset_info
from vega_utils.runs.config import load_preset, resolve

NO_DROPOUT = dict(dropout=0.0, outlayer_drop=0.0, clip_proj_drop=0.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return synthetic_files(tmp_path_factory.mktemp("capture"),
                           {"IEMOCAP.pkl": dict(n_train=12, n_test=6, min_len=4, max_len=20, signal=2.5)})


@pytest.fixture(autouse=True)
def aot_eager(monkeypatch):
    monkeypatch.setattr(capture_module, "BACKEND", "aot_eager")


def config(files, out, **kw):
    return resolve(load_preset("IEMOCAP").replace(
        data_path=str(files / "IEMOCAP.pkl"), anchor_path=str(files / "anchor.pt"), output_dir=str(out),
        hidden_dim=64, n_head=4, clip_dim=512, batch_size=4, device="cpu", num_workers=0, **kw))


class Regions:
    """An observer that records which captured regions ran, in order."""

    def __init__(self):
        self.seen = []

    @contextlib.contextmanager
    def region(self, name):
        self.seen.append(name)
        yield

    def enter(self, name):
        self.seen.append(name)

    def leave(self, name):
        self.seen.append(f"/{name}")


def test_captured_step_equals_eager_step(files, tmp_path, monkeypatch):
    """float32, no dropout: every loss term and every gradient of the captured step equal the eager step's, on
    batches of two shapes (dynamic shapes: one compilation), with one forward and one backward region each."""
    cfg = config(files, tmp_path, amp="off", **NO_DROPOUT)
    info = dataset_info("IEMOCAP")
    loader = make_loaders(load_dialogues(cfg.data_path, info), cfg)["train"]
    anchors = pick_anchors(load_anchor_cache(cfg.anchor_path, info.class_names), training=False, rand=0)
    weights = torch.tensor(info.class_weights)
    model = main.build_model(cfg)
    step = capture_module.capture(model, train.forward_losses, torch.device("cpu"))
    regions = Regions()
    monkeypatch.setattr(capture_module, "observer", regions)
    # the eager step with the ops the capture traces, torch's own: in float32 training the C kernels' gate differs
    # from torch's softmax in the last bit, which a small KL term turns into a relative 4e-6
    monkeypatch.setattr(cpu_kernels, "EMULATE_CUDA", True)
    batches = list(loader)[:2]
    assert batches[0].pad_mask.shape != batches[1].pad_mask.shape
    for host_batch in batches:
        batch, lay, index = train.to_device(model, host_batch, torch.device("cpu"), None)
        results = []
        for fn in (train.forward_losses, step):
            model.zero_grad(set_to_none=True)
            losses = fn(model, batch, anchors, lay, index, cfg, weights, torch.device("cpu"), None)
            losses["total"].backward()
            results.append(({k: v.detach() for k, v in losses.items()},
                            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        (eager, eager_grads), (captured, captured_grads) = results
        assert eager.keys() == captured.keys() and len(eager) == 19
        for k in eager:
            assert rel_err(captured[k], eager[k]) < 1e-6, k
        assert eager_grads.keys() == captured_grads.keys()
        for n in eager_grads:
            assert rel_err(captured_grads[n], eager_grads[n]) < 1e-5, n
    assert regions.seen == ["forward", "backward", "/backward"] * 2
    assert model.single_grid


def test_compiled_run_trains_in_bf16(files, tmp_path):
    """run.py's flow with --compile on the CPU: bf16 autocast, torch's ops and fused AdamW (no C kernels, no bf16
    weight copies), the setting saved with the run; compiled once for every batch shape (the layout's sentinel rows
    keep the zero-fill index from ever being empty, which would specialise a size and recompile)."""
    from torch._dynamo.utils import counters
    cfg = config(files, tmp_path, compile=True, epochs=2, lr=3e-3, amp="bf16")
    graphs_before = counters["stats"]["unique_graphs"]
    summary = main.train_run(cfg, progress=False)
    assert counters["stats"]["unique_graphs"] - graphs_before == 1
    saved = json.load(open(os.path.join(summary["run_dir"], "config.json")))
    assert saved["compile"] is True and saved["train_precision"] == "bfloat16"
    rows = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert isinstance(main.build_optimizer(cfg, main.build_model(cfg), torch.bfloat16, torch.device("cpu")),
                      torch.optim.AdamW)
