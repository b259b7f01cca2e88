"""End to end: short training runs on generated data, the run folder, validation selection, resume, seeds."""
import glob
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import interrupt_at_epoch
from PIL import Image

import main
import run
import train
from vega_utils.data.datasets import dataset_info
from vega_utils.data.synthetic import make_synthetic_anchor_cache, make_synthetic_dataset
from vega_utils.insight import report
from vega_utils.runs import run_folder
from vega_utils.runs.config import load_preset, resolve

# Small and quick to learn (the paper's dropout and rate need hundreds of epochs).
# device named: on a GPU machine `auto` would test CUDA fp16 instead (CUDA tests are in test_cuda.py).
SMALL = dict(hidden_dim=64, n_head=4, lr=3e-3, dropout=0.1, outlayer_drop=0.1, clip_dim=512, epochs=6,
             patience=31, batch_size=3, device="cpu")
RUN_FILES = ["config.json", "metrics.jsonl", "summary.json", "predictions.csv", "curves.png",
             "confusion.png", "last.pth"]


def small_cfg(files, out, dataset="IEMOCAP", **kw):
    data = files / ("IEMOCAP.pkl" if dataset == "IEMOCAP" else "meld.pkl")
    return resolve(load_preset(dataset).replace(data_path=str(data), anchor_path=str(files / "anchor.pt"),
                                                output_dir=str(out), **{**SMALL, **kw}))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def majority_f1(labels, class_names):
    majority = np.bincount(labels).argmax()
    return report.classification_metrics(labels, np.full_like(labels, majority), class_names)["weighted_f1"]


def test_short_run_learns_and_writes_every_file(iemocap_files, tmp_path):
    cfg = small_cfg(iemocap_files, tmp_path)
    summary = main.train_run(cfg, progress=False)
    run_dir = summary["run_dir"]
    for name in RUN_FILES:
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    best = glob.glob(os.path.join(glob.escape(run_dir), "BEST_cls_f1_*_epoch*.pth"))
    assert len(best) == 1   # older, worse bests are removed
    for png in ("curves.png", "confusion.png"):
        Image.open(os.path.join(run_dir, png)).verify()

    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["epoch"] for r in rows] == list(range(1, cfg.epochs + 1))
    for key in ("train_seconds", "eval_seconds", "train_loss", "test_loss", "train_cls_all", "test_clip_kl_v",
                "test_f1_all", "test_f1_t", "test_f1_a", "test_f1_v", "test_accuracy",
                "test_weighted_precision", "test_macro_f1"):
        assert key in rows[0], key
    best_row = max(rows, key=lambda r: r["test_f1_all"])
    assert summary["best_epoch"] == best_row["epoch"]
    assert f"_epoch{best_row['epoch']}.pth" in best[0]

    # Learned: far above always predicting the majority class.
    preds = pd.read_csv(os.path.join(run_dir, "predictions.csv"))
    names = list(dataset_info("IEMOCAP").class_names)
    labels = preds["label"].map(names.index).to_numpy()
    assert summary["best"]["test"]["weighted_f1"] > majority_f1(labels, names) + 0.25
    recomputed = report.metrics_from_predictions_csv(os.path.join(run_dir, "predictions.csv"), names)
    assert recomputed["weighted_f1"] == pytest.approx(summary["best"]["test"]["weighted_f1"], abs=1e-9)

    # Trained in the CPU default (bf16 where the CPU has it natively, else float32), evaluated in float32:
    # inference.py on the best checkpoint, with default flags, reports exactly the run's numbers and writes exactly
    # its predictions.csv rows.
    import inference
    out_csv, out_json = tmp_path / "again.csv", tmp_path / "again.json"
    assert inference.main(["--checkpoint", best[0], "--predictions_out", str(out_csv), "--json", str(out_json),
                           "--device", "cpu", "--no_progress"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out_csv), preds, check_exact=True)
    scored = json.load(open(out_json))
    assert scored["precision"] == "float32"
    for key in ("weighted_f1", "accuracy", "weighted_precision", "macro_f1"):
        assert scored["metrics"][key] == summary["best"]["test"][key], key

    saved = json.load(open(os.path.join(run_dir, "config.json")))
    assert saved["hidden_dim"] == 64 and "git_commit" in saved and "torch_version" in saved
    auto, why = train.amp_choice("auto", torch.device("cpu"))
    assert (saved["train_precision"], saved["eval_precision"]) == (train.precision_name(auto), "float32")
    assert (summary["train_precision"], summary["eval_precision"]) == (train.precision_name(auto), "float32")
    assert saved["train_precision_reason"] == why and "bf16" in why


def test_eval_amp_bf16_is_honoured_and_inherited_by_inference(iemocap_files, tmp_path):
    """--eval_amp bf16: the run evaluates in bf16, and inference.py takes the checkpoint's precision unless told."""
    import inference
    summary = main.train_run(small_cfg(iemocap_files, tmp_path, epochs=2, eval_amp="bf16"), progress=False)
    assert summary["eval_precision"] == "bfloat16"
    best = summary["best_checkpoint"]
    scores = {}
    for name, extra in (("inherited", []), ("float32", ["--eval_amp", "off"])):
        path = tmp_path / f"{name}.json"
        assert inference.main(["--checkpoint", best, "--json", str(path), "--device", "cpu", "--no_progress",
                               *extra]) == 0
        scores[name] = json.load(open(path))
    assert scores["inherited"]["precision"] == "bfloat16" and scores["float32"]["precision"] == "float32"
    assert scores["inherited"]["metrics"]["weighted_f1"] == summary["best"]["test"]["weighted_f1"]


def test_meld_end_to_end(tmp_path):
    make_synthetic_dataset(tmp_path / "meld.pkl", dataset="MELD", n_train=30, n_test=8, max_len=14,
                           signal=2.5, seed=4)
    make_synthetic_anchor_cache(tmp_path / "anchor.pt", dataset="MELD", clip_dim=512, seed=4)
    cfg = small_cfg(tmp_path, tmp_path / "out", dataset="MELD", epochs=3)
    summary = main.train_run(cfg, progress=False)
    assert len(summary["best"]["test"]["per_class"]) == 7
    assert "p_disgust" in pd.read_csv(os.path.join(summary["run_dir"], "predictions.csv")).columns


def test_two_runs_in_one_minute_get_separate_folders(iemocap_files, tmp_path):
    cfg = small_cfg(iemocap_files, tmp_path)
    assert run_folder.make_run_dir(cfg) != run_folder.make_run_dir(cfg)


def test_validation_split_selects_on_validation(iemocap_files, tmp_path):
    cfg = small_cfg(iemocap_files, tmp_path, valid_ratio=0.25, epochs=4)
    summary = main.train_run(cfg, progress=False)
    assert summary["selected_on"] == "valid"
    rows = read_jsonl(os.path.join(summary["run_dir"], "metrics.jsonl"))
    best = max(rows, key=lambda r: r["valid_f1_all"])   # first maximum = strictly better rule
    assert summary["best_epoch"] == best["epoch"]
    assert summary["best"]["test"]["weighted_f1"] == pytest.approx(best["test_f1_all"])
    held = json.load(open(os.path.join(summary["run_dir"], "valid_ids.json")))
    assert len(held) == 9
    assert not set(held) & set(pd.read_csv(os.path.join(summary["run_dir"], "predictions.csv"))["dialogue_id"])


# bf16: the optimizer's weight copies are rebuilt on resume; save_last end: last.pth written at the interrupt
@pytest.mark.parametrize("amp, save_last", [("off", "every"), ("bf16", "every"), ("bf16", "end")])
def test_resume_gives_the_uninterrupted_result(iemocap_files, tmp_path, monkeypatch, amp, save_last):
    cfg = small_cfg(iemocap_files, tmp_path, amp=amp, epochs=4, scheduler=True, save_last=save_last)
    full = read_jsonl(os.path.join(main.train_run(cfg, progress=False)["run_dir"], "metrics.jsonl"))

    restore = interrupt_at_epoch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        main.train_run(cfg.replace(output_dir=str(tmp_path / "b")), progress=False)
    restore()
    run_dir = glob.glob(str(tmp_path / "b" / "*" / "*"))[0]
    assert len(read_jsonl(os.path.join(run_dir, "metrics.jsonl"))) == 2
    assert json.load(open(os.path.join(run_dir, "summary.json")))["stopped"] == "interrupted"
    assert glob.glob(os.path.join(glob.escape(run_dir), "BEST_*.pth"))

    assert run.run(["--resume", run_dir, "--no_progress"]) == 0
    resumed = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    timing = {"train_seconds", "eval_seconds", "cpu_shared"}   # measurements of the machine
    strip = [{k: v for k, v in r.items() if k not in timing} for r in resumed]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in full]


def test_save_last_never_and_a_finished_runs_last_pth(iemocap_files, tmp_path, capsys):
    summary = main.train_run(small_cfg(iemocap_files, tmp_path, epochs=2, save_last="never"), progress=False)
    assert not os.path.exists(os.path.join(summary["run_dir"], "last.pth"))
    assert run.run(["--resume", summary["run_dir"], "--no_progress"]) == 2
    assert "--save_last never): there is nothing to resume" in capsys.readouterr().err

    summary = main.train_run(small_cfg(iemocap_files, tmp_path / "every", epochs=2), progress=False)
    last = torch.load(os.path.join(summary["run_dir"], "last.pth"), weights_only=True)
    assert last["optimizer"] is None and last["state"]["epoch"] == 2   # an ended run keeps no optimizer state
    best = torch.load(summary["best_checkpoint"], weights_only=True)
    assert set(best) == {"format", "state_dict", "config", "epoch", "metrics"}   # weights, never the optimizer
    # a larger --epochs still goes on from it, the optimizer afresh
    assert run.run(["--resume", summary["run_dir"], "--epochs", "3", "--no_progress"]) == 0
    assert "without the optimizer state" in capsys.readouterr().out
    assert len(read_jsonl(os.path.join(summary["run_dir"], "metrics.jsonl"))) == 3


def test_seeds_keep_best_leaves_one_checkpoint(iemocap_files, tmp_path):
    argv = ["--data_path", str(iemocap_files / "IEMOCAP.pkl"), "--anchor_path", str(iemocap_files / "anchor.pt"),
            "--output_dir", str(tmp_path), "--hidden_dim", "32", "--clip_dim", "512", "--epochs", "1",
            "--no_progress", "--device", "cpu", "--seeds", "1", "2", "--keep", "best"]
    assert run.run(argv) == 0
    runs = glob.glob(str(tmp_path / "IEMOCAP" / "*_seed*"))
    assert len(runs) == 2
    pth = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "IEMOCAP" / "*" / "*.pth")))
    assert len(pth) == 2 and pth[1] == "best_vega_branch.pth" and pth[0].startswith("BEST_")
    for folder in runs:
        for name in ("config.json", "metrics.jsonl", "summary.json"):
            assert os.path.exists(os.path.join(folder, name))


def test_seeds_write_aggregate_statistics(iemocap_files, tmp_path, monkeypatch):
    argv = ["--data_path", str(iemocap_files / "IEMOCAP.pkl"), "--anchor_path", str(iemocap_files / "anchor.pt"),
            "--output_dir", str(tmp_path), "--hidden_dim", "32", "--clip_dim", "512", "--epochs", "2",
            "--lr", "1e-3", "--no_progress", "--device", "cpu", "--seeds", "1", "2", "3"]
    assert run.run(argv) == 0
    folder = glob.glob(str(tmp_path / "IEMOCAP" / "aggregate-*"))[0]
    agg = json.load(open(os.path.join(folder, "aggregate.json")))
    assert agg["n_seeds"] == 3 and not agg["failed"]
    values = []
    for entry in agg["per_seed"]:
        summary = json.load(open(os.path.join(entry["run_dir"], "summary.json")))
        values.append(summary["best"]["test"]["weighted_f1"])
    stats = agg["metrics"]["weighted_f1"]
    assert stats["mean"] == pytest.approx(np.mean(values))
    assert stats["std"] == pytest.approx(np.std(values, ddof=1))
    assert stats["min"] == pytest.approx(min(values)) and stats["max"] == pytest.approx(max(values))
    assert "f1_happy" in agg["metrics"]
    assert os.path.exists(os.path.join(folder, "aggregate.md"))
    Image.open(os.path.join(folder, "per_class_f1.png")).verify()


def test_failed_seed_does_not_lose_the_others(iemocap_files, tmp_path, monkeypatch):
    real = main.train_run

    def fail_seed_2(cfg, **kw):
        if cfg.seed == 2:
            raise main.VegaError("simulated failure")
        return real(cfg, **kw)
    monkeypatch.setattr(main, "train_run", fail_seed_2)
    argv = ["--data_path", str(iemocap_files / "IEMOCAP.pkl"), "--anchor_path", str(iemocap_files / "anchor.pt"),
            "--output_dir", str(tmp_path), "--hidden_dim", "32", "--clip_dim", "512", "--epochs", "1",
            "--no_progress", "--device", "cpu", "--seeds", "1", "2"]
    assert run.run(argv) == 1
    agg = json.load(open(glob.glob(str(tmp_path / "IEMOCAP" / "aggregate-*" / "aggregate.json"))[0]))
    assert agg["n_seeds"] == 1 and agg["failed"][0]["seed"] == 2


def test_ablation_flags(iemocap_files):
    base = ["--data_path", str(iemocap_files / "IEMOCAP.pkl")]
    assert run.build_config(run.parser().parse_args(base + ["--ablation", "no_vega"])).clip_loss is False
    assert run.build_config(run.parser().parse_args(base + ["--ablation", "no_stochastic_anchors"])).rand == 0
    # An explicit flag wins over the ablation's setting.
    cfg = run.build_config(run.parser().parse_args(base + ["--ablation", "no_vega", "--clip_loss"]))
    assert cfg.clip_loss is True


def test_losses_switches_and_non_finite_stop(iemocap_files, tmp_path):
    cfg = small_cfg(iemocap_files, tmp_path, cls_loss=False, epochs=1)
    rows = read_jsonl(os.path.join(main.train_run(cfg, progress=False)["run_dir"], "metrics.jsonl"))
    assert "train_cls_all" not in rows[0] and "train_clip_all" in rows[0]   # --no_cls_loss is honoured
    with pytest.raises(main.VegaError, match="consecutive training steps skipped for a non-finite loss"):
        main.train_run(small_cfg(iemocap_files, tmp_path, lr=1e30, epochs=3, amp="off"), progress=False)


def test_run_builds_missing_anchor_cache_from_images_then_trains(tmp_path, monkeypatch):
    """The reference's behaviour: no cache but anchor/<expr_img_folder>/ exists -> build it, then train."""
    from anchor_fixtures import make_image_folder, make_tiny_clip
    monkeypatch.chdir(tmp_path)
    names = list(dataset_info("IEMOCAP").class_names)
    clip_dir = make_tiny_clip(tmp_path / "clip", projection_dim=24)
    make_image_folder(tmp_path / "anchor" / "35", names, per_class=2)
    make_synthetic_dataset(tmp_path / "data.pkl", n_train=8, n_test=4, max_len=10, seed=6)
    argv = ["--data_path", str(tmp_path / "data.pkl"), "--CLIP_Model", clip_dir, "--hidden_dim", "32",
            "--epochs", "1", "--no_progress", "--device", "cpu", "--output_dir", str(tmp_path / "out")]
    assert run.run(argv) == 0
    cache = torch.load(tmp_path / "anchor" / "35_anchor.pt", weights_only=True)
    assert cache["anchor_center"].shape == (6, 24)
    run_dir = glob.glob(str(tmp_path / "out" / "IEMOCAP" / "*"))[0]
    assert json.load(open(os.path.join(run_dir, "config.json")))["clip_dim"] == 24
    assert run.run(argv) == 0   # second run loads the cache it built


def test_eval_set_matches_per_batch_evaluation(iemocap_files, tmp_path):
    """Merged evaluation (EvalSet, reused every epoch) gives the per-batch predictions and loss means."""
    from dataloader import load_dialogues, make_loaders
    from vega_utils.anchors.bank import load_anchor_cache
    cfg = small_cfg(iemocap_files, tmp_path)
    info = dataset_info(cfg.Dataset)
    data = load_dialogues(cfg.data_path, cfg.Dataset)
    bank = load_anchor_cache(cfg.anchor_path, info.class_names)
    loader = make_loaders(data, cfg)["test"]
    torch.manual_seed(0)
    model = main.build_model(cfg)
    weights = torch.tensor(info.class_weights)
    run_eval = lambda d: train.eval_epoch(model, d, cfg, bank, weights, torch.device("cpu"), None, progress=False)
    per_batch = run_eval(train.EvalSet(loader, cfg.n_speakers, max_rows=1))   # every loader batch alone
    eval_set = train.EvalSet(loader, cfg.n_speakers)
    assert len(eval_set) == 1 < len(per_batch["labels"])                      # all 10 dialogues in one group
    for result in (run_eval(eval_set), run_eval(eval_set), run_eval(loader)):
        for head in ("all", "t", "a", "v"):
            assert np.array_equal(result["preds"][head], per_batch["preds"][head])
        np.testing.assert_allclose(result["probs"], per_batch["probs"], rtol=1e-5, atol=1e-6)
        assert result["dialogue_ids"] == per_batch["dialogue_ids"]
        assert result["losses"].keys() == per_batch["losses"].keys()
        for k, v in per_batch["losses"].items():
            assert result["losses"][k] == pytest.approx(v, rel=1e-5), k


def test_no_fast_trains_model_py_as_it_is(iemocap_files, tmp_path):
    """--no_fast: the plain model (padded layout, stock layers, torch's AdamW) trains through the same flow."""
    from fast import is_accelerated
    from model import VEGA
    cfg = small_cfg(iemocap_files, tmp_path, epochs=1, fast=False, amp="off")
    model = main.build_model(cfg)
    assert type(model) is VEGA and not is_accelerated(model)
    assert type(model.t_t.transformer_inter[0].self_attn.linear_q) is torch.nn.Linear
    assert isinstance(main.build_optimizer(cfg, model, torch.bfloat16, torch.device("cpu")), torch.optim.AdamW)
    summary = main.train_run(cfg, progress=False)
    saved = json.load(open(os.path.join(summary["run_dir"], "config.json")))
    assert saved["fast"] is False and summary["epochs_run"] == 1 and summary["best"]["test"]["weighted_f1"] >= 0
