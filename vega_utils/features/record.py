"""The extraction record: what made the features (each extractor with its model and a sha256 of its weights,
pooling, sample rate, frames), the library versions and the counts of one extraction. It travels in the
dataset JSON, inside the .npz (entry `extraction`) and in every run's config; features from another
extraction are refused by inference.py.
"""
import hashlib
import json
import os
from importlib import metadata

from vega_utils.common import VegaError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
LIBRARIES = ("torch", "transformers", "tokenizers", "opensmile", "av", "soundfile", "soxr",
             "opencv-python-headless", "numpy")


def model_folder(name):
    """The local folder of a model: the folder itself, or the hub cache's copy of a hub name (None if absent)."""
    if os.path.isdir(name):
        return name
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, local_files_only=True)
    except Exception:   # not in the cache, or no hub library: no hash can be given
        return None


def weights_sha256(name):
    """sha256 over the model's weight files (names and bytes, in name order); 'unknown' when not local."""
    folder = model_folder(name)
    if folder is None:
        return "unknown"
    digest = hashlib.sha256()
    files = sorted(f for f in os.listdir(folder) if f.endswith(WEIGHT_SUFFIXES))
    for f in files:
        digest.update(f.encode())
        with open(os.path.join(folder, f), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest() if files else "unknown"


def library_versions():
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            continue
    return out


def to_json(record):
    return json.dumps(record, sort_keys=True)


def require_same_extraction(trained, found, data_path):
    """One line naming both when the features of data_path come from another extraction than `trained`."""
    if found is None:
        raise VegaError(f"{data_path} carries no extraction record, but the checkpoint was trained on features "
                        f"of extract.py ({describe(trained)}); extract these with extract.py --like")
    if trained.get("extractors") != found.get("extractors"):
        said = differences(trained.get("extractors", {}), found.get("extractors", {}), "in training")
        raise VegaError(f"{data_path} holds features of another extraction than the checkpoint was trained on "
                        f"({'; '.join(said)}); extract them with extract.py --like")


def differences(old, new, where):
    """Each setting that differs between two extractors' records, with both values: 'text pooling mean here, cls
    in training' (where: how to name the old record's side)."""
    said = []
    for modality in sorted(set(old) | set(new)):
        a, b = old.get(modality) or {}, new.get(modality) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                said.append(f"{modality} {key.replace('_', ' ')} {show(b.get(key))} here, {show(a.get(key))} "
                            f"{where}")
    return said or ["the records differ"]


def show(value):
    if value is None:
        return "(none)"
    text = str(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def describe(record):
    parts = []
    for modality, e in sorted(record.get("extractors", {}).items()):
        model = e.get("model") or e.get("set")
        parts.append(f"{modality} {model} [{str(e.get('weights_sha256', ''))[:12]}]")
    return ", ".join(parts)
