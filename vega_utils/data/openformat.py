"""The open feature format: one .npz of row-aligned columns, read with allow_pickle=False (never runs code).

One row per utterance (docs/own-data.md, "The open feature format", documents every column):
    dialogue_id  (U,) str or int     the dialogue the utterance belongs to
    position     (U,) int            its place in the dialogue, 0..n-1 (rows may come in any order)
    speaker      (U,) str or int     a speaker name (or id)
    label        (U,) int or str     class id / name, or the source file's label for a label_map; -1 or "" = none
    split        (U,) str            train, valid, test or predict (one per dialogue)
    text, audio, visual  (U, D)      the feature matrices
Optional entries:
    utterance_id (U,) str or int     the source's name of each utterance (reports carry it)
    sentence     (U,) str            what was said (reports carry it as `text`; `text` holds the features)
    extraction   ()   str            the extraction record (JSON text) of features made by extract.py
The reader turns the columns into the same per-dialogue tables as the pickle, so every check of the pickle
loader (vega_utils/data/datacheck.py) holds with the same messages.
"""
import os
import zipfile

import numpy as np

from vega_utils.common import _atomic_write
from vega_utils.data.files import MODALITIES, first_line, missing_file, plain

COLUMNS = {"dialogue_id": 1, "position": 1, "speaker": 1, "label": 1, "split": 1, "text": 2, "audio": 2,
           "visual": 2}
OPTIONAL = {"utterance_id": 1, "sentence": 1, "extraction": 0}
SPLITS = ("train", "valid", "test", "predict")
KINDS = {"utterance_id": "iuU", "sentence": "U", "extraction": "U",
         "dialogue_id": "iuU", "position": "iu", "speaker": "iuU", "label": "iuU", "split": "U",
         "text": "fiu", "audio": "fiu", "visual": "fiu"}


def read_columns(path, check):
    """The eight columns as numpy arrays; a pickled object array, a missing column or a row count that
    differs is one error line."""
    if not os.path.exists(path):
        raise missing_file(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        check.fail(f"not a readable .npz archive ({type(e).__name__}: {first_line(e)})")
    if not isinstance(archive, np.lib.npyio.NpzFile):
        check.fail("is a single .npy array, expected an .npz archive of the columns "
                   f"{', '.join(COLUMNS)}")
    with archive:
        found = set(archive.files)
        missing = [c for c in COLUMNS if c not in found]
        if missing:
            check.fail(f"lacks column(s) {', '.join(missing)} (the open format has {', '.join(COLUMNS)})")
        unknown = sorted(found - set(COLUMNS) - set(OPTIONAL))
        if unknown:
            check.fail(f"has unknown column(s) {', '.join(unknown)} (the open format has {', '.join(COLUMNS)}, "
                       f"optionally {', '.join(OPTIONAL)})")
        cols = {name: _column(archive, name, check) for name in [*COLUMNS, *OPTIONAL] if name in found}
    rows = len(cols["dialogue_id"])
    shapes = {**COLUMNS, **OPTIONAL}
    for name, x in cols.items():
        if name == "extraction":
            if x.ndim != 0 or x.dtype.kind != "U":
                check.fail("entry 'extraction' must be one text (the extraction record as JSON)")
            continue
        if x.ndim != shapes[name]:
            check.fail(f"column {name!r} has shape {list(x.shape)}, expected "
                       f"{'[rows]' if shapes[name] == 1 else '[rows, dim]'}")
        if x.dtype.kind not in KINDS[name]:
            check.fail(f"column {name!r} holds {x.dtype}, expected {_kind_words(KINDS[name])}")
        if x.shape[0] != rows:
            check.fail(f"column {name!r} has {x.shape[0]} rows but 'dialogue_id' has {rows}: every column has "
                       f"one row per utterance")
    if rows == 0:
        check.fail("holds no utterances")
    return cols


def _column(archive, name, check):
    try:
        return archive[name]
    except ValueError as e:   # numpy: "Object arrays cannot be loaded when allow_pickle=False"
        if "allow_pickle" in str(e):
            check.fail(f"column {name!r} is a pickled object array; the open format refuses it (unpickling can "
                       f"run code): store it as a plain numeric or text array")
        check.fail(f"column {name!r} cannot be read ({first_line(e)})")
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        check.fail(f"column {name!r} cannot be read: damaged archive ({type(e).__name__}: {first_line(e)})")


def _kind_words(kinds):
    words = {"i": "integers", "u": "integers", "f": "floats", "U": "text"}
    return " or ".join(dict.fromkeys(words[k] for k in kinds))


def read_npz(path, check):
    """(tables {name: {dialogue id: value}}, {split: dialogue ids in order of first row}) of an open file."""
    cols = read_columns(path, check)
    bad_split = sorted(set(np.unique(cols["split"]).tolist()) - set(SPLITS))
    if bad_split:
        check.fail(f"unknown split value(s) {', '.join(map(repr, bad_split))}: each row's split is one of "
                   f"{', '.join(SPLITS)}")
    rows_of = {}
    for r, vid in enumerate(cols["dialogue_id"].tolist()):
        rows_of.setdefault(vid, []).append(r)
    tables = {name: {} for name in ("speakers", "labels", *MODALITIES)}
    splits = {s: [] for s in SPLITS}
    for vid, rows in rows_of.items():
        rows = np.asarray(rows)
        split_values = sorted(set(cols["split"][rows].tolist()))
        if len(split_values) > 1:
            check.fail(f"dialogue {vid!r} has rows in several splits ({', '.join(split_values)}); a dialogue "
                       f"belongs to one split")
        position = cols["position"][rows]
        order = np.argsort(position, kind="stable")
        rows = rows[order]                                     # the dialogue's rows in utterance order
        if not np.array_equal(position[order], np.arange(len(rows))):
            check.fail(f"dialogue {vid!r} has positions {_short(position[order].tolist())}, expected 0..{len(rows) - 1}"
                       f" (each once)")
        tables["speakers"][vid] = [plain(s) for s in cols["speaker"][rows]]
        tables["labels"][vid] = [plain(v) for v in cols["label"][rows]]
        for m in MODALITIES:
            tables[m][vid] = cols[m][rows]                     # (n, D), the stored dtype
        for table, name in (("utterance_ids", "utterance_id"), ("sentences", "sentence")):
            if name in cols:
                tables.setdefault(table, {})[vid] = [plain(v) for v in cols[name][rows]]
        splits[split_values[0]].append(vid)
    return tables, splits


def _short(values, limit=8):
    return str(values) if len(values) <= limit else f"[{', '.join(map(str, values[:limit]))}, ...]"


def read_extraction(path):
    """The extraction record (a dict) an .npz carries, or None (features not made by extract.py)."""
    import json
    with np.load(path, allow_pickle=False) as archive:
        return json.loads(str(archive["extraction"])) if "extraction" in archive.files else None


def write_npz(path, columns):
    """Write the columns (a dict of numpy arrays, COLUMNS' names and any of OPTIONAL's) atomically, compressed."""
    arrays = {name: np.asarray(columns[name]) for name in [*COLUMNS, *OPTIONAL] if name in columns}
    for name, x in arrays.items():
        if x.dtype.kind == "O":
            raise ValueError(f"column {name!r} is an object array; give numbers or text")
    _atomic_write(path, lambda f: np.savez_compressed(f, **arrays), "wb")
