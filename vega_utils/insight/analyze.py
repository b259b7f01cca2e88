"""Look inside a finished run, at its best epoch:

    python -m vega_utils.insight.analyze "output/IEMOCAP/[1201-2235]_seed64" [--data_path P] [--anchor_path P]

Writes into RUN/analysis/ (analysis-2, -3, ... when it exists; nothing is overwritten):
- map_pca.png, map_tsne.png: 2-D maps (scikit-learn PCA and t-SNE) of each head's projected test features,
  coloured by class, with the class-centre anchors and the anchor images;
- the anchor-alignment table (vega_utils/insight/alignment.py), recomputed from the saved weights and the anchors and
  checked against metrics.jsonl's numbers of the same epoch;
- head_agreement.png: how often each pair of heads (the four classifiers and, with the VEGA branch, the four
  nearest-anchor predictions) predicts the same class;
- breakdown.png: weighted F1 by position, dialogue length, speaker and on emotion shifts
  (vega_utils/insight/breakdown.py);
- analysis.md (every table) and analysis.json (every number).
A run without the VEGA branch (--ablation no_vega) has no projections: the anchor parts are skipped.
The best epoch's backbone comes from its BEST_*.pth, the VEGA branch from best_vega_branch.pth.
"""
import argparse
import json
import os
import sys

import torch

from model import VEGA, pick_anchors  # a command, not a helper: it rebuilds the plain model of a run
from vega_utils.common import OneLineParser, VegaError, atomic_write_text, exit_on_error, resolve_device
from vega_utils.data.datasets import dataset_info
from vega_utils.insight import alignment, anchor_maps, breakdown, report
from vega_utils.runs import checkpoint
from vega_utils.runs.run_folder import config_of_run as run_config
from vega_utils.runs.run_folder import fresh_folder

HEADS = alignment.HEADS


def parser():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_FOLDER", help="a run folder written by run.py")
    p.add_argument("--data_path", help="the feature pickle (default: the run's own data_path)")
    p.add_argument("--anchor_path", help="the anchor cache (default: the run's own anchor_path)")
    p.add_argument("--out", help="output folder (default: RUN_FOLDER/analysis, numbered when taken)")
    p.add_argument("--maps", nargs="*", default=["pca", "tsne"], choices=["pca", "tsne"],
                   help="which 2-D maps (default: pca tsne)")
    p.add_argument("--device", default="cpu", help="auto, cpu or cuda; scores in float32 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the t-SNE map (default: %(default)s)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores this process may use); scikit-learn's "
                   "own OpenMP threads spin while they wait, so on a busy machine --threads 1 makes t-SNE much faster")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run_name(cfg, run_dir):
    return f"{cfg.name}/{os.path.basename(os.path.normpath(run_dir))}"


def best_checkpoint(run_dir):
    found = checkpoint.best_files(run_dir)
    if not found:
        raise VegaError(f"{run_dir} holds no {checkpoint.BEST_GLOB}: no epoch of this run finished")
    return found[-1]


@torch.no_grad()
def project_test_set(model, cfg, data_path, anchors, device):
    """Every head's logits and (with anchors) projected features on the test set, valid utterances only.

    model.py's plain model computes the reference's padded layout (every (dialogue, position) is a row, in order),
    so a forward hook on `{m}_clip_proj` sees (B*L, K) rows that map back to (B, L, K) positions directly."""
    from dataloader import make_loaders
    from vega_utils.data.dialogues import load_dialogues
    data = load_dialogues(data_path, cfg.Dataset)
    loader = make_loaders(data, cfg)["test"]
    seen, hooks = {}, []
    if anchors is not None:
        for m in HEADS:
            hooks.append(getattr(model, f"{m}_clip_proj").register_forward_hook(
                lambda module, args, out, m=m: seen.__setitem__(m, out.float())))
    result = {"labels": [], "logits": {m: [] for m in HEADS}, "features": {m: [] for m in HEADS}}
    model.eval()
    try:
        for batch in loader:
            batch = batch.to(device)
            out = model(batch, anchors, features=False)
            valid = ~batch.pad_mask                                                 # (B, L)
            result["labels"].append(batch.labels[valid].cpu())
            for m in HEADS:
                result["logits"][m].append(out[f"{m}_logit"][valid].float().cpu())
                if m in seen:
                    B, L = valid.shape
                    result["features"][m].append(seen[m].view(B, L, -1)[valid].cpu())   # (B*L, K) -> (N, K)
    finally:
        for h in hooks:
            h.remove()
    cat = {"labels": torch.cat(result["labels"]).numpy()}
    cat["preds"] = {m: torch.cat(v).argmax(-1).numpy() for m, v in result["logits"].items()}
    cat["features"] = {m: torch.cat(v).numpy() for m, v in result["features"].items() if v}
    return cat


def load_model(cfg, run_dir, device, log):
    """The best epoch's model: backbone from BEST_*.pth, VEGA branch from best_vega_branch.pth (when kept)."""
    path = best_checkpoint(run_dir)
    obj = checkpoint.read_checkpoint(path)
    state, _, _ = checkpoint.split_checkpoint(obj, path)
    model = VEGA(cfg)
    checkpoint.load_backbone(model, state, path, log=log)
    epoch = int(obj.get("epoch", -1))
    has_branch = False
    if cfg.clip_loss:
        branch = os.path.join(run_dir, checkpoint.BRANCH_FILE)
        if os.path.exists(branch):
            checkpoint.load_branch(model, branch, epoch=epoch)
            has_branch = True
        else:
            log(f"{branch} not found (a run from before it was kept): anchor map and alignment skipped")
    else:
        log(f"{run_name(cfg, run_dir)} has no VEGA branch (clip_loss off, e.g. --ablation no_vega): anchor map "
            "and alignment skipped")
    return model.to(device), epoch, has_branch


def check_against_metrics(run_dir, epoch, by_head, class_names, log):
    """Largest difference between the recomputed alignment and what the run logged for that epoch."""
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError):
        return None
    row = next((r for r in rows if r.get("epoch") == epoch), {})
    logged = alignment.flat_row("test", by_head)
    diffs = [abs(row[k] - v) for k, v in logged.items() if k in row]
    if not diffs:
        log(f"note: {path} has no alignment numbers for epoch {epoch} (a run from before they were logged)")
        return None
    worst = max(diffs)
    log(f"alignment recomputed from the saved weights: largest difference to metrics.jsonl epoch {epoch} "
        f"{worst:.1e}")
    return worst


def anchor_parts(out, cfg, name, epoch, ev, bank, class_names, args, log):
    """Alignment table and the 2-D maps; returns (markdown, json). Adds each VEGA head's own prediction, its
    nearest class-centre anchor, to ev["preds"]."""
    cos = {m: alignment.cosines(ev["features"][m], bank.centers.numpy()) for m in HEADS}    # (N, C) each
    ev["preds"].update({f"anchor {m}": cos[m].argmax(1) for m in HEADS})
    by_head = {m: alignment.alignment(cos[m], ev["labels"], class_names) for m in HEADS}
    worst = check_against_metrics(args.run_dir, epoch, by_head, class_names, log)
    md = alignment.markdown(by_head, class_names, f"Anchor alignment, test set, epoch {epoch}")
    subtitles = {m: f"head {m}: cos to own anchor {by_head[m]['overall']['own']:.3f}, to others "
                    f"{by_head[m]['overall']['other']:.3f}, nearest own {100 * by_head[m]['overall']['nearest']:.0f}%"
                 for m in HEADS}
    titles = {"pca": "PCA", "tsne": "t-SNE"}
    for method in args.maps:
        anchor_maps.plot_maps(ev["features"], ev["labels"], bank.centers.numpy(),
                              [b.numpy() for b in bank.banks], class_names, method,
                              os.path.join(out, f"map_{method}.png"),
                              f"{name}: {titles[method]} of projected test features, epoch {epoch}", subtitles,
                              seed=args.seed)
    return md, {"alignment": by_head, "alignment_max_difference_to_metrics": worst}


def analyze(args, log=print):
    run_dir = args.run_dir
    if not os.path.isdir(run_dir):
        raise VegaError(f"{run_dir} is not a folder")
    cfg = run_config(run_dir)
    class_names = list(dataset_info(cfg.Dataset).class_names)
    name = run_name(cfg, run_dir)
    frame = report.read_predictions_csv(os.path.join(run_dir, "predictions.csv"))
    device = resolve_device(args.device)
    model, epoch, has_branch = load_model(cfg, run_dir, device, log)
    bank = None
    if has_branch:
        from vega_utils.anchors.bank import load_anchor_cache
        bank = load_anchor_cache(args.anchor_path or cfg.anchor_path, class_names, expected_dim=cfg.clip_dim)
    anchors = pick_anchors(bank, training=False, rand=0.0).to(device) if bank is not None else None
    ev = project_test_set(model, cfg, args.data_path or cfg.data_path, anchors, device)
    out = fresh_folder(args.out or os.path.join(run_dir, "analysis"))
    sections, numbers = [f"# Analysis of {name}, best epoch {epoch}", ""], {"run": name, "epoch": epoch}
    if bank is not None:
        md, extra = anchor_parts(out, cfg, name, epoch, ev, bank, class_names, args, log)
        sections.append(md)
        numbers.update(extra)
    ev["preds"] = {(k if k.startswith("anchor") else f"classifier {k}"): v for k, v in ev["preds"].items()}
    scores = report.head_f1s(ev["labels"], ev["preds"])
    names, matrix = anchor_maps.agreement(ev["preds"])
    anchor_maps.plot_agreement(names, matrix, scores, os.path.join(out, "head_agreement.png"),
                               f"{name}: head agreement on the test set, epoch {epoch}")
    sections.append(agreement_markdown(names, matrix, scores))
    numbers["head_agreement"] = {"predictors": names, "matrix": matrix.tolist(), "weighted_f1": scores}
    parts = breakdown.breakdown(frame, class_names)
    overall = report.classification_metrics(frame["label"].map(class_names.index),
                                            frame["prediction"].map(class_names.index), class_names)
    breakdown.plot(parts, os.path.join(out, "breakdown.png"),
                   f"{name}: where the model fails (test set, epoch {epoch})", overall["weighted_f1"])
    sections.append(breakdown.markdown(parts, "Weighted F1 by position, dialogue length, speaker, emotion shift"))
    numbers["breakdown"] = parts
    atomic_write_text(os.path.join(out, "analysis.md"), "\n".join(sections))
    atomic_write_text(os.path.join(out, "analysis.json"), json.dumps(numbers, indent=2) + "\n")
    log("\n".join(sections))
    log(f"wrote {', '.join(sorted(os.listdir(out)))} in {out}")
    return out


def agreement_markdown(names, matrix, scores):
    lines = ["## Head agreement (% of test utterances with the same prediction)", "",
             "| | weighted F1 | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for i, n in enumerate(names):
        lines.append(f"| {n} | {100 * scores[n]:.2f} | " + " | ".join(f"{100 * v:.1f}" for v in matrix[i]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency: its OpenMP and BLAS pools

    from vega_utils.runs.threads import apply_threads, resolve_threads
    args = parser().parse_args(argv)

    def command():
        count = resolve_threads(args.threads)
        apply_threads(count)
        with threadpool_limits(limits=count):
            analyze(args)
    return exit_on_error(command, args.debug)


if __name__ == "__main__":
    sys.exit(main())
