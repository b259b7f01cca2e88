"""inference.py: every checkpoint layout scores exactly like the model that wrote it; clear errors otherwise."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, reference_file

import inference
import train
from dataloader import load_dialogues, make_loaders
from model import VEGA
from vega_utils.data.datasets import dataset_info
from vega_utils.data.synthetic import make_synthetic_dataset
from vega_utils.insight import report
from vega_utils.runs import checkpoint
from vega_utils.runs.checkpoint import backbone_state_dict, is_backbone_key
from vega_utils.runs.config import load_preset, resolve

CLASSES = list(dataset_info("IEMOCAP").class_names)
SMALL = {"hidden_dim": 32}
# Everything the published format cannot record differs from the defaults here; outlayer_drop 0 also
# renumbers the head parameters (.0 .2 instead of .0 .3 .6).
OTHER = {"hidden_dim": 48, "n_head": 6, "outlayer_num": 2, "outlayer_drop": 0.0, "outlayer_activation_fn": "relu"}


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d.pkl"
    make_synthetic_dataset(path, n_train=6, n_test=4, max_len=12)
    return str(path)


def build(data_path, seed=0, **settings):
    cfg = resolve(load_preset("IEMOCAP").replace(clip_dim=16, data_path=data_path, **settings))
    torch.manual_seed(seed)
    model = VEGA(cfg)
    # shake the classifier heads, so predictions spread over the classes instead of one class everywhere
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_output_layer." in name:
                p.add_(torch.randn_like(p) * 0.05)
    return cfg, model


def expected(model, cfg):
    """What the in-memory model predicts on the test split, float32 on the CPU, through the training code."""
    loader = make_loaders(load_dialogues(cfg.data_path, cfg.Dataset), cfg)["test"]
    return train.eval_epoch(model, loader, cfg, None, None, torch.device("cpu"), None, with_losses=False,
                            progress=False)


def flags(settings):
    return [x for k, v in settings.items() for x in (f"--{k}", str(v))]


def run(checkpoint_path, data_path, *extra):
    return inference.main(["--checkpoint", str(checkpoint_path), "--data_path", data_path, "--amp", "off",
                           "--device", "cpu", "--no_progress", *extra])


def score_files(tmp_path, checkpoint_path, data_path, *extra):
    csv, js = tmp_path / "pred.csv", tmp_path / "scores.json"
    assert run(checkpoint_path, data_path, "--predictions_out", str(csv), "--json", str(js), *extra) == 0
    with open(js) as f:
        return pd.read_csv(csv, keep_default_na=False, dtype={"dialogue_id": str}), json.load(f)


def assert_same_scores(frame, scores, ev):
    assert list(frame.columns) == (report.PREDICTION_KEY_COLUMNS + [f"p_{c}" for c in CLASSES])
    assert list(frame["dialogue_id"]) == [str(d) for d in ev["dialogue_ids"]]
    assert list(frame["prediction"]) == [CLASSES[p] for p in ev["preds"]["all"]]
    np.testing.assert_allclose(frame[[f"p_{c}" for c in CLASSES]].to_numpy(), ev["probs"], atol=1e-6)
    want = report.classification_metrics(ev["labels"], ev["preds"]["all"], CLASSES)
    assert scores["metrics"] == want


# ---------------------------------------------------------------- scores match the writing model
def test_published_format_default_config_needs_no_flags(tmp_path, data_path):
    """The full-size default model, saved as the authors did (backbone keys only), scored with no model flags."""
    cfg, model = build(data_path)
    path = tmp_path / "IEMOCAP.pth"
    torch.save(backbone_state_dict(model), path)
    frame, scores = score_files(tmp_path, path, data_path)
    assert_same_scores(frame, scores, expected(model, cfg))
    assert "no config" in scores["config_source"]


def test_published_format_other_config(tmp_path, data_path):
    cfg, model = build(data_path, **OTHER)
    path = tmp_path / "other.pth"
    torch.save(backbone_state_dict(model), path)
    assert any(k.startswith("all_output_layer.2.") for k in backbone_state_dict(model))
    frame, scores = score_files(tmp_path, path, data_path, *flags(OTHER))
    assert_same_scores(frame, scores, expected(model, cfg))


@pytest.mark.parametrize("layout", ["state_dict_entry", "project", "full_model"])
def test_other_layouts_score_the_same(tmp_path, data_path, layout, capsys):
    cfg, model = build(data_path, **OTHER)
    path, extra = tmp_path / "ckpt.pth", flags(OTHER)
    if layout == "state_dict_entry":
        torch.save({"state_dict": backbone_state_dict(model)}, path)
    elif layout == "project":
        checkpoint.save_best(path, model, cfg, epoch=3, metrics={"weighted_f1": 0.5})
        extra = []   # the config travels with the file
    else:
        torch.save(model.state_dict(), path)   # VEGA-branch weights too: ignored with a notice
    frame, scores = score_files(tmp_path, path, data_path, *extra)
    assert_same_scores(frame, scores, expected(model, cfg))
    out = capsys.readouterr().out
    assert ("ignoring 20 VEGA-branch entries" in out) == (layout == "full_model")


def test_printed_metrics_agree_with_predictions_csv(tmp_path, data_path, capsys):
    cfg, model = build(data_path, **SMALL)
    path = tmp_path / "ckpt.pth"
    checkpoint.save_best(path, model, cfg, epoch=1, metrics={})
    csv = tmp_path / "p.csv"
    assert run(path, data_path, "--predictions_out", str(csv)) == 0
    out = capsys.readouterr().out
    from_csv = report.metrics_from_predictions_csv(str(csv), CLASSES)
    headline = re.search(r"weighted F1 ([\d.]+) \| accuracy ([\d.]+) \| weighted precision \(the reference's "
                         r"\"ACC\"\) ([\d.]+) \| macro F1 ([\d.]+)", out)
    assert headline, out
    for printed, key in zip(headline.groups(), report.HEADLINE_METRICS):
        assert float(printed) == pytest.approx(100 * from_csv[key], abs=0.005)
    for name in CLASSES:   # per-class rows: precision, recall, F1, support
        row = re.search(rf"^{name}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)$", out, re.M).groups()
        c = from_csv["per_class"][name]
        assert [float(x) for x in row[:3]] == pytest.approx([100 * c[k] for k in ("precision", "recall", "f1")],
                                                            abs=0.005)
        assert int(row[3]) == c["support"]
    assert from_csv["accuracy"] == pytest.approx(np.trace(from_csv["confusion"]) / from_csv["n"])


def test_train_split(tmp_path, data_path):
    cfg, model = build(data_path, **SMALL)
    path = tmp_path / "ckpt.pth"
    checkpoint.save_best(path, model, cfg, epoch=1, metrics={})
    frame, scores = score_files(tmp_path, path, data_path, "--split", "train")
    data = load_dialogues(data_path, "IEMOCAP")
    assert set(frame["dialogue_id"]) == set(data.train_ids)
    assert len(frame) == sum(len(d) for d in data.dialogues(data.train_ids)) == scores["metrics"]["n"]


def test_default_flags_fit_the_published_manifest():
    """With no flags, the model's backbone has exactly the names and shapes of the published checkpoints."""
    with open(reference_file("state_dict_manifest.json")) as f:
        manifest = json.load(f)
    for dataset in ("IEMOCAP", "MELD"):
        entry = manifest[f"{dataset}|openai/clip-vit-base-patch32"]
        args = inference.parser().parse_args([] if dataset == "IEMOCAP" else ["--dataset", dataset])
        cfg, _ = inference.model_config(args, None, "x.pth")
        with torch.device("meta"):
            model = VEGA(cfg)
        got = {k: list(v.shape) for k, v in model.state_dict().items() if is_backbone_key(k)}
        assert got == {k: entry["all"][k] for k in entry["checkpoint_keys"]}


# ---------------------------------------------------------------- errors
def error_of(capsys, checkpoint_path, data_path, *extra):
    assert run(checkpoint_path, data_path, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("built, flags, expected", [
    (SMALL, ["--hidden_dim", "64"],   # another hidden size: the shape, the size it has, and the fix
     ["wrong shape", "file (1, 512, 32), model (1, 512, 64)", "hidden_dim=32", "try: --hidden_dim 32"]),
    (OTHER, ["--hidden_dim", "48"],   # another head layout: missing and unexpected keys, and the flags
     ["missing", "unexpected", "try: --outlayer_num 2 --outlayer_drop 0"]),
])
def test_a_checkpoint_of_another_config_names_the_fix(tmp_path, data_path, capsys, built, flags, expected):
    _, model = build(data_path, **built)
    path = tmp_path / "other.pth"
    torch.save(backbone_state_dict(model), path)
    err = error_of(capsys, path, data_path, *flags)
    for text in expected:
        assert text in err, text
    # the fix comes first, then what the file looks like, then at most three entry names of each kind
    assert err.index("try: ") < err.index("looks like a model") < err.index("Entries: ")
    assert "above 0" not in err and "outlayer_drop=" not in err
    for names in re.findall(r"(?:wrong shape|missing|unexpected) \d+(?: \(e\.g\. [^)]*\)\))?: ([^;]*)", err):
        assert names.split(" ... and ")[0].count(",") <= 2, names


def test_the_vega_branch_file_is_named_with_the_file_to_give(tmp_path, data_path, capsys):
    cfg, model = build(data_path, **SMALL)
    best = tmp_path / "BEST_cls_f1_50.00_epoch3.pth"
    checkpoint.save_best(best, model, cfg, epoch=3, metrics={})
    branch = tmp_path / checkpoint.BRANCH_FILE
    checkpoint.save_branch(branch, model, cfg, epoch=3)
    err = error_of(capsys, branch, data_path)
    assert "VEGA branch" in err and "holds no state_dict" not in err and f"give {best} instead" in err
    os.remove(best)   # no best-epoch file beside it: its last.pth, else what to look for
    (tmp_path / "last.pth").write_bytes(b"")
    assert f"give {tmp_path / 'last.pth'} instead" in error_of(capsys, branch, data_path)
    os.remove(tmp_path / "last.pth")
    assert "BEST_cls_f1_*_epoch*.pth checkpoint (or last.pth)" in error_of(capsys, branch, data_path)


def test_missing_and_unexpected_keys_are_listed(tmp_path, data_path, capsys):
    _, model = build(data_path, **SMALL)
    state = backbone_state_dict(model)
    del state["t_t_gate.fc.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    err = error_of(capsys, path, data_path, *flags(SMALL))
    assert "missing 1: t_t_gate.fc.weight" in err and "unexpected 1: extra.weight" in err


def test_many_missing_keys_are_capped(tmp_path, data_path, capsys):
    _, model = build(data_path, **SMALL)
    state = {k: v for k, v in backbone_state_dict(model).items() if not k.startswith("t_t.")}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    err = error_of(capsys, path, data_path, *flags(SMALL))
    assert re.search(r"missing \d+: .* \.\.\. and \d+ more", err)


def test_non_finite_weights_are_refused(tmp_path, data_path, capsys):
    cfg, model = build(data_path, **SMALL)
    with torch.no_grad():
        model.t_t_gate.fc.weight[0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    checkpoint.save_best(path, model, cfg, epoch=1, metrics={})
    err = error_of(capsys, path, data_path)
    assert "non-finite values in t_t_gate.fc.weight" in err and "own config" not in err


def test_flags_contradicting_the_checkpoint_config(tmp_path, data_path, capsys):
    cfg, model = build(data_path, **SMALL)
    path = tmp_path / "ckpt.pth"
    checkpoint.save_best(path, model, cfg, epoch=1, metrics={})
    err = error_of(capsys, path, data_path, "--hidden_dim", "64", "--dataset", "MELD")
    assert "--hidden_dim 64 (the checkpoint's config has hidden_dim=32)" in err
    assert "--dataset MELD (the checkpoint's config has Dataset=IEMOCAP)" in err
    # named as typed: --Dataset is the other spelling of --dataset
    err = error_of(capsys, path, data_path, "--Dataset=MELD")
    assert "--Dataset MELD (the checkpoint's config has Dataset=IEMOCAP)" in err and "--dataset" not in err
    # agreeing model flags and the run-time ones are fine
    assert run(path, data_path, "--hidden_dim", "32", "--batch_size", "2") == 0


@pytest.mark.parametrize("kind", ["text", "truncated", "pickled_object", "no_state_dict", "missing_file"])
def test_unreadable_files(tmp_path, data_path, capsys, kind):
    _, model = build(data_path, **SMALL)
    path = tmp_path / "bad.pth"
    if kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "truncated":
        torch.save(backbone_state_dict(model), path)
        path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    elif kind == "pickled_object":
        torch.save({"state_dict": backbone_state_dict(model), "loader": np.random.default_rng(0)}, path)
    elif kind == "no_state_dict":
        torch.save({"weights": [1, 2, 3]}, path)
    err = error_of(capsys, path, data_path, *flags(SMALL))
    want = {"text": "not a torch checkpoint: it is a text file", "truncated": "truncated or corrupt",
            "pickled_object": "would execute code", "no_state_dict": "holds no state_dict",
            "missing_file": "does not exist"}[kind]
    assert want in err


def test_never_overwrites_the_checkpoint_or_data(tmp_path, data_path, capsys):
    cfg, model = build(data_path, **SMALL)
    path = tmp_path / "ckpt.pth"
    checkpoint.save_best(path, model, cfg, epoch=1, metrics={})
    before = path.read_bytes()
    assert "is the checkpoint" in error_of(capsys, path, data_path, "--predictions_out", str(path))
    assert "is the data file" in error_of(capsys, path, data_path, "--json", data_path)
    assert "--cpu contradicts --device cuda" in error_of(capsys, path, data_path, "--cpu", "--device", "cuda")
    assert path.read_bytes() == before


def test_command_line_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "inference.py"), "--checkpoint",
                           str(tmp_path / "absent.pth")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: checkpoint") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
