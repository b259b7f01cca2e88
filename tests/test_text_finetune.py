"""extract.py --text_finetune on generated conversations with a tiny encoder built from a config: fine-tuned
features carry the label a frozen encoder's first token hides, the test and predict labels never change the
weights, an interrupted fine-tune (kill -9, Ctrl-C) resumes to the weights of an uninterrupted one, and --like
reuses the saved encoder without training."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from anchor_fixtures import make_tiny_clip
from extract_fixtures import keyword_rows, keyword_sentences, make_manifest, make_tiny_text_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import extract  # noqa: E402
from vega_utils.cpu import native_bf16  # noqa: E402

# A small, quick recipe for a 2-layer encoder of width 32 (COSMIC's learning rate of 1e-6 suits RoBERTa-large).
RECIPE = ["--finetune_lr", "2e-3", "--finetune_epochs", "5", "--finetune_batch_size", "16",
          "--finetune_accumulation", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return {"root": root, "text": make_tiny_text_model(str(root / "text"), sentences=keyword_sentences()),
            "clip": make_tiny_clip(str(root / "clip"), projection_dim=16, image_size=32)}


def common(tiny, manifest):
    return ["--manifest", manifest, "--text_model", tiny["text"], "--visual_model", tiny["clip"], "--audio",
            "egemaps", "--batch_size", "16", "--no_progress"]


def load(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def record(out):
    return json.load(open(out[:-4] + ".json"))["extraction"]


@pytest.fixture(scope="module")
def tuned(tiny):
    """A frozen and a fine-tuned extraction of the same 65 dialogues (36 train, 9 valid, 15 test, 5 predict)."""
    root = tiny["root"]
    manifest = make_manifest(str(root), keyword_rows(60, predict=5), "keywords.csv")
    frozen, tuned = str(root / "frozen.npz"), str(root / "tuned.npz")
    assert extract.main(common(tiny, manifest) + ["--out", frozen]) == 0
    assert extract.main(common(tiny, manifest) + ["--out", tuned, "--text_finetune", *RECIPE]) == 0
    return {"manifest": manifest, "frozen": frozen, "tuned": tuned}


def probe_accuracy(path):
    """Test accuracy (%) of a logistic regression on the train rows' text features."""
    from sklearn.linear_model import LogisticRegression
    z = load(path)
    train, test = z["split"] == "train", z["split"] == "test"
    probe = LogisticRegression(max_iter=2000).fit(z["text"][train], z["label"][train])
    return 100 * probe.score(z["text"][test], z["label"][test])


def test_a_probe_on_finetuned_features_beats_the_frozen_ones(tuned):
    frozen, fine = probe_accuracy(tuned["frozen"]), probe_accuracy(tuned["tuned"])
    # measured on 2 AMD EPYC cores, 90 test utterances: frozen 28.9 (chance is 33), fine-tuned 98.9-100.0 with
    # --finetune_seed 0, 1, 2
    assert fine - frozen >= 50, (frozen, fine)
    ft = record(tuned["tuned"])["text_finetune"]
    assert ft["valid_from"] == "the valid split (54 utterances)" and ft["train_utterances"] == 216
    assert len(ft["epochs"]) == 5 and 0 <= ft["test_weighted_f1"] <= 100
    assert ft["precision"].startswith("bfloat16" if native_bf16()[0] else "float32 (this CPU has no native bf16")
    assert ft["valid_accuracy"] == max(e["valid_accuracy"] for e in ft["epochs"])
    text = record(tuned["tuned"])["extractors"]["text"]
    assert text["model"] == "tuned.text_encoder" and text["weights_sha256"] == ft["encoder_weights_sha256"]
    assert os.path.isdir(ft["encoder"]) and not os.path.exists(tuned["tuned"] + ".finetune")


def permuted(manifest, path, splits, seed=1):
    """The manifest with the labels of the rows of `splits` shuffled among those rows."""
    import csv
    rows = list(csv.DictReader(open(manifest)))
    idx = [i for i, r in enumerate(rows) if r["split"] in splits]
    labels = np.random.default_rng(seed).permutation([rows[i]["label"] for i in idx])
    assert any(rows[i]["label"] != y for i, y in zip(idx, labels))
    for i, y in zip(idx, labels):
        rows[i]["label"] = y
    return make_manifest(os.path.dirname(path), rows, os.path.basename(path))


def test_test_and_predict_labels_never_change_the_weights(tiny, tuned, tmp_path):
    shuffled = str(tmp_path / "shuffled.npz")
    other = permuted(tuned["manifest"], str(tmp_path / "other.csv"), ("test", "predict"))
    assert extract.main(common(tiny, other) + ["--out", shuffled, "--text_finetune", *RECIPE]) == 0
    a, b = record(tuned["tuned"])["text_finetune"], record(shuffled)["text_finetune"]
    assert a["encoder_weights_sha256"] == b["encoder_weights_sha256"]
    np.testing.assert_array_equal(load(tuned["tuned"])["text"], load(shuffled)["text"])
    assert a["test_weighted_f1"] != b["test_weighted_f1"]        # the test labels are read for the report only
    # the same check fails where it should: shuffled train labels give other weights
    train = str(tmp_path / "train.npz")
    other = permuted(tuned["manifest"], str(tmp_path / "train.csv"), ("train",))
    assert extract.main(common(tiny, other) + ["--out", train, "--text_finetune", *RECIPE]) == 0
    assert record(train)["text_finetune"]["encoder_weights_sha256"] != a["encoder_weights_sha256"]


def test_an_interrupted_finetune_resumes_to_the_same_weights(tiny, tmp_path):
    manifest = make_manifest(str(tmp_path), keyword_rows(24), "short.csv")
    recipe = [*RECIPE[:3], "3", *RECIPE[4:]]

    def run(out, stop=None):
        env = {**os.environ, **({"VEGA_FINETUNE_STOP_AFTER_EPOCH": stop} if stop else {})}
        command = [sys.executable, os.path.join(ROOT, "extract.py"), *common(tiny, manifest), "--out", out,
                   "--text_finetune", *recipe]
        return subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)

    whole, resumed = str(tmp_path / "whole.npz"), str(tmp_path / "resumed.npz")
    assert extract.main(common(tiny, manifest) + ["--out", whole, "--text_finetune", *recipe]) == 0
    killed = run(resumed, "1:KILL")                               # kill -9 once epoch 1's state is saved
    assert killed.returncode == -9 and os.path.exists(resumed + ".finetune/state.pt")
    stopped = run(resumed, "2:INT")                               # Ctrl-C once epoch 2's state is saved
    assert stopped.returncode == 2 and "resuming after epoch 1" in stopped.stdout
    assert "interrupted: run the same command again to continue after epoch 2" in stopped.stderr
    again = run(resumed)
    assert again.returncode == 0 and "resuming after epoch 2" in again.stdout
    assert "fine-tune epoch 3/3" in again.stdout and "epoch 2/3" not in again.stdout
    a, b = record(whole)["text_finetune"], record(resumed)["text_finetune"]
    assert a["encoder_weights_sha256"] == b["encoder_weights_sha256"] and a["epochs"] == b["epochs"]
    np.testing.assert_array_equal(load(whole)["text"], load(resumed)["text"])


def test_like_reuses_the_saved_encoder_without_training(tiny, tuned, tmp_path, capsys):
    rows = keyword_rows(60)[:5]
    for r in rows:
        r.pop("label"), r.pop("split")
    new = str(tmp_path / "new.npz")
    manifest = make_manifest(str(tmp_path), rows, "new.csv")
    capsys.readouterr()
    assert extract.main(["--like", tuned["tuned"][:-4] + ".json", "--manifest", manifest, "--out", new,
                         "--no_progress"]) == 0
    assert "fine-tune" not in capsys.readouterr().out
    first, again = record(tuned["tuned"]), record(new)
    assert again["extractors"] == first["extractors"] and again["text_finetune"] == first["text_finetune"]
    np.testing.assert_allclose(load(new)["text"], load(tuned["tuned"])["text"][:5], atol=1e-6)
    # a data folder moved whole: the encoder is found beside the JSON; gone, it is named in one line
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copytree(first["text_finetune"]["encoder"], moved / "tuned.text_encoder")
    spec = json.load(open(tuned["tuned"][:-4] + ".json"))
    spec["extraction"]["text_finetune"]["encoder"] = str(tmp_path / "gone" / "tuned.text_encoder")
    (moved / "tuned.json").write_text(json.dumps(spec))
    assert extract.main(["--like", str(moved / "tuned.json"), "--manifest", manifest, "--out", str(moved / "n.npz"),
                         "--no_progress"]) == 0
    np.testing.assert_array_equal(load(str(moved / "n.npz"))["text"], load(new)["text"])
    shutil.rmtree(moved / "tuned.text_encoder")
    capsys.readouterr()
    assert extract.main(["--like", str(moved / "tuned.json"), "--manifest", manifest, "--out", str(moved / "m.npz"),
                         "--no_progress"]) == 2
    assert "the fine-tuned text encoder of" in capsys.readouterr().err
    # a flag of the fine-tuning given with --like is refused, like every extractor flag
    assert extract.main(["--like", tuned["tuned"][:-4] + ".json", "--manifest", manifest, "--out", new,
                         "--finetune_epochs", "2"]) == 2
    assert "--finetune_epochs cannot change it" in capsys.readouterr().err


def test_text_layers_average_the_last_hidden_layers(tiny, tuned, tmp_path):
    import torch
    from transformers import AutoModel, AutoTokenizer
    out = str(tmp_path / "layers.npz")
    rows = keyword_rows(2)[:3]
    assert extract.main(common(tiny, make_manifest(str(tmp_path), rows, "l.csv")) + ["--out", out,
                                                                                      "--text_layers", "2"]) == 0
    tok, model = AutoTokenizer.from_pretrained(tiny["text"]), AutoModel.from_pretrained(tiny["text"]).eval()
    with torch.no_grad():
        states = model(**tok(rows[1]["text"], return_tensors="pt"), output_hidden_states=True).hidden_states
    np.testing.assert_allclose(load(out)["text"][1], (states[-1][0, 0] + states[-2][0, 0]).numpy() / 2, atol=1e-5)
    assert record(out)["extractors"]["text"]["layers"] == 2


def test_without_valid_rows_a_seeded_tenth_of_the_training_dialogues_is_held_out(tiny, tmp_path):
    rows = [r for r in keyword_rows(20) if r["split"] != "test"]
    for r in rows:
        r["split"] = "train"
    out = str(tmp_path / "held.npz")
    manifest = make_manifest(str(tmp_path), rows, "held.csv")
    assert extract.main(common(tiny, manifest) + ["--out", out, "--text_finetune", *RECIPE[:3], "1"]) == 0
    ft = record(out)["text_finetune"]
    held = ft["valid_from"].split(": ")[1].split(", ")
    assert ft["valid_from"].startswith("10% of the training dialogues held out (seed 0)") and len(held) == 2
    assert ft["valid_utterances"] == 12 and ft["train_utterances"] == len(rows) - 12
    assert ft["test_weighted_f1"] is None
