"""Dialogue data: read and check the feature pickles, batch dialogues the way the reference does."""
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from functools import partial

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from vega_utils.common import DATASETS, VegaError, dataset_info


@dataclass
class Batch:
    """A batch of B dialogues padded to the longest, L utterances. Batch-major (the reference is time-major).

    Mask convention, used everywhere in this project: pad_mask is True at padding positions.
    """
    text: torch.Tensor        # (B, L, D_text) float
    audio: torch.Tensor       # (B, L, D_audio) float
    visual: torch.Tensor      # (B, L, D_visual) float
    speakers: torch.Tensor    # (B, L) long: speaker id, n_speakers at padding
    pad_mask: torch.Tensor    # (B, L) bool: True = padding
    labels: torch.Tensor      # (B, L) long: class id, -1 at padding
    dialogue_ids: list        # B ids, in batch order

    def to(self, device, non_blocking=False):
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if torch.is_tensor(v):
                moved[k] = v.to(device, non_blocking=non_blocking)
        return Batch(**moved)

    def pin_memory(self):
        return Batch(**{f.name: (getattr(self, f.name).pin_memory() if torch.is_tensor(getattr(self, f.name))
                                 else getattr(self, f.name)) for f in fields(self)})

    @property
    def n_utterances(self):
        return int((~self.pad_mask).sum())


def batch_from_reference(ref, n_speakers):
    """Convert a batch in the reference's layout (time-major features, qmask one-hots, umask 1 = valid)."""
    umask = ref["umask"]                                   # (B, L), 1 = valid
    pad_mask = umask == 0                                  # (B, L), True = padding
    speakers = ref["qmask"].permute(1, 0, 2).argmax(-1)    # (L, B, S) -> (B, L)
    lengths = umask.sum(1).long()                          # (B,)
    past_end = torch.arange(umask.shape[1])[None, :] >= lengths[:, None]
    speakers = speakers.masked_fill(past_end, n_speakers)
    return Batch(
        text=ref["textf"].permute(1, 0, 2).float(),        # (L, B, D) -> (B, L, D)
        audio=ref["acouf"].permute(1, 0, 2).float(),
        visual=ref["visuf"].permute(1, 0, 2).float(),
        speakers=speakers.long(),
        pad_mask=pad_mask,
        labels=ref["label"].long().masked_fill(pad_mask, -1),
        dialogue_ids=list(ref["vids"]),
    )


# ---------------------------------------------------------------- dialogues in memory
MODALITIES = ("text", "audio", "visual")
TUPLE_FIELDS = ("speakers", "labels", "text", "audio", "visual", "train ids", "test ids")
SPEAKER_LETTERS = {"IEMOCAP": ("M", "F")}  # string speakers; other datasets store one-hot vectors


@dataclass
class Dialogue:
    """One dialogue of n utterances, converted to tensors once at load."""
    id: object                 # str for IEMOCAP, int for MELD
    text: torch.Tensor         # (n, D_text) float32
    audio: torch.Tensor        # (n, D_audio) float32
    visual: torch.Tensor       # (n, D_visual) float32
    speakers: torch.Tensor     # (n,) long
    labels: torch.Tensor       # (n,) long

    def __len__(self):
        return self.labels.shape[0]


@dataclass
class DialogueData:
    """A checked dataset file: every dialogue named in the train or test ids, and the two id lists."""
    dataset: str
    class_names: list
    records: dict              # dialogue id -> Dialogue
    train_ids: list            # file order
    test_ids: list             # file order
    path: str = ""

    @property
    def n_speakers(self):
        return dataset_info(self.dataset).n_speakers

    def dialogues(self, ids):
        return [self.records[i] for i in ids]


def speaker_names(dataset):
    """Printable speaker name per id (for a predictions file): 'M'/'F' for IEMOCAP, '0'..'8' for MELD."""
    if dataset in SPEAKER_LETTERS:
        return list(SPEAKER_LETTERS[dataset])
    return [str(i) for i in range(dataset_info(dataset).n_speakers)]


# ---------------------------------------------------------------- reading and checking a pickle
def load_dialogues(path, dataset):
    """Read the 7-tuple pickle of spec section 1 and check all of it; a problem raises a one-line VegaError.

    The file is unpickled, so only load files you trust.
    """
    info = dataset_info(dataset)
    check = _FileChecker(path, info)
    speakers, labels, text, audio, visual, train_raw, test_raw = check.seven_tuple(_read_pickle(path))
    tables = {"speakers": speakers, "labels": labels, "text": text, "audio": audio, "visual": visual}
    train_ids = check.id_list(train_raw, "train")
    test_ids = check.id_list(test_raw, "test")
    records = {}
    for split, ids in (("train", train_ids), ("test", test_ids)):
        for vid in ids:
            if vid not in records:
                records[vid] = check.dialogue(vid, split, tables)
    return DialogueData(dataset=info.name, class_names=list(info.class_names), records=records,
                        train_ids=train_ids, test_ids=test_ids, path=str(path))


def _read_pickle(path):
    if not os.path.exists(path):
        raise VegaError(f"{path}: data file not found (give its location with --data_path; README.md, 'Getting the "
                        f"data', says where the feature pickles come from; `python run.py --demo` needs none)")
    try:
        with open(path, "rb") as f:
            # latin1 lets pickles written by Python 2 (the older MERC feature files) load too
            return pickle.load(f, encoding="latin1")
    except OSError as e:
        raise VegaError(f"{path}: cannot read the data file ({e.strerror or e})") from e
    except Exception as e:  # unpickling can raise almost any error type on a damaged or foreign file
        raise VegaError(f"{path}: not a readable pickle ({type(e).__name__}: {_first_line(e)})") from e


def _first_line(e):
    lines = str(e).strip().splitlines()
    return lines[0] if lines else "no details"


def _plain(x):
    """numpy scalars -> Python scalars, so ids print and compare like the ones in the dicts."""
    return x.item() if isinstance(x, np.generic) else x


class _FileChecker:
    """Every check on one data file, in one place. Each failure is one line naming the file."""

    def __init__(self, path, info):
        self.path, self.info = path, info

    def fail(self, problem):
        raise VegaError(f"{self.path}: {problem}")

    def seven_tuple(self, raw):
        expected = "a 7-tuple (" + ", ".join(TUPLE_FIELDS) + ")"
        if not isinstance(raw, (tuple, list)):
            self.fail(f"expected {expected}, found a {type(raw).__name__}")
        if len(raw) != 7:
            self.fail(f"expected {expected}, found a {type(raw).__name__} of length {len(raw)}")
        for k, name in enumerate(TUPLE_FIELDS[:5]):
            if not isinstance(raw[k], Mapping):
                self.fail(f"element {k} ({name}) is a {type(raw[k]).__name__}, "
                          "expected a dict keyed by dialogue id")
        return raw

    def id_list(self, raw, split):
        if isinstance(raw, (str, bytes, Mapping)) or not hasattr(raw, "__iter__"):
            self.fail(f"the {split} ids are a {type(raw).__name__}, expected a list of dialogue ids")
        if isinstance(raw, (set, frozenset)):
            raw = sorted(raw, key=str)  # a set has no file order; sort so runs are repeatable
        ids = [_plain(v) for v in raw]
        if not ids:
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
        for name, table in tables.items():
            if vid not in table:
                self.fail(f"dialogue {vid!r} (in the {split} ids) is missing from the {name} dict")
        feats = {m: self.features(vid, m, tables[m][vid]) for m in MODALITIES}
        labels = self.as_list(vid, "labels", tables["labels"][vid])
        speakers = self.as_list(vid, "speakers", tables["speakers"][vid])
        self.lengths(vid, {**{m: x.shape[0] for m, x in feats.items()},
                           "labels": len(labels), "speakers": len(speakers)})
        for m, x in feats.items():
            self.feature_values(vid, m, x)
        return Dialogue(
            id=vid,
            **{m: torch.from_numpy(np.ascontiguousarray(x)) for m, x in feats.items()},
            speakers=torch.tensor(self.speaker_ids(vid, speakers), dtype=torch.long),
            labels=torch.tensor(self.labels(vid, labels), dtype=torch.long),
        )

    def features(self, vid, modality, raw):
        """Any array-like -> float32 numpy array with utterances first (shape checked later)."""
        try:
            if torch.is_tensor(raw):
                x = raw.detach().cpu().to(torch.float32).numpy()
            elif isinstance(raw, (list, tuple)) and raw and torch.is_tensor(raw[0]):
                x = torch.stack(list(raw)).detach().cpu().to(torch.float32).numpy()
            else:
                x = np.asarray(raw, dtype=np.float32)
        except (ValueError, TypeError, RuntimeError) as e:
            self.fail(f"{modality} features of dialogue {vid!r} are not a numeric array ({_first_line(e)})")
        if x.ndim == 3 and x.shape[0] == 1:
            x = x[0]  # IEMOCAP text is sometimes stored [1, n_utt, 1024]
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
                      f"expected [n_utt, {expected}]")
        if x.shape[1] != expected:
            fits = [name for name, info in DATASETS.items()
                    if name != self.info.name and getattr(info, f"{modality}_dim") == x.shape[1]]
            hint = f": is this a {fits[0]} file? Then add --Dataset {fits[0]}" if fits else ""
            self.fail(f"{modality} features of dialogue {vid!r} have dim {x.shape[1]}, "
                      f"expected {expected} for {self.info.name}{hint}")
        if not np.isfinite(x).all():
            self.fail(f"{modality} features of dialogue {vid!r} contain non-finite values (NaN or inf)")

    def labels(self, vid, labels):
        n_classes = len(self.info.class_names)
        for i, v in enumerate(labels):
            v = _plain(v)
            if isinstance(v, bool) or not isinstance(v, int):
                self.fail(f"label of utterance {i} in dialogue {vid!r} is not an integer: {v!r}")
            if not 0 <= v < n_classes:
                self.fail(f"label {v} of utterance {i} in dialogue {vid!r} is out of range [0, {n_classes})")
        return labels

    def speaker_ids(self, vid, speakers):
        letters = SPEAKER_LETTERS.get(self.info.name)
        return [self.speaker_id(vid, i, s, letters) for i, s in enumerate(speakers)]

    def speaker_id(self, vid, i, s, letters):
        n = self.info.n_speakers
        where = f"speaker of utterance {i} in dialogue {vid!r}"
        if isinstance(s, bytes):
            s = s.decode("latin1")
        if isinstance(s, str):
            if letters is None:
                self.fail(f"{where} is {s!r}, expected a {n}-dim one-hot vector for {self.info.name}")
            if s not in letters:
                self.fail(f"{where} is unknown: {s!r}, expected one of {', '.join(letters)}")
            return letters.index(s)
        try:
            row = np.asarray(s, dtype=np.float64)
        except (ValueError, TypeError):
            row = None
        if row is None or row.shape != (n,) or not np.isin(row, (0.0, 1.0)).all() or row.sum() != 1:
            shown = row.tolist() if row is not None else s
            self.fail(f"{where} is not a one-hot vector of {n}: {shown!r}")
        return int(row.argmax())


# ---------------------------------------------------------------- datasets, batches, loaders
class DialogueDataset(Dataset):
    """Dialogues as stored; with augment=True each read zeroes random feature dimensions (spec 1)."""

    def __init__(self, records, augment, drop_prob=0.1):
        self.records = list(records)
        self.augment = augment
        self.drop_prob = drop_prob

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        d = self.records[i]
        if not self.augment or self.drop_prob <= 0:
            return d
        return replace(d, **{m: _drop_dims(getattr(d, m), self.drop_prob) for m in MODALITIES})


def _drop_dims(x, p):
    """Zero each feature dimension with probability p, one draw per dimension for the whole dialogue.

    Uses torch's global RNG, so seeding torch (and DataLoader worker seeding) makes it repeatable.
    No rescaling, as in the reference.
    """
    keep = (torch.rand(x.shape[1]) >= p).to(x.dtype)   # (D,)
    return x * keep                                     # (n, D) * (D,) -> (n, D)


def collate(dialogues, n_speakers):
    """Pad B dialogues to the longest, L: zero features, speaker id n_speakers, label -1."""
    lengths = torch.tensor([len(d) for d in dialogues])                       # (B,)
    longest = int(lengths.max())

    def pad(name, value):
        return pad_sequence([getattr(d, name) for d in dialogues], batch_first=True, padding_value=value)

    return Batch(
        text=pad("text", 0.0),                                                # (B, L, D_text)
        audio=pad("audio", 0.0),                                              # (B, L, D_audio)
        visual=pad("visual", 0.0),                                            # (B, L, D_visual)
        speakers=pad("speakers", n_speakers),                                 # (B, L)
        pad_mask=torch.arange(longest)[None, :] >= lengths[:, None],          # (B, L)
        labels=pad("labels", -1),                                             # (B, L)
        dialogue_ids=[d.id for d in dialogues],
    )


def split_validation(train_ids, ratio, seed):
    """Hold out round(ratio * n) training dialogues (at least one when ratio > 0), chosen by seed.

    Both returned lists keep file order.
    """
    ids = list(train_ids)
    if not 0.0 <= ratio < 1.0:
        raise VegaError(f"validation ratio {ratio} must be in [0, 1)")
    if ratio == 0:
        return ids, []
    k = max(1, round(ratio * len(ids)))
    if k >= len(ids):
        raise VegaError(f"validation ratio {ratio} would leave no training dialogues out of {len(ids)}")
    held = set(np.random.default_rng(seed).choice(len(ids), size=k, replace=False).tolist())
    return ([v for j, v in enumerate(ids) if j not in held],
            [v for j, v in enumerate(ids) if j in held])


def make_loaders(data, cfg, valid_ids=None, pin_memory=False):
    """'train' (augmented, reshuffled every epoch from cfg.seed), 'test' and, given valid_ids, 'valid'.

    Validation dialogues come out of the training set. An empty valid_ids means no validation loader.
    """
    train_ids = list(data.train_ids)
    valid_ids = list(valid_ids or [])
    if valid_ids:
        known = set(train_ids)
        stray = [v for v in valid_ids if v not in known]
        if stray:
            raise VegaError(f"validation dialogue {stray[0]!r} is not a training dialogue of {data.path}")
        held = set(valid_ids)
        train_ids = [v for v in train_ids if v not in held]
        if not train_ids:
            raise VegaError("the validation set takes every training dialogue; lower valid_ratio")
    generator = torch.Generator()
    generator.manual_seed(cfg.seed)
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, pin_memory=pin_memory,
                  collate_fn=partial(collate, n_speakers=data.n_speakers))
    loaders = {
        "train": DataLoader(DialogueDataset(data.dialogues(train_ids), augment=True),
                            shuffle=True, generator=generator, **common),
        "test": DataLoader(DialogueDataset(data.dialogues(data.test_ids), augment=False), **common),
    }
    if valid_ids:
        loaders["valid"] = DataLoader(DialogueDataset(data.dialogues(valid_ids), augment=False), **common)
    return loaders
