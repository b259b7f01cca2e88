"""timeline.png: a recording's predicted emotions over time, one band per speaker.

Inside a speaker's band each emotion has its own row; an utterance is a bar on the row of its predicted emotion,
from its start to its end, in that emotion's colour, and as tall as the row times its probability (a full-height
bar: the model is sure). The picture widens with the number of utterances (up to a limit) so that a
conversation of a few hundred utterances stays readable; time is in minutes for a recording over six minutes,
else in seconds.
"""
import matplotlib

matplotlib.use("Agg")  # before pyplot: headless, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

LABELLED = 40   # up to this many utterances, each bar has its probability written beside it
COLOURS = ["#8c8c8c", "#e6a700", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
           "#e377c2"]


def colour_of(k, name):
    return COLOURS[0] if name == "neutral" else COLOURS[1 + k % (len(COLOURS) - 1)]


def draw_timeline(path, rows, class_names, title):
    """rows: emotion_rows of one recording (start, end, speaker, emotion, probability)."""
    speakers = list(dict.fromkeys(r["speaker"] for r in rows))   # in order of first turn
    n_cls = len(class_names)
    end = max(r["end"] for r in rows)
    minutes = end > 360
    scale = 60.0 if minutes else 1.0
    width = min(30.0, max(10.0, 6.0 + 0.06 * len(rows)))
    band = 0.22 * n_cls + 0.35
    fig, axes = plt.subplots(len(speakers), 1, sharex=True, squeeze=False,
                             figsize=(width, 1.4 + band * len(speakers)))
    colours = {c: colour_of(k, c) for k, c in enumerate(class_names)}
    for ax, who in zip(axes[:, 0], speakers):
        mine = [r for r in rows if r["speaker"] == who]
        for r in mine:
            row = class_names.index(r["emotion"])
            height = 0.9 * r["probability"]
            ax.broken_barh([(r["start"] / scale, max(r["end"] - r["start"], 0.02 * scale) / scale)],
                           (row - height / 2, height), facecolors=colours[r["emotion"]], edgecolors="none")
            if len(rows) <= LABELLED:   # few utterances: room to print each probability
                ax.text(r["end"] / scale, row, f" {100 * r['probability']:.0f}%", va="center", fontsize=7)
        ax.set_yticks(range(n_cls))
        ax.set_yticklabels(class_names, fontsize=8)
        ax.set_ylim(-0.6, n_cls - 0.4)
        ax.invert_yaxis()
        ax.set_ylabel(f"{who}\n({len(mine)})", rotation=0, ha="right", va="center", fontsize=9)
        ax.grid(axis="x", color="#dddddd", linewidth=0.6)
        for k in range(n_cls):
            ax.axhline(k, color="#f0f0f0", linewidth=0.5, zorder=0)
        ax.set_axisbelow(True)
    last = axes[-1, 0]
    last.set_xlim(0, end / scale)
    last.set_xlabel("minutes" if minutes else "seconds")
    height = fig.get_figheight()
    fig.suptitle(f"{title}: {len(rows)} utterances; bar height = probability of the predicted emotion",
                 x=0.01, y=1 - 0.08 / height, ha="left", va="top", fontsize=10)
    fig.legend(handles=[Patch(color=colours[c], label=c) for c in class_names], loc="upper left", ncol=n_cls,
               bbox_to_anchor=(0.01, 1 - 0.32 / height), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / height))
    fig.savefig(path, dpi=90)
    plt.close(fig)
