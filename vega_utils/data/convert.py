"""Turn a reference feature pickle into the open .npz format and back; every number is kept as stored.

    python -m vega_utils.data.convert data/IEMOCAP.pkl data/IEMOCAP.npz
    python -m vega_utils.data.convert data/meld.npz data/meld.pkl --Dataset MELD

The direction follows the file names (.pkl/.pickle <-> .npz). Both files go through the loader's checks
(vega_utils/data/datacheck.py) for the dataset named by --Dataset (IEMOCAP, MELD or a dataset JSON), so a file
that would not load is not converted. An existing output file is never replaced (--force replaces it).
"""
import argparse
import os
import pickle
import sys

import numpy as np

from vega_utils.common import VegaError, _atomic_write, exit_on_error
from vega_utils.data.datacheck import MODALITIES, open_checked, stored_matrix
from vega_utils.data.datasets import dataset_info
from vega_utils.data.openformat import write_npz


def pickle_to_columns(path, info):
    """The open format's columns of a reference pickle, checked as the loader checks it."""
    from vega_utils.data.dialogues import speaker_names
    check, tables, splits = open_checked(path, info)
    info = check.info
    both = set(splits["train"]) & set(splits["test"])
    if both:
        check.fail(f"dialogue {sorted(both, key=str)[0]!r} is in both the train and the test ids; the open "
                   f"format gives each dialogue one split")
    names = speaker_names(info)
    cols = {k: [] for k in ("dialogue_id", "position", "speaker", "label", "split", *MODALITIES)}
    named = {"utterance_id": "utterance_ids", "sentence": "sentences"}   # column -> table, where the file has it
    named = {col: table for col, table in named.items() if table in tables}
    cols.update({col: [] for col in named})
    for split in ("train", "test"):
        for vid in splits[split]:
            check.dialogue(vid, split, tables)      # every check of the loader, before converting
            n = len(tables["labels"][vid])
            cols["dialogue_id"] += [vid] * n
            cols["position"] += range(n)
            cols["speaker"] += [names[s] for s in check.speaker_ids(vid, list(tables["speakers"][vid]))]
            cols["label"] += [int(v) for v in tables["labels"][vid]]
            cols["split"] += [split] * n
            for m in MODALITIES:
                cols[m].append(stored_matrix(tables[m][vid]))
            for col, table in named.items():
                cols[col] += [str(v) for v in tables[table][vid]]
    out = {k: np.asarray(v) for k, v in cols.items() if k not in MODALITIES}
    out.update({m: np.concatenate(cols[m]) for m in MODALITIES})   # (U, D), the stored dtype
    out["position"] = out["position"].astype(np.int64)
    out["label"] = out["label"].astype(np.int64)
    return out


def npz_to_blob(path, info):
    """The reference 7-tuple of an open file; its valid and predict splits have no place there."""
    check, tables, splits = open_checked(path, info)   # only called for an .npz file
    info = check.info
    extra = {s: len(splits[s]) for s in ("valid", "predict") if splits[s]}
    if extra:
        check.fail("the reference pickle has only train and test splits; this file also has "
                   + ", ".join(f"{n} {s} dialogue(s)" for s, n in extra.items()))
    for split in ("train", "test"):
        for vid in splits[split]:
            check.dialogue(vid, split, tables)
            if any(not isinstance(v, int) for v in tables["labels"][vid]):
                check.fail(f"labels of dialogue {vid!r} are text; the reference pickle stores class ids")
    if info.speaker_onehot:   # MELD's pickle: a one-hot row per utterance
        width = info.n_speakers
        tables["speakers"] = {vid: [[int(j == k) for j in range(width)] for k in check.speaker_ids(vid, s)]
                              for vid, s in tables["speakers"].items()}
    return (tables["speakers"], tables["labels"], tables["text"], tables["audio"], tables["visual"],
            list(splits["train"]), list(splits["test"]))


def convert(src, dst, dataset="IEMOCAP", force=False):
    info = dataset_info(dataset)
    if os.path.exists(dst) and not force:
        raise VegaError(f"{dst} exists; refusing to replace it (give another name, or --force)")
    if os.path.realpath(src) == os.path.realpath(dst):
        raise VegaError(f"{src}: input and output are the same file")
    kind = lambda p: "npz" if p.lower().endswith(".npz") else "pickle" if p.lower().endswith((".pkl", ".pickle")) \
        else None   # noqa: E731
    if (kind(src), kind(dst)) == ("pickle", "npz"):
        cols = pickle_to_columns(src, info)
        write_npz(dst, cols)
        n = len(set(cols["dialogue_id"].tolist()))
        return f"wrote {dst}: {n} dialogues, {len(cols['label'])} utterances (open format, no pickle inside)"
    if (kind(src), kind(dst)) == ("npz", "pickle"):
        blob = npz_to_blob(src, info)
        _atomic_write(dst, lambda f: pickle.dump(blob, f, protocol=pickle.HIGHEST_PROTOCOL), "wb")
        return f"wrote {dst}: {len(blob[5])} train and {len(blob[6])} test dialogues (reference pickle layout)"
    raise VegaError(f"cannot tell the direction from {src} -> {dst}: convert .pkl to .npz or .npz to .pkl")


def parser():
    from vega_utils.common import OneLineParser
    from vega_utils.data.datasets import dataset_arg
    p = OneLineParser(prog="python -m vega_utils.data.convert", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a reference pickle (.pkl) or an open-format file (.npz)")
    p.add_argument("target", help="the file to write (.npz or .pkl)")
    p.add_argument("--Dataset", "--dataset", dest="Dataset", type=dataset_arg, default="IEMOCAP",
                   help="IEMOCAP, MELD or a dataset JSON: the sizes, speakers and labels to check against "
                        "(default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing target (default: refuse)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    return exit_on_error(lambda: print(convert(args.source, args.target, args.Dataset, args.force)))


if __name__ == "__main__":
    sys.exit(main())
