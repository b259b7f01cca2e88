"""What a dataset is: class names, speakers, feature sizes, class weights and label mapping, in one place.

The built-in IEMOCAP and MELD are fixed here; any other dataset is described by a JSON file (README, "Your
own data"), passed as `--Dataset path/to/dataset.json`. Both give a DatasetInfo. A run stores the resolved
description of a JSON dataset in its config (`dataset_spec`), so a checkpoint is scored with the classes,
speakers and sizes it was trained with even where the JSON file is not.
"""
import argparse
import os
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np

from vega_utils.common import VegaError, read_json

MISSING = -1        # an utterance without a label (e.g. the predict split)
DROPPED = None      # a source label the dataset's label_map leaves out: the utterance is removed
WEIGHT_POLICIES = ("reference", "balanced", "none")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    class_names: tuple
    text_dim: Optional[int]            # None: read from the data
    audio_dim: Optional[int]
    visual_dim: Optional[int]
    n_speakers: Optional[int]          # None: the number of speaker names found in the data
    class_weights: object              # CE weights in class-id order (a tuple), or "balanced" (from the data)
    default_data_path: Optional[str]
    speakers: Optional[tuple] = None   # speaker names in id order (a speaker given as text is looked up here)
    speaker_onehot: bool = False       # the reference pickle stores speakers as one-hot rows (MELD)
    label_map: Optional[dict] = None   # source label (text) -> class name; a label not in it is dropped
    source_classes: Optional[tuple] = None   # names of the data file's integer labels (for label_map)
    anchor_words: Optional[dict] = None      # image folder / file-name word -> class name (anchor builder)
    preset: str = "IEMOCAP"            # configs/<preset>.json gives the hyper-parameters
    builtin: bool = False
    extraction: Optional[dict] = None  # how extract.py made the features (its record), kept with the run

    def to_dict(self):
        return asdict(self)


DATASETS = {
    "IEMOCAP": DatasetInfo(
        name="IEMOCAP",
        class_names=("happy", "sad", "neutral", "anger", "excited", "frustration"),
        text_dim=1024, audio_dim=1582, visual_dim=342, n_speakers=2,
        class_weights=(2.85339499, 1.70571959, 1.08255267, 1.67633724, 1.77617681, 1.0),
        default_data_path="data/IEMOCAP.pkl", speakers=("M", "F"), preset="IEMOCAP", builtin=True,
    ),
    "MELD": DatasetInfo(
        name="MELD",
        class_names=("neutral", "surprise", "fear", "sad", "happy", "disgust", "anger"),
        text_dim=1024, audio_dim=300, visual_dim=342, n_speakers=9,
        class_weights=(1.0, 3.93398523, 17.97765350, 6.42315388, 2.78856158, 17.82825470, 4.00497818),
        default_data_path="data/meld.pkl", speakers=tuple(str(i) for i in range(9)), speaker_onehot=True,
        preset="MELD", builtin=True,
    ),
}
SPEC_KEYS = ("name", "classes", "source", "source_classes", "label_map", "speakers", "class_weights",
             "data_path", "preset", "text_dim", "audio_dim", "visual_dim", "anchor_label_map", "extraction")


def is_spec_path(name):
    return isinstance(name, str) and name.lower().endswith(".json")


def dataset_info(name):
    """The built-in dataset of that name, or the dataset a JSON file describes (a DatasetInfo: itself)."""
    if isinstance(name, DatasetInfo):
        return name
    if name in DATASETS:
        return DATASETS[name]
    if is_spec_path(name):
        return read_spec(name)
    raise VegaError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)} or give the path of a "
                    f"dataset JSON (docs/own-data.md)")


def dataset_of(name, spec=None):
    """A run's dataset: its stored description `spec` (a config's dataset_spec) when it has one, else `name`."""
    return from_dict(spec) if spec else dataset_info(name)


def info_of(cfg):
    """The dataset of a config: its stored description (dataset_spec), else its Dataset, with the sizes that
    resolve() settled."""
    info = dataset_of(cfg.Dataset, cfg.dataset_spec)
    sizes = {k: getattr(cfg, k) for k in ("text_dim", "audio_dim", "visual_dim", "n_speakers")
             if getattr(cfg, k) is not None}
    return replace(info, **sizes)


def from_dict(d):
    d = dict(d)
    for key in ("class_names", "speakers", "source_classes"):
        if d.get(key) is not None:
            d[key] = tuple(d[key])
    if isinstance(d.get("class_weights"), list):
        d["class_weights"] = tuple(d["class_weights"])
    return DatasetInfo(**d)


# ---------------------------------------------------------------- the dataset JSON
def read_spec(path):
    """Read and check a dataset JSON; every problem is one line naming the file."""
    def bad(problem):
        raise VegaError(f"dataset file {path}: {problem}")
    if not os.path.exists(path):
        bad("not found (--Dataset takes IEMOCAP, MELD or the path of a dataset JSON)")
    raw = read_json(path, "dataset file")
    if not isinstance(raw, dict):
        bad(f"expected a JSON object, found {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        bad(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(SPEC_KEYS)})")
    source = raw.get("source")
    if source is not None and source not in DATASETS:
        bad(f"source {source!r} is not one of {', '.join(DATASETS)}")
    base = DATASETS[source] if source else None
    classes = raw.get("classes")
    if not _names(classes) or len(classes) < 2:
        bad("'classes' must be a list of at least two distinct class names, in id order")
    source_classes = raw.get("source_classes", list(base.class_names) if base else None)
    if source_classes is not None and not _names(source_classes):
        bad("'source_classes' must be a list of distinct names (the data file's label ids, in order)")
    folder = os.path.dirname(os.path.abspath(path))
    data_path = raw.get("data_path")
    if data_path is not None:
        data_path = os.path.normpath(os.path.join(folder, data_path))   # relative to the JSON's folder
    info = DatasetInfo(
        name=_text(raw.get("name", os.path.splitext(os.path.basename(path))[0]), "name", bad),
        class_names=tuple(classes),
        **{k: _dim(raw.get(k, getattr(base, k) if base else None), k, bad)
           for k in ("text_dim", "audio_dim", "visual_dim")},
        n_speakers=None, class_weights=None,
        default_data_path=data_path or (base.default_data_path if base else None),
        speaker_onehot=base.speaker_onehot if base else False,
        label_map=_label_map(raw.get("label_map"), classes, "label_map", bad),
        source_classes=tuple(source_classes) if source_classes is not None else None,
        anchor_words=_label_map(raw.get("anchor_label_map"), classes, "anchor_label_map", bad),
        preset=raw.get("preset", base.preset if base else "IEMOCAP"),
        extraction=raw.get("extraction") if isinstance(raw.get("extraction"), dict) else None,
    )
    if info.preset not in DATASETS:
        bad(f"preset {info.preset!r} is not one of {', '.join(DATASETS)}")
    speakers = raw.get("speakers", list(base.speakers) if base else None)
    if isinstance(speakers, int) and not isinstance(speakers, bool) and speakers >= 1:
        info = replace(info, n_speakers=speakers)
    elif speakers is not None:
        if not _names(speakers):
            bad("'speakers' must be a list of distinct speaker names, a count, or left out (found in the data)")
        info = replace(info, speakers=tuple(speakers), n_speakers=len(speakers))
    same_classes = base is not None and tuple(classes) == base.class_names and info.label_map is None
    weights = class_weight_setting(raw.get("class_weights", "reference" if same_classes else "balanced"),
                                   info, base if same_classes else None, bad)
    return replace(info, class_weights=weights)


def _names(x):
    return isinstance(x, list) and bool(x) and all(isinstance(v, str) and v for v in x) and len(set(x)) == len(x)


def _text(x, key, bad):
    if not isinstance(x, str) or not x:
        bad(f"'{key}' must be a non-empty string")
    return x


def _dim(x, key, bad):
    if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < 1):
        bad(f"'{key}' must be a positive integer or left out (read from the data)")
    return x


def _label_map(m, classes, key, bad):
    """{source word: class name} with every value one of the classes."""
    if m is None:
        return None
    if not isinstance(m, dict) or not m:
        bad(f"'{key}' must be an object mapping labels to class names")
    wrong = [f"{k!r} -> {v!r}" for k, v in m.items() if v not in classes]
    if wrong:
        bad(f"'{key}' maps to names that are not classes: {', '.join(wrong)} (classes: {', '.join(classes)})")
    return {str(k): v for k, v in m.items()}


def class_weight_setting(value, info, reference, bad):
    """reference | balanced | none | a list of C positive numbers -> a tuple, or "balanced" (from the data)."""
    n = len(info.class_names)
    if value == "reference":
        if reference is None:
            bad("class_weights 'reference' exists only for IEMOCAP and MELD with their own classes; "
                "use 'balanced', 'none' or a list")
        return tuple(reference.class_weights)
    if value == "balanced":
        return "balanced"
    if value == "none":
        return (1.0,) * n
    if (isinstance(value, list) and len(value) == n and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            and np.isfinite(v) and v > 0 for v in value)):
        return tuple(float(v) for v in value)
    bad(f"class_weights must be one of {', '.join(WEIGHT_POLICIES)} or a list of {n} positive numbers, "
        f"found {value!r}")


def balanced_weights(labels, class_names, where):
    """n / (C * count_c) over the labelled training utterances, as scikit-learn's
    compute_class_weight('balanced'); a class without a training utterance cannot be weighted."""
    labels = np.asarray(labels)
    labels = labels[labels >= 0]
    counts = np.bincount(labels, minlength=len(class_names))
    empty = [c for c, k in zip(class_names, counts) if k == 0]
    if empty:
        raise VegaError(f"{where}: class_weights 'balanced' needs every class in the training split, but "
                        f"{', '.join(empty)} has no training utterance; give the weights as a list, or 'none'")
    return tuple(float(w) for w in labels.size / (len(class_names) * counts))


# ---------------------------------------------------------------- labels
def label_reader(info):
    """raw label -> class id, MISSING (no label), DROPPED (left out by label_map), or a str saying what is wrong."""
    index = {c: i for i, c in enumerate(info.class_names)}
    n_source = len(info.source_classes) if info.source_classes else None

    def read(v):
        if v is None or (isinstance(v, str) and v == "") or (isinstance(v, int) and v == MISSING
                                                             and not isinstance(v, bool)):
            return MISSING
        if isinstance(v, str):
            if info.label_map is not None:
                return index[info.label_map[v]] if v in info.label_map else DROPPED
            return index[v] if v in index else f"is not a class name ({', '.join(info.class_names)}): {v!r}"
        if isinstance(v, bool) or not isinstance(v, int):
            return f"is not an integer: {v!r}"
        if info.label_map is None:
            n = len(info.class_names)
            return v if 0 <= v < n else f"out of range [0, {n})"
        if n_source is not None and not 0 <= v < n_source:
            return f"out of range [0, {n_source}) ({', '.join(info.source_classes)})"
        word = info.source_classes[v] if n_source is not None else str(v)
        key = word if word in info.label_map else str(v)
        return index[info.label_map[key]] if key in info.label_map else DROPPED
    return read


def source_label_name(info, v):
    """How a dropped label is reported: its source class name when the file's ids have names."""
    if isinstance(v, int) and info.source_classes and 0 <= v < len(info.source_classes):
        return info.source_classes[v]
    return str(v)


def class_weights_of(info, data):
    """The CE weights of a loaded dataset: fixed ones as they are, 'balanced' from its train split's labels."""
    if info.class_weights != "balanced":
        return tuple(info.class_weights)
    labels = np.concatenate([data.records[v].labels.numpy() for v in data.train_ids]) if data.train_ids else []
    return balanced_weights(labels, info.class_names, f"{data.path} ({info.name})")


def read_label_map(path, class_names):
    """A --label_map file: a JSON object {word: class name}, e.g. {"happiness": "happy", "angry": "anger"}."""
    def bad(problem):
        raise VegaError(f"label map {path}: {problem}")
    raw = read_json(path, "label map")
    return _label_map(raw, list(class_names), "label map", bad)


def dataset_arg(value):
    """--Dataset: IEMOCAP, MELD or the path of a dataset JSON (a bad value is argparse's one-line error)."""
    if value in DATASETS or is_spec_path(value):
        return value
    raise argparse.ArgumentTypeError(f"unknown dataset {value!r}: choose one of {', '.join(DATASETS)} or give "
                                     f"the path of a dataset JSON")
