"""VEGA's visual anchors: per-class banks of L2-normalised CLIP image features and their centres, and the
anchor cache file that stores them (read and checked here; built from images in images.py and build.py).
"""
import os
import pickle
import re
from dataclasses import dataclass

import torch

from vega_utils.common import VegaError, python_cmd


@dataclass
class AnchorBank:
    centers: torch.Tensor   # (C, K): mean of each class's normalised features (not re-normalised)
    banks: list             # C tensors (n_c, K): normalised image features of class c

    @property
    def clip_dim(self):
        return self.centers.shape[1]

    def to(self, device):
        return AnchorBank(self.centers.to(device), [b.to(device) for b in self.banks])

    @classmethod
    def from_reference_dict(cls, d, class_names):
        """From the cache layout {"anchor_center": (C, K), "anchor_img_dict": {label: {"feature": (n, K)}}}."""
        return cls(d["anchor_center"].float().cpu(),
                   [d["anchor_img_dict"][c]["feature"].float().cpu() for c in class_names])

    def to_reference_dict(self, class_names):
        return {"anchor_center": self.centers.clone(),
                "anchor_img_dict": {c: {"feature": b.clone()} for c, b in zip(class_names, self.banks)}}


# =====================================================================================================
# Everything below loads and checks the anchor cache (docs/method.md, section 4); building one from images is
# images.py, whose imports (transformers, Pillow) happen only when a cache is built.
#
# Cache file, the reference's layout, so the published anchor/35_anchor.pt and caches built here are
# interchangeable:  {"anchor_center": Tensor[C, K],
#                    "anchor_img_dict": {label: {"feature": Tensor[n_images, K]}}}
# =====================================================================================================
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"


# ------------------------------------------------------------------------------------ loading a cache
def load_anchor_cache(path, class_names, expected_dim=None):
    """Read and check an anchor cache; tensors saved on a GPU are loaded onto the CPU."""
    bank = _bank_from_cache(_read_cache_file(path), path, list(class_names))
    if expected_dim is not None and bank.clip_dim != expected_dim:
        raise VegaError(f"anchor cache {path} has CLIP width {bank.clip_dim} but --CLIP_Model/clip_dim "
                        f"expects {expected_dim}: use the CLIP model the cache was built with, or rebuild "
                        f"the cache with this one ({python_cmd()} -m vega_utils.anchors.build)")
    return bank


def _read_cache_file(path):
    if not os.path.exists(path):
        raise VegaError(f"anchor cache {path} not found")
    if not os.path.isfile(path):
        raise VegaError(f"anchor cache {path} is not a file")
    try:
        # weights_only: a cache is only tensors in dicts, and unpickling anything else can run code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only names the class or function it refused as "GLOBAL module.name"; any other refusal
        # (an unknown opcode, say) comes from a file that is not a torch file at all.
        culprit = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if culprit is None:
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            raise VegaError(f"cannot read anchor cache {path}: damaged or not a torch file"
                            f"{f' ({detail.group(1).strip()})' if detail else ''}") from e
        raise VegaError(f"anchor cache {path} needs arbitrary unpickling to load (it refers to "
                        f"{culprit.group(1)}); refusing it, since a cache should hold only tensors in "
                        f"dicts: rebuild it from the images with {python_cmd()} -m vega_utils.anchors.build") from e
    except Exception as e:  # torch raises RuntimeError, KeyError, EOFError... for damaged files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VegaError(f"cannot read anchor cache {path}: damaged or not a torch file "
                        f"({type(e).__name__}: {first_line})") from e


def _bank_from_cache(d, path, class_names):
    """Check the reference layout key by key, so the message says exactly what is wrong."""
    def bad(problem):
        raise VegaError(f"anchor cache {path} is not a valid anchor cache: {problem}")

    if not isinstance(d, dict) or not {"anchor_center", "anchor_img_dict"} <= set(d):
        keys = sorted(map(str, d)) if isinstance(d, dict) else None
        bad(f"expected a dict with keys 'anchor_center' and 'anchor_img_dict', found "
            f"{'keys ' + str(keys) if keys is not None else type(d).__name__}")
    centers, per_class = d["anchor_center"], d["anchor_img_dict"]
    if not isinstance(per_class, dict):
        bad(f"'anchor_img_dict' is a {type(per_class).__name__}, not a dict")
    missing = [c for c in class_names if c not in per_class]
    if missing:
        bad(f"no images for class label(s) {', '.join(map(repr, missing))} in 'anchor_img_dict' "
            f"(it has {', '.join(map(repr, per_class))}); was it built for another dataset?")
    features = []
    for c in class_names:
        entry = per_class[c]
        feat = entry.get("feature") if isinstance(entry, dict) else None
        if not _is_float_matrix(feat) or feat.shape[0] == 0:
            bad(f"'anchor_img_dict'[{c!r}] must be {{'feature': float tensor [n_images >= 1, K]}}")
        features.append(feat)
    widths = sorted({f.shape[1] for f in features})
    if len(widths) > 1:
        bad("feature widths differ between classes: " +
            ", ".join(f"{c} {f.shape[1]}" for c, f in zip(class_names, features)))
    keys = list(per_class)
    if _is_float_matrix(centers) and centers.shape[0] == len(keys) != len(class_names):
        # a cache of more classes (IEMOCAP's six for IEMOCAP-4): the centre rows of ours, in the dict's order
        centers = centers[[keys.index(c) for c in class_names]]
    expected_shape = (len(class_names), widths[0])
    if not _is_float_matrix(centers) or tuple(centers.shape) != expected_shape:
        shape = tuple(centers.shape) if isinstance(centers, torch.Tensor) else type(centers).__name__
        bad(f"'anchor_center' has shape {shape}, expected {expected_shape} (classes, CLIP width)")
    named = [("'anchor_center'", centers)] + [(f"the features of {c!r}", f) for c, f in zip(class_names, features)]
    for name, t in named:
        if not torch.isfinite(t).all():
            bad(f"{name} hold NaN or infinite values")
    return AnchorBank(centers.float().cpu(), [f.float().cpu() for f in features])


def _is_float_matrix(t):
    return isinstance(t, torch.Tensor) and t.dim() == 2 and t.is_floating_point()


