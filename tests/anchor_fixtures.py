"""Offline test material for the anchor code: a tiny CLIP saved locally and folders of generated images.

Nothing here touches the hub: the CLIP is built from a CLIPConfig with random weights and written with
save_pretrained (model and preprocessor_config.json), the images are drawn with Pillow.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # before huggingface_hub is imported anywhere
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from vega_utils.data.toy_models import save_tiny_clip  # noqa: E402

# One format per image in turn, so every test folder mixes all the accepted kinds.
FORMATS = ("jpg", "png", "bmp", "gif", "tiff", "jpeg", "tif")


def make_tiny_clip(folder, projection_dim=16, image_size=32, seed=0, hidden=16, layers=1, patch_size=8):
    """Save a randomly initialised, very small CLIP (features of width projection_dim) in folder; hidden, layers
    and patch_size shape its vision tower (the benchmark uses a realistic width and patch 32 at 224 px)."""
    return save_tiny_clip(folder, projection_dim, image_size, seed, hidden, layers, patch_size)


def draw_face(path, seed, size=(40, 36)):
    """A random-noise picture with a per-seed tint, saved in the format its extension names."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    pixels[..., seed % 3] //= 2
    image = Image.fromarray(pixels)
    if path.lower().endswith(".gif"):
        image = image.convert("P")  # GIFs are palette images
    image.save(path)
    return path


def make_image_folder(image_dir, class_names, per_class=3, layout="folders", seed=0):
    """Images for every class: layout "folders" -> <class>/img_<i>.<ext>, "names" -> <Class>_<i>.<ext>.

    Returns {class: [paths]} with each class's paths in the order the builder reads them (sorted).
    """
    os.makedirs(image_dir, exist_ok=True)
    made = {}
    n = 0
    for c in class_names:
        made[c] = []
        for i in range(per_class):
            ext = FORMATS[n % len(FORMATS)]
            if layout == "folders":
                os.makedirs(os.path.join(image_dir, c), exist_ok=True)
                path = os.path.join(image_dir, c, f"img_{i:02d}.{ext}")
            else:
                path = os.path.join(image_dir, f"{c.capitalize()}_{i:02d}.{ext}")
            made[c].append(draw_face(path, seed + n))
            n += 1
        made[c].sort(key=lambda p: os.path.relpath(p, image_dir))
    return made


def make_anchor_setup(root, class_names, per_class=3, projection_dim=16, layout="folders"):
    """A tiny CLIP in root/clip and images in root/images; returns (clip_dir, image_dir, {class: paths})."""
    clip_dir = make_tiny_clip(os.path.join(root, "clip"), projection_dim=projection_dim)
    image_dir = os.path.join(root, "images")
    return clip_dir, image_dir, make_image_folder(image_dir, class_names, per_class, layout)
