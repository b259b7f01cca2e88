"""extract.py tried as a new user would: texts longer than the model reads, an --out that holds finished work or
cannot be written, repeated utterance ids, counts after dropped utterances, refusals that name the setting that
differs, models that are not there (offline, a folder gone), --like from another folder. Tiny models, files
written here, one line and exit 2 for every refusal."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from extract_fixtures import make_manifest, make_models, make_tiny_text_model, write_wav

import extract

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    text, clip = make_models(str(root))
    return {"text": text, "clip": clip}


def base(models, out, *more):
    return ["--text_model", models["text"], "--visual_model", models["clip"], "--out", str(out), "--no_progress",
            "--audio", "egemaps", *more]


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def text_rows(texts, **extra):
    return [{"dialogue_id": "d", "speaker": "a", "text": t, **extra} for t in texts]


def test_a_text_longer_than_the_model_reads_is_truncated_at_its_positions(models, tmp_path, capsys):
    """The tiny BERT has 64 positions; --max_length stays at its default 512: the sequence is cut at 64 and
    counted, and its features are the model's on the first 64 tokens."""
    from transformers import AutoModel, AutoTokenizer
    long = " ".join(["okay but i got here first"] * 30)          # about 180 tokens
    manifest = make_manifest(str(tmp_path), text_rows([long, "yeah"]))
    out = tmp_path / "long.npz"
    assert extract.main(["--manifest", manifest, *base(models, out)]) == 0
    z = np.load(out, allow_pickle=False)
    record = json.loads(str(z["extraction"]))
    assert record["counts"]["truncated_text"] == 1 and record["extractors"]["text"]["max_length"] == 512
    tok, model = AutoTokenizer.from_pretrained(models["text"]), AutoModel.from_pretrained(models["text"]).eval()
    ids = tok(long, truncation=True, max_length=64, return_tensors="pt")
    assert ids["input_ids"].shape[1] == 64
    with torch.no_grad():
        direct = model(**ids).last_hidden_state[0, 0]
    np.testing.assert_allclose(z["text"][0], direct.numpy(), atol=1e-5)


def test_a_finished_out_is_kept_unless_overwrite(models, tmp_path, capsys):
    manifest = make_manifest(str(tmp_path), text_rows(["yeah", "you did"]))
    out = tmp_path / "done.npz"
    assert extract.main(["--manifest", manifest, *base(models, out)]) == 0
    before = (out.read_bytes(), (tmp_path / "done.json").read_bytes())
    capsys.readouterr()
    other = make_manifest(str(tmp_path), text_rows(["oh god no"]), "other.csv")
    assert extract.main(["--manifest", other, *base(models, out)]) == 2
    line = one_error_line(capsys)
    assert f"{out} holds a finished extraction (1 dialogue, 2 utterances" in line and "--overwrite" in line
    assert (out.read_bytes(), (tmp_path / "done.json").read_bytes()) == before
    (tmp_path / "done.npz").rename(tmp_path / "kept.npz")                    # only the JSON left: kept too
    assert extract.main(["--manifest", other, *base(models, out)]) == 2
    assert "done.json is the dataset JSON of a finished extraction" in one_error_line(capsys)
    assert extract.main(["--manifest", other, *base(models, out), "--overwrite"]) == 0
    assert len(np.load(out)["text"]) == 1 and f"wrote {out}: 1 dialogue, 1 utterance;" in capsys.readouterr().out


def test_an_unwritable_out_folder_is_said_before_any_model_loads(models, tmp_path):
    """A folder made read-only with chmod; root ignores modes, so as root the run drops the capability that lets
    it (setpriv). The text model is a name that cannot load: the folder is what the one line names."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    manifest = make_manifest(str(tmp_path), text_rows(["yeah"]))
    command = [sys.executable, os.path.join(ROOT, "extract.py"), "--manifest", manifest, "--out",
               str(locked / "sub" / "x.npz"), "--text_model", "no-such-model-here", "--no_progress"]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: no folder is unwritable")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        locked.chmod(0o755)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert f"cannot write in {locked}" in err[0] and "Permission denied" in err[0]
    assert not (locked / "sub").exists()


def test_a_repeated_utterance_id_names_both_rows(models, tmp_path, capsys):
    rows = text_rows(["yeah", "you did", "okay"], split="train", label="x")
    for r, uid in zip(rows, ["u1", "u2", "u1"]):
        r["utterance_id"] = uid
    manifest = make_manifest(str(tmp_path), rows)
    assert extract.main(["--manifest", manifest, *base(models, tmp_path / "o.npz")]) == 2
    line = one_error_line(capsys)
    assert f"{manifest} row 4: utterance_id 'u1' is also that of {manifest} row 2" in line
    rows[2].update(split="test", dialogue_id="e")                        # another split: its own predictions
    manifest = make_manifest(str(tmp_path), rows)
    assert extract.main(["--manifest", manifest, *base(models, tmp_path / "o.npz")]) == 0


def test_missing_counts_leave_out_the_utterances_dropped(models, tmp_path):
    """Two utterances without a video; one is dropped by --on_error skip (its audio too short for egemaps):
    missing_visual counts the one that is kept."""
    write_wav(str(tmp_path / "ok.wav"), 0.5)
    rows = text_rows(["yeah", "you did"], audio="ok.wav")
    rows[1].update(start="0", end="0.04")
    manifest = make_manifest(str(tmp_path), rows)
    out = tmp_path / "o.npz"
    assert extract.main(["--manifest", manifest, *base(models, out), "--on_error", "skip"]) == 0
    counts = json.loads(str(np.load(out)["extraction"]))["counts"]
    assert counts["skipped"] == 1 and counts["missing_visual"] == 1 and counts["missing_audio"] == 0


def test_refusals_name_the_setting_that_differs(models, tmp_path, capsys):
    """inference's refusal of features from another extraction, and --like after the model's weights changed."""
    from vega_utils.common import VegaError
    from vega_utils.features.record import require_same_extraction
    manifest = make_manifest(str(tmp_path), text_rows(["yeah", "you did"]))
    records = {}
    for pooling in ("cls", "mean"):
        out = tmp_path / f"{pooling}.npz"
        assert extract.main(["--manifest", manifest, *base(models, out), "--text_pooling", pooling]) == 0
        records[pooling] = json.loads(str(np.load(out)["extraction"]))
    with pytest.raises(VegaError) as e:
        require_same_extraction(records["cls"], records["mean"], "new.npz")
    assert "text pooling mean here, cls in training" in str(e.value)
    text = make_tiny_text_model(str(tmp_path / "text"))
    out = tmp_path / "first.npz"
    assert extract.main(["--manifest", manifest, *base({**models, "text": text}, out)]) == 0
    make_tiny_text_model(text, seed=1)                                   # same folder, other weights
    capsys.readouterr()
    assert extract.main(["--like", str(tmp_path / "first.json"), "--manifest", manifest, "--no_progress",
                         "--out", str(tmp_path / "again.npz")]) == 2
    line = one_error_line(capsys)
    assert "text weights sha256" in line and "here," in line and "in the record" in line


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no connection"])
def test_an_absent_hub_model_offline_is_one_line_at_once(tmp_path, offline):
    """A made-up hub name, not in the cache: with HF_HUB_OFFLINE=1, and without it where the hub cannot be
    reached (the hub's address pointed at a closed local port)."""
    manifest = make_manifest(str(tmp_path), text_rows(["yeah"]))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update({"HF_HUB_OFFLINE": "1"} if offline == "HF_HUB_OFFLINE" else {"HF_ENDPOINT": "http://127.0.0.1:9"})
    started = time.monotonic()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "extract.py"), "--manifest", manifest, "--out",
                           str(tmp_path / "o.npz"), "--text_model", "made-up-org/made-up-model", "--no_progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    took = time.monotonic() - started
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert "--text_model made-up-org/made-up-model: not a folder and not in the local model cache" in err[0]
    why = "HF_HUB_OFFLINE=1" if offline == "HF_HUB_OFFLINE" else "no connection to 127.0.0.1"
    assert why in err[0] and "save_pretrained" in err[0], err[0]
    assert took < 30, took          # the interpreter and its imports; the library's retries took about 50 s


def test_like_runs_from_another_folder_and_names_a_model_folder_gone(models, tmp_path, capsys, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    shutil.copytree(models["text"], work / "text_model")
    manifest = make_manifest(str(work), text_rows(["yeah", "you did"]))
    monkeypatch.chdir(work)
    assert extract.main(["--manifest", "talks.csv", "--text_model", "text_model", "--visual_model", models["clip"],
                         "--audio", "egemaps", "--out", "first.npz", "--no_progress"]) == 0
    recorded = json.load(open(work / "first.json"))["extraction"]["settings"]["text_model"]
    assert recorded == str(work / "text_model")
    monkeypatch.chdir(elsewhere)
    like = ["--like", str(work / "first.json"), "--manifest", manifest, "--no_progress"]
    assert extract.main([*like, "--out", "again.npz"]) == 0
    np.testing.assert_array_equal(np.load(elsewhere / "again.npz")["text"], np.load(work / "first.npz")["text"])
    shutil.rmtree(work / "text_model")
    capsys.readouterr()
    assert extract.main([*like, "--out", "third.npz"]) == 2
    assert one_error_line(capsys) == (f"error: {work / 'first.json'}: its text model {work / 'text_model'}: "
                                      f"no such folder (a model folder saved with save_pretrained, or a hub name "
                                      f"such as roberta-large)")


def children_of(pid):
    """The pids whose parent is pid (read from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def running(pid):
    """Whether the process is alive (a zombie has ended: only its exit status is left)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc") or not hasattr(os, "killpg"), reason="needs /proc and process groups")
def test_ctrl_c_ends_every_worker_and_says_how_to_continue(models, tmp_path):
    """SIGINT to the process group (what Ctrl-C sends) while 2 audio workers run: every worker ends, one line
    says what is kept and the command that continues (the same command: test_extract.py shows that it resumes),
    and the exit status is 130."""
    for k in range(4):
        write_wav(str(tmp_path / f"a{k}.wav"), 3.0, seed=k)
    rows = [{"dialogue_id": f"d{k // 4}", "speaker": "a", "text": "yeah", "audio": f"a{k % 4}.wav"}
            for k in range(24)]
    manifest = make_manifest(str(tmp_path), rows)
    out = tmp_path / "o.npz"
    command = [sys.executable, os.path.join(ROOT, "extract.py"), *base(models, out, "--manifest", manifest,
                                                                        "--jobs", "2", "--shard_size", "2")]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)                     # its own process group, as a shell gives
    parts = tmp_path / "o.npz.parts"
    deadline = time.monotonic() + 120
    while not (parts.is_dir() and any(p.name.startswith("audio-") for p in parts.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    workers = children_of(proc.pid)
    assert len(workers) >= 2, workers
    os.killpg(proc.pid, 2)                                              # SIGINT, to every process of the group
    started = time.monotonic()
    try:
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    took = time.monotonic() - started
    time.sleep(0.5)
    assert not [w for w in workers if running(w)], "a worker outlived the interrupt"
    lines = stderr.strip().splitlines()
    assert proc.returncode == 130 and took < 20 and len(lines) == 1, (proc.returncode, took, stderr)
    assert lines[0].startswith("interrupted: the ") and f"finished shard(s) in {parts} are kept" in lines[0]
    again = shlex.split(lines[0].split("run the same command: ", 1)[1])

    def real(word):                                                     # as the shell finds it, run in ROOT
        return os.path.realpath(os.path.join(ROOT, word) if "/" in word else shutil.which(word) or word)
    assert [real(w) for w in again[:2]] == [real(w) for w in command[:2]] and again[2:] == command[2:]
    assert not out.exists() and len(list(parts.glob("audio-*.npz"))) >= 1


def test_a_repaired_file_continues_redoing_only_the_shards_that_read_it(models, tmp_path, capsys):
    """A bad WAV (too short for egemaps: found only as its features are computed) stops the extraction at its row,
    after some shards were written; the file repaired (and another one replaced), the same
    command continues: the audio shards that read a changed file are computed again, every other shard is kept,
    and the file written is the one a fresh extraction writes."""
    for k in range(3):
        write_wav(str(tmp_path / f"a{k}.wav"), 0.5, seed=k)
    write_wav(str(tmp_path / "a2.wav"), 0.04)                               # too short: NaN features
    rows = text_rows(["yeah", "you did", "okay", "oh god no", "excuse me", "let me see them"])
    for k, r in enumerate(rows):
        r["audio"] = f"a{min(k // 2, 2)}.wav"                               # shards of 2: shard k reads a{k}.wav
    manifest = make_manifest(str(tmp_path), rows)
    out = tmp_path / "o.npz"
    args = ["--manifest", manifest, *base(models, out), "--shard_size", "2"]
    assert extract.main(args) == 2
    assert "row 6" in one_error_line(capsys) and (tmp_path / "o.npz.parts" / "audio-00001.npz").exists()
    write_wav(str(tmp_path / "a2.wav"), 0.5, seed=2)                        # repaired
    write_wav(str(tmp_path / "a0.wav"), 0.5, seed=5)                        # replaced: shard 0 read the old one
    assert extract.main(args) == 0
    said = capsys.readouterr().out
    assert "resuming: 4 finished shard(s)" in said and "1 whose utterances or media files changed" in said
    fresh = tmp_path / "fresh.npz"
    assert extract.main(["--manifest", manifest, *base(models, fresh), "--shard_size", "2"]) == 0
    assert out.read_bytes() == fresh.read_bytes()


def test_frictions_are_one_clear_line(models, tmp_path, capsys):
    """A folder where a file is wanted, a segment that ends before it starts, a byte that is not UTF-8."""
    write_wav(str(tmp_path / "ok.wav"), 0.5)
    (tmp_path / "clips").mkdir()
    out = tmp_path / "o.npz"
    cases = [(text_rows(["yeah", "okay"], audio="clips"), "row 2 ({}): this is a folder, not a media file"
              .format(tmp_path / "clips")),
             ([*text_rows(["yeah"], audio="ok.wav"), *text_rows(["okay"], audio="ok.wav", start="0.4", end="0.1")],
              "row 3 ({}): segment 0.4-0.1 s ends before it starts".format(tmp_path / "ok.wav"))]
    for rows, expected in cases:
        assert extract.main(["--manifest", make_manifest(str(tmp_path), rows), *base(models, out)]) == 2
        assert expected in one_error_line(capsys)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("dialogue_id,speaker,text\nd,a,yeah\nd,b,caf\u00e9\n".encode("latin-1"))
    assert extract.main(["--manifest", str(latin), *base(models, out)]) == 2
    assert one_error_line(capsys) == (f"error: manifest {latin} row 3: byte 0xe9 is not UTF-8 (save the manifest "
                                      f"as UTF-8)")
    manifest = make_manifest(str(tmp_path), text_rows(["yeah"]))
    for given, what in ((["--manifest", str(tmp_path / "clips")], "manifest"),
                        (["--like", str(tmp_path / "clips"), "--manifest", manifest], "dataset file")):
        assert extract.main([*given, "--out", str(out), "--no_progress"]) == 2
        assert f"{what} {tmp_path / 'clips'} is a folder" in one_error_line(capsys)
    assert not out.exists()


def test_a_long_recording_is_announced_with_its_memory(tmp_path):
    """openSMILE takes a set's functionals over the whole segment, holding it all: a 6-minute utterance with is10
    (about 3.3 MB a second) is announced before the work, one 'note:' line naming it; egemaps needs no word."""
    import soundfile

    from vega_utils.features.audio import memory_note
    from vega_utils.features.pipeline import audio_seconds
    from vega_utils.features.utterances import Utterance
    path = str(tmp_path / "talk.wav")
    soundfile.write(path, np.zeros(16000 * 360, dtype=np.float32), 16000, subtype="PCM_16")
    talk = Utterance(row="m.csv row 2", dialogue_id="d", position=0, speaker="a", text="hi", audio=path)
    short = Utterance(row="m.csv row 3", dialogue_id="d", position=1, speaker="a", text="hi", audio=path,
                      start=0.0, end=60.0)
    note = memory_note([short, talk], "is10", 16000, 2, audio_seconds)
    assert note == (f"note: 1 utterance(s) hold long audio, the longest m.csv row 2 ({path}) with 6.0 min; "
                    f"openSMILE's is10 holds about 3.3 MB per second of an utterance in memory, so about 1.2 GB for "
                    f"it (--jobs 2: up to 2 at once); to use less, cut long recordings into utterances (start, end)")
    assert memory_note([short, talk], "egemaps", 16000, 2, audio_seconds) == ""
