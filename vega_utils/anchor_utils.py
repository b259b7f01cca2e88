"""VEGA's visual anchors: per-class banks of L2-normalised CLIP image features and their centres.

Also loads and checks the anchor cache file, and builds it from face images, as a library call
(build_anchor_cache / ensure_anchor_cache) or a command:
    python -m vega_utils.anchor_utils --image_dir anchor/35 --Dataset IEMOCAP \
        --CLIP_Model openai/clip-vit-base-patch32 --out anchor/35_anchor.pt [--batch_size 32] [--device auto]
(--Dataset a dataset JSON: its classes; --label_map FILE: other words for them in image paths.)
"""
import os
import pickle
import re
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import VegaError, atomic_torch_save, exit_on_error, resolve_device
from .datasets import dataset_info, info_of, read_label_map


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
# Everything below builds and loads the anchor cache (spec section 4). transformers, Pillow and tqdm are
# imported inside the functions that need them, so the model and training can import AnchorBank cheaply.
#
# Cache file, the reference's layout, so the published anchor/35_anchor.pt and caches built here are
# interchangeable:  {"anchor_center": Tensor[C, K],
#                    "anchor_img_dict": {label: {"feature": Tensor[n_images, K]}}}
#
# Which image belongs to which class (the reference searched the label word anywhere in the *absolute*
# path, so a folder like /home/sad_lab/ made every image "sad"; we look only below the image folder):
#   * the words of the path below --image_dir count: its subfolders and the file name without extension.
#     Words are split at anything that is not a letter and at camelCase humps, and lower-cased:
#     "Happy/img_03.jpg" -> happy, img;  "35/sadFace2.png" -> sad, face.
#   * a word names a class when it begins with the class name ("sad", "Sad_03", "sadness" -> sad;
#     "unhappy" names nothing).
#   * exactly one class named -> the image is that class's. No class named -> the file is listed in a
#     warning and skipped (folders often hold stray pictures). Several classes named (e.g. happy/sad_1.jpg)
#     -> refused with a list of such files: guessing would silently put images in the wrong anchor.
#   * hidden files and folders (".*") and macOS "__MACOSX" folders from zip files are ignored, and so are
#     files that are not images by extension (jpg, jpeg, png, bmp, gif, tif, tiff; any letter case).
#   * within a class, images are taken in the order of their relative paths (sorted), so builds repeat.
# =====================================================================================================
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
_LIST_LIMIT = 20  # files named in one message; the rest are counted


def _warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


def _listing(items):
    """Indented lines naming up to _LIST_LIMIT items, then how many more there are."""
    lines = [f"  {item}" for item in items[:_LIST_LIMIT]]
    if len(items) > _LIST_LIMIT:
        lines.append(f"  ... and {len(items) - _LIST_LIMIT} more")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ loading a cache
def load_anchor_cache(path, class_names, expected_dim=None):
    """Read and check an anchor cache; tensors saved on a GPU are loaded onto the CPU."""
    bank = _bank_from_cache(_read_cache_file(path), path, list(class_names))
    if expected_dim is not None and bank.clip_dim != expected_dim:
        raise VegaError(f"anchor cache {path} has CLIP width {bank.clip_dim} but --CLIP_Model/clip_dim "
                        f"expects {expected_dim}: use the CLIP model the cache was built with, or rebuild "
                        f"the cache with this one (python -m vega_utils.anchor_utils)")
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
                        f"dicts: rebuild it from the images with python -m vega_utils.anchor_utils") from e
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
        d = {"anchor_center": centers, "anchor_img_dict": per_class}
    expected_shape = (len(class_names), widths[0])
    if not _is_float_matrix(centers) or tuple(centers.shape) != expected_shape:
        shape = tuple(centers.shape) if isinstance(centers, torch.Tensor) else type(centers).__name__
        bad(f"'anchor_center' has shape {shape}, expected {expected_shape} (classes, CLIP width)")
    named = [("'anchor_center'", centers)] + [(f"the features of {c!r}", f) for c, f in zip(class_names, features)]
    for name, t in named:
        if not torch.isfinite(t).all():
            bad(f"{name} hold NaN or infinite values")
    return AnchorBank.from_reference_dict(d, class_names)


def _is_float_matrix(t):
    return isinstance(t, torch.Tensor) and t.dim() == 2 and t.is_floating_point()


# -------------------------------------------------------------------------- which image is which class
def path_words(rel_path):
    """Lower-case words of a path (extension dropped), split at non-letters and camelCase humps."""
    stem = os.path.splitext(rel_path)[0]
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", stem)
    return [w for w in re.split(r"[^a-z]+", spaced.lower()) if w]


def classes_named_by(rel_path, class_names, label_map=None):
    """The classes that words of the path (relative to the image folder) name, in label order. label_map
    {word: class} adds other words for a class ("happiness" -> happy): a path word beginning with one names it."""
    words = path_words(rel_path)
    names = {c: [c.lower()] + [k.lower() for k, v in (label_map or {}).items() if v == c] for c in class_names}
    return [c for c in class_names if any(w.startswith(n) for w in words for n in names[c])]


def list_images(image_dir):
    """Image files below image_dir as sorted '/'-separated relative paths, and how many other files."""
    found, others = [], 0
    for folder, subdirs, files in os.walk(image_dir):
        subdirs[:] = [s for s in subdirs if not s.startswith(".") and s != "__MACOSX"]
        for name in files:
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                rel = os.path.relpath(os.path.join(folder, name), image_dir)
                found.append(rel.replace(os.sep, "/"))
            else:
                others += 1
    return sorted(found), others


def assign_images(image_dir, class_names, label_map=None):
    """{class: [image paths]} in label order, by the rules at the top of this section."""
    if not os.path.isdir(image_dir):
        raise VegaError(f"image folder {image_dir} does not exist")
    images, others = list_images(image_dir)
    if others:
        _warn(f"ignored {others} file(s) in {image_dir} that are not images "
              f"({', '.join(e[1:] for e in IMAGE_EXTENSIONS)})")
    assigned = {c: [] for c in class_names}
    unmatched, ambiguous = [], []
    for rel in images:
        named = classes_named_by(rel, class_names, label_map)
        if len(named) == 1:
            assigned[named[0]].append(os.path.join(image_dir, rel))
        elif named:
            ambiguous.append(f"{rel}  (names {', '.join(named)})")
        else:
            unmatched.append(rel)
    if unmatched:
        _warn(f"skipped {len(unmatched)} image(s) in {image_dir} whose path names no class "
              f"({', '.join(class_names)}):\n{_listing(unmatched)}")
    if ambiguous:
        raise VegaError(f"{len(ambiguous)} image(s) in {image_dir} name more than one class; rename or "
                        f"move them so their path below the folder names one class:\n{_listing(ambiguous)}")
    _require_every_class(assigned, image_dir)
    return assigned


def _require_every_class(per_class, image_dir, why=""):
    empty = [c for c, items in per_class.items() if len(items) == 0]
    if empty:
        c = empty[0]
        raise VegaError(f"no image for class(es) {', '.join(empty)} in {image_dir}{why}: every class needs "
                        f"at least one, in a subfolder named after it ({c}/...) or with the class word in "
                        f"the file name ({c}_01.jpg)")


# ------------------------------------------------------------------------------------- CLIP features
def load_clip(clip_model, device):
    """CLIPModel (float32, eval) and its image processor, from a hub name or a save_pretrained folder."""
    import transformers
    # transformers 5 without torchvision falls back to this PIL processor with a warning; naming it directly
    # keeps the log clean and matches the PIL processing of transformers 4, which built the published cache.
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    def first_line(e):
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    try:
        model = transformers.CLIPModel.from_pretrained(clip_model)
    except Exception as e:  # OSError offline/not found, ValueError wrong model type, safetensors errors...
        raise VegaError(f"could not load CLIP model {clip_model!r} ({type(e).__name__}: {first_line(e)}). Give "
                        f"a local folder saved with save_pretrained (model and preprocessor_config.json; see "
                        f"README.md, 'CLIP offline') or a hub name that is already in the local cache or "
                        f"reachable online") from e
    try:
        processor = processor_cls.from_pretrained(clip_model)
    except Exception as e:
        raise VegaError(f"CLIP model {clip_model!r} loaded, but its image processor did not ({type(e).__name__}: "
                        f"{first_line(e)}): a folder needs preprocessor_config.json too. Save the processor "
                        f"beside the model: CLIPProcessor.from_pretrained(NAME).save_pretrained(FOLDER) (README.md, "
                        f"'CLIP offline')") from e
    # Some checkpoints load in half precision under transformers 5's dtype="auto"; anchors are float32.
    return model.float().to(device).eval(), processor


def feature_tensor(out):
    """get_image_features returns a tensor in transformers 4 and an output object in transformers 5."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise VegaError(f"CLIPModel.get_image_features returned {type(out).__name__}: expected a tensor "
                    f"(transformers 4) or an output with pooler_output (transformers 5)")


def _pixels_of(path, processor):
    """One image's pixel tensor [3, S, S]; the image goes to the processor as read (it converts to RGB)."""
    from PIL import Image
    with Image.open(path) as im:
        im.load()          # decode now, so a truncated file fails here, naming this path
        image = im.copy()  # frees the file handle; for animated GIFs this is the first frame
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


def _embed(model, pixels, device):
    with torch.no_grad():
        out = model.get_image_features(pixel_values=torch.stack(pixels).to(device))
    return F.normalize(feature_tensor(out).float(), dim=-1).cpu()


def class_features(paths, model, processor, device, batch_size, skip_bad_images, bar):
    """L2-normalised features [n_read, K] of one class's images, in batches; unreadable ones raise or skip."""
    chunks, batch = [], []
    for path in paths:
        try:
            batch.append(_pixels_of(path, processor))
        except Exception as e:  # Pillow raises many types for broken files; any of them means "bad image"
            if not skip_bad_images:
                raise VegaError(f"cannot read image {path}: {type(e).__name__}: {e} "
                                f"(fix or remove it, or pass --skip_bad_images)") from e
            _warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}")
        bar.update(1)
        if len(batch) == batch_size:
            chunks.append(_embed(model, batch, device))
            batch = []
    if batch:
        chunks.append(_embed(model, batch, device))
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.projection_dim)


# -------------------------------------------------------------------------------------------- building
def build_anchor_cache(image_dir, class_names, clip_model, out_path, batch_size=32, device="auto",
                       skip_bad_images=False, progress=True, expected_dim=None, label_map=None):
    """Compute every class's CLIP features and centre, write the cache atomically, return the AnchorBank."""
    from tqdm import tqdm
    class_names = list(class_names)
    if batch_size < 1:
        raise VegaError(f"batch size must be at least 1, got {batch_size}")
    device = resolve_device(device)
    per_class = assign_images(image_dir, class_names, label_map)  # before the model: naming errors come fast
    model, processor = load_clip(clip_model, device)
    width = model.config.projection_dim
    if expected_dim is not None and width != expected_dim:
        raise VegaError(f"CLIP model {clip_model!r} gives features of width {width} but clip_dim "
                        f"expects {expected_dim}")
    total = sum(len(p) for p in per_class.values())
    banks = {}
    with tqdm(total=total, desc="CLIP image features", unit="img", disable=not progress) as bar:
        for c in class_names:
            banks[c] = class_features(per_class[c], model, processor, device, batch_size,
                                      skip_bad_images, bar)
    _require_every_class(banks, image_dir, why=" that could be read")
    bank = AnchorBank(torch.stack([banks[c].mean(dim=0) for c in class_names]),
                      [banks[c] for c in class_names])
    atomic_torch_save(bank.to_reference_dict(class_names), out_path)
    _report(bank, class_names, per_class, image_dir, out_path, clip_model, device)
    return bank


def _report(bank, class_names, per_class, image_dir, out_path, clip_model, device):
    print(f"anchor images per class in {image_dir}:")
    for c, b in zip(class_names, bank.banks):
        skipped = len(per_class[c]) - b.shape[0]
        print(f"  {c:<12} {b.shape[0]:>5}" + (f"  ({skipped} unreadable, skipped)" if skipped else ""))
    n = sum(b.shape[0] for b in bank.banks)
    print(f"wrote anchor cache {out_path}: {len(class_names)} classes, {n} images, "
          f"CLIP width {bank.clip_dim} ({clip_model} on {device})")


def find_image_folder(cfg):
    """anchor/<expr_img_folder>/ or, as the reference also accepts, anchor/<expr_img_folder>_anchor/."""
    for folder in _image_folder_candidates(cfg):
        if os.path.isdir(folder):
            return folder
    return None


def _image_folder_candidates(cfg):
    return [os.path.join("anchor", str(cfg.expr_img_folder)),
            os.path.join("anchor", f"{cfg.expr_img_folder}_anchor")]


def ensure_anchor_cache(cfg, device="auto"):
    """The run's anchors: load cfg.anchor_path, or first build it from the image folder (as the reference)."""
    info = info_of(cfg)
    class_names = info.class_names
    path = cfg.anchor_path or os.path.join("anchor", f"{cfg.expr_img_folder}_anchor.pt")
    if os.path.exists(path):
        return load_anchor_cache(path, class_names, expected_dim=cfg.clip_dim)
    folder = find_image_folder(cfg)
    if folder is None:
        first, second = _image_folder_candidates(cfg)
        raise VegaError(f"no anchor cache at {path} and no image folder {first}/ or {second}/ to build it "
                        f"from: download the published cache ({cfg.expr_img_folder}_anchor.pt) to {path}, or "
                        f"unzip the images ({cfg.expr_img_folder}_anchor.zip) into {first}/, or build a "
                        f"cache with python -m vega_utils.anchor_utils --image_dir DIR --out {path} (README.md, "
                        f"'Getting the data', has the links); or train the backbone alone without anchors: "
                        f"--ablation no_vega")
    print(f"no anchor cache at {path}: building it from {folder} with {cfg.CLIP_Model}")
    return build_anchor_cache(folder, class_names, cfg.CLIP_Model, path, device=device,
                              expected_dim=cfg.clip_dim, label_map=info.anchor_words)


# ----------------------------------------------------------------------------------------- command line
def _parser():
    import argparse

    from .config import dataset_arg
    p = argparse.ArgumentParser(
        prog="python -m vega_utils.anchor_utils",
        description="Build a VEGA anchor cache (the reference's anchor/<name>_anchor.pt format) from "
                    "emotion face images: one subfolder per class, or the class word in each file name.")
    p.add_argument("--image_dir", required=True, help="folder of images (class = path below it)")
    p.add_argument("--Dataset", "--dataset", dest="Dataset", default="IEMOCAP", type=dataset_arg,
                   help="IEMOCAP, MELD or a dataset JSON: decides the class labels")
    p.add_argument("--label_map", metavar="JSON", help="{word: class} for image words that are not class names "
                   "(default: the dataset JSON's anchor_label_map)")
    p.add_argument("--CLIP_Model", default=DEFAULT_CLIP_MODEL, help="hub name or save_pretrained folder")
    p.add_argument("--out", required=True, help="cache file to write, e.g. anchor/35_anchor.pt")
    p.add_argument("--batch_size", type=int, default=32, help="images per CLIP forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--skip_bad_images", action="store_true",
                   help="skip unreadable images with a warning instead of stopping")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)

    def build():
        info = dataset_info(args.Dataset)
        words = read_label_map(args.label_map, info.class_names) if args.label_map else info.anchor_words
        build_anchor_cache(args.image_dir, info.class_names, args.CLIP_Model,
                           args.out, batch_size=args.batch_size, device=args.device,
                           skip_bad_images=args.skip_bad_images, progress=not args.no_progress, label_map=words)
    return exit_on_error(build)


if __name__ == "__main__":
    sys.exit(main())
