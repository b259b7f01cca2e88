"""A data file read into checked dialogues: every dialogue of its splits as tensors, and the dataset with what the
file settled (feature sizes, speakers). The checks themselves live in datacheck.py; batching is dataloader.py's."""
import json
import os
from dataclasses import dataclass, field

from vega_utils.common import VegaError
from vega_utils.data.datacheck import open_checked
from vega_utils.data.datasets import DatasetInfo, dataset_info


# ---------------------------------------------------------------- dialogues in memory
@dataclass
class DialogueData:
    """A checked dataset file: every dialogue of its splits, and the ids of each split in file order."""
    dataset: str
    class_names: list
    records: dict              # dialogue id -> Dialogue
    train_ids: list            # file order
    test_ids: list             # file order
    path: str = ""
    valid_ids: list = field(default_factory=list)      # the open format's own validation split
    predict_ids: list = field(default_factory=list)    # unlabelled dialogues (open format)
    info: DatasetInfo = None   # the dataset, with what the file settled (sizes, speakers)
    dropped: dict = field(default_factory=dict)        # source label -> utterances the label_map left out
    dropped_dialogues: list = field(default_factory=list)   # dialogues the label_map emptied

    @property
    def n_speakers(self):
        return self.info.n_speakers

    def dialogues(self, ids):
        return [self.records[i] for i in ids]

    def split_ids(self, split):
        return {"train": self.train_ids, "test": self.test_ids, "valid": self.valid_ids,
                "predict": self.predict_ids}[split]

    def describe_dropped(self):
        """One line on what the label_map left out, or None."""
        if not self.dropped:
            return None
        counts = ", ".join(f"{k} {n}" for k, n in sorted(self.dropped.items()))
        empty = f"; {len(self.dropped_dialogues)} dialogue(s) left empty, dropped" if self.dropped_dialogues else ""
        return f"{self.path}: the label map of {self.dataset} dropped {sum(self.dropped.values())} " \
               f"utterance(s) ({counts}){empty}"


def speaker_names(dataset):
    """Printable speaker name per id (for a predictions file): 'M'/'F' for IEMOCAP, '0'..'8' for MELD."""
    info = dataset_info(dataset)
    return list(info.speakers) if info.speakers else [str(i) for i in range(info.n_speakers)]


def utterance_names(data, dialogue_ids, utterance_index):
    """{utterance_id, text: one value per scored utterance} where the data file names its utterances, else {}."""
    out = {}
    for column, attr in (("utterance_id", "utterance_ids"), ("text", "sentences")):
        if all(getattr(data.records[v], attr) is not None for v in set(dialogue_ids)):
            out[column] = [getattr(data.records[v], attr)[int(i)] for v, i in zip(dialogue_ids, utterance_index)]
    return out if dialogue_ids is not None and len(dialogue_ids) else {}


def load_dialogues(path, dataset):
    """Read a data file (the 7-tuple pickle of docs/method.md, section 1, or the open .npz format) and check all of it;
    a problem raises a one-line VegaError. `dataset`: a name, a dataset JSON path or a DatasetInfo.

    A pickle is unpickled, so only load pickles you trust; an .npz is read without unpickling.
    """
    info = dataset_info(dataset)
    if path is None:
        raise VegaError(f"dataset {info.name} names no data file: give --data_path")
    check, tables, splits = open_checked(path, info)
    records, kept = {}, {}
    for split, ids in splits.items():
        for vid in ids:
            if vid not in records:
                records[vid] = check.dialogue(vid, split, tables)
        kept[split] = [v for v in ids if records[v] is not None]
    return DialogueData(dataset=info.name, class_names=list(info.class_names),
                        records={k: v for k, v in records.items() if v is not None},
                        train_ids=kept["train"], test_ids=kept["test"], path=str(path),
                        valid_ids=kept.get("valid", []), predict_ids=kept.get("predict", []), info=check.info,
                        dropped=dict(check.dropped), dropped_dialogues=check.dropped_dialogues)


def settle_from_data(info, path):
    """The dataset with the feature sizes and speakers its JSON left out read from the data file (the model's
    sizes must be known before it is built)."""
    if None not in (info.text_dim, info.audio_dim, info.visual_dim, info.n_speakers):
        return info
    stamp = os.stat(path).st_mtime_ns if os.path.exists(path) else None
    key = (os.path.abspath(path), stamp, json.dumps(info.to_dict(), sort_keys=True, default=str))
    if key not in _SETTLED:
        data = load_dialogues(path, info)
        if not data.records:
            raise VegaError(f"{path}: no dialogue is left after the label map of {info.name}")
        _SETTLED[key] = data.info   # the checker read the sizes from the first dialogue; the rest agree
    return _SETTLED[key]


_SETTLED = {}   # settle_from_data's answers: (file, its mtime, the description) -> DatasetInfo
