"""Dialogue data: batches of dialogues the way the reference makes them. Reading a data file (feature pickle or
open .npz) into checked dialogues is vega_utils/data/ (dialogues.py; its checks in datacheck.py)."""
from dataclasses import dataclass, fields, replace
from functools import partial

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from vega_utils.common import VegaError
from vega_utils.data.datacheck import MODALITIES
from vega_utils.data.dialogues import (  # noqa: F401  (where callers have always found them)
    DialogueData,
    load_dialogues,
    settle_from_data,
    speaker_names,
    utterance_names,
)


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


# ---------------------------------------------------------------- datasets, batches, loaders
class DialogueDataset(Dataset):
    """Dialogues as stored; with augment=True each read zeroes random feature dimensions (docs/method.md, section 1)."""

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


def check_trainable(data, splits):
    """Training needs train and test dialogues, every utterance of them labelled (docs/own-data.md)."""
    for split, ids in splits.items():
        if not ids and split != "valid":
            raise VegaError(f"{data.path}: no dialogues in the {split} split, which training needs")
        for vid in ids:
            if bool((data.records[vid].labels < 0).any()):
                raise VegaError(f"{data.path}: dialogue {vid!r} of the {split} split has utterances without a "
                                f"label; training needs labels there (unlabelled dialogues belong to the "
                                f"predict split)")


def make_loaders(data, cfg, valid_ids=None, pin_memory=False):
    """'train' (augmented, reshuffled every epoch from cfg.seed), 'test' and, given valid_ids, 'valid'.

    Validation dialogues come out of the training set. An empty valid_ids means no validation loader.
    """
    train_ids = list(data.train_ids)
    valid_ids = list(valid_ids or [])
    check_trainable(data, {"train": train_ids, "test": data.test_ids, "valid": valid_ids})
    if valid_ids:
        known = set(train_ids) | set(data.valid_ids)   # held out of the train split, or the file's own
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
