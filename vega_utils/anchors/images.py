"""Building an anchor cache from emotion face images with CLIP (docs/method.md, section 4): which image is which
class's, the CLIP features, the cache file (its layout: bank.py). transformers, Pillow and tqdm are imported
inside the functions that need them.

Which image belongs to which class (the reference searched the label word anywhere in the *absolute*
path, so a folder like /home/sad_lab/ made every image "sad"; we look only below the image folder):
  * the words of the path below --image_dir count: its subfolders and the file name without extension.
    Words are split at anything that is not a letter and at camelCase humps, and lower-cased:
    "Happy/img_03.jpg" -> happy, img;  "35/sadFace2.png" -> sad, face.
  * a word names a class when it begins with the class name ("sad", "Sad_03", "sadness" -> sad;
    "unhappy" names nothing).
  * exactly one class named -> the image is that class's. No class named -> the file is listed in a
    warning and skipped (folders often hold stray pictures). Several classes named (e.g. happy/sad_1.jpg)
    -> refused with a list of such files: guessing would silently put images in the wrong anchor.
  * hidden files and folders (".*") and macOS "__MACOSX" folders from zip files are ignored, and so are
    files that are not images by extension (jpg, jpeg, png, bmp, gif, tif, tiff; any letter case).
  * within a class, images are taken in the order of their relative paths (sorted), so builds repeat.
"""
import os
import re
import sys

import torch
import torch.nn.functional as F

from vega_utils.anchors.bank import AnchorBank
from vega_utils.common import VegaError, atomic_torch_save, resolve_device

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff")
_LIST_LIMIT = 20  # files named in one message; the rest are counted


def _warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


def _listing(items):
    """Indented lines naming up to _LIST_LIMIT items, then how many more there are."""
    lines = [f"  {item}" for item in items[:_LIST_LIMIT]]
    if len(items) > _LIST_LIMIT:
        lines.append(f"  ... and {len(items) - _LIST_LIMIT} more")
    return "\n".join(lines)


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
                        f"docs/anchors.md, 'CLIP offline') or a hub name that is already in the local cache or "
                        f"reachable online") from e
    try:
        processor = processor_cls.from_pretrained(clip_model)
    except Exception as e:
        raise VegaError(f"CLIP model {clip_model!r} loaded, but its image processor did not ({type(e).__name__}: "
                        f"{first_line(e)}): a folder needs preprocessor_config.json too. Save the processor "
                        f"beside the model: CLIPProcessor.from_pretrained(NAME).save_pretrained(FOLDER) "
                        f"(docs/anchors.md, 'CLIP offline')") from e
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


def image_features(model, pixels, device):
    """L2-normalised CLIP image features [n, K] of n pixel tensors [3, S, S] (a list, or one [n, 3, S, S]
    tensor): the one image-feature function of the anchor builder and of extract.py's visual features."""
    batch = pixels if isinstance(pixels, torch.Tensor) else torch.stack(pixels)
    with torch.no_grad():   # not inference_mode: anchor banks built here may meet autograd in a run
        out = model.get_image_features(pixel_values=batch.to(device))
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
            chunks.append(image_features(model, batch, device))
            batch = []
    if batch:
        chunks.append(image_features(model, batch, device))
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
