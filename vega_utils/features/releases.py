"""The MELD and IEMOCAP releases, read in their own layouts (docs/extract.md says which files are read).

MELD: {train,dev,test}_sent_emo.csv and the dia{D}_utt{U}.mp4 clips (train_splits/, dev_splits_complete/,
output_repeated_splits_test/); dev becomes `valid`; the CSVs mix encodings, so each is read as UTF-8, else
cp1252, else latin-1. IEMOCAP: Session1..5 transcriptions, EmoEvaluation labels, sentence WAVs and the
dialogue AVIs (an utterance's video is its [start-end] of the dialogue's); sessions 1-4 train, 5 test.
"""
import csv
import glob
import io
import os
import re
from collections import Counter

from vega_utils.common import VegaError
from vega_utils.features.utterances import Utterance

MELD_FILES = {"train": ("train_sent_emo.csv", "train_splits"), "valid": ("dev_sent_emo.csv", "dev_splits_complete"),
              "test": ("test_sent_emo.csv", "output_repeated_splits_test")}
MELD_COLUMNS = ("Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID")
MELD_CLASSES = {"neutral": "neutral", "surprise": "surprise", "fear": "fear", "sadness": "sad", "joy": "happy",
                "disgust": "disgust", "anger": "anger"}
IEMOCAP_CLASSES = {"hap": "happy", "sad": "sad", "neu": "neutral", "ang": "anger", "exc": "excited",
                   "fru": "frustration"}


def read_text(path):
    """A text file as UTF-8, else cp1252, else latin-1 (which reads any bytes)."""
    with open(path, "rb") as f:
        raw = f.read()
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def read_meld(root):
    """(utterances, dropped label counts) of a MELD release folder."""
    utterances = []
    for split, (csv_name, clips) in MELD_FILES.items():
        path = os.path.join(root, csv_name)
        if not os.path.isfile(path):
            raise VegaError(f"MELD layout: {path} not found (--root is the folder holding {csv_name})")
        reader = csv.DictReader(io.StringIO(read_text(path)))
        absent = [c for c in MELD_COLUMNS if c not in (reader.fieldnames or [])]
        if absent:
            raise VegaError(f"MELD layout: {path} lacks column(s) {', '.join(absent)} (a MELD CSV has "
                            f"{', '.join(MELD_COLUMNS)})")
        for i, row in enumerate(reader):
            utterances.append(meld_utterance(row, f"{path} row {i + 2}", root, split, clips))
    return utterances, Counter()


def meld_utterance(row, where, root, split, clips):
    fields = [row.get(c) for c in MELD_COLUMNS]
    if None in fields or None in row:
        raise VegaError(f"{where}: {'too few' if None in fields else 'more'} fields for the header's columns")
    d, n = row["Dialogue_ID"].strip(), row["Utterance_ID"].strip()
    if not (d.isdigit() and n.isdigit()):
        raise VegaError(f"{where}: Dialogue_ID {d!r} and Utterance_ID {n!r} must be whole numbers")
    emotion = row["Emotion"].strip().lower()
    return Utterance(row=where, dialogue_id=f"{split}_dia{d}", position=int(n), speaker=row["Speaker"].strip(),
                     text=row["Utterance"], video=os.path.join(root, clips, f"dia{d}_utt{n}.mp4"),
                     label=MELD_CLASSES.get(emotion, emotion), split=split, utterance_id=f"dia{d}_utt{n}")


TRANSCRIPT = re.compile(r"^(\S+) \[([\d.]+)-([\d.]+)\]:\s?(.*)$")
EVALUATION = re.compile(r"^\[([\d.]+) - ([\d.]+)\]\t(\S+)\t(\S+)\t")


def read_iemocap(root):
    """(utterances of the six classes, {other label: utterances dropped}) of an IEMOCAP release folder."""
    sessions = sorted(glob.glob(os.path.join(root, "Session[1-5]")))
    if not sessions:
        raise VegaError(f"IEMOCAP layout: no Session1..Session5 folder in {root}")
    utterances, dropped = [], Counter()
    for session in sessions:
        split = "test" if session.endswith("5") else "train"
        for path in sorted(glob.glob(os.path.join(session, "dialog", "transcriptions", "*.txt"))):
            dialog = os.path.splitext(os.path.basename(path))[0]
            labels = read_labels(os.path.join(session, "dialog", "EmoEvaluation", f"{dialog}.txt"))
            for k, line in enumerate(read_text(path).splitlines()):
                m = TRANSCRIPT.match(line.strip())
                if not m or m.group(1) not in labels:   # "M: (breathing)" and the like have no id
                    continue
                utt, start, end, text = m.group(1), float(m.group(2)), float(m.group(3)), m.group(4)
                label = labels[utt]
                if label not in IEMOCAP_CLASSES:
                    dropped[label] += 1
                    continue
                utterances.append(Utterance(
                    row=f"{path} line {k + 1}", dialogue_id=dialog, position=start, speaker=utt.split("_")[-1][0],
                    text=text, audio=os.path.join(session, "sentences", "wav", dialog, f"{utt}.wav"),
                    video=os.path.join(session, "dialog", "avi", "DivX", f"{dialog}.avi"), start=start, end=end,
                    label=IEMOCAP_CLASSES[label], split=split, utterance_id=utt, audio_segment=False))
    return utterances, dropped


def read_labels(path):
    if not os.path.isfile(path):
        raise VegaError(f"IEMOCAP layout: {path} not found (the labels of the dialogue's transcription)")
    labels = {}
    for line in read_text(path).splitlines():
        m = EVALUATION.match(line)
        if m:
            labels[m.group(3)] = m.group(4)
    return labels
