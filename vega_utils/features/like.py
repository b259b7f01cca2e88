"""Repeating a recorded extraction: the Settings of the extraction record that a dataset JSON carries (extract.py
--like) or that a checkpoint carries in its config (inference.py --media), so new conversations get features
of exactly the same kind (same models, pooling, frames, audio set, classes and speakers)."""
from vega_utils.common import VegaError
from vega_utils.features.pipeline import Settings


def recorded_settings(record, where):
    """Settings of an extraction record; one line naming `where` when there is none or it does not fit."""
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise VegaError(f"{where}: not a dataset JSON written by extract.py (no extraction record)")
    try:
        return Settings(**record["settings"])
    except TypeError as e:
        raise VegaError(f"{where}: its extraction settings do not fit this version of extract.py ({e})") from None
