"""Where a model fails: weighted F1 by position in the dialogue, dialogue length, speaker, and on emotion shifts.

The standard MERC breakdown, computed from a run's predictions.csv (best epoch, test set). An utterance is an
emotion shift when its label differs from the label of the same speaker's previous utterance in the dialogue;
a speaker's first utterance has no previous one and is counted apart ("speaker's first"); "rest" is every
utterance that is not a shift (no shift + speaker's first).
"""
import numpy as np
import pandas as pd

from vega_utils.insight.report import classification_metrics

EDGES = (1, 6, 11, 21, 41, 81)   # first value of each bin, 1-based: 1-5, 6-10, 11-20, 21-40, 41-80, 81+
SHIFT, SAME, FIRST = 1, 0, -1
FACETS = (("position", "position in the dialogue (utterances; 1 = first)"),
          ("length", "dialogue length (utterances)"), ("speaker", "speaker"),
          ("emotion_shift", "emotion shift: label differs from\nthe same speaker's previous label"))


def bin_name(value, edges=EDGES):
    """The bin of a 1-based count: '1-5', '6-10', ..., '81+'."""
    i = int(np.searchsorted(edges, value, side="right")) - 1
    return f"{edges[i]}+" if i == len(edges) - 1 else f"{edges[i]}-{edges[i + 1] - 1}"


def emotion_shift(dialogue_ids, utterance_index, speakers, labels):
    """Per utterance: SHIFT (1) when its label differs from the same speaker's previous utterance in its
    dialogue, SAME (0) when equal, FIRST (-1) for a speaker's first utterance. Any row order."""
    frame = pd.DataFrame({"d": list(dialogue_ids), "i": np.asarray(utterance_index), "s": list(speakers),
                          "y": np.asarray(labels)})
    order = frame.sort_values(["d", "i"], kind="stable")
    previous = order.groupby(["d", "s"], sort=False)["y"].shift(1)               # same speaker, same dialogue
    kind = np.where(previous.isna(), FIRST, np.where(previous == order["y"], SAME, SHIFT))
    out = np.empty(len(frame), dtype=np.int64)
    out[order.index.to_numpy()] = kind
    return out


def _group_scores(labels, preds, groups, order, class_names):
    rows = []
    for name in order:
        mask = groups == name
        if not mask.any():
            continue
        m = classification_metrics(labels[mask], preds[mask], class_names)
        rows.append({"group": name, "n": int(mask.sum()), "weighted_f1": m["weighted_f1"],
                     "accuracy": m["accuracy"]})
    return rows


def breakdown(frame, class_names):
    """frame: report.read_predictions_csv's table -> {facet: [{"group", "n", "weighted_f1", "accuracy"}]}."""
    labels = frame["label"].map(list(class_names).index).to_numpy()
    preds = frame["prediction"].map(list(class_names).index).to_numpy()
    index = frame["utterance_index"].to_numpy()
    lengths = frame.groupby("dialogue_id")["utterance_index"].transform("size").to_numpy()
    bins = [bin_name(e) for e in EDGES]
    position = np.array([bin_name(i + 1) for i in index])
    length = np.array([bin_name(n) for n in lengths])
    speaker = frame["speaker"].astype(str).to_numpy()
    shift = emotion_shift(frame["dialogue_id"], index, speaker, labels)
    kind = np.array(["shift" if k == SHIFT else "no shift" if k == SAME else "speaker's first" for k in shift])
    out = {"position": _group_scores(labels, preds, position, bins, class_names),
           "length": _group_scores(labels, preds, length, bins, class_names),
           "speaker": _group_scores(labels, preds, speaker, sorted(set(speaker)), class_names)}
    shift_rows = _group_scores(labels, preds, np.where(shift == SHIFT, "shift", "rest"), ["shift", "rest"],
                               class_names)
    out["emotion_shift"] = shift_rows + [dict(r, group=f"rest: {r['group']}") for r in
                                         _group_scores(labels, preds, kind, ["no shift", "speaker's first"],
                                                       class_names)]
    return out


def markdown(result, title):
    lines = [f"## {title}", "", "| by | group | utterances | weighted F1 (%) | accuracy (%) |", "|---|---|---|---|---|"]
    for facet, _ in FACETS:
        for r in result.get(facet, []):
            lines.append(f"| {facet.replace('_', ' ')} | {r['group']} | {r['n']} | {100 * r['weighted_f1']:.2f} | "
                         f"{100 * r['accuracy']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(result, path, title, overall_f1=None):
    """Four bar panels (weighted F1 per group, utterance count on each bar), the run's overall F1 dashed."""
    from vega_utils.insight.report import _save_figure, plt
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.8), gridspec_kw={"width_ratios": [6, 6, 3, 4], "wspace": 0.3})
    for ax, (facet, xlabel) in zip(axes, FACETS):
        rows = result.get(facet, [])
        x = np.arange(len(rows))
        values = [100 * r["weighted_f1"] for r in rows]
        colours = ["#d98f8f" if r["group"] == "shift" else "#8fb4d9" for r in rows]
        bars = ax.bar(x, values, color=colours, edgecolor="#3b5a78")
        for bar, r in zip(bars, rows):
            ax.annotate(f"n={r['n']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        if overall_f1 is not None:
            ax.axhline(100 * overall_f1, color="black", linestyle="--", linewidth=1,
                       label=f"all test utterances {100 * overall_f1:.1f}")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks(x, labels=[r["group"].replace("rest: ", "rest:\n").replace("speaker's first",
                                                                                  "speaker's\nfirst")
                                 for r in rows], fontsize=8)
        ax.set(xlabel=xlabel, ylim=(0, 105))
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("weighted F1 (%)")
    fig.suptitle(f"{title}\nweighted F1 of each group of test utterances; n = utterances in the group")
    _save_figure(fig, path)
