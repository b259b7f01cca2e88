"""Your own data: a dataset JSON, the open .npz format and its converter, IEMOCAP-4, predictions for
unlabelled dialogues, anchors for any label set."""
import glob
import json
import os
import pickle
import re

import numpy as np
import pandas as pd
import pytest
import torch
from anchor_fixtures import draw_face, make_tiny_clip
from conftest import ROOT

import inference
import run
from dataloader import load_dialogues
from vega_utils.anchors.build import main as anchor_main
from vega_utils.anchors.images import assign_images
from vega_utils.common import VegaError
from vega_utils.data import convert
from vega_utils.data.openformat import write_npz
from vega_utils.data.synthetic import make_synthetic_anchor_cache, make_synthetic_dataset

IEMOCAP4 = os.path.join(ROOT, "configs", "datasets", "IEMOCAP-4.json")
TINY = ["--hidden_dim", "32", "--epochs", "2", "--batch-size", "4", "--no_progress", "--device", "cpu",
        "--no_folder_brackets"]


def readme_example():
    """docs/own-data.md's example that writes a four-class dataset in the open format (run as it is printed)."""
    with open(os.path.join(ROOT, "docs", "own-data.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    [code] = [b for b in blocks if "feelings.npz" in b]
    return code


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """The docs example's files in a fresh folder: mydata/feelings.{npz,json}, images, a tiny CLIP."""
    root = tmp_path_factory.mktemp("own")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        exec(readme_example(), {})
    finally:
        os.chdir(cwd)
    mydata = root / "mydata"
    make_tiny_clip(mydata / "clip", projection_dim=16)
    for k, word in enumerate(["Happiness", "Angry", "Sad", "Calm"]):   # other words than the class names
        os.makedirs(mydata / "faces" / word)
        for i in range(2):
            draw_face(str(mydata / "faces" / word / f"{i}.png"), 10 * k + i)
    return mydata


def one_error(capsys, code, *words):
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and not any("Traceback" in line for line in err), err
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


# ---------------------------------------------------------------- end to end
def test_own_four_class_dataset_trains_builds_anchors_and_predicts(own, tmp_path, capsys):
    spec = str(own / "feelings.json")
    anchor = str(tmp_path / "anchor.pt")
    assert anchor_main(["--image_dir", str(own / "faces"), "--Dataset", spec, "--CLIP_Model", str(own / "clip"),
                        "--out", anchor, "--no_progress"]) == 0
    cache = torch.load(anchor)
    assert list(cache["anchor_img_dict"]) == ["joy", "anger", "sadness", "calm"]
    assert cache["anchor_center"].shape == (4, 16)

    out = tmp_path / "out"
    assert run.run(["--Dataset", spec, "--CLIP_Model", str(own / "clip"), "--anchor_path", anchor,
                    "--output_dir", str(out), "--lr", "1e-3"] + TINY) == 0
    [run_dir] = glob.glob(str(out / "feelings" / "*"))
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["n_classes"] == 4 and config["n_speakers"] == 2 and config["dataset_spec"]["speakers"] == ["A", "B"]
    assert (config["text_dim"], config["audio_dim"], config["visual_dim"]) == (64, 32, 16)   # read from the data
    labels = np.load(own / "feelings.npz")["label"][np.load(own / "feelings.npz")["split"] == "train"]
    counts = np.array([(labels == c).sum() for c in ["joy", "anger", "sadness", "calm"]])
    assert np.allclose(config["class_weights"], labels.size / (4 * counts))                 # balanced
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    for key in ("test_f1_all", "test_f1_t", "test_f1_a", "test_f1_v", "train_clip_all", "train_clip_kl_t"):
        assert np.isfinite(rows[-1][key]), key                                             # 4 heads, VEGA branch
    [best] = glob.glob(os.path.join(run_dir, "BEST_*.pth"))
    state = torch.load(best, weights_only=True)["state_dict"]
    assert [v.shape[0] for k, v in state.items() if k.endswith("output_layer.6.weight")] == [4] * 4
    capsys.readouterr()

    csv = str(tmp_path / "pred.csv")
    assert inference.main(["--checkpoint", best, "--split", "predict", "--predictions_out", csv,
                           "--no_progress"]) == 0
    printed = capsys.readouterr().out
    assert "no metric can be computed" in printed and "predicted classes: joy" in printed
    frame = pd.read_csv(csv, keep_default_na=False)
    npz = np.load(own / "feelings.npz")
    assert len(frame) == int((npz["split"] == "predict").sum()) and set(frame["label"]) == {""}
    probs = frame[["p_joy", "p_anger", "p_sadness", "p_calm"]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (np.array(["joy", "anger", "sadness", "calm"])[probs.argmax(1)] == frame["prediction"]).all()
    shown = re.search(r"predicted classes: (.*)", printed).group(1)
    for c, n in frame["prediction"].value_counts().items():
        assert f"{c} {n} (" in shown

    # the test split is labelled: scored as before, the number training recorded
    assert inference.main(["--checkpoint", best, "--no_progress"]) == 0
    printed = capsys.readouterr().out
    recorded = json.load(open(os.path.join(run_dir, "summary.json")))["best"]["test"]["weighted_f1"]
    assert f"weighted F1 {100 * recorded:.2f} |" in printed


def test_default_predictions_file_is_never_replaced(own, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "predictions.csv").write_text("mine\n")
    out = tmp_path / "out"
    spec = str(own / "feelings.json")
    assert run.run(["--Dataset", spec, "--no_clip_loss", "--output_dir", str(out)] + TINY) == 0
    [best] = glob.glob(str(out / "feelings" / "*" / "BEST_*.pth"))
    capsys.readouterr()
    code = inference.main(["--checkpoint", best, "--split", "predict", "--no_progress"])
    one_error(capsys, code, "predictions.csv exists", "--predictions_out")
    assert (tmp_path / "predictions.csv").read_text() == "mine\n"


# ---------------------------------------------------------------- IEMOCAP-4
def test_iemocap4_mapping_dropped_count_and_balanced_weights(tmp_path):
    from sklearn.utils.class_weight import compute_class_weight

    from vega_utils.data.datasets import class_weights_of, dataset_info
    path = tmp_path / "iemocap.pkl"
    make_synthetic_dataset(path, n_train=10, n_test=4, max_len=14, seed=2)
    raw = pickle.load(open(path, "rb"))
    data = load_dialogues(path, IEMOCAP4)
    assert data.class_names == ["happy", "anger", "sad", "neutral"]
    six_to_four = {0: 0, 4: 0, 3: 1, 1: 2, 2: 3}      # happy, excited -> happy; anger; sad; neutral; 5 dropped
    n_frustrated = sum(int(np.sum(np.asarray(raw[1][v]) == 5)) for v in raw[5] + raw[6])
    assert n_frustrated > 0 and data.dropped == {"frustration": n_frustrated}
    for vid in raw[5] + raw[6]:
        keep = [i for i, y in enumerate(raw[1][vid]) if y != 5]
        d = data.records[vid]
        assert d.labels.tolist() == [six_to_four[raw[1][vid][i]] for i in keep]
        assert torch.equal(d.text, torch.from_numpy(raw[2][vid][keep]))                    # the same rows
        assert d.speakers.tolist() == ["MF".index(raw[0][vid][i]) for i in keep]
    train_y = np.concatenate([data.records[v].labels.numpy() for v in data.train_ids])
    expected = compute_class_weight("balanced", classes=np.arange(4), y=train_y)
    assert np.allclose(class_weights_of(dataset_info(IEMOCAP4), data), expected, rtol=1e-12)
    assert "dropped " + str(n_frustrated) in data.describe_dropped()


def test_iemocap4_uses_an_iemocap_anchor_cache(tmp_path):
    from vega_utils.anchors.bank import load_anchor_cache
    path = tmp_path / "a.pt"
    cache = make_synthetic_anchor_cache(path, clip_dim=8)
    bank = load_anchor_cache(path, ["happy", "anger", "sad", "neutral"])
    assert torch.equal(bank.centers, cache["anchor_center"][[0, 3, 1, 2]])


# ---------------------------------------------------------------- pickle <-> open format
@pytest.mark.parametrize("dataset,text_as_3d", [("IEMOCAP", True), ("MELD", False)])
def test_round_trip_is_exact(tmp_path, dataset, text_as_3d):
    src = tmp_path / "a.pkl"
    make_synthetic_dataset(src, dataset=dataset, n_train=5, n_test=3, max_len=9, seed=4, text_as_3d=text_as_3d)
    assert convert.main([str(src), str(tmp_path / "a.npz"), "--Dataset", dataset]) == 0
    assert convert.main([str(tmp_path / "a.npz"), str(tmp_path / "b.pkl"), "--Dataset", dataset]) == 0
    a, b = pickle.load(open(src, "rb")), pickle.load(open(tmp_path / "b.pkl", "rb"))
    assert list(a[5]) == b[5] and list(a[6]) == b[6]
    for vid in list(a[5]) + list(a[6]):
        assert [list(s) if not isinstance(s, str) else s for s in a[0][vid]] == b[0][vid]
        assert list(a[1][vid]) == b[1][vid]
        for k in (2, 3, 4):
            x = np.asarray(a[k][vid])
            x = x[0] if x.ndim == 3 else x                                              # [1, n, D] -> [n, D]
            assert x.dtype == b[k][vid].dtype and x.tobytes() == b[k][vid].tobytes()


def test_training_on_both_forms_is_identical(tmp_path):
    src = tmp_path / "d.pkl"
    make_synthetic_dataset(src, n_train=6, n_test=3, max_len=9, seed=6)
    assert convert.main([str(src), str(tmp_path / "d.npz")]) == 0
    make_synthetic_anchor_cache(tmp_path / "anchor.pt", clip_dim=512)
    rows = {}
    for form in ("pkl", "npz"):
        out = tmp_path / form
        assert run.run(["--data_path", str(tmp_path / f"d.{form}"), "--anchor_path", str(tmp_path / "anchor.pt"),
                        "--output_dir", str(out), "--amp", "off"] + TINY) == 0
        [metrics] = glob.glob(str(out / "IEMOCAP" / "*" / "metrics.jsonl"))
        rows[form] = [{k: v for k, v in json.loads(line).items() if "seconds" not in k and k != "cpu_shared"}
                      for line in open(metrics)]
    assert rows["pkl"] == rows["npz"] and len(rows["pkl"]) == 2


def test_converter_refuses_to_replace_and_splits_it_cannot_hold(own, tmp_path, capsys):
    src = tmp_path / "d.pkl"
    make_synthetic_dataset(src, n_train=3, n_test=2, min_len=3, max_len=6, seed=1)
    (tmp_path / "d.npz").write_text("keep")
    one_error(capsys, convert.main([str(src), str(tmp_path / "d.npz")]), "exists")
    assert (tmp_path / "d.npz").read_text() == "keep"
    code = convert.main([str(own / "feelings.npz"), str(tmp_path / "f.pkl"), "--Dataset", str(own / "feelings.json")])
    one_error(capsys, code, "feelings.npz", "predict")


# ---------------------------------------------------------------- bad files of the open format
def good_columns(seed=0):
    rng = np.random.default_rng(seed)
    n = [4, 5, 3, 4]
    ids = np.repeat(["a", "b", "c", "d"], n)
    return {"dialogue_id": ids, "position": np.concatenate([np.arange(k) for k in n]),
            "speaker": np.array(["x", "y"] * 8), "label": rng.integers(0, 2, 16),
            "split": np.repeat(["train", "train", "test", "predict"], n),
            "text": rng.normal(size=(16, 6)).astype(np.float32), "audio": rng.normal(size=(16, 4)),
            "visual": rng.normal(size=(16, 3)).astype(np.float32)}


def write_case(tmp_path, edit, weights="none"):
    cols = good_columns()
    edit(cols)
    np.savez(tmp_path / "bad.npz", **cols)
    with open(tmp_path / "bad.json", "w") as f:
        json.dump({"classes": ["calm", "upset"], "data_path": "bad.npz", "class_weights": weights}, f)
    return str(tmp_path / "bad.json")


BAD_OPEN = {
    "pickled object": (lambda c: c.__setitem__("speaker", np.array(["x", {"p": 1}] * 8, dtype=object)),
                       ["bad.npz", "'speaker'", "pickled object array"]),
    "row counts": (lambda c: c.__setitem__("audio", c["audio"][:-1]), ["bad.npz", "'audio' has 15 rows", "16"]),
    "label outside the classes": (lambda c: c["label"].__setitem__(2, 7), ["bad.npz", "label 7", "'a'",
                                                                            "out of range [0, 2)"]),
    "class name outside the classes": (lambda c: c.__setitem__("label", np.array(["calm", "upset", "glad"])[
        np.r_[c["label"][:15], 2]]), ["bad.npz", "'d'", "not a class name (calm, upset)", "'glad'"]),
    "NaN": (lambda c: c["text"].__setitem__((5, 1), np.nan), ["bad.npz", "'b'", "non-finite"]),
    "position twice": (lambda c: c["position"].__setitem__(1, 0), ["bad.npz", "'a'", "positions"]),
    "two splits": (lambda c: c["split"].__setitem__(0, "test"), ["bad.npz", "'a'", "several splits"]),
    "unknown split": (lambda c: c["split"].__setitem__(0, "dev"), ["bad.npz", "'dev'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_OPEN))
def test_bad_open_files_give_one_line(tmp_path, capsys, case):
    edit, words = BAD_OPEN[case]
    spec = write_case(tmp_path, edit)
    code = run.run(["--Dataset", spec, "--no_clip_loss", "--output_dir", str(tmp_path / "out")] + TINY)
    one_error(capsys, code, *words)
    assert not os.path.exists(tmp_path / "out" / "bad")


def test_a_files_valid_split_selects_the_epoch(tmp_path, capsys):
    def b_is_valid(c):
        c["split"][c["dialogue_id"] == "b"] = "valid"
    spec = write_case(tmp_path, b_is_valid)
    assert run.run(["--Dataset", spec, "--no_clip_loss", "--output_dir", str(tmp_path / "out")] + TINY) == 0
    [summary] = glob.glob(str(tmp_path / "out" / "bad" / "*" / "summary.json"))
    assert json.load(open(summary))["selected_on"] == "valid"
    assert "1 train / 1 valid / 1 test dialogues" in capsys.readouterr().out


def test_a_json_without_data_path_takes_the_flag_and_resumes_without_the_json(tmp_path, capsys):
    spec = write_case(tmp_path, lambda c: None)
    data = {k: v for k, v in json.load(open(spec)).items() if k != "data_path"}
    json.dump(data, open(spec, "w"))
    base = ["--Dataset", spec, "--no_clip_loss", "--output_dir", str(tmp_path / "out")]
    one_error(capsys, run.run(base + TINY), "names no data file", "--data_path")
    assert run.run(base + ["--data_path", str(tmp_path / "bad.npz")] + TINY) == 0
    [run_dir] = glob.glob(str(tmp_path / "out" / "bad" / "*"))
    os.remove(spec)                                   # the run keeps the description it was trained with
    assert run.run(["--resume", run_dir, "--epochs", "3", "--no_progress"]) == 0
    assert len(open(os.path.join(run_dir, "metrics.jsonl")).readlines()) == 3


def test_balanced_weights_need_every_class_in_training(tmp_path, capsys):
    def no_upset_in_train(c):
        c["label"][c["split"] == "train"] = 0
    spec = write_case(tmp_path, no_upset_in_train, weights="balanced")
    code = run.run(["--Dataset", spec, "--no_clip_loss", "--output_dir", str(tmp_path / "out")] + TINY)
    one_error(capsys, code, "bad.npz", "balanced", "upset has no training utterance")


def test_same_check_same_message_in_both_formats(tmp_path):
    """A NaN in the pickle and in its open-format copy: the same message but for the file name."""
    src = tmp_path / "d.pkl"
    make_synthetic_dataset(src, n_train=3, n_test=2, min_len=3, max_len=6, seed=1)
    blob = list(pickle.load(open(src, "rb")))
    blob[3][blob[5][1]][2, 5] = np.nan
    pickle.dump(tuple(blob), open(src, "wb"))
    write_npz(tmp_path / "d.npz", columns_of(blob))
    messages = []
    for path in (src, tmp_path / "d.npz"):
        with pytest.raises(VegaError) as e:
            load_dialogues(path, "IEMOCAP")
        messages.append(str(e.value).replace(str(path), "FILE"))
    assert messages[0] == messages[1] and "non-finite" in messages[0]


def columns_of(blob):
    """The open format's columns of a 7-tuple, written directly (the converter refuses a file with a NaN)."""
    ids = list(blob[5]) + list(blob[6])
    n = {v: len(blob[1][v]) for v in ids}
    return {"dialogue_id": np.concatenate([[v] * n[v] for v in ids]),
            "position": np.concatenate([np.arange(n[v]) for v in ids]),
            "speaker": np.concatenate([blob[0][v] for v in ids]), "label": np.concatenate([blob[1][v] for v in ids]),
            "split": np.array(["train"] * sum(n[v] for v in blob[5]) + ["test"] * sum(n[v] for v in blob[6])),
            **{m: np.concatenate([blob[k][v] for v in ids]) for k, m in ((2, "text"), (3, "audio"), (4, "visual"))}}


# ---------------------------------------------------------------- anchors for any label set
def test_label_map_assigns_other_words_and_refusals_stay(tmp_path, capsys):
    classes = ["joy", "anger", "sadness", "calm"]
    words = {"happiness": "joy", "angry": "anger", "sad": "sadness"}
    for rel in ["Happiness/1.png", "Angry/2.png", "sad_3.png", "calm/4.png", "misc/5.png"]:
        os.makedirs(os.path.dirname(str(tmp_path / "img" / rel)), exist_ok=True)
        draw_face(str(tmp_path / "img" / rel), 1)
    got = assign_images(str(tmp_path / "img"), classes, words)
    assert {c: [os.path.relpath(p, tmp_path / "img") for p in ps] for c, ps in got.items()} == {
        "joy": ["Happiness/1.png"], "anger": ["Angry/2.png"], "sadness": ["sad_3.png"], "calm": ["calm/4.png"]}
    with pytest.raises(VegaError, match="no image for class"):                   # without the map: sad_3 is nobody's
        assign_images(str(tmp_path / "img"), classes)
    draw_face(str(tmp_path / "img" / "Happiness" / "angry_6.png"), 2)
    with pytest.raises(VegaError, match="more than one class"):
        assign_images(str(tmp_path / "img"), classes, words)
    bad_map = tmp_path / "map.json"
    bad_map.write_text(json.dumps({"happiness": "glee"}))
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"classes": classes}))
    code = anchor_main(["--image_dir", str(tmp_path / "img"), "--Dataset", str(spec), "--label_map", str(bad_map),
                        "--out", str(tmp_path / "a.pt")])
    one_error(capsys, code, "map.json", "'glee'")
