"""A sweep's results: the table of trials (CSV and markdown), the best trial as a preset for run.py --config,
and Optuna's matplotlib plots (optimisation history, intermediate values, parameter importances, parallel
coordinates), all in output/<name>/<study>/report/."""
import json
import os
import shlex

import pandas as pd
from optuna.trial import TrialState

from vega_utils.common import atomic_write_text, python_cmd
from vega_utils.runs.config import read_config_file

# The preset leaves out what belongs to the machine a run is on, not to the experiment (a preset pinned to
# cuda:3 would fail on a machine with one GPU).
NOT_IN_PRESET = ("threads", "device")


def trial_rows(study):
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus") or t.user_attrs.get("setup_failure"):
            continue   # closed without running (another worker's trial made up the study), or could not start
        a = t.user_attrs
        row = {"number": t.number, "state": t.state.name, "valid_f1": a.get("valid_f1"), "test_f1": a.get("test_f1"),
               "best_epoch": a.get("best_epoch"), "epochs_run": a.get("epochs_run"),
               "max_epochs": a.get("max_epochs"), "seconds": a.get("seconds"),
               "retry_of": t.system_attrs.get("failed_trial"), "run_dir": a.get("run_dir"), "error": a.get("error")}
        row.update({f"param_{k}": v for k, v in t.params.items()})
        rows.append(row)
    return rows


def _markdown(df):
    def cell(v, key):
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return "–"
        if key in ("valid_f1", "test_f1"):
            return f"{100 * v:.2f}"
        if key == "seconds":
            return f"{v:.0f}"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)
    keys = [k for k in df.columns if k not in ("run_dir", "error")]   # too long for a table: in the CSV
    heads = [k[len("param_"):] if k.startswith("param_") else k for k in keys]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(keys)]
    for rec in df.to_dict("records"):
        lines.append("| " + " | ".join(cell(rec[k], k) for k in keys) + " |")
    return "\n".join(lines)


def epochs_saved(rows):
    """(epochs run, epochs if every finished trial had run to its last epoch) over complete and pruned trials."""
    done = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED") and r["epochs_run"]]
    return sum(r["epochs_run"] for r in done), sum(r["max_epochs"] or r["epochs_run"] for r in done)


def write_preset(study, path):
    """The best trial's complete settings (its run folder's config.json, machine-specific keys left out) as
    `path`; returns None, and removes an earlier report's file there, when that folder is not on this machine
    (a sweep over several machines: --report where the trial ran writes it)."""
    source = os.path.join(study.best_trial.user_attrs["run_dir"], "config.json")
    if not os.path.isfile(source):
        if os.path.exists(path):
            os.remove(path)   # an earlier best trial's: it must not pass for this one's
        return None
    settings = read_config_file(source)
    for key in NOT_IN_PRESET:
        settings.pop(key, None)
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")
    return path


def write_plots(study, folder):
    """Optuna's matplotlib plots as PNG; one that cannot be drawn yet (too few trials) is named and skipped."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    from vega_utils.insight.report import _save_figure  # the project's atomic PNG write (report sets the Agg backend)
    plots = {"history": ovm.plot_optimization_history, "intermediate": ovm.plot_intermediate_values,
             "importances": ovm.plot_param_importances, "parallel": ovm.plot_parallel_coordinate}
    written, skipped = [], []
    for name, plot in plots.items():
        path = os.path.join(folder, f"{name}.png")
        try:
            ax = plot(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(9, 5)
            _save_figure(fig, path)
            written.append(path)
        except Exception as e:   # Optuna refuses e.g. importances with fewer than two complete trials
            skipped.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        finally:
            plt.close("all")
    return written, skipped


def failed_trials(rows):
    """[(trial number, one-line reason)] of the failed trials that recorded one (Ctrl-C and dead workers do not)."""
    return [(r["number"], r["error"]) for r in rows if r["state"] == "FAIL" and r["error"]]


def setup_failures(study):
    """[(trial number, message)] of the trials that could not start (a missing file...): not the search's."""
    return [(t.number, t.user_attrs["setup_failure"]) for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get("setup_failure")]


def count_line(rows, n_setup):
    counts = {s.name: sum(r["state"] == s.name for r in rows) for s in TrialState}
    return (f"{len(rows)} trials: {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed, "
            f"{counts['RUNNING']} running, {counts['WAITING']} waiting"
            + (f" ({n_setup} more could not start: setup failures, below)" if n_setup else ""))


def write_report(study, folder, log=print, full=True):
    """Everything above; returns the markdown text, printed whole (full) or as one line and the folder."""
    os.makedirs(folder, exist_ok=True)
    rows = trial_rows(study)
    df = pd.DataFrame(rows)
    atomic_write_text(os.path.join(folder, "trials.csv"), df.to_csv(index=False))
    counts = {s.name: sum(r["state"] == s.name for r in rows) for s in TrialState}
    run, full_epochs = epochs_saved(rows)
    setups = setup_failures(study)
    text = [f"# Study {study.study_name}", "",
            f"{count_line(rows, len(setups))}. Epochs run by complete and pruned trials: "
            f"{run} of {full_epochs} ({full_epochs - run} saved by pruning). F1 in percent; the objective is "
            f"validation weighted F1, test F1 is at the epoch validation selected (never optimised).", "",
            _markdown(df) if rows else "(no trials yet)", ""]
    best_line = ""
    if counts["COMPLETE"]:
        best = study.best_trial
        best_line = (f"Best: trial {best.number}, validation F1 {100 * best.value:.2f}, test F1 "
                     f"{100 * (best.user_attrs.get('test_f1') or 0):.2f}; ")
        preset = write_preset(study, os.path.join(folder, "best.json"))
        if preset:
            best_line += f"its settings: {preset} ({python_cmd()} run.py --config {shlex.quote(preset)})"
        else:
            best_line += (f"best.json not written: its run folder {best.user_attrs['run_dir']} is not on this "
                          f"machine (--report where it ran writes it)")
        text += [best_line, ""]
    failed = failed_trials(rows)
    if failed:
        text += ["## Failed trials", ""] + [f"- trial {n}: {msg}" for n, msg in failed] + [""]
    if setups:
        text += ["## Setup failures", "", "Trials that could not start (the worker stopped there; not counted "
                 "among the failed trials of the search):", ""] + [f"- trial {n}: {msg}" for n, msg in setups] + [""]
    written, skipped = write_plots(study, folder)
    text += [f"Plots: {', '.join(os.path.basename(p) for p in written) or 'none'}"
             + (f"; not drawn: {'; '.join(skipped)}" if skipped else ""), ""]
    markdown = "\n".join(text)
    atomic_write_text(os.path.join(folder, "trials.md"), markdown)
    if full:
        log(markdown)
        log(f"sweep report: {folder}")
    else:
        log(f"sweep report: {count_line(rows, len(setups))}. {best_line.split(';')[0] or 'No trial complete yet'}; "
            f"the table: {os.path.join(folder, 'trials.md')}")
    return markdown
