"""CUDA: parity in float32, a training run with resume, scoring against the CPU, and no CPU-only code reached with
CUDA tensors. Skipped without a GPU (bench/gpu_check.py runs these and times the rest)."""
import glob
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import interrupt_at_epoch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


@pytest.fixture
def no_cpu_only_code(monkeypatch):
    """Fail if anything built for the CPU runs: the C kernels, ShadowAdam, oneDNN's linear."""
    from fast import cpu_kernels, shadow_weights

    def forbidden(*a, **k):
        raise AssertionError("CPU-only code reached in a CUDA run")
    monkeypatch.setattr(cpu_kernels, "kernel", forbidden)
    monkeypatch.setattr(shadow_weights.ShadowAdam, "__init__", forbidden)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", forbidden, raising=False)


@pytest.mark.parametrize("name", ["iemocap", "meld"])
@pytest.mark.parametrize("kind", ["plain", "fast"])
def test_parity_float32_on_cuda(name, kind, no_cpu_only_code):
    from test_parity import check_against_reference, fixture_setup

    import train
    from fast import accelerate
    train.exact_float32(CUDA)
    fx, cfg, model, batch, anchors, weights = fixture_setup(name)
    model = accelerate(model) if kind == "fast" else model
    check_against_reference(fx, cfg, model.to(CUDA), batch.to(CUDA), anchors.to(CUDA), weights.to(CUDA))


def small_cuda_cfg(files, out, **kw):
    from test_training import small_cfg
    return small_cfg(files, out, device="cuda", **kw)


def read_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_seconds")} for line in f]


@pytest.mark.parametrize("amp", ["auto", "off"])   # auto: fp16 autocast + GradScaler, as the reference
def test_cuda_run_resumes_to_the_uninterrupted_result(iemocap_files, tmp_path, monkeypatch, amp, no_cpu_only_code):
    import main
    import run
    cfg = small_cuda_cfg(iemocap_files, tmp_path / "a", amp=amp, epochs=4)
    full = read_rows(main.train_run(cfg, progress=False)["run_dir"])
    restore = interrupt_at_epoch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        main.train_run(cfg.replace(output_dir=str(tmp_path / "b")), progress=False)
    restore()
    run_dir = glob.glob(str(tmp_path / "b" / "*" / "*"))[0]
    assert run.run(["--resume", run_dir, "--no_progress"]) == 0
    resumed = read_rows(run_dir)
    assert len(resumed) == len(full) == 4
    for a, b in zip(resumed, full):   # atomics in CUDA backward kernels: equal up to their reordering
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k


def test_cpu_bf16_run_resumes_on_cuda(iemocap_files, tmp_path, monkeypatch):
    """Trained on the CPU in bf16 (ShadowAdam), resumed on CUDA (fused AdamW + GradScaler): it steps."""
    from test_training import small_cfg

    import main
    import run
    cfg = small_cfg(iemocap_files, tmp_path, epochs=3, amp="bf16")   # on the CPU, in bf16
    restore = interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        main.train_run(cfg, progress=False)
    restore()
    run_dir = glob.glob(str(tmp_path / "*" / "*"))[0]
    assert run.run(["--resume", run_dir, "--device", "cuda", "--no_progress"]) == 0
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["epochs_run"] == 3 and summary["train_precision"] == "float16"


def test_cuda_scores_agree_with_cpu_float32(iemocap_files, tmp_path):
    """inference.py in float32 on CUDA gives the CPU's probabilities and predictions; the fp16 default is close."""
    from test_training import small_cfg

    import inference
    import main
    summary = main.train_run(small_cfg(iemocap_files, tmp_path, epochs=2), progress=False)
    scored = {}
    for name, extra in (("cpu", ["--device", "cpu"]), ("cuda32", ["--device", "cuda", "--eval_amp", "off"]),
                        ("cuda16", ["--device", "cuda"])):
        csv = tmp_path / f"{name}.csv"
        assert inference.main(["--checkpoint", summary["best_checkpoint"], "--predictions_out", str(csv),
                               "--no_progress", *extra]) == 0
        scored[name] = pd.read_csv(csv)
    probs = [c for c in scored["cpu"].columns if c.startswith("p_")]
    np.testing.assert_allclose(scored["cuda32"][probs].to_numpy(), scored["cpu"][probs].to_numpy(), atol=1e-5)
    assert list(scored["cuda32"]["prediction"]) == list(scored["cpu"]["prediction"])
    np.testing.assert_allclose(scored["cuda16"][probs].to_numpy(), scored["cpu"][probs].to_numpy(), atol=2e-2)


def test_compiled_cuda_run_trains(iemocap_files, tmp_path, no_cpu_only_code):
    """--compile on CUDA: inductor with CUDA graphs (reduce-overhead), fp16 + GradScaler; the loss falls."""
    import main
    cfg = small_cuda_cfg(iemocap_files, tmp_path, compile=True, epochs=3)
    run_dir = main.train_run(cfg, progress=False)["run_dir"]
    rows = read_rows(run_dir)
    assert len(rows) == 3 and all(np.isfinite(r["train_loss"]) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
