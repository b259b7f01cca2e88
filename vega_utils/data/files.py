"""What every reader of a data file shares: the modality names, the missing-file message, an error's first line,
numpy scalars as Python's."""
import numpy as np

from vega_utils.common import VegaError, script_cmd

MODALITIES = ("text", "audio", "visual")


def missing_file(path):
    return VegaError(f"{path}: data file not found (give its location with --data_path; README.md, 'Getting the "
                     f"data', says where the feature pickles come from; `{script_cmd('run.py')} --demo` needs none)")


def first_line(e):
    lines = str(e).strip().splitlines()
    return lines[0] if lines else "no details"


def plain(x):
    """numpy scalars -> Python scalars, so ids print and compare like the ones in the dicts."""
    return x.item() if isinstance(x, np.generic) else x
