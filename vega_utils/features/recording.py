"""A recording's features for a checkpoint (inference.py --media): the cues of its transcript (or of one made by
--transcribe) extracted exactly as the extraction recorded in the checkpoint did (the same machinery as
extract.py --like), into the output folder, where they are kept for the next run.

The folder holds `recording.json` (what was asked: recordings, transcripts, model, extraction), `features.npz`
and its dataset JSON, `transcripts/` when the cues were made by a speech-recognition model, and the outputs.
A run with the same request reuses what is there (an interrupted extraction continues); after a run that
stopped before its features (a bad cue, since mended) the folder takes the new request; a folder holding
anything else is refused, so no finished output is replaced.
"""
import json
import os
import shutil
from collections import Counter
from dataclasses import replace

from vega_utils.common import VegaError, atomic_write_text
from vega_utils.features.like import recorded_settings
from vega_utils.features.pipeline import extract, stamp
from vega_utils.features.transcribe import transcribe_all
from vega_utils.features.transcripts import read_recordings

FEATURES = "features.npz"
REQUEST = "recording.json"


def checkpoint_record(dataset_spec, checkpoint):
    """The extraction record a checkpoint was trained on; one line when it has none."""
    record = (dataset_spec or {}).get("extraction")
    if not isinstance(record, dict):
        raise VegaError(f"checkpoint {checkpoint} carries no extraction record (it was trained on features that "
                        f"extract.py did not make, such as the published pickles), so it cannot say how to turn a "
                        f"recording into its features; extract them yourself and predict with --data_path")
    return record


def files_of(path):
    if not os.path.isdir(path):
        return [os.path.abspath(path)]
    return [os.path.abspath(os.path.join(path, f)) for f in sorted(os.listdir(path))
            if not f.startswith(".") and os.path.isfile(os.path.join(path, f))]


def request_of(media, transcript, transcribe, record):
    """What the folder's contents answer: the inputs (with their size and modification time) and the extraction."""
    inputs = files_of(media) + (files_of(transcript) if transcript else [])
    return {"media": os.path.abspath(media), "transcript": transcript and os.path.abspath(transcript),
            "transcribe": transcribe, "files": {p: list(stamp(p)) for p in inputs},
            "extraction": {"extractors": record.get("extractors"), "settings": record.get("settings")}}


def claim_folder(out, request):
    """Create the output folder, or accept one that holds the same request, or one whose earlier request never
    got its features (a run stopped by a bad cue, then the transcript mended): its unfinished shards are
    dropped. A folder with the finished outputs of another request is refused."""
    path = os.path.join(out, REQUEST)
    if os.path.isfile(path):
        with open(path) as f:
            try:
                held = json.load(f)
            except ValueError:
                held = None
        if held == request:
            return True
        if os.path.exists(os.path.join(out, FEATURES)):
            raise VegaError(f"--out {out} holds the outputs of another recording, transcript or extraction "
                            f"({REQUEST}); give another folder, or remove it to start afresh")
        shutil.rmtree(os.path.join(out, FEATURES + ".parts"), ignore_errors=True)
        atomic_write_text(path, json.dumps(request, indent=1, sort_keys=True) + "\n")
        return False
    if os.path.isdir(out) and os.listdir(out):
        raise VegaError(f"--out {out} is a folder with other files in it; give a new or empty folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise VegaError(f"--out {out} is a file; give a folder")
    os.makedirs(out, exist_ok=True)
    atomic_write_text(path, json.dumps(request, indent=1, sort_keys=True) + "\n")
    return False


def check_speakers(utterances, settings, checkpoint):
    """A checkpoint that numbered speakers per dialogue has a place for so many speakers in one dialogue: one
    line naming the recording's speakers when it has more (the checks would name only the numbers)."""
    if settings.speaker_ids != "dialogue" or not settings.speakers:
        return
    by_recording = {}
    for u in utterances:
        if u.broken is None:
            by_recording.setdefault(u.dialogue_id, {}).setdefault(u.speaker, None)
    for name, speakers in by_recording.items():
        if len(speakers) > len(settings.speakers):
            raise VegaError(f"recording {name}: {len(speakers)} speakers ({', '.join(speakers)}), but checkpoint "
                            f"{checkpoint} was trained on dialogues of at most {len(settings.speakers)}")


def recording_features(record, checkpoint, media, transcript, transcribe, out, work):
    """(path of the features, {utterance_id: Utterance} of every cue read). The extraction is the checkpoint's
    record replayed; `work` says how to run it (batching, device, errors, progress)."""
    if bool(transcript) == bool(transcribe):
        raise VegaError("--media needs its cues: --transcript FILE (SRT, WebVTT, ASS) or --transcribe MODEL")
    settings = recorded_settings(record, f"checkpoint {checkpoint}")
    for path, what in ((media, "recording"), (transcript, "transcript")):
        if path and not os.path.exists(path):
            raise VegaError(f"{what} {path} not found")
    claim_folder(out, request_of(media, transcript, transcribe, record))
    if transcribe:
        transcript = transcribe_all(media, transcribe, os.path.join(out, "transcripts"), work.device, work.progress)
    utterances, counts = read_recordings(media, transcript)
    print(counts.describe())
    check_speakers(utterances, settings, checkpoint)
    cues = {u.utterance_id: replace(u) for u in utterances if u.broken is None}   # copies: names as written
    features = os.path.join(out, FEATURES)
    if os.path.isfile(features):
        print(f"features: {features}, made by an earlier run of this command")
    else:
        extracted = extract(utterances, settings, work, features, transcript, Counter(),
                            (checkpoint, record))
        print(f"features: {features}, {extracted['counts']['utterances']} utterances extracted as the checkpoint's "
              f"extraction record says")
        for line in extracted["skipped"]:
            print(f"skipped: {line}")
    return features, cues
