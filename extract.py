"""Features from raw conversations: text, audio and visual features of every utterance, written in the open
.npz format with a dataset JSON beside it, so that `python run.py --Dataset OUT.json` trains on them.

    python extract.py --layout meld --root MELD.Raw --out data/meld_own.npz
    python extract.py --manifest talks.csv --out data/talks.npz --audio egemaps --frames 4
    python extract.py --like data/meld_own.json --manifest new.csv --out data/new.npz
    python extract.py --media talk.mp4 --transcript talk.vtt --out data/talk.npz
    python extract.py --media recordings --transcribe openai/whisper-small --out data/recordings.npz

docs/extract.md describes every extractor, the manifest, resuming and the errors.
"""
import argparse
import os
import shlex
import sys
from dataclasses import asdict

from vega_utils.common import OneLineParser, VegaError, exit_on_error, read_json, script_cmd
from vega_utils.features.finetune import Recipe
from vega_utils.features.like import recorded_settings
from vega_utils.features.pipeline import Settings, Work, extract
from vega_utils.features.text import POOLINGS

DEFAULTS = Settings()
RECIPE = Recipe()


def parser():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_argument_group("input (one of --manifest, --layout with --root, --media with --transcript)")
    source.add_argument("--manifest", metavar="CSV",
                        help="one row per utterance (docs/extract.md, 'The manifest'; default: none)")
    source.add_argument("--layout", choices=["meld", "iemocap"],
                        help="read a MELD or IEMOCAP release folder (default: none)")
    source.add_argument("--root", metavar="DIR", help="the release folder of --layout (default: none)")
    source.add_argument("--media", metavar="FILE|DIR", help="a recording (video or audio), or a folder of them, "
                        "with --transcript (default: none)")
    source.add_argument("--transcript", metavar="FILE|DIR", help="its SRT, WebVTT or ASS transcript, or a folder "
                        "of them matched by file name (docs/extract.md, 'Transcripts'; default: none)")
    source.add_argument("--transcribe", metavar="MODEL", help="no transcript: make the cues of --media with this "
                        "Whisper model (a folder, or a hub name in the local cache), written to OUT.transcripts/ "
                        "and kept; speakers are unknown (default: none)")
    source.add_argument("--like", metavar="JSON", help="repeat the extraction that wrote this dataset JSON "
                        "(same models, pooling, frames, audio set, classes and speakers; default: the flags below)")
    p.add_argument("--out", required=True, metavar="FILE.npz",
                   help="the features; the dataset JSON goes beside it (required)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished extraction at --out (default: refuse)")
    p.add_argument("--text_model", default=DEFAULTS.text_model, help="hub name or local folder (default: %(default)s)")
    p.add_argument("--text_pooling", choices=POOLINGS, default=DEFAULTS.text_pooling,
                   help="cls: first token; mean: the utterance's tokens (default: %(default)s)")
    p.add_argument("--text_context", type=int, default=DEFAULTS.text_context,
                   help="preceding utterances of the dialogue read with each one (default: %(default)s)")
    p.add_argument("--max_length", type=int, default=DEFAULTS.max_length,
                   help="tokens per sequence; longer ones are truncated and counted (default: %(default)s)")
    p.add_argument("--text_layers", type=int, default=DEFAULTS.text_layers,
                   help="the pooled vector averaged over the last K hidden layers (default: %(default)s)")
    tune = p.add_argument_group("fine-tuning the text model first (--text_finetune; defaults: COSMIC's recipe)")
    tune.add_argument("--text_finetune", action="store_true",
                      help="fine-tune --text_model for emotion classification on the labelled train utterances, "
                           "keep the best epoch on valid, extract with it (default: off)")
    for key, kind, help_text in (
            ("epochs", int, "epochs"), ("lr", float, "peak learning rate"), ("batch_size", int, "utterances a batch"),
            ("accumulation", int, "batches whose gradients make one update"),
            ("warmup", float, "share of the updates with a rising learning rate"),
            ("weight_decay", float, "AdamW's decoupled weight decay"),
            ("dropout", float, "dropout of the head and of the encoder's hidden layers"),
            ("beta2", float, "Adam's second beta (the first is 0.9)"), ("eps", float, "Adam's epsilon"),
            ("seed", int, "seed of the head, the shuffling, dropout and a held-out valid set")):
        tune.add_argument(f"--finetune_{key}", type=kind, default=getattr(RECIPE, key),
                          help=f"{help_text} (default: %(default)s)")
    tune.add_argument("--finetune_amp", choices=["auto", "bf16", "off"], default=RECIPE.amp,
                      help="precision: auto = training's --amp auto (fp16 on CUDA; on the CPU bf16 only where it is "
                           "native, else float32), bf16, off = float32 (default: %(default)s)")
    p.add_argument("--audio", default=DEFAULTS.audio,
                   help="is10, egemaps, compare or hf:MODEL (default: %(default)s)")
    p.add_argument("--sample_rate", type=int, default=DEFAULTS.sample_rate,
                   help="audio is resampled to this rate in Hz (default: %(default)s)")
    p.add_argument("--visual_model", default=DEFAULTS.visual_model,
                   help="CLIP model, hub name or local folder (default: %(default)s)")
    p.add_argument("--frames", type=int, default=DEFAULTS.frames,
                   help="frames taken evenly over each utterance's video segment (default: %(default)s)")
    p.add_argument("--faces", action="store_true", help="crop frames to the largest face (default: whole frames)")
    p.add_argument("--classes", help="comma-separated class names in id order (default: the labels found, sorted)")
    p.add_argument("--speaker_ids", choices=["name", "dialogue"], default=None,
                   help="speakers by name, or numbered per dialogue by first turn (default: dialogue for "
                        "--layout meld, name otherwise)")
    p.add_argument("--batch_size", type=int, default=32, help="utterances per forward pass (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1, help="audio worker processes (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--shard_size", type=int, default=256,
                   help="utterances per resumable shard (default: %(default)s)")
    p.add_argument("--on_error", choices=["error", "skip"], default="error",
                   help="stop at a bad utterance, or drop it and list it in the record (default: %(default)s)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars (default: shown)")
    p.add_argument("--debug", action="store_true", help="show tracebacks (default: off)")
    return p


def read_source(args):
    """(utterances, what they came from, dropped label counts, preset, speaker numbering)."""
    from collections import Counter

    from vega_utils.features.manifest import read_manifest
    from vega_utils.features.releases import read_iemocap, read_meld
    if bool(args.manifest) + bool(args.layout) + bool(args.media or args.transcript or args.transcribe) != 1:
        raise VegaError("give one input: --manifest CSV, or --layout meld|iemocap with --root DIR, or --media "
                        "with --transcript or --transcribe")
    if args.media or args.transcript or args.transcribe:
        from vega_utils.features.transcripts import read_recordings
        if not args.media or bool(args.transcript) == bool(args.transcribe):
            raise VegaError("--media goes with one of --transcript (its transcript) or --transcribe (a "
                            "speech-recognition model)")
        transcript = args.transcript
        if args.transcribe:
            import os

            from vega_utils.common import resolve_device
            from vega_utils.features.transcribe import transcribe_all
            if not os.path.exists(args.media):
                raise VegaError(f"recording {args.media} not found")
            transcript = transcribe_all(args.media, args.transcribe, os.path.splitext(args.out)[0] + ".transcripts",
                                        resolve_device(args.device), not args.no_progress)
        utterances, counts = read_recordings(args.media, transcript)
        print(counts.describe())
        return utterances, transcript, Counter(), "IEMOCAP", "name"
    if args.manifest:
        return read_manifest(args.manifest), args.manifest, Counter(), "IEMOCAP", "name"
    if not args.root:
        raise VegaError(f"--layout {args.layout} needs --root DIR, the release folder")
    utterances, dropped = (read_meld if args.layout == "meld" else read_iemocap)(args.root)
    return utterances, args.root, dropped, args.layout.upper(), "dialogue" if args.layout == "meld" else "name"


RECORDED = ("text_model", "text_pooling", "text_context", "max_length", "text_layers", "text_finetune", "audio",
            "sample_rate", "visual_model", "frames", "faces", "classes", "speaker_ids",
            *(f"finetune_{k}" for k in asdict(RECIPE)))   # the flags --like takes from the record


def refuse_changes_to_like(args):
    """One line when extractor flags come with --like, which takes them all from the record."""
    given = [f"--{k}" for k in RECORDED if getattr(args, k) != parser().get_default(k)]
    if args.like and given:
        raise VegaError(f"--like repeats the extraction recorded in {args.like}; {', '.join(given)} cannot "
                        f"change it (leave them out, or extract without --like)")


def settings_of(args, preset, speaker_ids):
    if args.like:
        spec = read_json(args.like, "dataset file")
        record = spec.get("extraction") if isinstance(spec, dict) else None
        return recorded_settings(record, f"--like {args.like}"), record
    from vega_utils.features.releases import IEMOCAP_CLASSES, MELD_CLASSES
    classes = args.classes.split(",") if args.classes else None
    if args.layout and not classes:
        classes = list((MELD_CLASSES if args.layout == "meld" else IEMOCAP_CLASSES).values())
    from vega_utils.features.hub import resolved
    audio = "hf:" + resolved(args.audio[3:]) if args.audio.startswith("hf:") else args.audio
    recipe = asdict(Recipe(**{k: getattr(args, f"finetune_{k}") for k in asdict(RECIPE)}))
    return Settings(text_model=resolved(args.text_model), text_pooling=args.text_pooling,
                    text_context=args.text_context, max_length=args.max_length, text_layers=args.text_layers,
                    text_finetune=recipe if args.text_finetune else None, audio=audio,
                    sample_rate=args.sample_rate, visual_model=resolved(args.visual_model), frames=args.frames,
                    faces=args.faces, classes=classes, speaker_ids=args.speaker_ids or speaker_ids,
                    preset=preset), None


def command(args):
    for flag in ("batch_size", "jobs", "shard_size", "frames", "max_length", "sample_rate", "text_layers",
                 "finetune_epochs", "finetune_batch_size", "finetune_accumulation"):
        if getattr(args, flag) < 1:
            raise VegaError(f"--{flag} must be at least 1")
    if args.text_context < 0:
        raise VegaError("--text_context must be 0 or more")
    from vega_utils.features.output import check_out, counted
    refuse_changes_to_like(args)
    check_out(args.out, args.overwrite)          # before any model loads (--transcribe's too)
    utterances, source, dropped, preset, speaker_ids = read_source(args)
    settings, like = settings_of(args, preset, speaker_ids)
    work = Work(batch_size=args.batch_size, jobs=args.jobs, device=args.device, on_error=args.on_error,
                shard_size=args.shard_size, progress=not args.no_progress)
    expected = (args.like, like) if like else None
    record = extract(utterances, settings, work, args.out, source, dropped, expected)
    c = record["counts"]
    print(f"wrote {args.out}: {counted(c['dialogues'], 'dialogue')}, {counted(c['utterances'], 'utterance')}; "
          f"dataset JSON beside it")
    print("counts: " + ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("utterances", "dialogues")))
    absent = record["classes_without_training_utterance"]
    if absent and len(absent) < len(record["settings"]["classes"]):     # training data, but not of every class
        print(f"note: class(es) {', '.join(absent)} have no training "
              f"utterance, so the dataset JSON sets class_weights 'none' (balanced weights cannot weigh an unseen "
              f"class); edit it to give a list of weights if you want others")
    for line in record["skipped"]:
        print(f"skipped: {line}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    try:
        return exit_on_error(lambda: command(args), args.debug)
    except KeyboardInterrupt:
        print(interrupted(args, argv), file=sys.stderr, flush=True)
        return 130


def interrupted(args, argv):
    """The one line of Ctrl-C: what is kept, and the command that continues."""
    folder = f"{args.out}.parts"
    shards = len([f for f in os.listdir(folder) if f.endswith(".npz")]) if os.path.isdir(folder) else 0
    again = " ".join([script_cmd("extract.py"), *map(shlex.quote, argv)])
    if shards:
        return (f"interrupted: the {shards} finished shard(s) in {folder} are kept; to continue, run the same "
                f"command: {again}")
    return f"interrupted before any feature was written; to start again: {again}"


if __name__ == "__main__":
    sys.exit(main())
