"""The manifest: a CSV of one row per utterance (docs/extract.md, "The manifest").

    dialogue_id, speaker, text       required
    position                         order in the dialogue (default: row order)
    audio, video                     media files, relative to the manifest's folder (audio blank: the video's)
    start, end                       seconds inside the media file(s) (default: the whole file)
    label, split, utterance_id       optional (a row without a split is `predict`)
"""
import csv
import io
import math
import os

from vega_utils.common import VegaError
from vega_utils.features.utterances import Utterance, bad

REQUIRED = ("dialogue_id", "speaker", "text")
KNOWN = REQUIRED + ("position", "audio", "video", "start", "end", "label", "split", "utterance_id")


def read_manifest(path):
    if os.path.isdir(path):
        raise VegaError(f"manifest {path} is a folder; give the CSV file")
    if not os.path.isfile(path):
        raise VegaError(f"manifest {path} not found")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8-sig")
    except OSError as e:
        raise VegaError(f"manifest {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise VegaError(f"manifest {path} row {row_at(raw, e.start)}: byte 0x{raw[e.start]:02x} is not UTF-8 "
                        f"(save the manifest as UTF-8)") from None
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows, header = list(reader), reader.fieldnames or []
    except csv.Error as e:
        raise VegaError(f"manifest {path}: cannot read it as a CSV ({e})") from None
    for i, row in enumerate(rows):
        if None in row:   # csv puts the fields beyond the header under None
            raise VegaError(f"manifest {path} row {i + 2}: more fields than the header's {len(header)} (a text "
                            f"that holds a comma must be in double quotes)")
    missing = [c for c in REQUIRED if c not in header]
    if not rows or missing:
        raise VegaError(f"manifest {path}: " + (f"lacks column(s) {', '.join(missing)}" if rows else "no rows")
                        + f" (columns: {', '.join(KNOWN)})")
    unknown = [c for c in header if c not in KNOWN]
    if unknown:
        raise VegaError(f"manifest {path}: unknown column(s) {', '.join(unknown)} (known: {', '.join(KNOWN)})")
    folder = os.path.dirname(os.path.abspath(path))
    return [row_utterance(row, f"{path} row {i + 2}", i, folder) for i, row in enumerate(rows)]


def row_at(raw, offset):
    """The CSV row (1: the header) that holds byte `offset` of the file: the rows csv reads before it, counted."""
    before = raw[:offset].decode("utf-8-sig", errors="replace")
    rows = list(csv.reader(io.StringIO(before, newline="")))
    at_line_start = before == "" or before.endswith(("\n", "\r"))
    return len(rows) + 1 if at_line_start else max(len(rows), 1)


def row_utterance(row, where, index, folder):
    def value(key):
        return (row.get(key) or "").strip()

    def media(key):
        return os.path.join(folder, value(key)) if value(key) else None

    u = Utterance(row=where, dialogue_id=value("dialogue_id"), position=index, speaker=value("speaker"),
                  text=row.get("text") or "", audio=media("audio"), video=media("video"), label=value("label"),
                  split=value("split") or "predict", utterance_id=value("utterance_id"))
    for key in ("position", "start", "end"):
        if value(key):
            try:
                number = float(value(key))
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                u.broken = bad(u, f"{key} {value(key)!r} is not a number")   # reported by the checks
                return u
            setattr(u, key, number)
    return u
