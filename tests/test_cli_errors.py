"""Bad input across the CLI: one `error:` line naming the file and problem, exit 2, nothing written damaged."""
import errno
import glob
import hashlib
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, synthetic_files

import inference
import run

TINY = ["--hidden_dim", "32", "--clip_dim", "512", "--epochs", "1", "--batch-size", "4", "--no_progress",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return synthetic_files(tmp_path_factory.mktemp("cli"), {
        "good.pkl": dict(n_train=8, n_test=4, max_len=10),
        "meld.pkl": dict(dataset="MELD", n_train=8, n_test=4, max_len=10)},
        anchors={"anchor.pt": 512, "anchor768.pt": 768}, seed=5)


def variant(files, name, edit, source="good.pkl"):
    """A copy of a good pickle with one thing broken by `edit(list_of_seven)`."""
    with open(files / source, "rb") as f:
        blob = list(pickle.load(f))
    blob = edit(blob) or blob
    path = files / f"{name}.pkl"
    with open(path, "wb") as f:
        pickle.dump(tuple(blob) if isinstance(blob, list) else blob, f)
    return path


def first(blob):
    return blob[5][0]


def set_text(blob, value):
    blob[2][first(blob)] = value


BAD_DATA = {
    "wrong tuple": (lambda b: b[:5], "7"),
    "not a tuple": (lambda b: {"a": 1}, "7"),
    "wrong dims": (lambda b: set_text(b, np.zeros((len(b[1][first(b)]), 100), np.float32)), "100"),
    "nan features": (lambda b: b[2][first(b)].__setitem__((0, 0), np.nan), "finite"),
    "empty dialogue": (lambda b: [b[i].__setitem__(first(b), b[i][first(b)][:0]) for i in range(5)], "empty"),
    "label out of range": (lambda b: b[1][first(b)].__setitem__(0, 9), "9"),
    "missing dialogue": (lambda b: [b[3].pop(first(b))] and None, first),
    "length mismatch": (lambda b: b[1].__setitem__(first(b), b[1][first(b)][:-1]), "length"),
}


def call(capsys, fn, argv):
    try:
        code = fn(argv)
    except SystemExit as e:   # argparse rejecting a flag value
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_one_line(code, err, *words):
    assert code == 2, (code, err)
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and not any("Traceback" in line for line in err), err
    for w in words:
        assert str(w) in errors[0], (w, errors[0])


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_files(files, capsys, case, tmp_path):
    edit, word = BAD_DATA[case]
    path = variant(files, case.replace(" ", "_"), edit)
    if callable(word):
        with open(files / "good.pkl", "rb") as f:
            word = word(pickle.load(f))
    code, err = call(capsys, run.run, ["--data_path", str(path), "--anchor_path", str(files / "anchor.pt"),
                                       "--output_dir", str(tmp_path)] + TINY)
    assert_one_line(code, err, path.name, word)
    assert not os.listdir(tmp_path)   # nothing half-made


def test_meld_speakers_not_one_hot(files, capsys, tmp_path):
    def two_hot(b):
        b[0][first(b)][0] = [1] * 9
    path = variant(files, "meld_two_hot", two_hot, source="meld.pkl")
    code, err = call(capsys, run.run, ["--Dataset", "MELD", "--data_path", str(path), "--output_dir",
                                       str(tmp_path), "--anchor_path", str(files / "anchor.pt")] + TINY)
    assert_one_line(code, err, path.name, "one-hot")


@pytest.mark.parametrize("argv,word", [
    (["--data_path", "/no/such/file.pkl"], "/no/such/file.pkl"),
    (["--optimizer", "Foo"], "Foo"),
    (["--dropout", "1.5"], "dropout"),
    (["--hidden_dim", "30", "--n_head", "4"], "hidden_dim"),
    (["--amp", "fp16", "--device", "cpu"], "fp16"),
    (["--resume", "/no/such/run"], "/no/such/run"),
])
def test_bad_flags_and_paths(files, capsys, argv, word):
    code, err = call(capsys, run.run, ["--data_path", str(files / "good.pkl"),
                                       "--anchor_path", str(files / "anchor.pt")] + TINY + argv)
    assert_one_line(code, err, word)


def test_unknown_flag_value_exits_2_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        run.run(["--Dataset", "FOO"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FOO" in err[0]


def test_missing_and_mismatched_anchor_cache(files, capsys, tmp_path):
    base = ["--data_path", str(files / "good.pkl"), "--output_dir", str(tmp_path)] + TINY
    code, err = call(capsys, run.run, base + ["--anchor_path", str(tmp_path / "none.pt")])
    assert_one_line(code, err, "none.pt")
    code, err = call(capsys, run.run, base[:-len(TINY)] + ["--anchor_path", str(files / "anchor768.pt"),
                                                           "--hidden_dim", "32", "--epochs", "1", "--no_progress"])
    assert_one_line(code, err, "anchor768.pt", "768", "512")


def digest(folder):
    out = {}
    for p in sorted(glob.glob(os.path.join(glob.escape(folder), "*"))):
        with open(p, "rb") as f:
            out[os.path.basename(p)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished_run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    assert run.run(["--data_path", str(files / "good.pkl"), "--anchor_path", str(files / "anchor.pt"),
                    "--output_dir", str(out)] + TINY) == 0
    return glob.glob(str(out / "IEMOCAP" / "*"))[0]


def test_corrupt_last_checkpoint_on_resume(finished_run, capsys, tmp_path):
    import shutil
    run_dir = str(tmp_path / "copy")
    shutil.copytree(finished_run, run_dir)
    with open(os.path.join(run_dir, "last.pth"), "r+b") as f:
        f.truncate(100)
    before = digest(run_dir)
    code, err = call(capsys, run.run, ["--resume", run_dir, "--no_progress"])
    assert_one_line(code, err, "last.pth", "corrupt")
    assert digest(run_dir) == before


def test_checkpoint_of_another_config_and_corrupt_checkpoint(finished_run, files, capsys, tmp_path):
    best = glob.glob(os.path.join(glob.escape(finished_run), "BEST_*.pth"))[0]
    code, err = call(capsys, inference.main, ["--checkpoint", best, "--hidden_dim", "64",
                                              "--data_path", str(files / "good.pkl")])
    assert_one_line(code, err, "hidden_dim", "64", "32")
    state = torch.load(best, weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "bare.pth")   # published format, no config: flags must fit the shapes
    code, err = call(capsys, inference.main, ["--checkpoint", str(tmp_path / "bare.pth"),
                                              "--data_path", str(files / "good.pkl")])
    assert_one_line(code, err, "bare.pth", "hidden_dim")
    (tmp_path / "junk.pth").write_bytes(b"\x00not a checkpoint" * 10)
    code, err = call(capsys, inference.main, ["--checkpoint", str(tmp_path / "junk.pth"),
                                              "--data_path", str(files / "good.pkl")])
    assert_one_line(code, err, "junk.pth")


def test_unwritable_output_folder(files, capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, err = call(capsys, run.run, ["--data_path", str(files / "good.pkl"), "--anchor_path",
                                       str(files / "anchor.pt"), "--output_dir", str(blocker / "out")] + TINY)
    assert_one_line(code, err, "a_file")


def test_disk_full_leaves_earlier_files_intact(finished_run, files, capsys, tmp_path, monkeypatch):
    """A write that fails half way (ENOSPC) never replaces a good file: writes go through a temp + rename."""
    import shutil
    run_dir = str(tmp_path / "copy")
    shutil.copytree(finished_run, run_dir)
    before = digest(run_dir)
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    # Resuming a finished run with more epochs: its first checkpoint write (best or last) fails.
    code, err = call(capsys, run.run, ["--resume", run_dir, "--epochs", "2", "--no_progress"])
    assert_one_line(code, err, "No space left")
    after = digest(run_dir)
    for name, h in before.items():   # config.json records the resume (written before the failing save)
        if name not in ("metrics.jsonl", "summary.json", "predictions.csv", "confusion.png", "curves.png",
                        "config.json"):
            assert after.get(name) == h, name
    assert not [n for n in os.listdir(run_dir) if n.startswith(".tmp-")]


def test_real_process_exit_code_and_single_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), "--data_path", str(tmp_path / "x.pkl")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "x.pkl" in proc.stderr and "Traceback" not in proc.stderr
