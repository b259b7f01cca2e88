"""Where an extraction writes: OUT.npz and the dataset JSON beside it. Checked before anything is read or a model
loads: a finished extraction there is kept unless --overwrite is given, and a folder that cannot be written is
said at once rather than after the work."""
import json
import os
import tempfile

from vega_utils.common import VegaError


def dataset_json(out):
    return os.path.splitext(out)[0] + ".json"


def check_out(out, overwrite):
    """One line when `out` cannot or must not be written."""
    if not out.lower().endswith(".npz"):
        raise VegaError(f"--out {out}: the output is an .npz file")
    if os.path.isdir(out):
        raise VegaError(f"--out {out} is a folder; give a file name ending in .npz")
    if not overwrite:
        for path in (out, dataset_json(out)):
            if os.path.exists(path):
                raise VegaError(f"--out {out}: {path} {what_it_holds(path)}; give --overwrite to replace it, or "
                                f"another --out")
    check_writable(out)


def what_it_holds(path):
    """'holds a finished extraction (2 dialogues, ...)', or what else the file is."""
    try:
        if path.endswith(".npz"):
            import numpy as np
            with np.load(path, allow_pickle=False) as z:
                record = json.loads(str(z["extraction"])) if "extraction" in z.files else None
                size = f"{len(z['text'])} utterances" if "text" in z.files else "no features"
            if record is None:
                return f"holds a data file ({size}) that extract.py did not write"
            return f"holds a finished extraction ({summary(record)})"
        with open(path) as f:
            spec = json.load(f)
        if isinstance(spec, dict) and isinstance(spec.get("extraction"), dict):
            return f"is the dataset JSON of a finished extraction ({summary(spec['extraction'])})"
        return "exists (a JSON file extract.py did not write)"
    except Exception:   # damaged or of another kind: it is still not ours to replace
        return "exists and is not an extraction extract.py can read"


def summary(record):
    counts, extractors = record.get("counts", {}), record.get("extractors", {})
    models = ", ".join(f"{m} {e.get('model') or e.get('set')}" for m, e in sorted(extractors.items()))
    return f"{counted(counts.get('dialogues', 0), 'dialogue')}, {counted(counts.get('utterances', 0), 'utterance')}" \
           + (f"; {models}" if models else "")


def counted(n, noun):
    return f"{n} {noun}" + ("" if n == 1 else "s")


def check_writable(out):
    """Try a file in the folder that will hold `out` (or in the nearest folder above it that exists, where the
    missing ones would be made): permission bits alone do not say it (a read-only disk, root, ACLs)."""
    folder = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise VegaError(f"--out {out}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise VegaError(f"--out {out}: cannot write in {folder} ({e.strerror or e}); choose a folder you can "
                        f"write to") from None
