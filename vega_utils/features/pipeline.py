"""One extraction: check the utterances and their files, compute each modality shard by shard (resumable,
shards.py), then write OUT.npz (the open format, with utterance_id, sentence and the extraction record) and
the dataset JSON beside it (OUT.json) that run.py --Dataset trains on."""
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from vega_utils.common import VegaError, atomic_write_text, resolve_device
from vega_utils.data.openformat import write_npz
from vega_utils.features.hub import require_models
from vega_utils.features.media import check_media, probe
from vega_utils.features.record import differences, library_versions, to_json
from vega_utils.features.shards import Parts
from vega_utils.features.utterances import BadUtterance, Problems, bad, check_fields, renumber

MODALITIES = ("text", "audio", "visual")


@dataclass
class Settings:
    """What an extraction is (repeated by --like): the extractors and the dataset it builds."""
    text_model: str = "roberta-large"
    text_pooling: str = "cls"
    text_context: int = 0
    max_length: int = 512
    text_layers: int = 1                # the pooled vector averaged over the last K hidden layers
    text_finetune: Optional[dict] = None   # finetune.Recipe's values: fine-tune the text model first; None: not
    audio: str = "is10"
    sample_rate: int = 16000
    visual_model: str = "openai/clip-vit-base-patch32"
    frames: int = 8
    faces: bool = False
    classes: Optional[list] = None      # None: the labels found, sorted
    speakers: Optional[list] = None     # None: the speakers found, sorted
    speaker_ids: str = "name"           # name | dialogue (each dialogue's speakers 0, 1, ... by first turn)
    preset: str = "IEMOCAP"


@dataclass
class Work:
    """How to run it (not part of the record): batching, workers, device, errors, progress."""
    batch_size: int = 32
    jobs: int = 1
    device: str = "auto"
    on_error: str = "error"
    shard_size: int = 256
    progress: bool = True


def speakers_per_dialogue(utterances):
    """Each dialogue's speakers numbered by first turn (MELD's published features do the same)."""
    seen = {}
    for u in sorted(utterances, key=lambda u: (u.dialogue_id, u.position if u.broken is None else 0)):
        names = seen.setdefault(u.dialogue_id, {})
        u.speaker = str(names.setdefault(u.speaker, len(names)))


def check_files(u, problems):
    """Check the utterance's media. False if it is dropped."""
    try:
        if u.audio:
            check_media(u, u.audio, "audio")
        if u.video:
            check_media(u, u.video, "video")
    except BadUtterance as e:
        problems.report(e)
        return False
    return True


def stamp(path):
    """(size, modification time) of a media file, so that a resumed extraction notices a replaced file."""
    if not path:
        return None
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def audio_seconds(u):
    """Seconds of the utterance's audio segment (0 without an audio source)."""
    if not has_source(u, "audio"):
        return 0.0
    start, end = u.segment("audio")
    return (probe(u.audio or u.video)[0] if end is None else end) - (start or 0.0)


def announce_memory(utts, settings, work):
    from vega_utils.features.audio import memory_note
    note = memory_note(utts, settings.audio, settings.sample_rate, work.jobs, audio_seconds)
    if note:
        print(note)


def reads(modality, chunk, contexts):
    """A hash of what one shard of a modality reads: its utterances' texts, or media files (with their size and
    modification time) and segments; a resumed extraction computes a shard again when this changed."""
    if modality == "text":
        keys = [(u.dialogue_id, u.position, u.text, c) for u, c in zip(chunk, contexts)]
    elif modality == "audio":
        keys = [(u.dialogue_id, u.position, u.audio or u.video, u.segment("audio"), stamp(u.audio or u.video))
                for u in chunk]
    else:
        keys = [(u.dialogue_id, u.position, u.video, u.start, u.end, stamp(u.video)) for u in chunk]
    return hashlib.sha256(json.dumps(keys).encode()).hexdigest()


def has_source(u, modality):
    if modality == "audio":
        return bool(u.audio or (u.video and probe(u.video)[1]))
    return modality == "text" or bool(u.video)


def text_encoder(utts, contexts, settings, work, out, like):
    """(the folder or name the text model loads from, its name in the record, the fine-tune record or None):
    with --text_finetune, the encoder fine-tuned here, or the one a --like record names (never trained again)."""
    if not settings.text_finetune:
        return settings.text_model, None, None
    from vega_utils.features.finetune import fine_tuned_encoder, recorded_encoder
    if like is not None:
        return recorded_encoder(like[1], like[0]), like[1]["extractors"]["text"]["model"], like[1]["text_finetune"]
    folder, record = fine_tuned_encoder(utts, contexts, settings, out, resolve_device(work.device), work.batch_size,
                                        work.progress)
    return folder, os.path.basename(folder), record


def build_extractors(settings, work, text_model=None, text_name=None):
    from vega_utils.features.audio import AudioExtractor
    from vega_utils.features.text import TextExtractor
    from vega_utils.features.visual import VisualExtractor
    device = resolve_device(work.device)
    return {"text": TextExtractor(text_model or settings.text_model, settings.text_pooling, settings.text_context,
                                  settings.max_length, work.batch_size, device, settings.text_layers, text_name),
            "audio": AudioExtractor(settings.audio, settings.sample_rate, work.jobs, device, work.batch_size),
            "visual": VisualExtractor(settings.visual_model, settings.frames, settings.faces, work.batch_size, device)}


def run_shard(modality, extractor, chunk, contexts, problems):
    """(features (n, D), problem per utterance, count) of one shard; in error mode a problem stops here."""
    dim = extractor.dim if modality != "text" else extractor.model.config.hidden_size
    feats = np.zeros((len(chunk), dim), dtype=np.float32)
    lines = [""] * len(chunk)
    if modality == "text":
        before = extractor.truncated
        return extractor.features([u.text for u in chunk], contexts), lines, extractor.truncated - before
    idx = [i for i, u in enumerate(chunk) if has_source(u, modality)]
    before = extractor.faces.fallbacks if modality == "visual" and extractor.faces else 0
    for i, (x, problem) in zip(idx, extractor.features([chunk[i] for i in idx])):
        if not problem and not np.isfinite(x).all():   # openSMILE gives NaN for a segment under about 0.1 s
            u = chunk[i]
            problem = str(bad(u, f"its {modality} features are not finite (a segment too short for the "
                                 f"extractor?)", u.audio or u.video if modality == "audio" else u.video))
        if problem:
            if not problems.skip:
                raise VegaError(problem)
            lines[i] = problem
        else:
            feats[i] = x
    after = extractor.faces.fallbacks if modality == "visual" and extractor.faces else 0
    return feats, lines, after - before


def extract(utterances, settings, work, out, source, dropped_labels, expected=None):
    """Write out (.npz) and its dataset JSON; returns the extraction record. expected: (the --like JSON or None,
    the extraction record it repeats), whose extractors the models found here must match."""
    from collections import Counter

    from tqdm import tqdm

    from vega_utils.features.text import contexts_of
    if not out.lower().endswith(".npz"):
        raise VegaError(f"--out {out}: the output is an .npz file")
    problems = Problems(work.on_error)
    if settings.speaker_ids == "dialogue":
        speakers_per_dialogue(utterances)
    known_speakers = settings.speakers if settings.classes is not None else None   # --like: fixed ones
    utts = check_fields(utterances, settings.classes, known_speakers, problems)
    utts = renumber([u for u in utts if check_files(u, problems)])
    if not utts:
        raise VegaError(f"{source}: no utterance left to extract")
    announce_memory(utts, settings, work)
    if not work.progress:   # transformers draws its own bars while it loads weights
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    contexts = contexts_of(utts, settings.text_context)
    require_models(settings, expected[0] if expected else "", text=not (settings.text_finetune and expected))
    text_model, text_name, tuned = text_encoder(utts, contexts, settings, work, out, expected)
    extractors = build_extractors(settings, work, text_model, text_name)
    described = {m: e.describe() for m, e in extractors.items()}
    if expected is not None and expected[1]["extractors"] != described:
        said = differences(expected[1]["extractors"], described, "in the record")
        raise VegaError(f"--like {expected[0]}: the extractors found here differ from the recorded ones "
                        f"({'; '.join(said)}), so the extraction cannot be repeated")
    chunks = range(0, len(utts), work.shard_size)
    plan = {"extractors": described, "shard_size": work.shard_size,
            "shards": {m: [reads(m, utts[lo:lo + work.shard_size], contexts[lo:lo + work.shard_size])
                           for lo in chunks] for m in MODALITIES}}
    parts = Parts(out, plan)
    columns, counts = {}, Counter()
    failed = [""] * len(utts)
    try:
        for m in MODALITIES:
            shards = []
            with tqdm(total=len(utts), desc=f"{m} features", unit="utt", disable=not work.progress) as bar:
                for k, lo in enumerate(range(0, len(utts), work.shard_size)):
                    chunk = utts[lo:lo + work.shard_size]
                    if not parts.done(m, k):
                        parts.save(m, k, *run_shard(m, extractors[m], chunk, contexts[lo:lo + len(chunk)], problems))
                    shards.append(parts.load(m, k))
                    dropped = [p for p in shards[-1][1] if p]
                    if dropped and not problems.skip:      # a shard of an earlier run with --on_error skip
                        raise VegaError(dropped[0])
                    bar.update(len(chunk))
            columns[m] = np.concatenate([s[0] for s in shards])             # (U, D)
            if m != "audio":                                                   # audio counts nothing
                counts["truncated_text" if m == "text" else "visual_fallbacks"] += sum(s[2] for s in shards)
            failed = [a or b for a, b in zip(failed, [p for s in shards for p in s[1]])]
    except BaseException:       # an error or Ctrl-C: the audio workers are ended, not waited for
        extractors["audio"].close(now=True)
        raise
    extractors["audio"].close()
    keep = [i for i, f in enumerate(failed) if not f]
    problems.lines += [f for f in failed if f]
    utts = renumber([utts[i] for i in keep])
    columns = {m: x[keep] for m, x in columns.items()}
    missing = Counter({m: sum(not has_source(u, m) for u in utts) for m in ("audio", "visual")})   # of those kept
    record = make_record(settings, described, utts, counts, missing, dropped_labels, problems.lines)
    if tuned is not None:
        record["text_finetune"] = tuned
    write_outputs(out, utts, columns, record)
    parts.remove()
    return record


def make_record(settings, described, utts, counts, missing, dropped_labels, skipped):
    classes = settings.classes or sorted({u.label for u in utts if u.label})
    speakers = settings.speakers or sorted({u.speaker for u in utts})
    settings = Settings(**{**asdict(settings), "classes": list(classes), "speakers": list(speakers)})
    weights, absent = class_weight_policy(utts, classes)
    return {"extractors": described, "settings": asdict(settings), "versions": library_versions(),
            "class_weights": weights, "classes_without_training_utterance": absent,
            "counts": {"utterances": len(utts), "dialogues": len({u.dialogue_id for u in utts}),
                       **dict(counts), **{f"missing_{m}": missing[m] for m in ("audio", "visual")},
                       "dropped_labels": dict(dropped_labels), "skipped": len(skipped)},
            "skipped": skipped}


def class_weight_policy(utts, classes):
    """('balanced', []) when every class has a labelled training utterance; otherwise ('none', the classes
    without one): balanced weights (n / (C * count)) cannot weigh a class never seen in training."""
    seen = {u.label for u in utts if u.split == "train" and u.label}
    absent = [c for c in classes if c not in seen]
    return ("none" if absent else "balanced"), absent


def write_outputs(out, utts, columns, record):
    settings = record["settings"]
    cols = {"dialogue_id": np.asarray([u.dialogue_id for u in utts], dtype=str),
            "position": np.asarray([u.position for u in utts], dtype=np.int64),
            "speaker": np.asarray([u.speaker for u in utts], dtype=str),
            "label": np.asarray([u.label for u in utts], dtype=str),
            "split": np.asarray([u.split for u in utts], dtype=str),
            "utterance_id": np.asarray([u.utterance_id or f"{u.dialogue_id}#{u.position}" for u in utts], dtype=str),
            "sentence": np.asarray([u.text for u in utts], dtype=str),
            "extraction": np.asarray(to_json(record)), **columns}
    write_npz(out, cols)
    spec = {"name": os.path.splitext(os.path.basename(out))[0], "classes": settings["classes"],
            "speakers": settings["speakers"], "data_path": os.path.basename(out), "preset": settings["preset"],
            "class_weights": record["class_weights"],
            **{f"{m}_dim": int(columns[m].shape[1]) for m in MODALITIES}, "extraction": record}
    atomic_write_text(os.path.splitext(out)[0] + ".json", json.dumps(spec, indent=1) + "\n")
