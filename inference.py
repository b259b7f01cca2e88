"""Score a VEGA checkpoint: weighted F1 (the paper's headline), true accuracy, weighted precision (what the
reference prints as "ACC"), macro F1, per-class scores and the confusion matrix of the `all` head.

    python inference.py --checkpoint "checkpoint/IEMOCAP.pth"
    python inference.py --checkpoint "output/IEMOCAP/[1125-1952]/BEST_cls_f1_[70.12]_epoch42.pth" \
        --predictions_out predictions.csv --json scores.json
    python inference.py --checkpoint BEST.pth --media talk.mp4 --transcript talk.vtt --out talk_emotions

Checkpoints: a bare backbone state_dict (the authors' published IEMOCAP.pth), a dict with a 'state_dict'
entry, and this project's files, which carry their config (the model is rebuilt from it). Files are read
with torch.load(weights_only=True); one that needs arbitrary unpickling is refused. The dataset pickle is
unpickled in full and can execute code: only use data files from a trusted source.
"""
import argparse
import json
import math
import os
import sys
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader

import train
from dataloader import DialogueDataset, collate, load_dialogues, speaker_names, utterance_names
from main import build_model
from vega_utils.common import OneLineParser, VegaError, as_typed, atomic_write_text, exit_on_error, resolve_device
from vega_utils.data.datasets import dataset_arg, info_of
from vega_utils.data.openformat import read_extraction
from vega_utils.insight import report
from vega_utils.runs import checkpoint, threads
from vega_utils.runs.config import ACTIVATIONS, AMP_CHOICES, Config, load_preset, resolve
from vega_utils.runs.config_help import config_help, preset_default

# The reference's model flags: (flag, config key, type, choices). They build the model of a file without
# a config; with a config, a flag that contradicts it is an error.
MODEL_FLAGS = [
    ("dataset", "Dataset", dataset_arg, None), ("hidden_dim", "hidden_dim", int, None),
    ("n_head", "n_head", int, None), ("dropout", "dropout", float, None),
    ("outlayer_drop", "outlayer_drop", float, None), ("outlayer_num", "outlayer_num", int, None),
    ("outlayer_activation_fn", "outlayer_activation_fn", str, list(ACTIVATIONS)),
    ("clip_dim", "clip_dim", int, None), ("clip_proj_layer_num", "clip_proj_layer_num", int, None),
    ("clip_proj_activation_fn", "clip_proj_activation_fn", str, list(ACTIVATIONS)),
    ("clip_proj_drop", "clip_proj_drop", float, None), ("expr_img_folder", "expr_img_folder", str, None),
    ("rand", "rand", float, None),
]
FLAG_OF = {key: flag for flag, key, _, _ in MODEL_FLAGS} | {"clip_loss": "clip_loss"}
DEFAULT_CLIP_DIM = 512  # the VEGA branch is built but never loaded, so its width only has to be valid


def parser():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoint/IEMOCAP.pth",
                   help="the file to score: a BEST_*.pth, a last.pth or a bare state_dict (default: %(default)s)")
    model = p.add_argument_group("model settings (a file with its config needs none; a flag that contradicts it "
                                 "is an error)")
    # default=SUPPRESS: only flags actually given appear in args, so they can be checked against a config
    for flag, key, kind, choices in MODEL_FLAGS:   # --dataset is the reference's spelling, --Dataset run.py's
        names = [f"--{flag}", "--Dataset"] if flag == "dataset" else [f"--{flag}"]
        model.add_argument(*names, dest=flag, type=kind, choices=choices, default=argparse.SUPPRESS,
                           help=from_the_file(key))
    model.add_argument("--clip_loss", dest="clip_loss", action="store_true", default=argparse.SUPPRESS,
                       help="build the VEGA branch too (never used for predictions; default: the file's "
                            "config, else on)")
    model.add_argument("--no_clip_loss", dest="clip_loss", action="store_false", default=argparse.SUPPRESS,
                       help="build the model without its VEGA branch")
    for names, key in ((["--batch_size", "--batch-size"], "batch_size"), (["--num_workers"], "num_workers")):
        p.add_argument(*names, dest=key, type=int, default=argparse.SUPPRESS, help=from_the_file(key))
    p.add_argument("--data_path", help="dataset pickle (default: the checkpoint's, else the dataset's)")
    p.add_argument("--split", choices=["test", "train", "valid", "predict"], default="test",
                   help="dialogues to score; a split without labels (predict) gets predictions only "
                        "(default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--cpu", action="store_true", help="the reference's flag: same as --device cpu")
    p.add_argument("--eval_amp", "--amp", dest="eval_amp", choices=list(AMP_CHOICES), default=None,
                   help="precision: auto = float32 on the CPU, fp16 autocast on CUDA (the reference's); off = "
                        "float32 everywhere (default: the checkpoint's eval_amp, else auto)")
    p.add_argument("--threads", type=int,
                   help="CPU threads (default: the cores this process may use)")
    p.add_argument("--predictions_out", metavar="CSV",
                   help="per-utterance labels, predictions, probabilities (default: not written)")
    p.add_argument("--json", metavar="PATH",
                   help="the reported numbers as JSON, fractions, not percent (default: not written)")
    rec = p.add_argument_group("a recording in, emotions out (docs/inference.md, 'From a recording')")
    rec.add_argument("--media", metavar="FILE|DIR", help="a recording (video or audio) or a folder of them: "
                     "extracted as the checkpoint's extraction record says, then predicted (default: none)")
    rec.add_argument("--transcript", metavar="FILE|DIR", help="its SRT, WebVTT or ASS transcript (a folder: "
                     "matched by file name; default: none)")
    rec.add_argument("--transcribe", metavar="MODEL", help="no transcript: make the cues with this Whisper "
                     "model, a folder or a hub name in the local cache; speakers are then unknown (default: none)")
    rec.add_argument("--out", metavar="DIR", help="the folder for the features, predictions.csv, emotions.vtt, "
                     "emotions.srt and timeline.png (required with --media)")
    rec.add_argument("--on_error", choices=["error", "skip"], default="error",
                     help="a bad cue stops the extraction, or is dropped and listed (default: %(default)s)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (default: one on a terminal)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def from_the_file(key):
    """Help of a model or loader flag: a checkpoint with its config brings its own value."""
    default = preset_default(key) if key != "clip_dim" else DEFAULT_CLIP_DIM
    return config_help(key, f"default: the checkpoint's config; for a file without one, {default}")


# ---------------------------------------------------------------- checkpoint and config
def read_checkpoint(path):
    """checkpoint.read_checkpoint, plus the odd errors torch's safe unpickler raises on foreign files."""
    try:
        return checkpoint.read_checkpoint(path)
    except VegaError:
        raise
    except Exception as e:  # e.g. IndexError from the weights-only unpickler on a text file
        raise VegaError(f"checkpoint {path} is not a readable checkpoint (corrupt or not a torch file: "
                        f"{type(e).__name__})") from None


def unpack(obj, path):
    """(state_dict, saved config or None). This project's resume files keep the whole model under 'model'."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "optimizer" in obj:
        return obj["model"], obj.get("config")
    state, config, _ = checkpoint.split_checkpoint(obj, path)
    return state, config


def given_model_flags(args):
    return {key: getattr(args, flag) for key, flag in FLAG_OF.items() if hasattr(args, flag)}


def same(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def model_config(args, saved, path):
    """The resolved Config to build, and where its model settings came from."""
    given = given_model_flags(args)
    if saved is None:
        cfg = load_preset(given.get("Dataset", "IEMOCAP")).replace(**given)
        cfg = cfg.replace(clip_dim=given.get("clip_dim", DEFAULT_CLIP_DIM))
        source = "flags and the reference defaults (the checkpoint carries no config)"
    else:
        try:
            cfg = Config.from_dict(saved)
        except (VegaError, TypeError) as e:
            raise VegaError(f"checkpoint {path} carries a config this version cannot read: {e}") from None
        clash = [f"{as_typed(args, FLAG_OF[k])} {v} (the checkpoint's config has {k}={getattr(cfg, k)})"
                 for k, v in given.items() if not same(getattr(cfg, k), v)]
        if clash:
            raise VegaError(f"checkpoint {path} carries its config, and flags contradict it: " + "; ".join(clash)
                            + ". Drop those flags: the model is rebuilt from the checkpoint")
        source = "the checkpoint's config"
    runtime = {k: getattr(args, k) for k in ("batch_size", "num_workers") if hasattr(args, k)}
    data_path = args.data_path or (cfg.data_path if saved is not None else None)
    return resolve(cfg.replace(data_path=data_path, **runtime)), source


def load_weights(model, state, cfg, path, has_config):
    """Strict backbone load; a file that does not fit says first what would fit: for a file without a config
    the flags that build its shapes, for one with a config that it does not match its own config."""
    def advice(found):
        if has_config:
            return "its weights do not match its own config: the file is damaged or was edited"
        fix = fitting_flags(found, cfg)
        return f"try: {fix}" if fix else ""
    checkpoint.load_backbone(model, state, path, log=print, advice=advice)


def fitting_flags(found, cfg):
    """Flags (different from the current ones) that would build a model with the file's shapes."""
    flags = [f"--{FLAG_OF[k]} {found[k]}" for k in ("Dataset", "hidden_dim", "outlayer_num")
             if k in found and found[k] != getattr(cfg, k)]
    if found.get("outlayer_dropout") is False and cfg.outlayer_drop > 0:
        flags.append("--outlayer_drop 0")
    if found.get("outlayer_dropout") and cfg.outlayer_drop == 0:
        # any rate above 0 builds the dropout modules (their rate leaves no trace, and scoring never drops)
        flags.append(f"--outlayer_drop {load_preset(cfg.Dataset).outlayer_drop or 0.1}")
    return " ".join(flags)


# ---------------------------------------------------------------- running
def pick_device(args):
    if args.cpu:
        if args.device not in ("auto", "cpu"):
            raise VegaError(f"--cpu contradicts --device {args.device}: give one of them")
        return torch.device("cpu")
    return resolve_device(args.device)


def check_output_paths(args, cfg):
    """Never overwrite the checkpoint or the data file, nor write both outputs to one file."""
    outputs = [(f, p) for f, p in (("--predictions_out", args.predictions_out), ("--json", args.json)) if p]
    inputs = [("the checkpoint", args.checkpoint), ("the data file", cfg.data_path)]
    for flag, out in outputs:
        for what, src in inputs:
            if src and os.path.realpath(out) == os.path.realpath(src):
                raise VegaError(f"{flag} {out} is {what}; refusing to overwrite it")
    if len(outputs) == 2 and os.path.realpath(outputs[0][1]) == os.path.realpath(outputs[1][1]):
        raise VegaError(f"--predictions_out and --json name the same file {args.json}")


def split_loader(data, cfg, split, pin_memory):
    """The split's dialogues as stored: no feature dropout, file order (the test loader of training)."""
    ids = data.split_ids(split)
    if not ids:
        raise VegaError(f"{data.path} has no dialogues in the {split} split")
    return DataLoader(DialogueDataset(data.dialogues(ids), augment=False), batch_size=cfg.batch_size,
                      num_workers=cfg.num_workers, pin_memory=pin_memory,
                      collate_fn=partial(collate, n_speakers=data.n_speakers))


def evaluate(model, cfg, args, device, amp_dtype):
    data = load_dialogues(cfg.data_path, info_of(cfg))
    check_extraction(cfg)
    if data.describe_dropped():
        print(data.describe_dropped())
    loader = split_loader(data, cfg, args.split, pin_memory=device.type == "cuda")
    progress = not args.no_progress and sys.stderr.isatty()
    ev = train.eval_epoch(model, loader, cfg, None, None, device, amp_dtype, with_losses=False,
                          desc=f"scoring {args.split}", progress=progress)
    return {**ev, "named": utterance_names(data, ev["dialogue_ids"], ev["utterance_index"])}


def check_extraction(cfg):
    """Features made by extract.py must come from the extraction the checkpoint was trained on."""
    trained = (cfg.dataset_spec or {}).get("extraction")
    if trained and str(cfg.data_path).lower().endswith(".npz"):
        from vega_utils.features.record import require_same_extraction
        require_same_extraction(trained, read_extraction(cfg.data_path), cfg.data_path)


# ---------------------------------------------------------------- report
def pct(x):
    return f"{100 * x:.2f}"


def format_report(m, heads, class_names):
    lines = [f"weighted F1 {pct(m['weighted_f1'])} | accuracy {pct(m['accuracy'])} | weighted precision "
             f"(the reference's \"ACC\") {pct(m['weighted_precision'])} | macro F1 {pct(m['macro_f1'])}",
             "weighted F1 per head: " + ", ".join(f"{h} {pct(v)}" for h, v in heads.items()), ""]
    width = max(len(n) for n in class_names + ["class"]) + 2
    lines.append(f"{'class':<{width}}{'precision':>10}{'recall':>8}{'F1':>8}{'support':>9}")
    for name in class_names:
        c = m["per_class"][name]
        lines.append(f"{name:<{width}}{pct(c['precision']):>10}{pct(c['recall']):>8}{pct(c['f1']):>8}"
                     f"{c['support']:>9}")
    lines += ["", "confusion matrix (rows: true class, columns: predicted class)"]
    col = max(len(n) for n in class_names) + 2
    lines.append(" " * width + "".join(f"{n:>{col}}" for n in class_names))
    for name, row in zip(class_names, m["confusion"]):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{col}}" for v in row))
    return "\n".join(lines)


def recorded_line(obj, split):
    """The test score stored in a project checkpoint, to compare with what was just measured."""
    metrics = obj.get("metrics") if isinstance(obj, dict) else None
    if split != "test" or not isinstance(metrics, dict) or "weighted_f1" not in metrics:
        return None
    return f"recorded in the checkpoint at training time: weighted F1 {pct(metrics['weighted_f1'])}"


def write_outputs(args, cfg, ev, context, class_names, numbers):
    if args.predictions_out:
        names = speaker_names(info_of(cfg))
        report.write_predictions_csv(args.predictions_out, ev["dialogue_ids"], ev["utterance_index"],
                                     [names[s] for s in ev["speakers"]], ev["labels"], ev["preds"]["all"],
                                     ev["probs"], class_names, ev["named"])
        print(f"predictions: {args.predictions_out}")
    if args.json:
        body = {**context, "class_names": class_names, **numbers}
        atomic_write_text(args.json, json.dumps(body, indent=2) + "\n")
        print(f"scores: {args.json}")


def score(args):
    obj = read_checkpoint(args.checkpoint)
    state, saved = unpack(obj, args.checkpoint)
    cfg, source = model_config(args, saved, args.checkpoint)
    check_output_paths(args, cfg)
    device = pick_device(args)
    # the run's own evaluation precision unless a flag says otherwise: the same checkpoint, the same numbers
    amp_dtype = train.resolve_eval_amp(args.eval_amp or cfg.eval_amp, device)
    train.exact_float32(device)
    print(f"checkpoint: {args.checkpoint}, {checkpoint.describe_format(obj)}")
    print(f"model: {cfg.Dataset}, hidden_dim {cfg.hidden_dim}, n_head {cfg.n_head}, outlayer {cfg.outlayer_num} x "
          f"{cfg.outlayer_activation_fn} (drop {cfg.outlayer_drop}), from {source}")
    if saved is None:
        print("note: n_head and the activation cannot be read from the weights; pass --n_head / "
              "--outlayer_activation_fn if the model was trained with other values")
    model = build_model(cfg)
    load_weights(model, state, cfg, args.checkpoint, saved is not None)
    model.to(device)
    ev = evaluate(model, cfg, args, device, amp_dtype)
    class_names = list(info_of(cfg).class_names)
    amp_name = train.precision_name(amp_dtype)
    labelled = ev["labels"] >= 0
    print(f"data: {cfg.data_path}, {args.split} split, {len(set(ev['dialogue_ids']))} dialogues, {len(labelled)} "
          f"utterances ({int(labelled.sum())} labelled); device {device}, {amp_name}\n")
    context = {"checkpoint": args.checkpoint, "checkpoint_format": checkpoint.describe_format(obj),
               "config_source": source, "dataset": cfg.Dataset, "data_path": cfg.data_path, "split": args.split,
               "device": str(device), "precision": amp_name}
    if not labelled.any():
        return predict_only(args, cfg, ev, class_names, context)
    if not labelled.all():
        print(f"note: {int((~labelled).sum())} utterances have no label: they are predicted, not scored\n")
    m = report.classification_metrics(ev["labels"][labelled], ev["preds"]["all"][labelled], class_names)
    heads = report.head_f1s(ev["labels"][labelled], {k: v[labelled] for k, v in ev["preds"].items()})
    print(format_report(m, heads, class_names))
    recorded = recorded_line(obj, args.split)
    if recorded:
        print(f"\n{recorded}")
    write_outputs(args, cfg, ev, context, class_names, {"metrics": m, "head_weighted_f1": heads})
    return 0


def predicted_counts(preds, class_names):
    counts = np.bincount(preds, minlength=len(class_names))
    return {c: int(n) for c, n in zip(class_names, counts)}


def predict_only(args, cfg, ev, class_names, context):
    """A split without labels: the predictions and their class distribution; nothing to score them against."""
    if not args.predictions_out:   # the default name, never over a file already there
        args.predictions_out = "predictions.csv"
        if os.path.exists(args.predictions_out):
            raise VegaError(f"{args.predictions_out} exists; refusing to replace it: name the predictions file "
                            f"with --predictions_out")
    counts = predicted_counts(ev["preds"]["all"], class_names)
    total = max(1, sum(counts.values()))
    print("predicted classes: " + ", ".join(f"{c} {n} ({100 * n / total:.1f}%)" for c, n in counts.items()))
    print(f"no metric can be computed: the {args.split} split of {cfg.data_path} has no labels")
    write_outputs(args, cfg, ev, context, class_names, {"metrics": None, "predicted_counts": counts})
    return 0


def from_media(args):
    """A recording and its transcript in, its emotions out: the checkpoint's extraction replayed on the cues, the
    predictions, then predictions.csv, the emotion subtitles and the timeline in --out."""
    from vega_utils.features.pipeline import Work
    from vega_utils.features.recording import FEATURES, checkpoint_record, recording_features
    from vega_utils.insight.emotions import write_recording
    if not args.out:
        raise VegaError("--media needs --out DIR, the folder for the features and the emotions")
    given = [flag for flag, value in (("--data_path", args.data_path), ("--predictions_out", args.predictions_out),
                                      ("--json", args.json)) if value]
    if given:
        raise VegaError(f"--media writes its features and predictions in --out; leave out {', '.join(given)}")
    obj = read_checkpoint(args.checkpoint)
    state, saved = unpack(obj, args.checkpoint)
    args.data_path, args.split = os.path.join(args.out, FEATURES), "predict"
    cfg, source = model_config(args, saved, args.checkpoint)
    record = checkpoint_record(cfg.dataset_spec, args.checkpoint)
    device = pick_device(args)
    work = Work(device=device.type, on_error=args.on_error, progress=not args.no_progress)
    _, cues = recording_features(record, args.checkpoint, args.media, args.transcript, args.transcribe, args.out,
                                 work)
    amp_dtype = train.resolve_eval_amp(args.eval_amp or cfg.eval_amp, device)
    train.exact_float32(device)
    model = build_model(cfg)
    load_weights(model, state, cfg, args.checkpoint, saved is not None)
    model.to(device)
    ev = evaluate(model, cfg, args, device, amp_dtype)
    class_names = list(info_of(cfg).class_names)
    counts = predicted_counts(ev["preds"]["all"], class_names)
    print(f"predicted {len(ev['preds']['all'])} utterances: " + ", ".join(f"{c} {n}" for c, n in counts.items() if n))
    for path in write_recording(args.out, cues, ev["named"]["utterance_id"], ev["probs"], class_names,
                                folder=os.path.isdir(args.media)):
        print(f"wrote {path}")
    return 0


def main(argv=None):
    args = parser().parse_args(argv)

    def command():
        count = threads.resolve_threads(args.threads)
        threads.apply_threads(count)
        share = threads.CoreShare(count).start()   # idle OpenMP threads sleep while others keep cores busy
        try:
            if args.transcript or args.transcribe or args.out:
                if not args.media:
                    raise VegaError("--transcript, --transcribe and --out go with --media (a recording)")
            return from_media(args) if args.media else score(args)
        finally:
            share.close()
    return exit_on_error(command, args.debug)


if __name__ == "__main__":
    sys.exit(main())
