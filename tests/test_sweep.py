"""sweep.py on Optuna with real storages (SQLite, PostgreSQL), real worker processes and real training runs."""
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest
import torch
from conftest import ROOT, sigterm_after_first_epoch
from optuna.trial import TrialState
from pg_server import postgres_server

import run
import sweep
from vega_utils.data.synthetic import make_synthetic_anchor_cache, make_synthetic_dataset

SPACE = {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
         "dropout": {"type": "float", "low": 0.0, "high": 0.5}}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    make_synthetic_dataset(root / "IEMOCAP.pkl", n_train=24, n_test=6, max_len=12, signal=2.5, seed=5)
    make_synthetic_anchor_cache(root / "anchor.pt", clip_dim=512, seed=5)
    (root / "space.json").write_text(json.dumps(SPACE))
    return root


def flags(files, out, study, storage, trials, epochs=2):
    return ["--study", study, "--trials", str(trials), "--storage", storage, "--space", str(files / "space.json"),
            "--data_path", str(files / "IEMOCAP.pkl"), "--anchor_path", str(files / "anchor.pt"),
            "--output_dir", str(out), "--hidden_dim", "32", "--clip_dim", "512", "--epochs", str(epochs),
            "--batch_size", "4", "--valid_ratio", "0.25", "--device", "cpu", "--no_progress", "--threads", "1"]


def start(argv, log):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "sweep.py"), *argv], cwd=ROOT,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def finish(proc, log, timeout=240):
    rc = proc.wait(timeout=timeout)
    assert rc == 0, open(log).read()[-3000:]


def check_shared_study(storage, study, out, n):
    """N finished trials, no parameter set run twice, every trial's run folder with its parameters."""
    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == n
    params = [tuple(sorted(t.params.items())) for t in finished]
    assert len(set(params)) == n
    for t in finished:
        folder = os.path.join(out, "IEMOCAP", study, f"trial_{t.number}")
        assert t.user_attrs["run_dir"] == folder
        saved = json.load(open(os.path.join(folder, "config.json")))
        assert saved["sweep"]["trial"] == t.number and saved["sweep"]["params"] == t.params
        assert saved["lr"] == t.params["lr"] and saved["dropout"] == t.params["dropout"]
        assert os.path.exists(os.path.join(folder, "summary.json"))
    return trials


def test_two_workers_share_one_sqlite_study(files, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    log = tmp_path / "jobs.log"
    # --jobs 2: two worker processes of this machine, each a complete sweep.py process on the study
    argv = flags(files, tmp_path, "two", storage, 4)
    argv = argv[:argv.index("--threads")] + ["--jobs", "2"]   # the workers get their share of the cores
    finish(start(argv, log), log)
    text = open(log).read()
    assert "worker 0 (pid" in text and "worker 1 (pid" in text
    # a readable console: one --jobs per worker command, epoch lines with their trial, the table printed once
    assert all(line.count("--jobs") == 0 for line in text.splitlines() if line.startswith("sweep: worker"))
    assert "trial 0 | epoch   1 |" in text and text.count("# Study two") == 1
    trials = check_shared_study(storage, "two", str(tmp_path), 4)
    used = {json.load(open(os.path.join(t.user_attrs["run_dir"], "config.json")))["resolved_threads"]
            for t in trials if t.state in FINISHED}
    assert used == {max(1, len(os.sched_getaffinity(0)) // 2)}
    assert os.path.exists(tmp_path / "IEMOCAP" / "two" / "report" / "trials.csv")


def test_killed_worker_trial_is_failed_by_heartbeat_and_requeued(files, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    beat = ["--heartbeat", "1", "--grace", "3"]
    # the first worker's trial is long (60 epochs) so that it is surely still running when it is killed
    first = start(flags(files, tmp_path, "kill", storage, 2, epochs=60) + beat, tmp_path / "first.log")
    deadline = time.time() + 120
    while True:
        assert time.time() < deadline and first.poll() is None, open(tmp_path / "first.log").read()[-3000:]
        try:
            trials = optuna.load_study(study_name="kill", storage=storage).get_trials()
        except KeyError:   # the study is not created yet
            trials = []
        metrics = tmp_path / "IEMOCAP" / "kill" / "trial_0" / "metrics.jsonl"
        if trials and trials[0].state == TrialState.RUNNING and metrics.exists():
            break
        time.sleep(0.3)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert optuna.load_study(study_name="kill", storage=storage).get_trials()[0].state == TrialState.RUNNING
    second = start(flags(files, tmp_path, "kill", storage, 2) + beat, tmp_path / "second.log")
    finish(second, tmp_path / "second.log")
    trials = optuna.load_study(study_name="kill", storage=storage).get_trials()
    assert trials[0].state == TrialState.FAIL
    assert sum(t.state in FINISHED for t in trials) == 2
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].state in FINISHED and retry[0].params == trials[0].params


def test_two_workers_share_one_postgresql_study(files, tmp_path):
    with postgres_server() as url:   # skips, saying why, where no PostgreSQL server can be started
        storage = url.replace("postgresql://", "postgresql+psycopg://")
        workers = [start(flags(files, tmp_path, "pg", storage, 4), tmp_path / f"w{i}.log") for i in range(2)]
        for i, w in enumerate(workers):
            finish(w, tmp_path / f"w{i}.log")
        check_shared_study(storage, "pg", str(tmp_path), 4)
        optuna.storages.RDBStorage(storage).engine.dispose()


def test_report_and_best_preset_reproduce_the_best_trial(files, tmp_path, capsys):
    threads = torch.get_num_threads()
    storage = f"journal:{tmp_path / 'journal.log'}"
    argv = flags(files, tmp_path, "best", storage, 2, epochs=2) + ["--amp", "off", "--pruner", "none"]
    try:
        assert sweep.main(argv) == 0
        assert sweep.main(argv + ["--report"]) == 0
        report = tmp_path / "IEMOCAP" / "best" / "report"
        for name in ("trials.csv", "trials.md", "best.json", "history.png", "parallel.png"):
            assert (report / name).stat().st_size > 0, name
        study = optuna.load_study(study_name="best", storage=sweep_storage(storage))
        best = study.best_trial
        md = (report / "trials.md").read_text()
        assert f"Best: trial {best.number}, validation F1 {100 * best.value:.2f}" in md
        preset = json.load(open(report / "best.json"))
        assert preset["lr"] == best.params["lr"] and preset["amp"] == "off"
        assert "threads" not in preset and "device" not in preset   # the machine's, not the experiment's
        # the same settings, seed, device and thread count through run.py: the same validation F1, to the last bit
        out = tmp_path / "again"
        assert run.run(["--config", str(report / "best.json"), "--output_dir", str(out), "--threads", "1",
                        "--device", "cpu", "--no_progress"]) == 0
        summary = json.load(open(glob.glob(str(out / "IEMOCAP" / "*" / "summary.json"))[0]))
        assert summary["selected_on"] == "valid"
        assert summary["best"]["selected_f1"] == best.value
        assert summary["best"]["test"]["weighted_f1"] == best.user_attrs["test_f1"]
    finally:
        torch.set_num_threads(threads)


def sweep_storage(url):
    from vega_utils.sweep.study import open_storage
    return open_storage(url)


def test_seeds_in_parallel_give_the_serial_aggregate(files, tmp_path):
    threads = torch.get_num_threads()
    base = ["--data_path", str(files / "IEMOCAP.pkl"), "--anchor_path", str(files / "anchor.pt"),
            "--hidden_dim", "32", "--clip_dim", "512", "--epochs", "2", "--lr", "3e-3", "--device", "cpu",
            "--no_progress", "--threads", "1", "--seeds", "1", "2"]
    try:
        aggs = []
        for jobs in ("1", "2"):
            assert run.run(base + ["--output_dir", str(tmp_path / jobs), "--jobs", jobs]) == 0
            aggs.append(json.load(open(glob.glob(str(tmp_path / jobs / "IEMOCAP" / "aggregate-*" /
                                                     "aggregate.json"))[0])))
    finally:
        torch.set_num_threads(threads)
    assert aggs[0]["n_seeds"] == aggs[1]["n_seeds"] == 2
    assert aggs[0]["metrics"] == aggs[1]["metrics"]
    assert [r["seed"] for r in aggs[1]["per_seed"]] == [1, 2]
    assert aggs[1]["metrics"]["weighted_f1"]["values"][0] != aggs[1]["metrics"]["weighted_f1"]["values"][1]


def seed_flags(files, out, *more):
    return ["--data_path", str(files / "IEMOCAP.pkl"), "--anchor_path", str(files / "anchor.pt"), "--hidden_dim",
            "32", "--clip_dim", "512", "--lr", "3e-3", "--device", "cpu", "--no_progress", "--threads", "1",
            "--output_dir", str(out), *more]


def test_keep_none_tidies_a_seed_that_failed_after_some_epochs(files, tmp_path, monkeypatch):
    import main
    from vega_utils.runs.step_guard import NonFiniteLoss
    real = main.run_epoch

    def seed_2_breaks_in_epoch_2(cfg, run_, epoch, *args):
        if cfg.seed == 2 and epoch == 2:
            raise NonFiniteLoss("loss is nan.")
        return real(cfg, run_, epoch, *args)
    monkeypatch.setattr(main, "run_epoch", seed_2_breaks_in_epoch_2)
    threads = torch.get_num_threads()
    try:
        assert run.run(seed_flags(files, tmp_path, "--epochs", "2", "--seeds", "1", "2", "--keep", "none")) == 1
    finally:
        torch.set_num_threads(threads)
    folders = [d for d in glob.glob(str(tmp_path / "IEMOCAP" / "*")) if "aggregate" not in d]
    assert len(folders) == 2 and not glob.glob(str(tmp_path / "**" / "*.pth"), recursive=True)
    failed = [d for d in folders if json.load(open(os.path.join(d, "summary.json")))["epochs_run"] == 1]
    assert len(failed) == 1                                            # seed 2's folder, its epoch 1 kept


def test_sigterm_to_parallel_seeds_stops_every_worker(files, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "run.py"),
           *seed_flags(files, tmp_path, "--epochs", "400", "--seeds", "1", "2", "3", "--jobs", "2")]
    code, out, err = sigterm_after_first_epoch(cmd, tmp_path)           # once a seed has finished an epoch
    assert code == 143, (out, err)
    assert "===== seed 3: failed: not started: terminated (SIGTERM)" in out
    runs = [d for d in glob.glob(str(tmp_path / "IEMOCAP" / "*")) if "aggregate" not in d]
    assert len(runs) == 2
    for d in runs:
        assert json.load(open(os.path.join(d, "summary.json")))["stopped"] == "terminated (SIGTERM)"


@pytest.mark.parametrize("extra, message", [
    (["--valid_ratio", "0"], "would make the sweep select on the test set"),
    (["--trials", "0"], "--trials N (at least 1)"),
    (["--storage", "nonsense"], "is neither a database URL"),
])
def test_refusals_are_one_line(files, tmp_path, capsys, extra, message):
    argv = flags(files, tmp_path, "bad", f"sqlite:///{tmp_path / 'x.db'}", 2) + extra
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_bad_space_file_is_one_line(files, tmp_path, capsys):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"lr": {"type": "float", "low": 1e-2, "high": 1e-3}}))
    argv = flags(files, tmp_path, "bad", f"sqlite:///{tmp_path / 'x.db'}", 2) + ["--space", str(space)]
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: search space {space}, key 'lr': low 0.01 must be below high 0.001"


def test_config_file_overrides_defaults_and_flags_win(files, tmp_path, capsys):
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"lr": 0.005, "hidden_dim": 64, "dropout": 0.2, "git_commit": "abc"}))
    base = ["--data_path", str(files / "IEMOCAP.pkl"), "--config", str(preset)]
    cfg = run.build_config(run.parser().parse_args(base))
    assert (cfg.lr, cfg.hidden_dim, cfg.dropout, cfg.n_head) == (0.005, 64, 0.2, 4)   # n_head: IEMOCAP's default
    cfg = run.build_config(run.parser().parse_args(base + ["--lr", "0.001", "--ablation", "no_stochastic_anchors"]))
    assert (cfg.lr, cfg.hidden_dim, cfg.rand) == (0.001, 64, 0.0)
    preset.write_text(json.dumps({"lr": 0.005, "learning_rate": 1}))
    assert run.run(base + ["--no_progress"]) == 2
    assert capsys.readouterr().err.strip() == f"error: config file {preset}: unknown keys learning_rate"
    assert run.run(["--data_path", str(files / "IEMOCAP.pkl"), "--jobs", "2"]) == 2
    assert "give --seeds too" in capsys.readouterr().err


def test_worker_slots_spread_devices_and_divide_cores():
    from vega_utils.common import VegaError
    from vega_utils.sweep import parallel
    cores = len(os.sched_getaffinity(0))
    assert parallel.worker_slots(2, ["cpu"]) == [("cpu", max(1, cores // 2))] * 2
    assert parallel.worker_slots(3, ["cpu"], thread_count=5) == [("cpu", 5)] * 3
    slots = parallel.worker_slots(3, parallel.parse_devices("cuda:0,cuda:1", "auto"))
    assert [d for d, _ in slots] == ["cuda:0", "cuda:1", "cuda:0"]
    with pytest.raises(VegaError, match="is not auto, cpu, cuda or cuda:N"):
        parallel.parse_devices("gpu0", "auto")


def study_trials(storage, study):
    try:
        return optuna.load_study(study_name=study, storage=sweep_storage(storage)).get_trials()
    except KeyError:   # never created
        return []


@pytest.mark.parametrize("missing", ["--data_path", "--anchor_path"])
def test_sweep_without_its_files_stops_before_any_trial(files, tmp_path, capsys, missing):
    storage = f"sqlite:///{tmp_path / 'x.db'}"
    argv = flags(files, tmp_path, "nodata", storage, 4)
    argv[argv.index(missing) + 1] = str(tmp_path / "nowhere.pkl")
    for extra in ([], ["--jobs", "2"]):   # the launcher checks before it starts any worker
        assert sweep.main(argv + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "nowhere.pkl" in err and "\n" not in err
    assert study_trials(storage, "nodata") == []


def test_setup_failure_stops_the_worker_and_is_listed_apart(files, tmp_path, capsys, monkeypatch):
    import main
    storage = f"journal:{tmp_path / 'journal.log'}"
    argv = flags(files, tmp_path, "setup", storage, 3)

    def vanished(cfg):   # passes the check before the first trial, then the file is gone
        raise main.VegaError("data file vanished")
    monkeypatch.setattr(main, "setup", vanished)
    assert sweep.main(argv) == 2
    assert "trial 0 could not start, and no trial here would: data file vanished" in capsys.readouterr().err
    trials = study_trials(storage, "setup")
    assert len(trials) == 1 and trials[0].user_attrs["setup_failure"] == "data file vanished"
    assert sweep.main(argv + ["--report"]) == 0
    out = capsys.readouterr().out
    assert "0 trials: 0 complete, 0 pruned, 0 failed" in out and "1 more could not start" in out
    assert "## Setup failures" in out and "- trial 0: data file vanished" in out


@pytest.mark.parametrize("keep", ["best", "none"])
def test_keep_leaves_exactly_what_it_promises(files, tmp_path, keep):
    threads = torch.get_num_threads()
    storage = f"journal:{tmp_path / 'journal.log'}"
    try:
        assert sweep.main(flags(files, tmp_path, "keep", storage, 3, epochs=1) + ["--keep", keep,
                                                                                  "--pruner", "none"]) == 0
    finally:
        torch.set_num_threads(threads)
    study = optuna.load_study(study_name="keep", storage=sweep_storage(storage))
    best = study.best_trial.number
    for t in study.get_trials():
        folder = tmp_path / "IEMOCAP" / "keep" / f"trial_{t.number}"
        names = set(os.listdir(folder))
        assert {"config.json", "metrics.jsonl", "summary.json"} <= names
        pth = {n for n in names if n.endswith(".pth")}
        if keep == "best" and t.number == best:
            assert len(pth) == 2 and "best_vega_branch.pth" in pth and any(n.startswith("BEST_") for n in pth)
        else:
            assert pth == set(), (t.number, pth)
    assert (tmp_path / "IEMOCAP" / "keep" / "report" / "best.json").exists()


def with_space(argv, space):
    argv = list(argv)
    argv[argv.index("--space") + 1] = str(space)
    return argv


def test_ablation_and_config_file_keys_are_not_drawn(files, tmp_path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({**SPACE, "rand": {"type": "float", "low": 0.2, "high": 1.0}}))
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"dropout": 0.3}))
    storage = f"journal:{tmp_path / 'journal.log'}"
    argv = with_space(flags(files, tmp_path, "abl", storage, 2, epochs=1), space)
    threads = torch.get_num_threads()
    try:
        assert sweep.main(argv + ["--ablation", "no_stochastic_anchors", "--config", str(preset),
                                  "--pruner", "none"]) == 0
    finally:
        torch.set_num_threads(threads)
    trials = study_trials(storage, "abl")
    assert len(trials) == 2
    for t in trials:
        assert t.state == TrialState.COMPLETE and set(t.params) == {"lr"}   # rand: the ablation's; dropout: the file's
        saved = json.load(open(os.path.join(t.user_attrs["run_dir"], "config.json")))
        assert (saved["ablation"], saved["rand"], saved["dropout"]) == ("no_stochastic_anchors", 0.0, 0.3)
        assert saved["lr"] == t.params["lr"]


def test_a_space_left_empty_is_refused_and_demo_keys_are_not_drawn(files, tmp_path, capsys):
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"lr": 0.002, "dropout": 0.3}))   # every key of SPACE
    storage = f"sqlite:///{tmp_path / 'x.db'}"
    assert sweep.main(flags(files, tmp_path, "empty", storage, 2) + ["--config", str(preset)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: every key of the search space") and "nothing to draw" in err and "\n" not in err
    assert study_trials(storage, "empty") == []
    fixed = sweep.fixed_keys(sweep.parser().parse_args(["--study", "s", "--demo"]))
    assert {"lr", "hidden_dim", "epochs", "data_path"} <= fixed and "dropout" not in fixed


def test_worker_commands_are_printed_ready_to_paste(files, tmp_path, capsys, monkeypatch):
    started = []

    class Worker:   # the worker processes are not started: only their command lines are looked at
        def __init__(self, cmd):
            started.append(cmd)

        def wait(self):
            return 0
    monkeypatch.setattr(sweep.subprocess, "Popen", Worker)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        argv = flags(files, tmp_path / "out dir", "paste", f"sqlite:///{tmp_path / 'x.db'}", 2)
        assert sweep.main(argv + ["--jobs", "2"]) == 0
    finally:
        signal.signal(signal.SIGTERM, handler)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sweep: worker ")]
    assert len(lines) == 2
    for line, cmd in zip(lines, started):
        printed = shlex.split(line.split(": ", 2)[2])   # what a shell makes of the pasted line
        interpreter = shutil.which(printed[0]) or os.path.abspath(printed[0])
        assert os.path.realpath(interpreter) == os.path.realpath(sys.executable)
        assert printed[1:] == cmd[1:] and str(tmp_path / "out dir") in printed


def test_report_says_when_the_best_trials_folder_is_on_another_machine(files, tmp_path, capsys):
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial
    storage = f"journal:{tmp_path / 'journal.log'}"
    study = optuna.create_study(study_name="far", storage=sweep_storage(storage), direction="maximize")
    here = tmp_path / "trial 0"
    here.mkdir()
    (here / "config.json").write_text(json.dumps({"lr": 0.002, "threads": 2, "device": "cuda:3", "git_commit": "x"}))

    def add(value, run_dir):
        study.add_trial(create_trial(value=value, params={"lr": 0.002},
                                     distributions={"lr": FloatDistribution(1e-3, 1e-2, log=True)},
                                     user_attrs={"run_dir": str(run_dir), "test_f1": 0.4}))
    add(0.5, here)
    out = tmp_path / "out dir"
    report = ["--report", "--output_dir", str(out)]
    assert sweep.main(flags(files, tmp_path, "far", storage, 2) + report) == 0
    preset = out / "IEMOCAP" / "far" / "report" / "best.json"
    assert json.load(open(preset)) == {"lr": 0.002}   # neither threads nor device: they belong to the machine
    assert f"run.py --config {shlex.quote(str(preset))})" in capsys.readouterr().out
    add(0.7, "/elsewhere/trial_1")   # a better trial, run on another machine
    assert sweep.main(flags(files, tmp_path, "far", storage, 2) + report) == 0
    out = capsys.readouterr().out
    assert "Best: trial 1, validation F1 70.00" in out and "| 1 | COMPLETE |" in out
    assert "best.json not written: its run folder /elsewhere/trial_1 is not on this machine" in out
    assert not preset.exists()   # the earlier best trial's preset must not pass for this one's


class CountingObjective:
    """Stands for worker.Objective: counts the trials it is asked to run."""

    def __init__(self):
        self.calls, self.last_number = 0, None

    def __call__(self, trial):
        self.calls, self.last_number = self.calls + 1, trial.number
        return 0.5

    def tidy(self, study):
        pass


@pytest.fixture
def sigterm():
    import train
    yield train.STOP.set   # what sweep.py's SIGTERM handler does
    train.STOP.clear()


def test_sigterm_between_trials_stops_the_worker_before_its_next_trial(sigterm):
    from vega_utils.sweep import worker as sweep_worker
    study = optuna.create_study(direction="maximize")
    objective = CountingObjective()
    sigterm()   # e.g. while the worker's trial was saving its last epoch
    with pytest.raises(sweep_worker.BetweenTrials, match="terminated"):
        sweep_worker.work(study, objective, 3, log=lambda line: None)
    assert objective.calls == 0 and study.trials == []


def test_sigterm_ends_the_wait_for_other_workers_last_trials(sigterm):
    from vega_utils.sweep import worker as sweep_worker
    study = optuna.create_study(direction="maximize")
    study.ask()   # the study's last trial, running in another worker
    objective, outcome = CountingObjective(), []

    def worker():
        try:
            outcome.append(sweep_worker.work(study, objective, 1, heartbeat=True, log=lambda line: None))
        except BaseException as e:
            outcome.append(e)
    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive()   # waiting: that trial's worker may still die and its trial come back
    sigterm()
    thread.join(timeout=3)
    assert not thread.is_alive() and isinstance(outcome[0], sweep_worker.BetweenTrials)
    assert objective.calls == 0


def test_a_trial_that_raises_fails_alone_and_the_worker_goes_on(files, tmp_path, capsys, monkeypatch):
    import main
    train_run, calls = main.train_run, []

    def out_of_memory_once(cfg, **kwargs):   # a large drawn hidden_dim on a small GPU
        calls.append(cfg)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nOf the allocated ...")
        return train_run(cfg, **kwargs)
    monkeypatch.setattr(main, "train_run", out_of_memory_once)
    storage = f"journal:{tmp_path / 'journal.log'}"
    threads = torch.get_num_threads()
    try:
        assert sweep.main(flags(files, tmp_path, "oom", storage, 2, epochs=1) + ["--pruner", "none"]) == 0
    finally:
        torch.set_num_threads(threads)
    reason = "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    captured = capsys.readouterr()
    assert f"sweep: trial 0 failed: {reason}\n" in captured.out and "Traceback" not in captured.out + captured.err
    trials = study_trials(storage, "oom")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[0].user_attrs["error"] == reason and "setup_failure" not in trials[0].user_attrs
    assert f"## Failed trials\n\n- trial 0: {reason}\n" in captured.out


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_study_of_one_finished_trial_says_trial():
    from vega_utils.sweep.worker import work
    study = optuna.create_study()
    study.tell(study.ask(), 0.1)
    said = []
    assert work(study, None, 1, heartbeat=False, log=said.append) == 1
    assert said == ["sweep: the study holds 1 finished trial (asked for 1): this worker stops"]
