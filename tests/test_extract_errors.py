"""Bad input to extract.py: one line naming the row and the file, exit 2, no output; --on_error skip drops
the utterance and lists it. And the 9- and 10-tuple pickles the field circulates."""
import os
import pickle

import numpy as np
import pytest
from anchor_fixtures import make_tiny_clip
from extract_fixtures import make_manifest, make_tiny_text_model, write_mp4, write_wav

import extract


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    corrupt = root / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 40)
    return {"root": str(root), "wav": write_wav(str(root / "ok.wav"), 0.5), "mp4": write_mp4(str(root / "ok.mp4")),
            "corrupt": str(corrupt), "text": make_tiny_text_model(str(root / "text")),
            "clip": make_tiny_clip(str(root / "clip"))}


GOOD = {"dialogue_id": "d", "speaker": "a", "text": "yeah", "audio": "ok.wav", "label": "x", "split": "train"}
CASES = {
    "missing file": ({"audio": "nowhere.wav"}, "file not found"),
    "corrupt stream": ({"audio": "corrupt.wav"}, "cannot open the file"),
    "segment outside": ({"start": "0.2", "end": "9"}, "lies outside the file"),
    "zero length": ({"start": "0.3", "end": "0.3"}, "has zero length"),
    "empty text": ({"text": "  "}, "empty text"),
    "duplicate": ({"position": "0"}, "duplicate position"),
    "unknown split": ({"split": "dev"}, "unknown split 'dev'"),
    "unknown label": ({"label": "joy"}, "label 'joy' is not one of the classes"),
    "too short for its audio set": ({"start": "0", "end": "0.04"}, "audio features are not finite"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line(media, case, capsys):
    change, expected = CASES[case]
    rows = [{**GOOD, "position": "0"}, {**GOOD, "position": "1", **change}]
    manifest = make_manifest(media["root"], rows, f"{case.replace(' ', '_')}.csv")
    out = os.path.join(media["root"], f"{case.replace(' ', '_')}.npz")
    args = ["--manifest", manifest, "--out", out, "--text_model", media["text"], "--visual_model", media["clip"],
            "--audio", "egemaps", "--classes", "x,y", "--no_progress"]
    assert extract.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "row 3" in err[0] and not os.path.exists(out)
    if case in ("missing file", "corrupt stream"):
        assert change["audio"] in err[0]
    assert extract.main([*args, "--on_error", "skip"]) == 0
    z = np.load(out, allow_pickle=False)
    assert len(z["text"]) == 1 and expected in str(z["extraction"])


def circulated(n):
    """A 9-tuple (IEMOCAP) or 10-tuple (MELD) pickle in the field's layout, features of the built-in sizes."""
    rng = np.random.default_rng(0)
    ids, speakers, labels, text, audio, visual, sentences = {}, {}, {}, {}, {}, {}, {}
    meld = n == 10
    for vid in ("a", "b"):
        k = 3
        ids[vid] = [f"{vid}_utt{i}" for i in range(k)]
        speakers[vid] = [[1, 0] + [0] * 7 if meld else "M"] * k
        labels[vid] = [i % 6 for i in range(k)]
        text[vid] = rng.standard_normal((k, 1024)).astype(np.float32)
        audio[vid] = rng.standard_normal((k, 300 if meld else 1582)).astype(np.float32)
        visual[vid] = rng.standard_normal((k, 342)).astype(np.float32)
        sentences[vid] = [f"sentence {vid} {i}" for i in range(k)]
    blob = (ids, speakers, labels, text, audio, visual, sentences, ["a"], ["b"])
    return blob + ({"a": [0] * 3, "b": [0] * 3},) if meld else blob


@pytest.mark.parametrize("n,dataset,name", [(9, "IEMOCAP", "9-tuple IEMOCAP"), (10, "MELD", "10-tuple MELD")])
def test_circulated_pickles_load_with_their_sentences(tmp_path, capsys, n, dataset, name):
    from dataloader import load_dialogues, utterance_names
    from vega_utils.insight.report import write_predictions_csv
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps(circulated(n)))
    data = load_dialogues(str(path), dataset)
    assert name in capsys.readouterr().out
    named = utterance_names(data, ["b", "b"], [0, 2])
    assert named == {"utterance_id": ["b_utt0", "b_utt2"], "text": ["sentence b 0", "sentence b 2"]}
    csv = tmp_path / "p.csv"
    write_predictions_csv(str(csv), ["b", "b"], [0, 2], ["M", "M"], [0, 1], [0, 1], np.eye(len(data.class_names))[:2],
                          data.class_names, named)
    assert open(csv).readline().startswith("dialogue_id,utterance_index,utterance_id,text,speaker")
    from vega_utils.data.convert import convert
    convert(str(path), str(tmp_path / "data.npz"), dataset)
    z = np.load(tmp_path / "data.npz", allow_pickle=False)
    assert list(z["utterance_id"][:2]) == ["a_utt0", "a_utt1"] and z["sentence"][0] == "sentence a 0"
    assert load_dialogues(str(tmp_path / "data.npz"), dataset).records["a"].sentences[1] == "sentence a 1"


def test_other_pickle_shapes_name_the_known_layouts(tmp_path):
    from dataloader import load_dialogues
    from vega_utils.common import VegaError
    path = tmp_path / "odd.pkl"
    path.write_bytes(pickle.dumps(tuple({} for _ in range(8))))
    with pytest.raises(VegaError, match="9-tuple IEMOCAP layout.*10-tuple MELD layout.*length 8"):
        load_dialogues(str(path), "IEMOCAP")


def test_malformed_sources_and_flags_are_one_line(media, tmp_path, capsys):
    """A manifest row with more fields than the header, a MELD CSV without a column, a negative context, and
    extractor flags given with --like: one line each, exit 2."""
    (tmp_path / "commas.csv").write_text("dialogue_id,speaker,text\nd,a,hello, there\n")
    (tmp_path / "good.csv").write_text("dialogue_id,speaker,text\nd,a,hello\n")
    meld = tmp_path / "meld"
    meld.mkdir()
    for name in ("train_sent_emo.csv", "dev_sent_emo.csv", "test_sent_emo.csv"):
        (meld / name).write_text("Sr No.,Utterance,Speaker,Dialogue_ID,Utterance_ID\n1,hi,Joey,0,0\n")
    base = ["--out", str(tmp_path / "o.npz"), "--text_model", media["text"], "--visual_model", media["clip"],
            "--no_progress"]
    like = tmp_path / "like.json"
    like.write_text('{"extraction": {"settings": {"frames": 2}}}')
    cases = [(["--manifest", str(tmp_path / "commas.csv")], "row 2: more fields than the header's 3"),
             (["--layout", "meld", "--root", str(meld)], "lacks column(s) Emotion"),
             (["--manifest", str(tmp_path / "commas.csv"), "--text_context", "-1"], "--text_context must be 0"),
             (["--like", str(like), "--manifest", str(tmp_path / "good.csv"), "--frames", "4"],
              "--frames cannot change it")]
    for args, expected in cases:
        assert extract.main([*args, *base]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (args, err)
    assert not os.path.exists(tmp_path / "o.npz")
