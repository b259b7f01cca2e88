"""What every trial of a sweep needs, checked once before the first: a sweep whose data file is missing must
stop with one line, not record a failed trial per draw.

Checked: the dataset JSON (resolved already by the config), the data file (read and checked in full, as a run
reads it, with the validation split the sweep selects on), the anchor cache or the images to build it from
(unless the VEGA branch is off), the output folder (a file written and removed) and the storage (the study
opened, by the caller). Every failure is a SetupError: the same one every trial would meet.
"""
import os
import tempfile

from vega_utils.common import SetupError, VegaError


def check_trial_needs(cfg, folder):
    """Raise a one-line SetupError if a trial of `cfg` could not start; `folder`: where trials' run folders go."""
    try:
        _check_data(cfg)
        if cfg.clip_loss:
            _check_anchors(cfg)
        _check_writable(folder)
    except SetupError:
        raise
    except VegaError as e:
        raise SetupError(str(e)) from None


def _check_data(cfg):
    from dataloader import load_dialogues, split_validation
    from vega_utils.data.datasets import info_of
    data = load_dialogues(cfg.data_path, info_of(cfg))
    split_validation(data.train_ids, cfg.valid_ratio, cfg.seed)


def _check_anchors(cfg):
    from vega_utils.anchors.bank import load_anchor_cache
    from vega_utils.anchors.build import anchor_source
    from vega_utils.data.datasets import info_of
    path, folder = anchor_source(cfg)
    if folder is None:   # a cache: it must load; an image folder is read by the first trial (CLIP needed)
        load_anchor_cache(path, info_of(cfg).class_names, expected_dim=cfg.clip_dim)


def _check_writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise SetupError(f"cannot write the sweep's run folders in {folder}: {e.strerror or e}") from None
