"""One sweep worker: draws trials from the shared study and trains each as an ordinary run, until the study
holds the asked number of finished (complete or pruned) trials, whoever ran them.

Trials run in this process, one after another, through main.train_run, the function run.py calls: the pruner
has to see every epoch's validation F1 as it happens, and torch, the data and the compiled kernels are loaded
once per worker instead of once per trial. Workers are separate processes (sweep.py --jobs, or one per machine),
so a crash or a kill takes one worker and its current trial, which the storage's heartbeat fails and re-queues.
"""
import os
import time

import optuna
from optuna.trial import TrialState

from vega_utils.common import SetupError, VegaError
from vega_utils.runs import keep
from vega_utils.runs.config import resolve
from vega_utils.sweep.space import suggest

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
POLL_SECONDS = 2.0      # how often a worker with nothing to start looks at the study again
STOP_CHECK_SECONDS = 0.1   # how soon a waiting worker sees a SIGTERM
MAX_FAILED_IN_A_ROW = 3


class SurplusTrial(Exception):
    """Another worker's trial already makes up the asked number: this one is closed (FAIL) without running."""


class BetweenTrials(KeyboardInterrupt):
    """SIGTERM (or Ctrl-C) while this worker ran no trial: it stops before drawing another."""


def one_line(error):
    """A trial's failure as one line: a VegaError's message, else the exception's type and first line (a CUDA
    out-of-memory RuntimeError for a large drawn hidden_dim, a bug)."""
    if isinstance(error, VegaError):
        return str(error)
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def trial_dir(cfg, study_name, number):
    return os.path.join(cfg.output_dir, cfg.name, study_name, f"trial_{number}")


class Objective:
    """A trial: its settings drawn from the space (keys fixed by flags excepted), one run, validation F1."""

    def __init__(self, base_cfg, space, fixed, study_name, n_trials, progress=False, keep="all"):
        self.base_cfg, self.space, self.fixed = base_cfg, space, set(fixed)
        self.study_name, self.n_trials, self.progress, self.keep = study_name, n_trials, progress, keep
        self.last_number = self.last_error = None
        self.numbers = set()   # the trials this worker ran

    def __call__(self, trial):
        """Run the trial; a failure of any kind is kept as one line (its "error" attribute, last_error) and
        raised on, for Optuna to record the trial as failed."""
        self.last_number, self.last_error = trial.number, None
        self.numbers.add(trial.number)
        try:
            return self.run_trial(trial)
        except (SurplusTrial, optuna.TrialPruned):
            raise
        except Exception as e:
            self.last_error = one_line(e)
            trial.set_user_attr("error", self.last_error)
            if isinstance(e, SetupError):   # every trial would meet it: the report lists it apart
                trial.set_user_attr("setup_failure", str(e))
            raise

    def run_trial(self, trial):
        import main
        import train
        # Trial numbers are handed out by the storage one by one: if the trials before this one that are not
        # failed already make up the study, another worker got there first.
        trials = trial.study.get_trials(deepcopy=False)
        frozen = next(t for t in trials if t.number == trial.number)
        live = (*FINISHED, TrialState.RUNNING)
        if sum(t.number < trial.number and t.state in live for t in trials) >= self.n_trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"the study already has {self.n_trials} trials")
        params = suggest(trial, self.space, self.fixed)
        cfg = resolve(self.base_cfg.replace(**params))   # a drawn combination can be invalid (a bad space)
        train.check_stop()   # a SIGTERM since the trial was drawn: no run folder for it
        run_dir = trial_dir(cfg, self.study_name, trial.number)
        trial.set_user_attr("run_dir", run_dir)
        trial.set_user_attr("max_epochs", cfg.epochs)

        def on_epoch(epoch, valid_f1):
            trial.report(valid_f1, epoch)
            return f"pruned by the sweep's pruner after epoch {epoch}" if trial.should_prune() else None
        sweep_info = {"study": self.study_name, "trial": trial.number, "params": params,
                      "retry_of": frozen.system_attrs.get("failed_trial")}
        with main.labelled(f"trial {trial.number} | "):
            summary = main.train_run(cfg, progress=self.progress, run_dir=run_dir, on_epoch=on_epoch,
                                     config_extra={"sweep": sweep_info})
        best = summary.get("best") or {}
        test = best.get("test") or {}
        for key, value in (("valid_f1", best.get("selected_f1")), ("test_f1", test.get("weighted_f1")),
                           ("test_accuracy", test.get("accuracy")), ("best_epoch", summary.get("best_epoch")),
                           ("epochs_run", summary.get("epochs_run")), ("seconds", summary.get("total_seconds"))):
            trial.set_user_attr(key, value)
        if summary.get("stopped", "").startswith("pruned"):
            raise optuna.TrialPruned(summary["stopped"])
        return best["selected_f1"]

    def tidy(self, study):
        """--keep: the .pth files of the trials that have ended, decided from the study as it stands now. Every
        worker does it after each of its trials; what it deletes is never the best trial's (a trial still running
        is left alone and tidied when it ends), so workers deciding at the same moment never disagree harmfully."""
        trials = study.get_trials(deepcopy=False)
        ended = [t.user_attrs.get("run_dir") for t in trials if t.state in (*FINISHED, TrialState.FAIL)]
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = max(complete, key=lambda t: t.value).user_attrs.get("run_dir") if complete else None
        return keep.apply_policy(self.keep, ended, best)


def ran_the_last(study, objective):
    """Whether this worker ran the study's last trial to finish (complete or pruned): of the workers that end
    together, the one that prints the report."""
    ended = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED and t.datetime_complete]
    return not ended or max(ended, key=lambda t: t.datetime_complete).number in objective.numbers


def count_states(study):
    counts = {state: 0 for state in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    return counts


def wait(seconds, stop):
    """Sleep `seconds` in short steps, ended at once by a SIGTERM (`stop` set); Ctrl-C: BetweenTrials."""
    end = time.monotonic() + seconds
    try:
        while not stop.is_set() and time.monotonic() < end:
            time.sleep(STOP_CHECK_SECONDS)
    except KeyboardInterrupt:
        raise BetweenTrials("interrupted") from None


def work(study, objective, n_trials, heartbeat=True, log=print):
    """Run trials until the study holds n_trials finished ones. While the last ones run in other workers,
    wait (with a heartbeat storage): one of them may die, and its re-queued trial is then taken here.
    A trial that fails (any exception) is logged in one line and the next one drawn, unless it could not start
    (a setup failure) or MAX_FAILED_IN_A_ROW failed in a row. After a SIGTERM (train.STOP, set by the handler
    sweep.py installs) no trial is drawn and no waiting goes on: BetweenTrials."""
    import train
    failed_in_a_row = 0
    while True:
        optuna.storages.fail_stale_trials(study)   # a dead worker's trial: FAIL, and its parameters re-queued
        counts = count_states(study)
        finished = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
        if finished >= n_trials:
            trials = f"{finished} finished trial{'' if finished == 1 else 's'}"
            log(f"sweep: the study holds {trials} (asked for {n_trials}): this worker stops")
            return finished
        if train.STOP.is_set():   # the study is not complete: the trials left are for the workers still there
            raise BetweenTrials("terminated (SIGTERM)")
        if finished + counts[TrialState.RUNNING] >= n_trials and not counts[TrialState.WAITING]:
            if not heartbeat:   # no heartbeat (journal storage): a running trial cannot be told from a dead one
                log(f"sweep: the last {counts[TrialState.RUNNING]} trials run elsewhere: this worker stops")
                return finished
            wait(POLL_SECONDS, train.STOP)
            continue
        # any exception of a trial (VegaError, CUDA out of memory...) fails that trial only
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True,
                       callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=FINISHED)])
        last = next(t for t in study.get_trials(deepcopy=False) if t.number == objective.last_number)
        objective.tidy(study)
        if last.user_attrs.get("setup_failure"):
            raise VegaError(f"trial {last.number} could not start, and no trial here would: "
                            f"{last.user_attrs['setup_failure']}")
        if last.state == TrialState.FAIL and not last.user_attrs.get("surplus"):
            log(f"sweep: trial {last.number} failed: {objective.last_error}")
            failed_in_a_row += 1
            if failed_in_a_row >= MAX_FAILED_IN_A_ROW:
                raise VegaError(f"{MAX_FAILED_IN_A_ROW} trials in a row failed here (the last: trial {last.number}, "
                                f"see its message above): this worker stops")
        else:
            failed_in_a_row = 0

