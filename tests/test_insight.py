"""Seeing inside a run: TensorBoard curves, anchor alignment, analyze, compare, the statistics."""
import glob
import json
import os

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from conftest import interrupt_at_epoch
from PIL import Image
from sklearn.metrics import f1_score

import main
import run
from dataloader import load_dialogues, make_loaders
from vega_utils.anchors.bank import load_anchor_cache
from vega_utils.data.synthetic import make_synthetic_anchor_cache, make_synthetic_dataset
from vega_utils.insight import alignment, analyze, breakdown, compare, live, stats
from vega_utils.runs.config import load_preset, resolve

TINY = dict(hidden_dim=32, n_head=4, lr=3e-3, dropout=0.1, outlayer_drop=0.1, clip_dim=512, epochs=3,
            patience=31, batch_size=3, device="cpu", amp="off")
NAMES = ["happy", "sad", "neutral", "anger", "excited", "frustration"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A full-method run (interrupted before epoch 3, then resumed) and a --ablation no_vega run."""
    root = tmp_path_factory.mktemp("insight")
    make_synthetic_dataset(root / "IEMOCAP.pkl", n_train=10, n_test=6, max_len=12, signal=2.5, seed=4)
    make_synthetic_anchor_cache(root / "anchor.pt", clip_dim=512, seed=4)
    cfg = resolve(load_preset("IEMOCAP").replace(data_path=str(root / "IEMOCAP.pkl"),
                                                 anchor_path=str(root / "anchor.pt"), output_dir=str(root), **TINY))
    with pytest.MonkeyPatch.context() as mp:
        interrupt_at_epoch(mp, 3)
        with pytest.raises(KeyboardInterrupt):
            main.train_run(cfg.replace(name="vega"), progress=False)
    vega = glob.glob(str(root / "vega" / "*"))[0]
    # written after each epoch, not only at the end: the interrupted run has its curves of epochs 1-2
    assert os.path.getsize(os.path.join(vega, "curves.png")) > 0
    assert len(read_jsonl(os.path.join(vega, "metrics.jsonl"))) == 2
    assert run.run(["--resume", vega, "--no_progress"]) == 0
    plain = main.train_run(cfg.replace(name="plain", clip_loss=False, ablation="no_vega"), progress=False)
    return {"vega": vega, "plain": plain["run_dir"], "cfg": cfg, "root": root}


# ---------------------------------------------------------------- TensorBoard
def test_tensorboard_reads_back_every_epoch(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    for key in ("vega", "plain"):
        rows = read_jsonl(os.path.join(runs[key], "metrics.jsonl"))
        assert [r["epoch"] for r in rows] == [1, 2, 3]
        events = EventAccumulator(runs[key], size_guidance={"scalars": 0})   # 0: keep every event
        events.Reload()
        tags = set(events.Tags()["scalars"])
        expected = {}
        for row in rows:
            for tag, value in live.scalars(row, NAMES).items():
                expected.setdefault(tag, {})[row["epoch"]] = value
        assert tags == set(expected)
        for tag, by_epoch in expected.items():
            logged = events.Scalars(tag)
            # every epoch once, also across the resume (a second event file in the same folder)
            assert [e.step for e in logged] == [1, 2, 3], tag
            for e in logged:   # event files hold float32
                assert e.value == np.float32(by_epoch[e.step]), tag
        for must in ("loss/train_total", "loss/test_total", "f1/test_all", "f1/test_t", "f1/test_a", "f1/test_v",
                     "metrics/test_accuracy", "metrics/test_weighted_precision", "lr", "seconds/train",
                     "seconds/eval", "loss_terms/train_cls_all"):
            assert must in tags, must
        has_alignment = {t for t in tags if t.startswith("alignment")}
        if key == "vega":
            assert {"alignment/test_all_own", "alignment/test_v_nearest",
                    "alignment_per_class/test_t_other_sad"} <= has_alignment
        else:
            assert not has_alignment


def test_tags():
    assert live.tag("test_loss") == "loss/test_total"
    assert live.tag("valid_f1_all") == "f1/valid_all"
    assert live.tag("train_clip_kl_t") == "loss_terms/train_clip_kl_t"
    assert live.tag("test_align_all_nearest", NAMES) == "alignment/test_all_nearest"
    assert live.tag("test_align_a_own_anger", NAMES) == "alignment_per_class/test_a_own_anger"
    assert live.tag("eval_seconds") == "seconds/eval" and live.tag("cpu_shared") == "run/cpu_shared"
    assert live.scalars({"epoch": 2, "is_best": True, "lr": 1e-3, "test_macro_f1": 0.5}) == \
        {"lr": 1e-3, "metrics/test_macro_f1": 0.5}


def test_no_tensorboard_flag(runs, tmp_path):
    cfg = runs["cfg"].replace(output_dir=str(tmp_path), epochs=1, tensorboard=False, clip_loss=False)
    run_dir = main.train_run(cfg, progress=False)["run_dir"]
    assert not glob.glob(os.path.join(glob.escape(run_dir), "events.out.tfevents.*"))
    assert os.path.getsize(os.path.join(run_dir, "curves.png")) > 0


# ---------------------------------------------------------------- alignment
def test_alignment_hand_computed():
    cos = np.array([[0.9, 0.1, 0.2], [0.3, 0.5, 0.6], [0.0, 0.4, 0.2]])
    result = alignment.alignment(cos, [0, 1, 1], ["x", "y", "z"])
    assert result["overall"]["own"] == pytest.approx((0.9 + 0.5 + 0.4) / 3)
    assert result["overall"]["other"] == pytest.approx(((0.1 + 0.2) / 2 + (0.3 + 0.6) / 2 + (0.0 + 0.2) / 2) / 3)
    assert result["overall"]["nearest"] == pytest.approx(2 / 3)   # the second one is nearest to z
    assert result["per_class"]["y"] == pytest.approx({"own": 0.45, "other": (0.45 + 0.1) / 2, "nearest": 0.5, "n": 2})
    assert "z" not in result["per_class"]
    assert alignment.from_row(alignment.flat_row("test", {"a": result}), "test", ["x", "y", "z"])["a"] == \
        {"overall": {k: result["overall"][k] for k in alignment.STATS},
         "per_class": {c: {k: v[k] for k in alignment.STATS} for c, v in result["per_class"].items()}}


def _best_model(run_dir):
    cfg = analyze.run_config(run_dir)
    model, epoch, has_branch = analyze.load_model(cfg, run_dir, torch.device("cpu"), log=lambda m: None)
    assert has_branch
    return cfg, model, epoch


def test_alignment_equals_recomputation_from_saved_weights(runs):
    """metrics.jsonl's alignment of the best epoch (from the evaluation's VEGA logits) against a recomputation
    from best checkpoint + best_vega_branch.pth + the anchor cache."""
    run_dir = runs["vega"]
    cfg, model, epoch = _best_model(run_dir)
    row = next(r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["epoch"] == epoch)
    assert row["is_best"]
    bank = load_anchor_cache(cfg.anchor_path, NAMES)
    centres = F.normalize(bank.centers.float(), dim=-1)                          # (C, K)
    # directly: the fused features, through the `all` projection, cosine to each centre
    data = load_dialogues(cfg.data_path, cfg.Dataset)
    labels, cos_all = [], []
    model.eval()
    with torch.no_grad():
        for batch in make_loaders(data, cfg)["test"]:
            out = model(batch, None)
            valid = ~batch.pad_mask
            proj = F.normalize(model.all_clip_proj(out["all_transformer_out"][valid]), dim=-1)   # (N, K)
            cos_all.append(proj @ centres.t())
            labels.append(batch.labels[valid])
    labels = torch.cat(labels).numpy()
    direct = alignment.alignment(torch.cat(cos_all).numpy(), labels, NAMES)
    logged = alignment.from_row(row, "test", NAMES)
    for stat in alignment.STATS:
        assert direct["overall"][stat] == pytest.approx(logged["all"]["overall"][stat], abs=1e-6)
        for c, values in direct["per_class"].items():
            assert values[stat] == pytest.approx(logged["all"]["per_class"][c][stat], abs=1e-6)
    # every head, as analyze computes it (projection outputs caught by a hook on the padded computation)
    ev = analyze.project_test_set(model, cfg, cfg.data_path, centres, torch.device("cpu"))
    np.testing.assert_array_equal(ev["labels"], labels)
    for head in alignment.HEADS:
        recomputed = alignment.alignment(alignment.cosines(ev["features"][head], bank.centers.numpy()), labels, NAMES)
        for stat in alignment.STATS:
            assert recomputed["overall"][stat] == pytest.approx(logged[head]["overall"][stat], abs=1e-6)
            for c, values in recomputed["per_class"].items():
                assert values[stat] == pytest.approx(logged[head]["per_class"][c][stat], abs=1e-6)


def test_branch_file_is_the_best_epoch(runs):
    from vega_utils.runs import checkpoint
    obj = checkpoint.read_checkpoint(os.path.join(runs["vega"], checkpoint.BRANCH_FILE))
    summary = json.load(open(os.path.join(runs["vega"], "summary.json")))
    assert obj["epoch"] == summary["best_epoch"]
    assert obj["branch_state_dict"] and all("_clip_" in k or k == "prob_gate_logit" for k in obj["branch_state_dict"])
    best = checkpoint.read_checkpoint(glob.glob(os.path.join(glob.escape(runs["vega"]), "BEST_*.pth"))[0])
    assert not any("_clip_proj." in k for k in best["state_dict"])   # the reference-format file stays backbone-only
    assert not os.path.exists(os.path.join(runs["plain"], checkpoint.BRANCH_FILE))


# ---------------------------------------------------------------- where the model fails
def test_emotion_shift_hand_made():
    # dialogue d1: speakers A B A A B B A, labels 0 1 0 2 1 3 2
    #   A: first, -, same (0 = 0), shift (2 != 0), -, -, same (2 = 2)
    #   B: -, first, -, -, same (1 = 1), shift (3 != 1), -
    # dialogue d2 starts again: B's first utterance there is a first, though B spoke in d1
    dialogue = ["d1"] * 7 + ["d2"] * 3
    index = list(range(7)) + [0, 1, 2]
    speaker = list("ABAABBA") + list("BBA")
    labels = [0, 1, 0, 2, 1, 3, 2] + [3, 0, 0]
    expected = [-1, -1, 0, 1, 0, 1, 0] + [-1, 1, -1]
    np.testing.assert_array_equal(breakdown.emotion_shift(dialogue, index, speaker, labels), expected)
    order = [9, 3, 0, 7, 5, 1, 8, 2, 6, 4]   # any row order gives each row the same answer
    shuffled = breakdown.emotion_shift([dialogue[i] for i in order], [index[i] for i in order],
                                       [speaker[i] for i in order], [labels[i] for i in order])
    np.testing.assert_array_equal(shuffled, [expected[i] for i in order])


def test_breakdown_groups():
    assert [breakdown.bin_name(v) for v in (1, 5, 6, 10, 11, 40, 41, 80, 81, 300)] == \
        ["1-5", "1-5", "6-10", "6-10", "11-20", "21-40", "41-80", "41-80", "81+", "81+"]
    names = ["a", "b", "c", "d"]
    frame = pd.DataFrame({"dialogue_id": ["d1"] * 7 + ["d2"] * 3, "utterance_index": list(range(7)) + [0, 1, 2],
                          "speaker": list("ABAABBA") + list("BBA"),
                          "label": [names[i] for i in [0, 1, 0, 2, 1, 3, 2, 3, 0, 0]],
                          "prediction": [names[i] for i in [0, 1, 0, 0, 1, 1, 2, 3, 1, 0]]})
    result = breakdown.breakdown(frame, names)
    shift = {r["group"]: r for r in result["emotion_shift"]}
    # shifts: rows 3 (c, predicted a), 5 (d, predicted b), 8 (a, predicted b): all wrong
    assert shift["shift"]["n"] == 3 and shift["shift"]["accuracy"] == 0.0 and shift["shift"]["weighted_f1"] == 0.0
    assert shift["rest"]["n"] == 7 and shift["rest"]["accuracy"] == 1.0
    assert shift["rest: no shift"]["n"] == 3 and shift["rest: speaker's first"]["n"] == 4
    assert [(r["group"], r["n"]) for r in result["length"]] == [("1-5", 3), ("6-10", 7)]
    assert [(r["group"], r["n"]) for r in result["position"]] == [("1-5", 8), ("6-10", 2)]
    speakers = {r["group"]: r for r in result["speaker"]}
    assert speakers["A"]["n"] == 5 and speakers["A"]["accuracy"] == pytest.approx(4 / 5)   # rows 0 2 3 6 9: 3 wrong


# ---------------------------------------------------------------- statistics
def _example(n=40, seed=1):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    pred_a = np.where(rng.random(n) < 0.6, labels, rng.integers(0, 3, n))
    pred_b = np.where(rng.random(n) < 0.75, labels, rng.integers(0, 3, n))
    return labels, pred_a, pred_b


def test_weighted_f1_from_confusion_is_sklearns():
    labels, pred_a, _ = _example()
    pred_a[pred_a == 2] = 0   # class 2 never predicted: its F1 is 0, as sklearn's zero_division gives
    conf = np.zeros((3, 3))
    np.add.at(conf, (labels, pred_a), 1)
    want = f1_score(labels, pred_a, average="weighted", labels=[0, 1, 2], zero_division=0)
    assert stats.weighted_f1_from_confusion(conf) == pytest.approx(want, abs=1e-12)


def _direct_percentiles(labels, pred_a, pred_b, draws, alpha, units=None):
    diffs = []
    for row in draws:   # one resample: the drawn units' utterances
        idx = row if units is None else np.concatenate([units[u] for u in row])
        fa = f1_score(labels[idx], pred_a[idx], average="weighted", labels=[0, 1, 2], zero_division=0)
        fb = f1_score(labels[idx], pred_b[idx], average="weighted", labels=[0, 1, 2], zero_division=0)
        diffs.append(fb - fa)
    return np.asarray(diffs), np.quantile(diffs, [alpha / 2, 1 - alpha / 2])


def test_paired_bootstrap_against_a_direct_loop():
    labels, pred_a, pred_b = _example()
    got = stats.paired_bootstrap(labels, pred_a, pred_b, 3, n_boot=150, seed=7, alpha=0.1)
    draws = np.random.default_rng(7).integers(0, len(labels), size=(150, len(labels)))   # the same draws
    diffs, (low, high) = _direct_percentiles(labels, pred_a, pred_b, draws, 0.1)
    np.testing.assert_allclose(got["differences"], diffs, atol=1e-12)
    assert (got["low"], got["high"]) == pytest.approx((low, high), abs=1e-12)
    whole = f1_score(labels, pred_b, average="weighted") - f1_score(labels, pred_a, average="weighted")
    assert got["difference"] == pytest.approx(whole, abs=1e-12)
    assert got["low"] < got["difference"] < got["high"]
    # resampling whole dialogues: 8 dialogues of 5 utterances
    dialogues = np.repeat([f"d{i}" for i in range(8)], 5)
    got = stats.paired_bootstrap(labels, pred_a, pred_b, 3, n_boot=100, seed=3, groups=dialogues)
    units = [np.flatnonzero(dialogues == f"d{i}") for i in range(8)]
    draws = np.random.default_rng(3).integers(0, 8, size=(100, 8))
    diffs, (low, high) = _direct_percentiles(labels, pred_a, pred_b, draws, 0.05, units)
    np.testing.assert_allclose(got["differences"], diffs, atol=1e-12)
    assert got["unit_count"] == 8 and (got["low"], got["high"]) == pytest.approx((low, high), abs=1e-12)
    # the same predictions twice: no difference in any resample
    same = stats.paired_bootstrap(labels, pred_a, pred_a, 3, n_boot=1500, seed=0)
    assert same["difference"] == same["low"] == same["high"] == 0.0 and len(same["differences"]) == 1500


def test_mcnemar_by_hand_and_against_scipy():
    # only A right 3 times, only B right 10 times (and 20 both right, 7 both wrong)
    a = np.array([1] * 3 + [0] * 10 + [1] * 20 + [0] * 7, dtype=bool)
    b = np.array([0] * 3 + [1] * 10 + [1] * 20 + [0] * 7, dtype=bool)
    got = stats.mcnemar(a, b)
    assert (got["b"], got["c"]) == (3, 10)
    # exact: 2 * (C(13,0) + C(13,1) + C(13,2) + C(13,3)) / 2^13 = 2 * 378 / 8192
    assert got["p_exact"] == 756 / 8192
    assert got["p_exact"] == pytest.approx(scipy.stats.binomtest(3, 13, 0.5).pvalue, rel=1e-12)
    assert got["chi2"] == pytest.approx(36 / 13)   # (|3 - 10| - 1)^2 / 13
    assert got["p_chi2"] == pytest.approx(scipy.stats.chi2.sf(36 / 13, 1), rel=1e-10)
    for b_, c_ in ((0, 0), (5, 5), (0, 7), (40, 61), (700, 760)):
        x = np.array([1] * b_ + [0] * c_, dtype=bool)
        got = stats.mcnemar(x, ~x)
        want = scipy.stats.binomtest(min(b_, c_), b_ + c_, 0.5).pvalue if b_ + c_ else 1.0
        assert got["p_exact"] == pytest.approx(want, rel=1e-9)
    assert stats.mcnemar(x, x)["p_exact"] == 1.0


# ---------------------------------------------------------------- the two commands
def _png(path):
    with Image.open(path) as img:
        img.verify()
        return img.size


def test_analyze_full_run(runs, tmp_path, capsys):
    out = str(tmp_path / "analysis")
    assert analyze.main([runs["vega"], "--out", out, "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "no VEGA branch" not in printed and "largest difference to metrics.jsonl" in printed
    for name in ("map_pca.png", "map_tsne.png", "head_agreement.png", "breakdown.png"):
        width, height = _png(os.path.join(out, name))
        assert width > 600 and height > 300
    numbers = json.load(open(os.path.join(out, "analysis.json")))
    assert numbers["alignment_max_difference_to_metrics"] < 1e-6
    agreement = numbers["head_agreement"]
    assert agreement["predictors"] == ["classifier all", "classifier t", "classifier a", "classifier v",
                                       "anchor all", "anchor t", "anchor a", "anchor v"]
    matrix = np.array(agreement["matrix"])
    assert np.allclose(np.diag(matrix), 1.0) and np.allclose(matrix, matrix.T)
    summary = json.load(open(os.path.join(runs["vega"], "summary.json")))
    assert agreement["weighted_f1"]["classifier all"] == pytest.approx(summary["best"]["test"]["weighted_f1"], abs=1e-9)
    # a second analysis goes to a new folder: nothing overwritten
    assert analyze.main([runs["vega"], "--out", out, "--maps", "--threads", "1"]) == 0
    assert os.path.isdir(out + "-2") and os.path.exists(os.path.join(out, "map_tsne.png"))


def test_analyze_and_compare_without_vega(runs, tmp_path, capsys):
    out = str(tmp_path / "analysis")
    assert analyze.main([runs["plain"], "--out", out, "--maps", "pca", "tsne", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert len([line for line in printed.splitlines() if "no VEGA branch" in line]) == 1
    assert sorted(os.listdir(out)) == ["analysis.json", "analysis.md", "breakdown.png", "head_agreement.png"]
    numbers = json.load(open(os.path.join(out, "analysis.json")))
    assert "alignment" not in numbers and len(numbers["head_agreement"]["predictors"]) == 4
    assert {r["group"] for r in numbers["breakdown"]["emotion_shift"]} >= {"shift", "rest"}

    numbers, folder = compare.compare(compare.parser().parse_args(
        [runs["vega"], runs["plain"], "--out", str(tmp_path / "cmp"), "--n_boot", "500"]))
    printed = capsys.readouterr().out
    assert len([line for line in printed.splitlines() if "no VEGA branch" in line]) == 1
    assert "cos to own anchor (all head)" in printed and "McNemar (exact binomial)" in printed
    _png(os.path.join(folder, "compare.png"))
    (pair,) = numbers["paired"]
    f1 = [r["values"]["weighted_f1"] for r in numbers["runs"]]
    assert pair["bootstrap"]["difference"] == pytest.approx(f1[1] - f1[0], abs=1e-9)
    assert pair["bootstrap_significant"] == (pair["bootstrap"]["low"] > 0 or pair["bootstrap"]["high"] < 0)
    frames = [pd.read_csv(os.path.join(runs[k], "predictions.csv")) for k in ("vega", "plain")]
    right = [f["label"] == f["prediction"] for f in frames]
    assert (pair["mcnemar"]["b"], pair["mcnemar"]["c"]) == (int((right[0] & ~right[1]).sum()),
                                                          int((~right[0] & right[1]).sum()))
    assert numbers["runs"][1]["alignment"] is None and numbers["runs"][0]["alignment"]["own"] == pytest.approx(
        read_jsonl(os.path.join(runs["vega"], "metrics.jsonl"))[pair_best(runs["vega"]) - 1]["test_align_all_own"])


def test_compare_with_a_seed_aggregate(runs, tmp_path, capsys):
    from vega_utils.insight import report
    per_seed = [{"seed": i, "run_dir": runs[k], "metrics": json.load(open(os.path.join(runs[k], "summary.json")))
                 ["best"]["test"]} for i, k in enumerate(("vega", "vega"))]
    folder = tmp_path / "aggregate-1"
    folder.mkdir()
    (folder / "aggregate.json").write_text(json.dumps(report.aggregate_runs(per_seed)))
    numbers, _ = compare.compare(compare.parser().parse_args(
        [str(folder), runs["plain"], "--out", str(tmp_path / "cmp"), "--n_boot", "200"]))
    printed = capsys.readouterr().out
    assert "paired tests skipped" in printed and not numbers["paired"]
    agg = numbers["runs"][0]
    assert agg["kind"] == "aggregate" and agg["values"]["weighted_f1"]["std"] == 0.0
    assert agg["alignment"]["own"]["mean"] == pytest.approx(
        read_jsonl(os.path.join(runs["vega"], "metrics.jsonl"))[pair_best(runs["vega"]) - 1]["test_align_all_own"])
    wf1 = 100 * agg["values"]["weighted_f1"]["mean"]
    assert f"| weighted F1 | {wf1:.2f} ± 0.00 |" in printed


def pair_best(run_dir):
    return json.load(open(os.path.join(run_dir, "summary.json")))["best_epoch"]


def test_bad_folders_get_one_line(tmp_path, capsys):
    assert analyze.main([str(tmp_path)]) == 2
    assert compare.main([str(tmp_path), str(tmp_path)]) == 2
    assert compare.main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "config.json not found" in err[0] and "neither a run folder" in err[1]
