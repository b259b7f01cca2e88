"""Runs side by side, and whether their difference is more than noise:

    python -m vega_utils.insight.compare RUN_OR_AGGREGATE [RUN_OR_AGGREGATE ...] [--alpha 0.05] [--n_boot 10000]

Each argument is a run folder (run.py) or a seed-aggregate folder (run.py --seeds: aggregate.json). Prints and
writes (into --out, default output/comparisons/<time>) a table of weighted F1, accuracy, macro F1, weighted
precision, per-class F1 and the best epoch's anchor alignment (mean +- std over seeds for an aggregate), and, for
every later run scored on the same test utterances as the first one, the paired bootstrap interval of the
weighted-F1 difference and McNemar's exact test on the two prediction files (vega_utils/insight/stats.py), each saying
whether the difference is significant at --alpha. Files: compare.md, compare.json, compare.png.
"""
import argparse
import datetime
import json
import os
import sys

import numpy as np

from vega_utils.common import OneLineParser, VegaError, atomic_write_text, exit_on_error, read_json
from vega_utils.data.datasets import dataset_info
from vega_utils.insight import report, stats
from vega_utils.insight.analyze import run_config, run_name
from vega_utils.runs.run_folder import fresh_folder

HEADLINE = (("weighted_f1", "weighted F1"), ("accuracy", "accuracy"), ("macro_f1", "macro F1"),
            ("weighted_precision", 'weighted precision (reference "ACC")'))
ALIGN = (("own", "cos to own anchor (all head)"), ("other", "mean cos to other anchors (all head)"),
         ("nearest", "nearest anchor is own, % (all head)"))


def parser():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", metavar="RUN_OR_AGGREGATE",
                   help="run folders (summary.json) or seed aggregates (aggregate.json) to compare")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    p.add_argument("--n_boot", type=int, default=10000, help="bootstrap resamples (default 10000)")
    p.add_argument("--unit", choices=["utterance", "dialogue"], default="utterance",
                   help="what the bootstrap resamples (dialogue: whole dialogues, keeping their correlation; "
                        "default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: %(default)s)")
    p.add_argument("--out", help="output folder (default output/comparisons/<MMDD-HHMMSS>)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def best_alignment(run_dir):
    """The test-set alignment of the 'all' head at the run's best epoch, from metrics.jsonl; None without it."""
    try:
        best = read_json(os.path.join(run_dir, "summary.json"), "the run summary").get("best_epoch")
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            row = next((r for r in map(json.loads, f) if r.get("epoch") == best), {})
    except (VegaError, OSError, ValueError):
        return None
    values = {s: row.get(f"test_align_all_{s}") for s, _ in ALIGN}
    return values if None not in values.values() else None


def load_run(path):
    cfg = run_config(path)
    summary = read_json(os.path.join(path, "summary.json"), "the run summary")
    test = (summary.get("best") or {}).get("test")
    if not test:
        raise VegaError(f"{path}/summary.json has no best-epoch test metrics (the run finished no epoch)")
    values = {k: test[k] for k, _ in HEADLINE if k in test}
    values.update({f"f1_{c}": v["f1"] for c, v in test.get("per_class", {}).items()})
    names = list(dataset_info(cfg.Dataset).class_names)
    frame = report.read_predictions_csv(os.path.join(path, "predictions.csv"))
    return {"kind": "run", "name": run_name(cfg, path), "path": path, "class_names": names, "values": values,
            "alignment": best_alignment(path), "vega": cfg.clip_loss, "frame": frame}


def load_aggregate(path):
    agg = read_json(os.path.join(path, "aggregate.json"), "the seed aggregate")
    metrics = agg.get("metrics") or {}
    if not metrics:
        raise VegaError(f"{path}/aggregate.json holds no metrics (no seed finished)")
    names = [k[3:] for k in metrics if k.startswith("f1_")]
    per_seed = [best_alignment(r["run_dir"]) for r in agg.get("per_seed", []) if r.get("run_dir")]
    align = None
    if per_seed and None not in per_seed:
        align = {s: report._stats([a[s] for a in per_seed]) for s, _ in ALIGN}
    parent = os.path.basename(os.path.dirname(os.path.normpath(path)))
    return {"kind": "aggregate", "name": f"{parent}/{os.path.basename(os.path.normpath(path))} "
                                         f"({agg.get('n_seeds')} seeds)",
            "path": path, "class_names": names, "values": metrics, "alignment": align, "vega": align is not None}


def load(path):
    if os.path.isfile(os.path.join(path, "aggregate.json")):
        return load_aggregate(path)
    if os.path.isfile(os.path.join(path, "summary.json")):
        return load_run(path)
    raise VegaError(f"{path} is neither a run folder (summary.json) nor a seed aggregate (aggregate.json)")


def cell(value, percent=True):
    """A number or a {mean, std} dict as text."""
    scale = 100 if percent else 1
    digits = 2 if percent else 4
    if value is None:
        return "–"
    if isinstance(value, dict):
        return f"{scale * value['mean']:.{digits}f} ± {scale * value['std']:.{digits}f}"
    return f"{scale * value:.{digits}f}"


def table(entries):
    classes = []
    for e in entries:
        classes += [c for c in e["class_names"] if c not in classes]
    rows = [(title, [e["values"].get(k) for e in entries], True) for k, title in HEADLINE]
    rows += [(f"F1 {c}", [e["values"].get(f"f1_{c}") for e in entries], True) for c in classes]
    if any(e["alignment"] for e in entries):
        rows += [(title, [(e["alignment"] or {}).get(s) for e in entries], s == "nearest") for s, title in ALIGN]
    lines = ["| metric (%, best epoch, test set) | " + " | ".join(e["name"] for e in entries) + " |",
             "|---|" + "---|" * len(entries)]
    lines += [f"| {title} | " + " | ".join(cell(v, pct) for v in values) + " |" for title, values, pct in rows]
    return "\n".join(lines) + "\n", rows


def paired(a, b, args):
    """Paired tests of run b against run a on their common test utterances; None (and why) when not paired."""
    keys = ["dialogue_id", "utterance_index"]
    fa, fb = a["frame"], b["frame"]
    if len(fa) != len(fb) or fa.duplicated(keys).any():
        return None, (f"{b['name']} and {a['name']} were scored on different test sets "
                      f"({len(fb)} vs {len(fa)} utterances)")
    merged = fa.merge(fb, on=keys, suffixes=("_a", "_b"))
    if len(merged) != len(fa) or (merged["label_a"] != merged["label_b"]).any():
        return None, f"{b['name']} and {a['name']} were scored on different test utterances or labels"
    names = a["class_names"]
    labels = merged["label_a"].map(names.index).to_numpy()
    pred_a = merged["prediction_a"].map(names.index).to_numpy()
    pred_b = merged["prediction_b"].map(names.index).to_numpy()
    groups = merged["dialogue_id"].to_numpy() if args.unit == "dialogue" else None
    boot = stats.paired_bootstrap(labels, pred_a, pred_b, len(names), args.n_boot, args.seed, args.alpha, groups)
    test = stats.mcnemar(pred_a == labels, pred_b == labels)
    return {"a": a["name"], "b": b["name"], "n": int(len(labels)), "unit": args.unit, "bootstrap": boot,
            "mcnemar": test, "bootstrap_significant": bool(boot["low"] > 0 or boot["high"] < 0),
            "mcnemar_significant": bool(test["p_exact"] < args.alpha)}, None


def describe(result, alpha):
    boot, test = result["bootstrap"], result["mcnemar"]
    level = 100 * (1 - alpha)
    verdict = {True: "significant", False: "not significant"}
    return (f"{result['b']} - {result['a']}: weighted F1 {100 * boot['difference']:+.2f} points, {level:g}% paired "
            f"bootstrap CI [{100 * boot['low']:+.2f}, {100 * boot['high']:+.2f}] ({boot['n_boot']} resamples of "
            f"{boot['unit_count']} {result['unit']}s): {verdict[result['bootstrap_significant']]} at alpha {alpha:g}. "
            f"McNemar (exact binomial): only {result['a']} right {test['b']}, only {result['b']} right {test['c']}, "
            f"p = {test['p_exact']:.4g} (chi-square with continuity correction: p = {test['p_chi2']:.4g}): "
            f"{verdict[result['mcnemar_significant']]} at alpha {alpha:g}.")


def plot(entries, rows, results, path, alpha):
    """Grouped bars of every percentage row (std bars for aggregates); beside them, each paired bootstrap's
    distribution of the weighted-F1 difference with its interval."""
    from vega_utils.insight.report import _save_figure, plt
    bars = [(title, values) for title, values, pct in rows if pct]
    ncols = 2 if results else 1
    fig_width = max(9.0, 0.9 * len(bars) * max(1, len(entries) / 2) + 3) + 6 * (ncols - 1)
    fig, axes = plt.subplots(1, ncols, figsize=(fig_width, 5.2), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1.4][:ncols]})
    ax = axes[0, 0]
    width = 0.8 / len(entries)
    x = np.arange(len(bars))
    lowest = np.nanmin([100 * (v["mean"] - v["std"] if isinstance(v, dict) else v)
                        for _, values in bars for v in values if v is not None] + [100.0])
    for i, e in enumerate(entries):
        values = [v[i] for _, v in bars]
        # a missing value (no alignment without the VEGA branch) draws no bar rather than a 0
        means = [100 * (v["mean"] if isinstance(v, dict) else v) if v is not None else np.nan for v in values]
        errors = [100 * v["std"] if isinstance(v, dict) else 0.0 for v in values] if e["kind"] == "aggregate" else None
        drawn = ax.bar(x + (i - (len(entries) - 1) / 2) * width, means, width, yerr=errors, capsize=3,
                       label=e["name"])
        ax.bar_label(drawn, fmt="%.1f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(x, labels=[t.replace(' (reference "ACC")', "") for t, _ in bars],
                  rotation=35, ha="right")
    bottom = max(0.0, 10 * np.floor(lowest / 10) - 10)   # close enough to the values to see differences
    ax.set(ylabel=f"% (best epoch, test set; axis from {bottom:.0f})", ylim=(bottom, 104),
           title="Runs compared (bars: mean ± std over seeds for an aggregate)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    if results:
        ax = axes[0, 1]
        for r in results:
            boot = r["bootstrap"]
            verdict = "significant" if r["bootstrap_significant"] else "not significant"
            ax.hist(100 * boot["differences"], bins=50, alpha=0.5,
                    label=f"{r['b']}\n- {r['a']}\nCI [{100 * boot['low']:+.2f}, {100 * boot['high']:+.2f}]: {verdict}")
            ax.axvspan(100 * boot["low"], 100 * boot["high"], alpha=0.12, color="grey")
        ax.axvline(0, color="black", linewidth=1)
        ax.set(xlabel="weighted F1 difference (points)", ylabel="bootstrap resamples",
               title=f"Paired bootstrap, {100 * (1 - alpha):g}% interval shaded")
        ax.legend(fontsize=7)
    _save_figure(fig, path)


def compare(args, log=print):
    if not 0 < args.alpha < 1:
        raise VegaError(f"--alpha {args.alpha} must be between 0 and 1")
    if args.n_boot < 100:
        raise VegaError(f"--n_boot {args.n_boot} is too few resamples (at least 100)")
    entries = [load(p) for p in args.folders]
    for e in entries:
        if not e["vega"]:
            log(f"{e['name']} has no VEGA branch (or no alignment logged): its anchor-alignment cells are empty")
    text, rows = table(entries)
    lines = [text]
    results = []
    first = entries[0]
    for other in entries[1:]:
        if first["kind"] != "run" or other["kind"] != "run":
            lines.append(f"paired tests skipped for {other['name']}: they need two single runs, not seed aggregates")
            continue
        result, why = paired(first, other, args)
        if result is None:
            lines.append(f"paired tests skipped: {why}")
            continue
        results.append(result)
        lines.append(describe(result, args.alpha))
    out = fresh_folder(args.out or os.path.join("output", "comparisons",
                                                datetime.datetime.now().strftime("%m%d-%H%M%S")))
    report_text = "# Runs compared\n\n" + "\n\n".join(lines) + "\n"
    atomic_write_text(os.path.join(out, "compare.md"), report_text)
    numbers = {"runs": [{k: e[k] for k in ("name", "kind", "path", "values", "alignment")} for e in entries],
               "paired": [{**r, "bootstrap": {k: v for k, v in r["bootstrap"].items() if k != "differences"}}
                          for r in results], "alpha": args.alpha}
    atomic_write_text(os.path.join(out, "compare.json"), json.dumps(numbers, indent=2) + "\n")
    plot(entries, rows, results, os.path.join(out, "compare.png"), args.alpha)
    log(report_text)
    log(f"wrote compare.md, compare.json, compare.png in {out}")
    return numbers, out


def main(argv=None):
    args = parser().parse_args(argv)

    def command():
        compare(args)
    return exit_on_error(command, args.debug)


if __name__ == "__main__":
    sys.exit(main())
