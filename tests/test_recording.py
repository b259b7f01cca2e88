"""A recording in, emotions out: transcripts (SRT, WebVTT, ASS) read into utterances, extract.py --media
--transcript, and inference.py --media: the checkpoint's extraction replayed on the cues, predictions.csv,
emotion subtitles and a timeline; --transcribe with a tiny Whisper built from its configuration."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
from extract_fixtures import make_manifest, make_models, write_mp4

import extract
import inference
from vega_utils.features.transcripts import read_recordings

VTT = """WEBVTT

00:00:00.200 --> 00:00:01.000
<v Ann>excuse <b>me</b></v>

00:00:01.100 --> 00:00:01.900
<v.loud Ben Smith>do you have <c.yellow>your</c> forms

00:00:02.000 --> 00:00:02.800
Ann: yeah &amp; <00:00:02.400>okay

00:00:02.900 --> 00:00:03.000
<i> </i>

00:00:03.000 --> 00:00:03.800 align:start
let me see them
"""

SRT = """1
00:00:00,200 --> 00:00:01,000
ANN: <i>excuse</i> me

2
00:00:01,100 --> 00:00:01,900
<font color="red">do you have</font>
your forms

3
00:00:02,000 --> 00:00:02,800
Ben: yeah
"""

ASS_EVENTS = [("Ann", 200, 1000, r"{\i1}excuse{\i0} me"), ("Ben", 1100, 1900, r"do you have\Nyour forms"),
              ("", 2000, 2800, "Ann: yeah")]


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def write_ass(path, events):
    import pysubs2
    subs = pysubs2.SSAFile()
    for name, start, end, text in events:
        subs.append(pysubs2.SSAEvent(start=start, end=end, text=text, name=name))
    subs.append(pysubs2.SSAEvent(start=0, end=500, text="a comment line", type="Comment"))
    subs.save(str(path))
    return str(path)


def cues(utterances):
    return [(u.speaker, u.text, u.start, u.end, u.utterance_id) for u in utterances]


@pytest.fixture(scope="module")
def talk(tmp_path_factory):
    root = tmp_path_factory.mktemp("talk")
    return {"root": root, "mp4": write_mp4(str(root / "talk.mp4"), seconds=4.0, seed=3)}


def test_webvtt_voice_tags_prefixes_and_styling(talk):
    utts, counts = read_recordings(talk["mp4"], write(talk["root"] / "talk.vtt", VTT))
    assert cues(utts) == [("Ann", "excuse me", 0.2, 1.0, "talk_cue1"),
                          ("Ben Smith", "do you have your forms", 1.1, 1.9, "talk_cue2"),
                          ("Ann", "yeah & okay", 2.0, 2.8, "talk_cue3"),
                          ("unknown", "let me see them", 3.0, 3.8, "talk_cue5")]
    assert all(u.video == talk["mp4"] and u.audio is None and u.dialogue_id == "talk" for u in utts)
    assert [u.position for u in utts] == [0, 1, 2, 3] and all(u.broken is None for u in utts)
    assert (counts["cues"], counts["empty"], counts["unknown_speaker"]) == (5, 1, 1)
    assert "1 empty cue(s) dropped" in counts.describe() and "share the speaker 'unknown'" in counts.describe()


def test_srt_and_ass(talk):
    utts, counts = read_recordings(talk["mp4"], write(talk["root"] / "talk.srt", SRT))
    assert cues(utts) == [("ANN", "excuse me", 0.2, 1.0, "talk_cue1"),
                          ("unknown", "do you have your forms", 1.1, 1.9, "talk_cue2"),
                          ("Ben", "yeah", 2.0, 2.8, "talk_cue3")]
    utts, counts = read_recordings(talk["mp4"], write_ass(talk["root"] / "talk.ass", ASS_EVENTS))
    assert cues(utts) == [("Ann", "excuse me", 0.2, 1.0, "talk_cue1"),
                          ("Ben", "do you have your forms", 1.1, 1.9, "talk_cue2"),
                          ("Ann", "yeah", 2.0, 2.8, "talk_cue3")]     # the comment line is no cue
    assert counts["unknown_speaker"] == 0


def test_audio_recording_and_folders_matched_by_name(talk, tmp_path):
    import soundfile
    from extract_fixtures import tone
    soundfile.write(str(tmp_path / "call.wav"), tone(3.0), 16000)
    shutil.copy(talk["mp4"], tmp_path / "talk.mp4")
    write(tmp_path / "call.srt", SRT)
    write(tmp_path / "talk.vtt", VTT)
    utts, counts = read_recordings(str(tmp_path), str(tmp_path))
    assert counts["recordings"] == 2 and {u.dialogue_id for u in utts} == {"call", "talk"}
    call = [u for u in utts if u.dialogue_id == "call"]
    assert call[0].audio == str(tmp_path / "call.wav") and call[0].video is None
    os.remove(tmp_path / "call.srt")
    utts, _ = read_recordings(str(tmp_path), str(tmp_path))
    assert "no transcript call.srt, .vtt, .ass or .ssa" in str(utts[0].broken)


def bad_line(tmp_path, capsys, media, transcript, *more):
    """The output of extract.py on a bad transcript: (exit code, stderr)."""
    out = str(tmp_path / "bad.npz")
    code = extract.main(["--media", media, "--transcript", transcript, "--out", out, "--no_progress", *more])
    return code, capsys.readouterr().err


def test_bad_transcripts_get_one_line_each(talk, tmp_path, capsys):
    past = write(tmp_path / "past.vtt", "WEBVTT\n\n00:00:01.000 --> 00:00:02.000\n<v A>fine\n\n"
                 "00:00:03.500 --> 00:00:05.000\n<v A>too late\n")
    code, err = bad_line(tmp_path, capsys, talk["mp4"], past)
    assert code == 2 and err.count("\n") == 1
    assert f"{past} cue 2 (3.500-5.000 s) ({talk['mp4']}): the cue ends at 5.000 s, past the end" in err
    overlap = write(tmp_path / "overlap.srt", "1\n00:00:00,500 --> 00:00:02,000\nA: one\n\n"
                    "2\n00:00:01,000 --> 00:00:01,500\nB: other speaker\n\n3\n00:00:01,500 --> 00:00:03,000\nA: two\n")
    code, err = bad_line(tmp_path, capsys, talk["mp4"], overlap)
    assert code == 2 and err.count("\n") == 1
    assert f"{overlap} cue 3 (1.500-3.000 s): the cue starts before the previous cue of 'A' ends (cue 1" in err
    unknown = write(tmp_path / "notes.vtt", "just some notes\nwithout any times\n")
    code, err = bad_line(tmp_path, capsys, talk["mp4"], unknown)
    assert code == 2 and err.strip() == (f"error: transcript {unknown}: not in a known format (one of SRT, WebVTT, "
                                         f"ASS, SSA)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint trained on an extraction of cut-up recordings (speakers numbered per dialogue), and the
    recording to predict with its WebVTT transcript."""
    import run
    root = tmp_path_factory.mktemp("trained")
    text, clip = make_models(str(root))
    write_mp4(str(root / "long.mp4"), seconds=8.0, seed=5)
    words = ["excuse me", "yeah", "you did", "oh god no", "okay", "let me see them"]
    rows = [{"dialogue_id": f"d{d}", "speaker": "ABC"[u % 3], "text": words[(d + u) % 6], "video": "long.mp4",
             "start": 0.5 * (4 * d + u), "end": 0.5 * (4 * d + u) + 0.45, "label": ["joy", "anger", "neutral"][
                 (d + u) % 3], "split": "test" if d == 3 else "train"} for d in range(4) for u in range(4)]
    data = str(root / "train.npz")
    assert extract.main(["--manifest", make_manifest(str(root), rows), "--out", data, "--text_model", text,
                         "--visual_model", clip, "--frames", "2", "--audio", "egemaps", "--speaker_ids", "dialogue",
                         "--text_finetune", "--finetune_epochs", "1", "--finetune_batch_size", "4",
                         "--finetune_accumulation", "1", "--no_progress"]) == 0
    encoder = json.load(open(data[:-4] + ".json"))["extraction"]["text_finetune"]["encoder"]
    assert run.run(["--Dataset", data[:-4] + ".json", "--epochs", "1", "--hidden_dim", "32", "--no_clip_loss",
                    "--output_dir", str(root / "runs"), "--no_progress"]) == 0
    best = next((root / "runs").glob("*/*/BEST*.pth"))
    mp4 = write_mp4(str(root / "talk.mp4"), seconds=4.0, seed=3)
    return {"root": root, "best": str(best), "json": data[:-4] + ".json", "mp4": mp4, "text": text, "clip": clip,
            "encoder": encoder, "vtt": write(root / "talk.vtt", VTT)}


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_one_command_equals_like_and_predict(trained, tmp_path):
    """inference.py --media --transcript against extract.py --like + inference.py --split predict on the same
    recording cut by hand into a manifest: the same features, the same probabilities."""
    import pysubs2
    out = tmp_path / "emotions"
    assert inference.main(["--checkpoint", trained["best"], "--media", trained["mp4"], "--transcript",
                           trained["vtt"], "--out", str(out), "--no_progress"]) == 0
    rows = [{"dialogue_id": "talk", "speaker": s, "text": t, "video": trained["mp4"], "start": a, "end": b}
            for s, t, a, b in [("Ann", "excuse me", 0.2, 1.0), ("Ben Smith", "do you have your forms", 1.1, 1.9),
                               ("Ann", "yeah & okay", 2.0, 2.8), ("unknown", "let me see them", 3.0, 3.8)]]
    by_hand = str(tmp_path / "by_hand.npz")
    assert extract.main(["--like", trained["json"], "--manifest", make_manifest(str(tmp_path), rows), "--out",
                         by_hand, "--no_progress"]) == 0
    expected = tmp_path / "expected.csv"
    assert inference.main(["--checkpoint", trained["best"], "--data_path", by_hand, "--split", "predict",
                           "--predictions_out", str(expected), "--no_progress"]) == 0
    with np.load(by_hand) as a, np.load(out / "features.npz") as b:
        for m in ("text", "audio", "visual"):
            np.testing.assert_array_equal(a[m], b[m])
        extraction = json.loads(str(b["extraction"]))
    assert extraction["extractors"]["text"]["model"] == "train.text_encoder"   # the fine-tuned encoder replayed
    got, want = read_csv(out / "predictions.csv"), read_csv(expected)
    classes = [k for k in want[0] if k.startswith("p_")]
    assert [r["text"] for r in got] == [r["text"] for r in want] == [r["text"] for r in rows]
    np.testing.assert_allclose([[float(r[c]) for c in classes] for r in got],
                               [[float(r[c]) for c in classes] for r in want], atol=1e-6, rtol=0)
    assert [r["emotion"] for r in got] == [r["prediction"] for r in want]
    assert [(r["speaker"], r["start"], r["end"]) for r in got] == [
        ("Ann", "0.200", "1.000"), ("Ben Smith", "1.100", "1.900"), ("Ann", "2.000", "2.800"),
        ("unknown", "3.000", "3.800")]
    # the subtitles read back: one cue per utterance, the original times, the emotion before the text
    for name in ("emotions.vtt", "emotions.srt"):
        subs = pysubs2.load(str(out / name))
        assert [(e.start, e.end) for e in subs] == [(200, 1000), (1100, 1900), (2000, 2800), (3000, 3800)]
        first = subs[0].plaintext
        p = max(float(got[0][c]) for c in classes)
        assert first == f"[{got[0]['emotion']} {100 * p:.0f}%] Ann: excuse me"
    assert subs[3].plaintext.endswith("%] let me see them")       # no speaker named: none shown
    png = (out / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # the same request again reuses the features; another transcript in the same folder is refused
    stamp = os.stat(out / "features.npz").st_mtime_ns
    assert inference.main(["--checkpoint", trained["best"], "--media", trained["mp4"], "--transcript",
                           trained["vtt"], "--out", str(out), "--no_progress"]) == 0
    assert os.stat(out / "features.npz").st_mtime_ns == stamp
    other = write(tmp_path / "other.vtt", VTT.replace("let me see them", "okay"))
    assert inference.main(["--checkpoint", trained["best"], "--media", trained["mp4"], "--transcript", other,
                           "--out", str(out), "--no_progress"]) == 2


def test_checkpoint_without_record_and_missing_model(trained, tmp_path, capsys):
    import torch
    obj = torch.load(trained["best"], weights_only=True)
    bare = tmp_path / "bare.pth"
    torch.save(obj["state_dict"] if "state_dict" in obj else obj["model"], bare)
    code = inference.main(["--checkpoint", str(bare), "--media", trained["mp4"], "--transcript", trained["vtt"],
                           "--out", str(tmp_path / "o1"), "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "carries no extraction record" in err
    for model, line in ((trained["encoder"], "the fine-tuned text encoder of"),
                        (trained["clip"], f"its visual model {trained['clip']}: no such folder")):
        os.rename(model, model + "_away")
        try:
            code = inference.main(["--checkpoint", trained["best"], "--media", trained["mp4"], "--transcript",
                                   trained["vtt"], "--out", str(tmp_path / os.path.basename(model)), "--no_progress"])
        finally:
            os.rename(model + "_away", model)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and line in err, err
    crowd = write(tmp_path / "crowd.vtt", VTT.replace("let me see them", "Cy: let me see them").replace(
        "<v.loud Ben Smith>", "<v Dee>").replace("Ann: yeah", "Eve: yeah"))
    code = inference.main(["--checkpoint", trained["best"], "--media", trained["mp4"], "--transcript", crowd,
                           "--out", str(tmp_path / "o3"), "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == (f"error: recording talk: 4 speakers (Ann, Dee, Eve, Cy), but checkpoint "
                                         f"{trained['best']} was trained on dialogues of at most 3")


def test_transcribe_with_a_tiny_whisper(trained, tmp_path):
    from vega_utils.data.toy_models import save_tiny_whisper
    whisper = save_tiny_whisper(str(tmp_path / "whisper"))
    out = tmp_path / "heard"
    assert inference.main(["--checkpoint", trained["best"], "--media", trained["mp4"], "--transcribe", whisper,
                           "--out", str(out), "--no_progress"]) == 0
    rows = read_csv(out / "predictions.csv")
    from vega_utils.features.media import probe
    assert rows and all(0 <= float(r["start"]) < float(r["end"]) <= probe(trained["mp4"])[0] for r in rows)
    assert {r["speaker"] for r in rows} == {"unknown"}
    assert all(abs(sum(float(v) for k, v in r.items() if k.startswith("p_")) - 1) < 1e-4 for r in rows)
    with np.load(out / "features.npz") as z:
        assert z["text"].shape[0] == len(rows) and np.abs(z["audio"]).sum() > 0
    assert os.path.isfile(out / "transcripts" / "talk.vtt") and os.path.isfile(out / "timeline.png")
    assert json.load(open(out / "recording.json"))["transcribe"] == whisper
    # extract.py --transcribe: the transcript kept beside the features, the same cues
    npz = str(tmp_path / "heard.npz")
    assert extract.main(["--media", trained["mp4"], "--transcribe", whisper, "--out", npz, "--text_model",
                         trained["text"], "--visual_model", trained["clip"], "--frames", "2", "--audio", "egemaps",
                         "--no_progress"]) == 0
    assert (tmp_path / "heard.transcripts" / "talk.vtt").read_text() == (out / "transcripts" / "talk.vtt").read_text()
    with np.load(npz) as z:
        assert list(z["sentence"]) == [r["text"] for r in rows]


def test_skip_drops_the_bad_cues_and_lists_them(trained, tmp_path, capsys):
    vtt = write(tmp_path / "talk.vtt", "WEBVTT\n\n00:00:00.200 --> 00:00:01.000\n<v A>excuse me\n\n"
                "00:00:00.500 --> 00:00:01.500\n<v A>overlapping\n\n00:00:01.500 --> 00:00:02.500\n<v B>yeah\n\n"
                "00:00:03.000 --> 00:00:09.000\n<v B>too late\n")
    out = str(tmp_path / "skip.npz")
    assert extract.main(["--media", trained["mp4"], "--transcript", vtt, "--out", out, "--text_model",
                         trained["text"], "--visual_model", trained["clip"], "--frames", "2", "--audio", "egemaps",
                         "--on_error", "skip", "--no_progress"]) == 0
    printed = capsys.readouterr().out
    with np.load(out) as z:
        assert list(z["sentence"]) == ["excuse me", "yeah"] and list(z["utterance_id"]) == ["talk_cue1", "talk_cue3"]
        record = json.loads(str(z["extraction"]))
    assert record["counts"]["skipped"] == 2 and printed.count("skipped: ") == 2
    assert "cue 2" in record["skipped"][0] and "overlap" in record["skipped"][0]
    assert "cue 4" in record["skipped"][1] and "past the end of the recording" in record["skipped"][1]


def test_a_mended_transcript_runs_in_the_same_folder(trained, tmp_path, capsys):
    late = write(tmp_path / "talk.vtt", VTT + "\n00:00:03.900 --> 00:00:06.000\n<v Ann>too late\n")
    out = str(tmp_path / "out")
    command = ["--checkpoint", trained["best"], "--media", trained["mp4"], "--transcript", late, "--out", out,
               "--no_progress"]
    assert inference.main(command) == 2 and "past the end of the recording" in capsys.readouterr().err
    write(tmp_path / "talk.vtt", VTT)
    assert inference.main(command) == 0 and len(read_csv(os.path.join(out, "predictions.csv"))) == 4


def test_a_folder_of_recordings_gets_subtitles_and_a_timeline_each(trained, tmp_path):
    import pysubs2
    for name in ("one", "two"):
        shutil.copy(trained["mp4"], tmp_path / f"{name}.mp4")
        write(tmp_path / f"{name}.vtt", VTT)
    out = tmp_path / "out"
    assert inference.main(["--checkpoint", trained["best"], "--media", str(tmp_path), "--transcript",
                           str(tmp_path), "--out", str(out), "--no_progress"]) == 0
    rows = read_csv(out / "predictions.csv")
    assert [r["dialogue_id"] for r in rows] == ["one"] * 4 + ["two"] * 4
    for name in ("one", "two"):
        assert len(pysubs2.load(str(out / f"{name}.emotions.srt"))) == 4
        assert (out / f"{name}.timeline.png").is_file()
