"""A newcomer's first hour: messages that point the way, flags that forgive, a resume that talks,
readable files, run folders that say what they hold."""
import glob
import json
import os
import re
import shlex
import signal
import stat
import sys

import pytest
import torch
from conftest import ROOT, interrupt_at_epoch, sigterm_after_first_epoch, synthetic_files

import inference
import run
from vega_utils.common import VegaError, atomic_write_text
from vega_utils.runs import checkpoint

TINY = ["--hidden_dim", "32", "--clip_dim", "512", "--batch-size", "4", "--no_progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return synthetic_files(tmp_path_factory.mktemp("first_hour"), {
        "IEMOCAP.pkl": dict(n_train=8, n_test=4, max_len=10),
        "meld.pkl": dict(dataset="MELD", n_train=4, n_test=2, max_len=10)}, seed=7)


def data_flags(files, out):
    return ["--data_path", str(files / "IEMOCAP.pkl"), "--anchor_path", str(files / "anchor.pt"),
            "--output_dir", str(out)] + TINY


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- checkpoints that are not checkpoints
def test_html_page_given_as_checkpoint_is_called_what_it_is(tmp_path, capsys):
    page = tmp_path / "IEMOCAP.pth"
    page.write_text("<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head></html>")
    assert inference.main(["--checkpoint", str(page)]) == 2
    err = one_error_line(capsys)
    assert "HTML page" in err and "download" in err.lower() and "arbitrary Python objects" not in err


def test_html_page_saved_as_the_data_file_is_called_what_it_is(files, tmp_path, capsys):
    page = tmp_path / "IEMOCAP.pkl"
    page.write_text("\n  <!DOCTYPE html>\n<html><head><title>Google Drive - Virus scan warning</title></html>")
    flags = data_flags(files, tmp_path)
    flags[1] = str(page)
    assert run.run(flags + ["--epochs", "1"]) == 2
    err = one_error_line(capsys)
    assert "HTML page" in err and "download" in err.lower() and "load key" not in err


def test_truncated_checkpoint_message_ends_in_whole_words(tmp_path):
    full = tmp_path / "full.pth"
    torch.save({"a": torch.zeros(1000)}, full)   # cut in half: torch says "failed finding central directory ... If you
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(VegaError) as e:
        checkpoint.read_checkpoint(str(cut))
    message = str(e.value)
    assert "truncated or corrupt" in message and message.endswith(")")
    assert "If yo" not in message and "central directory" in message


# ---------------------------------------------------------------- flags
COMMANDS = ["run", "inference", "sweep", "extract", "vega_utils.anchors.build", "vega_utils.data.convert",
            "vega_utils.insight.analyze", "vega_utils.insight.compare", "vega_utils.data.toy_models",
            "vega_utils.features.samples"]
HIDDEN = {("sweep", "--worker_index")}   # set by sweep.py --jobs for its workers, not by a user


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_says_what_it_does_and_its_default(command):
    """--help lists no flag without a help text, and each flag that takes a value says its default."""
    import argparse
    import importlib
    p = importlib.import_module(command).parser()
    assert "--" in p.format_help()   # renders (a stray % in a help text would raise here)
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        if (command, name) in HIDDEN:
            assert action.help == argparse.SUPPRESS
            continue
        assert action.help and action.help != argparse.SUPPRESS, f"{command} {name} has no help"
        if action.option_strings and action.nargs != 0:   # a flag taking a value
            assert "default" in action.help or "required" in action.help, f"{command} {name}: {action.help}"


def test_config_flags_show_the_preset_defaults():
    import dataclasses

    from vega_utils.runs.config import DERIVED, Config
    from vega_utils.runs.config_help import CONFIG_HELP, preset_default
    assert set(CONFIG_HELP) == {f.name for f in dataclasses.fields(Config)} - DERIVED
    text = " ".join(run.parser().format_help().split())
    assert "dialogues per batch (preset default: 9)" in text and "(preset default: 0.53)" in text
    assert "--no_folder_brackets turn --folder_brackets off" in text
    # a key whose presets differ shows both
    presets = {"IEMOCAP": {"lr": 0.0001, "fast": True}, "MELD": {"lr": 0.00005, "fast": True}}
    assert preset_default("lr", presets) == "0.0001 (IEMOCAP), 5e-05 (MELD)"
    assert preset_default("fast", presets) == "on"


def test_abbreviated_flag_is_refused_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as e:
        run.parser().parse_args(["--epoch", "1"])
    assert e.value.code == 2
    assert "did you mean --epochs?" in capsys.readouterr().err


def test_friendly_spellings_beside_the_references(capsys):
    args = run.parser().parse_args(["--learning_rate", "0.01", "--weight_decay", "0", "--dataset", "MELD"])
    assert (args.lr, args.l2, args.Dataset) == (0.01, 0.0, "MELD")
    assert inference.parser().parse_args(["--Dataset", "MELD"]).dataset == "MELD"
    with pytest.raises(SystemExit):
        run.parser().parse_args(["--learnig_rate", "0.01"])
    assert "did you mean --learning_rate?" in capsys.readouterr().err


def test_negative_learning_rate_is_refused_before_training(files, tmp_path, capsys):
    assert run.run(data_flags(files, tmp_path) + ["--lr", "-1"]) == 2
    assert "lr -1.0 must be a positive number" in one_error_line(capsys)
    assert not os.path.exists(tmp_path / "IEMOCAP")   # no run folder made


def test_meld_file_read_as_iemocap_suggests_the_flag(files, tmp_path, capsys):
    flags = data_flags(files, tmp_path)
    flags[1] = str(files / "meld.pkl")
    assert run.run(flags + ["--epochs", "1"]) == 2
    assert "add --Dataset MELD" in one_error_line(capsys)


def test_missing_data_and_anchors_point_to_their_sources(files, tmp_path, capsys):
    assert run.run(["--data_path", str(tmp_path / "IEMOCAP.pkl"), "--output_dir", str(tmp_path)] + TINY) == 2
    assert "Getting the data" in one_error_line(capsys)
    assert run.run(["--data_path", str(files / "IEMOCAP.pkl"), "--anchor_path", str(tmp_path / "none.pt"),
                    "--expr_img_folder", str(tmp_path / "no_images"), "--output_dir", str(tmp_path)] + TINY) == 2
    err = one_error_line(capsys)
    assert "--ablation no_vega" in err and "Getting the data" in err


def test_clip_folder_without_its_processor_says_how_to_save_it(tmp_path):
    from anchor_fixtures import make_tiny_clip

    from vega_utils.anchors.images import load_clip
    folder = make_tiny_clip(tmp_path / "clip")
    os.remove(os.path.join(folder, "preprocessor_config.json"))
    with pytest.raises(VegaError, match=r"preprocessor_config.json too.*save_pretrained"):
        load_clip(folder, "cpu")


# ---------------------------------------------------------------- runs, their folders and their files
def test_run_folder_names_seed_and_ablation_and_files_are_readable(files, tmp_path):
    old = os.umask(0o022)
    try:
        assert run.run(data_flags(files, tmp_path) + ["--epochs", "1", "--seed", "5", "--ablation", "no_vega",
                                                      "--no_folder_brackets"]) == 0
    finally:
        os.umask(old)
    (run_dir,) = glob.glob(str(tmp_path / "IEMOCAP" / "*"))
    name = os.path.basename(run_dir)
    assert name.endswith("_seed5_no_vega") and "[" not in name
    (best,) = checkpoint.best_files(run_dir)   # the checkpoint's name too, and its readers find it
    assert "[" not in os.path.basename(best) and re.fullmatch(r"BEST_cls_f1_\d+\.\d\d_epoch1\.pth",
                                                              os.path.basename(best))
    from vega_utils.insight.analyze import best_checkpoint
    assert best_checkpoint(run_dir) == best
    assert inference.main(["--checkpoint", best, "--no_progress", "--device", "cpu"]) == 0
    saved = json.load(open(os.path.join(run_dir, "config.json")))
    assert saved["ablation"] == "no_vega" and saved["seed"] == 5 and saved["clip_loss"] is False
    for f in ("config.json", "summary.json", "last.pth", "predictions.csv", "metrics.jsonl"):
        assert stat.S_IMODE(os.stat(os.path.join(run_dir, f)).st_mode) == 0o644, f


def test_atomic_writes_take_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(str(tmp_path / "x.json"), "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "x.json").st_mode) == 0o640


def test_config_line_names_only_what_differs(files, tmp_path, capsys):
    assert run.run(data_flags(files, tmp_path) + ["--epochs", "1"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("config:"))
    assert "hidden_dim=32" in line and "cls_lambda" not in line and "config.json" in line
    assert len(line) < 600


# ---------------------------------------------------------------- resume
@pytest.fixture
def two_epoch_run(files, tmp_path):
    assert run.run(data_flags(files, tmp_path) + ["--epochs", "2"]) == 0
    return glob.glob(str(tmp_path / "IEMOCAP" / "*"))[0]


def test_resume_of_a_finished_run_says_so(two_epoch_run, capsys):
    before = open(os.path.join(two_epoch_run, "metrics.jsonl")).read()
    assert run.run(["--resume", two_epoch_run, "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "has finished (all 2 epochs" in out and "--epochs" in out
    assert open(os.path.join(two_epoch_run, "metrics.jsonl")).read() == before


def test_resume_with_more_epochs_extends_the_run(two_epoch_run):
    assert run.run(["--resume", two_epoch_run, "--epochs", "3", "--no_progress"]) == 0
    rows = [json.loads(line) for line in open(os.path.join(two_epoch_run, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    saved = json.load(open(os.path.join(two_epoch_run, "config.json")))
    assert saved["epochs"] == 3 and len(saved["resumes"]) == 1


def test_resume_refuses_flags_it_would_ignore(two_epoch_run, capsys):
    assert run.run(["--resume", two_epoch_run, "--lr", "0.1"]) == 2
    assert "--lr cannot change there" in one_error_line(capsys)
    # named as typed (the other spellings of --batch_size, --lr, --Dataset)
    assert run.run(["--resume", two_epoch_run, "--batch-size", "2", "--learning_rate=0.1", "--dataset", "MELD"]) == 2
    assert "--dataset, --batch-size, --learning_rate cannot change there" in one_error_line(capsys)


def test_best_checkpoint_names_with_and_without_brackets(tmp_path):
    for f1, epoch, brackets in ((0.7966, 10, True), (0.8012, 12, False)):
        (tmp_path / checkpoint.best_file_name(f1, epoch, brackets)).write_bytes(b"")
    (tmp_path / "BEST_cls_f1_notes_epoch.pth").write_bytes(b"")   # matches the glob, not the name
    names = [os.path.basename(p) for p in checkpoint.best_files(str(tmp_path))]
    assert names == ["BEST_cls_f1_[79.66]_epoch10.pth", "BEST_cls_f1_80.12_epoch12.pth"]


def test_ctrl_c_prints_one_line_with_the_resume_command(files, tmp_path, monkeypatch, capsys):
    interrupt_at_epoch(monkeypatch, 2)
    assert run.run(data_flags(files, tmp_path) + ["--epochs", "3"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    run_dir = glob.glob(str(tmp_path / "IEMOCAP" / "*"))[0]
    assert len(err) == 1 and err[0].startswith("interrupted after epoch 1")
    assert err[0].endswith(f"python run.py --resume '{run_dir}'")


def test_ctrl_c_in_the_first_epoch_tells_the_truth_and_its_hint_works(files, tmp_path, monkeypatch, capsys):
    flags = data_flags(files, tmp_path / "a") + ["--epochs", "2"]
    restore = interrupt_at_epoch(monkeypatch, 1)
    assert run.run(flags) == 130
    restore()
    err = capsys.readouterr().err.strip().splitlines()
    (run_dir,) = glob.glob(str(tmp_path / "a" / "IEMOCAP" / "*"))
    assert len(err) == 1 and err[0].startswith("interrupted during epoch 1: no epoch finished"), err
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["stopped"] == "interrupted" and summary["epochs_run"] == 0 and summary["best_epoch"] == 0
    assert summary["best"] is None and summary["best_checkpoint"] is None
    assert not os.path.exists(os.path.join(run_dir, "last.pth"))

    hint = err[0].split("; ")[-1]                                  # "<python> run.py --resume '<dir>' starts ..."
    argv = shlex.split(hint.split(" starts the run again")[0])
    assert argv[1:3] == ["run.py", "--resume"] and argv[3] == run_dir
    assert run.run(argv[2:] + ["--no_progress"]) == 0              # the hint, as printed
    assert run.run(data_flags(files, tmp_path / "b") + ["--epochs", "2"]) == 0
    (fresh,) = glob.glob(str(tmp_path / "b" / "IEMOCAP" / "*"))
    timing = {"train_seconds", "eval_seconds", "cpu_shared"}
    rows = [[{k: v for k, v in json.loads(line).items() if k not in timing} for line in open(os.path.join(d,
             "metrics.jsonl"))] for d in (run_dir, fresh)]
    assert len(rows[0]) == 2 and rows[0] == rows[1]                # the same epochs as a run never stopped


def test_ctrl_c_while_an_epoch_is_saved_waits_for_the_whole_epoch(files, tmp_path, monkeypatch, capsys):
    real = checkpoint.save_best

    def pressed_during_save(*args, **kw):
        os.kill(os.getpid(), signal.SIGINT)                        # a real Ctrl-C, mid-save
        return real(*args, **kw)
    monkeypatch.setattr(checkpoint, "save_best", pressed_during_save)
    assert run.run(data_flags(files, tmp_path) + ["--epochs", "3"]) == 130
    (run_dir,) = glob.glob(str(tmp_path / "IEMOCAP" / "*"))
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["epochs_run"] == 1 and summary["best_epoch"] == 1 and os.path.exists(summary["best_checkpoint"])
    assert torch.load(os.path.join(run_dir, "last.pth"), weights_only=False)["state"]["epoch"] == 1
    assert "interrupted after epoch 1" in capsys.readouterr().err


def test_sigterm_writes_the_summary(files, tmp_path):
    """A cluster job hitting its time limit gets SIGTERM: the run stops as on Ctrl-C, summary.json written."""
    cmd = [sys.executable, os.path.join(ROOT, "run.py")] + data_flags(files, tmp_path) + ["--epochs", "400"]
    code, _, err = sigterm_after_first_epoch(cmd, tmp_path)
    assert code == 143, err
    run_dir = glob.glob(str(tmp_path / "IEMOCAP" / "*"))[0]
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["stopped"] == "terminated (SIGTERM)" and summary["epochs_run"] >= 1
    assert "--resume" in err


def test_a_run_failing_before_its_first_epoch_is_marked_failed(files, tmp_path, capsys):
    """Nothing to resume or keep: the folder is renamed `-failed` and the message names the first broken term."""
    assert run.run(data_flags(files, tmp_path) + ["--epochs", "2", "--lr", "1e30", "--amp", "off",
                                                  "--max_bad_steps", "1"]) == 2
    err = one_error_line(capsys)
    (run_dir,) = glob.glob(str(tmp_path / "IEMOCAP" / "*"))
    assert run_dir.endswith("-failed") and f"the folder is now {run_dir}" in err
    assert json.load(open(os.path.join(run_dir, "summary.json")))["epochs_run"] == 0
    # the same again within the minute: a second folder, not a crash on the first
    assert run.run(data_flags(files, tmp_path) + ["--epochs", "2", "--lr", "1e30", "--amp", "off",
                                                  "--max_bad_steps", "1"]) == 2
    assert f"the folder is now {run_dir}-2" in one_error_line(capsys)
    assert sorted(glob.glob(str(tmp_path / "IEMOCAP" / "*"))) == [run_dir, run_dir + "-2"]


def test_resume_with_save_last_never_drops_the_older_last_pth(two_epoch_run, capsys):
    """Otherwise a later --resume would go back to epoch 2 and train again what the metrics already hold."""
    assert run.run(["--resume", two_epoch_run, "--epochs", "3", "--save_last", "never", "--no_progress"]) == 0
    assert not os.path.exists(os.path.join(two_epoch_run, "last.pth"))
    capsys.readouterr()
    assert run.run(["--resume", two_epoch_run, "--epochs", "4", "--no_progress"]) == 2
    assert "there is nothing to resume" in one_error_line(capsys)
    assert [json.loads(r)["epoch"] for r in open(os.path.join(two_epoch_run, "metrics.jsonl"))] == [1, 2, 3]


def test_a_moved_run_folder_resumes_with_its_own_best_checkpoint(two_epoch_run, tmp_path):
    moved = str(tmp_path / "moved")
    os.replace(two_epoch_run, moved)
    assert run.run(["--resume", moved, "--epochs", "3", "--no_progress"]) == 0
    summary = json.load(open(os.path.join(moved, "summary.json")))
    assert os.path.dirname(summary["best_checkpoint"]) == moved and os.path.exists(summary["best_checkpoint"])
    assert len(glob.glob(os.path.join(moved, "BEST_*.pth"))) == 1


def test_ctrl_c_while_the_run_starts_leaves_a_summary(files, tmp_path, monkeypatch, capsys):
    import main

    def pressed(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(main, "log_start", pressed)                 # right after the folder is made
    monkeypatch.chdir(tmp_path)                                      # and from another folder than the project's
    assert run.run(data_flags(files, tmp_path) + ["--epochs", "2"]) == 130
    (run_dir,) = glob.glob(str(tmp_path / "IEMOCAP" / "*"))
    assert json.load(open(os.path.join(run_dir, "summary.json")))["epochs_run"] == 0
    err = capsys.readouterr().err
    assert "no epoch finished" in err and f"{shlex.quote(os.path.join(ROOT, 'run.py'))} --resume" in err


def test_flags_of_new_runs_are_refused_on_resume_and_devices_checked(two_epoch_run, files, tmp_path, capsys):
    assert run.run(["--resume", two_epoch_run, "--jobs", "2"]) == 2
    assert "--jobs cannot change there" in one_error_line(capsys)
    if not torch.cuda.is_available():
        assert run.run(data_flags(files, tmp_path)[:-2] + ["--device", "cuda:0"]) == 2
        assert "--device cuda:0: no CUDA device is available" in one_error_line(capsys)


def test_seeds_without_their_data_file_stop_before_any_seed(files, tmp_path, capsys):
    flags = data_flags(files, tmp_path) + ["--epochs", "1", "--seeds", "1", "2", "3"]
    flags[flags.index("--data_path") + 1] = str(tmp_path / "nowhere.pkl")
    assert run.run(flags) == 2
    assert "nowhere.pkl: data file not found" in one_error_line(capsys)
    assert not (tmp_path / "IEMOCAP").exists()
