"""The anchor cache of a run: load it, or build it from the emotion face images (as the reference does), as a
library call (ensure_anchor_cache) or a command:
    python -m vega_utils.anchors.build --image_dir anchor/35 --Dataset IEMOCAP \
        --CLIP_Model openai/clip-vit-base-patch32 --out anchor/35_anchor.pt [--batch_size 32] [--device auto]
(--Dataset a dataset JSON: its classes; --label_map FILE: other words for them in image paths.)
"""
import os
import sys

from vega_utils.anchors import images
from vega_utils.anchors.bank import DEFAULT_CLIP_MODEL, load_anchor_cache
from vega_utils.common import OneLineParser, VegaError, exit_on_error, python_cmd
from vega_utils.data.datasets import dataset_arg, dataset_info, info_of, read_label_map


# -------------------------------------------------------------------------- which image is which class
def find_image_folder(cfg):
    """anchor/<expr_img_folder>/ or, as the reference also accepts, anchor/<expr_img_folder>_anchor/."""
    for folder in _image_folder_candidates(cfg):
        if os.path.isdir(folder):
            return folder
    return None


def _image_folder_candidates(cfg):
    return [os.path.join("anchor", str(cfg.expr_img_folder)),
            os.path.join("anchor", f"{cfg.expr_img_folder}_anchor")]


def anchor_source(cfg):
    """(the anchor cache's path, the image folder it is to be built from: None when the cache exists); a
    VegaError when there is neither."""
    path = cfg.anchor_path or os.path.join("anchor", f"{cfg.expr_img_folder}_anchor.pt")
    if os.path.exists(path):
        return path, None
    folder = find_image_folder(cfg)
    if folder is None:
        first, second = _image_folder_candidates(cfg)
        raise VegaError(f"no anchor cache at {path} and no image folder {first}/ or {second}/ to build it "
                        f"from: download the published cache ({cfg.expr_img_folder}_anchor.pt) to {path}, or "
                        f"unzip the images ({cfg.expr_img_folder}_anchor.zip) into {first}/, or build a "
                        f"cache with {python_cmd()} -m vega_utils.anchors.build --image_dir DIR --out {path} "
                        f"(README.md, "
                        f"'Getting the data', has the links); or train the backbone alone without anchors: "
                        f"--ablation no_vega")
    return path, folder


def ensure_anchor_cache(cfg, device="auto"):
    """The run's anchors: load cfg.anchor_path, or first build it from the image folder (as the reference)."""
    info = info_of(cfg)
    path, folder = anchor_source(cfg)
    if folder is None:
        return load_anchor_cache(path, info.class_names, expected_dim=cfg.clip_dim)
    print(f"no anchor cache at {path}: building it from {folder} with {cfg.CLIP_Model}")
    return images.build_anchor_cache(folder, info.class_names, cfg.CLIP_Model, path, device=device,
                              expected_dim=cfg.clip_dim, label_map=info.anchor_words)


# ----------------------------------------------------------------------------------------- command line
def parser():
    p = OneLineParser(
        prog="python -m vega_utils.anchors.build",
        description="Build a VEGA anchor cache (the reference's anchor/<name>_anchor.pt format) from "
                    "emotion face images: one subfolder per class, or the class word in each file name.")
    p.add_argument("--image_dir", required=True, help="folder of images (class = path below it); required")
    p.add_argument("--Dataset", "--dataset", dest="Dataset", default="IEMOCAP", type=dataset_arg,
                   help="IEMOCAP, MELD or a dataset JSON: decides the class labels (default: %(default)s)")
    p.add_argument("--label_map", metavar="JSON", help="{word: class} for image words that are not class names "
                   "(default: the dataset JSON's anchor_label_map)")
    p.add_argument("--CLIP_Model", default=DEFAULT_CLIP_MODEL,
                   help="hub name or save_pretrained folder (default: %(default)s)")
    p.add_argument("--out", required=True, help="cache file to write, e.g. anchor/35_anchor.pt; required")
    p.add_argument("--batch_size", type=int, default=32, help="images per CLIP forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--skip_bad_images", action="store_true",
                   help="skip unreadable images with a warning (default: stop at the first)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = parser().parse_args(argv)

    def build():
        info = dataset_info(args.Dataset)
        words = read_label_map(args.label_map, info.class_names) if args.label_map else info.anchor_words
        images.build_anchor_cache(args.image_dir, info.class_names, args.CLIP_Model,
                           args.out, batch_size=args.batch_size, device=args.device,
                           skip_bad_images=args.skip_bad_images, progress=not args.no_progress, label_map=words)
    return exit_on_error(build)


if __name__ == "__main__":
    sys.exit(main())
