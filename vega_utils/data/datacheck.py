"""Every check on a data file, in one place, for both formats (the reference pickle and the open .npz).

Each reader turns its file into the same per-dialogue tables ({dialogue id: value} for speakers, labels, text,
audio, visual); FileChecker checks a dialogue's entries and turns them into tensors. A failure is one line
naming the file (VegaError), whichever format it came from.
"""
import os
import pickle
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch

from vega_utils.common import HTML_PAGE, VegaError, is_html_page
from vega_utils.data.datasets import DATASETS, DROPPED, MISSING, label_reader, source_label_name
from vega_utils.data.files import MODALITIES, first_line, missing_file, plain
from vega_utils.data.openformat import read_npz

UTTERANCE_TEXT = ("utterance_ids", "sentences")   # optional per-utterance tables (strings), kept for reports
TUPLE_FIELDS = ("speakers", "labels", "text", "audio", "visual", "train ids", "test ids")
# The pickle layouts the field circulates, by length: (name, field names). The 9- and 10-tuples lead with
# per-dialogue utterance ids and carry the sentences; MELD's adds the sentiment labels last.
CIRCULATED = ("videoIDs", "videoSpeakers", "videoLabels", "videoText", "videoAudio", "videoVisual",
              "videoSentence", "trainVid", "testVid")
LAYOUTS = {7: ("the 7-tuple reference layout", TUPLE_FIELDS),
           9: ("the 9-tuple IEMOCAP layout", CIRCULATED),
           10: ("the 10-tuple MELD layout", CIRCULATED + ("videoSentiment",))}


@dataclass
class Dialogue:
    """One dialogue of n utterances, converted to tensors once at load."""
    id: object                 # str for IEMOCAP, int for MELD
    text: torch.Tensor         # (n, D_text) float32
    audio: torch.Tensor        # (n, D_audio) float32
    visual: torch.Tensor       # (n, D_visual) float32
    speakers: torch.Tensor     # (n,) long
    labels: torch.Tensor       # (n,) long: class id, -1 where the utterance has no label
    utterance_ids: Optional[list] = None   # n str, where the file names its utterances
    sentences: Optional[list] = None       # n str, where the file carries the spoken text

    def __len__(self):
        return self.labels.shape[0]


def stored_matrix(raw):
    """A feature entry (a tensor, a list of tensors or any array-like) as numpy in its stored dtype (bf16, which
    numpy lacks, as float32), utterances first: IEMOCAP text is sometimes stored [1, n_utt, 1024]."""
    if torch.is_tensor(raw) or (isinstance(raw, (list, tuple)) and raw and torch.is_tensor(raw[0])):
        t = (raw if torch.is_tensor(raw) else torch.stack(list(raw))).detach().cpu()
        x = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    else:
        x = np.asarray(raw)
    return x[0] if x.ndim == 3 and x.shape[0] == 1 else x


class FileChecker:
    """Checks of one data file against one dataset description. Each failure is one line naming the file.

    Labels go through the dataset's label reader: an utterance whose label the label_map leaves out is removed
    (counted in `dropped`), and a dialogue left empty so is dropped (listed in `dropped_dialogues`)."""

    def __init__(self, path, info):
        self.path, self.info = path, info
        self.read_label = label_reader(info)
        self.dropped, self.dropped_dialogues = Counter(), []

    def fail(self, problem):
        raise VegaError(f"{self.path}: {problem}")

    def seven_tuple(self, raw):
        """(layout name, per-dialogue tables, train ids, test ids) of a pickle in one of the LAYOUTS."""
        known = "; ".join(f"{name} ({', '.join(fields)})" for name, fields in LAYOUTS.values())
        expected = f"a 7-tuple or one of the layouts it knows: {known}"
        if not isinstance(raw, (tuple, list)):
            self.fail(f"expected {expected}, found a {type(raw).__name__}")
        if len(raw) not in LAYOUTS:
            self.fail(f"expected {expected}, found a {type(raw).__name__} of length {len(raw)}")
        name, fields = LAYOUTS[len(raw)]
        if len(raw) == 7:
            keys, train_raw, test_raw = ("speakers", "labels", *MODALITIES), raw[5], raw[6]
        else:
            keys = ("utterance_ids", "speakers", "labels", *MODALITIES, "sentences")
            train_raw, test_raw = raw[7], raw[8]
        for k in range(len(keys)):
            if not isinstance(raw[k], Mapping):
                self.fail(f"element {k} ({fields[k]}) is a {type(raw[k]).__name__}, "
                          "expected a dict keyed by dialogue id")
        return name, dict(zip(keys, raw)), train_raw, test_raw

    def id_list(self, raw, split, allow_empty=False):
        if isinstance(raw, (str, bytes, Mapping)) or not hasattr(raw, "__iter__"):
            self.fail(f"the {split} ids are a {type(raw).__name__}, expected a list of dialogue ids")
        if isinstance(raw, (set, frozenset)):
            raw = sorted(raw, key=str)  # a set has no file order; sort so runs are repeatable
        ids = [plain(v) for v in raw]
        if not ids and not allow_empty:
            self.fail(f"the {split} ids are empty")
        seen = set()
        for vid in ids:
            if isinstance(vid, bool) or not isinstance(vid, (str, int)):
                self.fail(f"dialogue id {vid!r} in the {split} ids is a {type(vid).__name__}, expected str or int")
            if vid in seen:
                self.fail(f"dialogue {vid!r} is listed twice in the {split} ids")
            seen.add(vid)
        return ids

    def dialogue(self, vid, split, tables):
        """The checked Dialogue (tensors), or None when the label_map dropped every utterance of it."""
        for name, table in tables.items():
            if vid not in table:
                self.fail(f"dialogue {vid!r} (in the {split} ids) is missing from the {name} dict")
        feats = {m: self.features(vid, m, tables[m][vid]) for m in MODALITIES}
        labels = self.as_list(vid, "labels", tables["labels"][vid])
        speakers = self.as_list(vid, "speakers", tables["speakers"][vid])
        named = {k: [str(plain(v)) for v in self.as_list(vid, k, tables[k][vid])] for k in UTTERANCE_TEXT
                 if k in tables}
        self.lengths(vid, {**{m: x.shape[0] for m, x in feats.items()}, "labels": len(labels),
                           "speakers": len(speakers), **{k: len(v) for k, v in named.items()}})
        for m, x in feats.items():
            self.feature_values(vid, m, x)
        speaker_ids = self.speaker_ids(vid, speakers)
        label_ids = self.labels(vid, labels)
        keep = [i for i, y in enumerate(label_ids) if y is not DROPPED]
        if not keep:
            self.dropped_dialogues.append(vid)
            return None
        if len(keep) < len(label_ids):   # rows of utterances whose labels the label_map leaves out
            feats = {m: x[keep] for m, x in feats.items()}
        return Dialogue(
            id=vid,
            **{m: torch.from_numpy(np.ascontiguousarray(x)) for m, x in feats.items()},
            speakers=torch.tensor([speaker_ids[i] for i in keep], dtype=torch.long),
            labels=torch.tensor([label_ids[i] for i in keep], dtype=torch.long),
            **{k: [v[i] for i in keep] for k, v in named.items()},
        )

    def features(self, vid, modality, raw):
        """Any array-like -> float32 numpy array with utterances first (shape checked later)."""
        try:
            x = stored_matrix(raw).astype(np.float32, copy=False)
        except (ValueError, TypeError, RuntimeError) as e:
            self.fail(f"{modality} features of dialogue {vid!r} are not a numeric array ({first_line(e)})")
        if x.ndim == 0:
            self.fail(f"{modality} features of dialogue {vid!r} are a single number, expected [n_utt, dim]")
        return x

    def as_list(self, vid, what, raw):
        if torch.is_tensor(raw) or isinstance(raw, np.ndarray):
            raw = raw.tolist()
        if isinstance(raw, (str, bytes)) or not isinstance(raw, (list, tuple)):
            self.fail(f"{what} of dialogue {vid!r} are a {type(raw).__name__}, expected a list per utterance")
        return list(raw)

    def lengths(self, vid, lengths):
        if not any(lengths.values()):
            self.fail(f"dialogue {vid!r} is empty (no utterances)")
        if len(set(lengths.values())) > 1:
            found = ", ".join(f"{k} {n}" for k, n in lengths.items())
            self.fail(f"dialogue {vid!r} has utterance counts that disagree: {found}")

    def feature_values(self, vid, modality, x):
        expected = getattr(self.info, f"{modality}_dim")
        if x.ndim != 2:
            self.fail(f"{modality} features of dialogue {vid!r} have shape {list(x.shape)}, "
                      f"expected [n_utt, {expected or 'dim'}]")
        if expected is None:   # sizes read from the data: the first dialogue sets them, the others must agree
            self.info = replace(self.info, **{f"{modality}_dim": x.shape[1]})
        elif x.shape[1] != expected:
            fits = [name for name, info in DATASETS.items()
                    if name != self.info.name and getattr(info, f"{modality}_dim") == x.shape[1]]
            hint = f": is this a {fits[0]} file? Then add --Dataset {fits[0]}" if fits and self.info.builtin else ""
            self.fail(f"{modality} features of dialogue {vid!r} have dim {x.shape[1]}, "
                      f"expected {expected} for {self.info.name}{hint}")
        if not np.isfinite(x).all():
            self.fail(f"{modality} features of dialogue {vid!r} contain non-finite values (NaN or inf)")

    def labels(self, vid, labels):
        """Class ids, MISSING or DROPPED per utterance; a label that is neither is an error."""
        out = []
        for i, v in enumerate(labels):
            v = plain(v)
            y = self.read_label(v)
            if isinstance(y, str):
                if y.startswith("is "):
                    self.fail(f"label of utterance {i} in dialogue {vid!r} {y}")
                self.fail(f"label {v} of utterance {i} in dialogue {vid!r} is {y}")
            if y is DROPPED:
                self.dropped[source_label_name(self.info, v)] += 1
            out.append(y)
        return out

    def speaker_ids(self, vid, speakers):
        return [self.speaker_id(vid, i, plain(s)) for i, s in enumerate(speakers)]

    def speaker_id(self, vid, i, s):
        n, names = self.info.n_speakers, self.info.speakers
        where = f"speaker of utterance {i} in dialogue {vid!r}"
        if isinstance(s, bytes):
            s = s.decode("latin1")
        if isinstance(s, str):
            if names is None:
                self.fail(f"{where} is {s!r}, expected a {n}-dim one-hot vector for {self.info.name}")
            try:
                return names.index(s)
            except ValueError:
                self.fail(f"{where} is unknown: {s!r}, expected one of {', '.join(names)}")
        if isinstance(s, int) and not isinstance(s, bool):
            if not 0 <= s < n:
                self.fail(f"{where} is speaker id {s}, out of range [0, {n})")
            return s
        try:
            row = np.asarray(s, dtype=np.float64)
        except (ValueError, TypeError):
            row = None
        if row is None or row.shape != (n,) or not np.isin(row, (0.0, 1.0)).all() or row.sum() != 1:
            shown = row.tolist() if row is not None else s
            self.fail(f"{where} is not a one-hot vector of {n}: {shown!r}")
        return int(row.argmax())


def speakers_in(tables, ids):
    """Speaker names (sorted) of a file whose speakers are text, else the width of its one-hot rows, else None."""
    names, width = set(), None
    for vid in ids:
        for s in tables["speakers"].get(vid, ()):
            s = plain(s)
            if isinstance(s, bytes):
                s = s.decode("latin1")
            if isinstance(s, str):
                names.add(s)
            elif not isinstance(s, int):
                width = width or np.asarray(s).size
    if names:
        return tuple(sorted(names)), len(names)
    return None, width


def complete_info(info, tables, ids):
    """Fill what a dataset JSON left to the data: the speaker list (or one-hot width)."""
    if info.n_speakers is None:
        names, n = speakers_in(tables, ids)
        if n is None:
            raise VegaError(f"dataset {info.name}: no speaker names in the data; give 'speakers' (a count) in "
                            f"the dataset JSON")
        info = replace(info, speakers=names, n_speakers=n)
    return info


# ---------------------------------------------------------------- reading a file
def open_checked(path, info):
    """(FileChecker with the file's speakers settled, per-dialogue tables, {split: dialogue ids}) of a data file:
    a reference pickle or the open .npz format."""
    check = FileChecker(path, info)
    tables, splits = read_tables(path, check)
    check.info = complete_info(check.info, tables, [v for ids in splits.values() for v in ids])
    return check, tables, splits


def read_tables(path, check):
    """The file's per-dialogue tables (speakers, labels, text, audio, visual) and {split: dialogue ids}."""
    if os.path.isfile(path) and is_html_page(path):
        check.fail(f"not a data file: it is {HTML_PAGE}. Download it again")
    if str(path).lower().endswith(".npz"):
        return read_npz(path, check)
    layout, tables, train_raw, test_raw = check.seven_tuple(read_pickle(path))
    if layout != LAYOUTS[7][0]:
        print(f"{path}: {layout}")
    return tables, {"train": check.id_list(train_raw, "train"), "test": check.id_list(test_raw, "test")}


def read_pickle(path):
    if not os.path.exists(path):
        raise missing_file(path)
    try:
        with open(path, "rb") as f:
            # latin1 lets pickles written by Python 2 (the older MERC feature files) load too
            return pickle.load(f, encoding="latin1")
    except OSError as e:
        raise VegaError(f"{path}: cannot read the data file ({e.strerror or e})") from e
    except Exception as e:  # unpickling can raise almost any error type on a damaged or foreign file
        raise VegaError(f"{path}: not a readable pickle ({type(e).__name__}: {first_line(e)})") from e


__all__ = ["Dialogue", "FileChecker", "missing_file", "MISSING", "MODALITIES", "TUPLE_FIELDS", "complete_info",
           "first_line", "open_checked", "plain", "read_tables", "stored_matrix"]
