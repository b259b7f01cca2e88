"""Figures of `python -m vega_utils.insight.analyze`:
2-D maps of projected features with the anchors, head agreement."""
import numpy as np

from vega_utils.insight.alignment import unit_rows
from vega_utils.insight.report import _save_figure, plt

CLASS_COLOURS = plt.get_cmap("tab10").colors


def embed(points, n_fit, method, seed=0):
    """(P, K) -> (P, 2) and the axis labels. PCA is fitted on the first n_fit points (the utterances) and the
    anchors are projected onto its axes: fitted on all points, the first axis only separated utterances from
    anchors when they are far apart. t-SNE has no projection of new points, so it is fitted on all of them."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    if method == "pca":
        pca = PCA(n_components=2, random_state=seed).fit(points[:n_fit])
        share = 100 * pca.explained_variance_ratio_
        return pca.transform(points), (f"PC 1 ({share[0]:.0f}% of the utterances' variance; unit-vector coordinates)",
                                       f"PC 2 ({share[1]:.0f}% of the utterances' variance)")
    perplexity = min(30.0, max(2.0, (points.shape[0] - 1) / 3))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
    return xy, (f"t-SNE 1 (no units; perplexity {perplexity:.0f}, cosine geometry)", "t-SNE 2 (no units)")


def plot_maps(features, labels, centres, images, class_names, method, path, title, subtitles, seed=0):
    """One panel per head: its projected test features (L2-normalised, dots coloured by true class), the class
    centre anchors (stars, named) and the anchor images (crosses) of the same colour.

    features: {head: (N, K)}; labels (N,); centres (C, K); images: C arrays (n_c, K); subtitles: {head: str}."""
    heads = list(features)
    cols = 2 if len(heads) > 1 else 1
    rows = -(-len(heads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.2 * cols, 6.2 * rows), squeeze=False)
    image_points = np.concatenate([np.asarray(b) for b in images]) if images else np.zeros((0, centres.shape[1]))
    image_class = np.concatenate([np.full(len(b), k) for k, b in enumerate(images)]) if images else np.zeros(0)
    n, c = len(labels), len(class_names)
    for ax, head in zip(axes.flat, heads):
        # (N + C + I, K): utterances, then centres, then images
        points = np.concatenate([unit_rows(features[head]), unit_rows(centres), unit_rows(image_points)])
        xy, (xlabel, ylabel) = embed(points, n, method, seed)
        utt, cen, img = xy[:n], xy[n:n + c], xy[n + c:]
        for k, name in enumerate(class_names):
            colour = CLASS_COLOURS[k % len(CLASS_COLOURS)]
            mask = labels == k
            ax.scatter(utt[mask, 0], utt[mask, 1], s=14, alpha=0.7, color=colour, linewidths=0,
                       label=f"{name} (n={int(mask.sum())})")
            ax.scatter(img[image_class == k, 0], img[image_class == k, 1], s=28, marker="x", color=colour,
                       linewidths=1.2)
            ax.scatter(cen[k, 0], cen[k, 1], s=260, marker="*", color=colour, edgecolors="black", linewidths=1.2,
                       zorder=5)
            ax.annotate(name, cen[k], xytext=(6, 6), textcoords="offset points", fontsize=9, weight="bold",
                        bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.7, "linewidth": 0})
        ax.set(title=subtitles.get(head, head), xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.2)
    for ax in list(axes.flat)[len(heads):]:
        ax.axis("off")
    first = axes.flat[0]
    first.scatter([], [], s=200, marker="*", color="white", edgecolors="black", label="class-centre anchor")
    first.scatter([], [], s=28, marker="x", color="black", label="anchor image")
    # one legend under the panels: inside one it covered points or anchors
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05 / rows, 1, 1))
    fig.legend(*first.get_legend_handles_labels(), loc="lower center", ncol=min(c + 2, 8), fontsize=9,
               markerscale=1.5, bbox_to_anchor=(0.5, 0))
    _save_figure(fig, path)


def agreement(preds):
    """{predictor: (N,) class ids} -> (names, (P, P) share of utterances on which two predictors agree)."""
    names = list(preds)
    stacked = np.stack([np.asarray(preds[k]) for k in names])                     # (P, N)
    return names, (stacked[:, None, :] == stacked[None, :, :]).mean(-1)          # (P, P)


def plot_agreement(names, matrix, scores, path, title):
    """Heat map of pairwise agreement (%); each predictor's weighted F1 in its row label."""
    p = len(names)
    fig, ax = plt.subplots(figsize=(1.0 * p + 4, 0.8 * p + 2.5))
    image = ax.imshow(100 * matrix, cmap="Greens", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="same prediction (% of test utterances)")
    for i in range(p):
        for j in range(p):
            ax.text(j, i, f"{100 * matrix[i, j]:.0f}", ha="center", va="center", fontsize=9,
                    color="white" if matrix[i, j] > 0.6 else "black")
    ax.set_xticks(range(p), labels=names, rotation=40, ha="right")
    ax.set_yticks(range(p), labels=[f"{n} (F1 {100 * scores[n]:.1f})" for n in names])
    ax.set(title=title, xlabel="predictor (classifier heads; the nearest class-centre anchor of each VEGA head)",
           ylabel="predictor (its weighted F1, %)")
    _save_figure(fig, path)
