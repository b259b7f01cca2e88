"""Checkpoints: written atomically, read with weights_only=True, loaded strictly on the backbone.

Formats read:
- a bare backbone state_dict (the published `IEMOCAP.pth`);
- a dict whose `state_dict` entry is one (the reference's other form, and this project's files, which also
  carry `config` (plain dict), `metrics` and `epoch`).
"""
import pickle
import zipfile

import torch

from model import is_backbone_key

from .common import VegaError, atomic_torch_save

FORMAT = "vega-checkpoint-v1"


def save_best(path, model, cfg, epoch, metrics):
    """Best-epoch file: backbone parameters and buffers only (as the reference), plus what rebuilds it."""
    atomic_torch_save({"format": FORMAT, "state_dict": model.backbone_state_dict(), "config": cfg.to_dict(),
                       "epoch": int(epoch), "metrics": metrics}, path)


def read_checkpoint(path):
    """torch.load with weights_only=True and one clear error per way a file can be wrong."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise VegaError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise VegaError(f"checkpoint {path} is a folder, not a file") from None
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise VegaError(f"checkpoint {path} holds arbitrary Python objects and was refused: loading it "
                            "would execute code (only tensors and plain values are accepted)") from None
        raise VegaError(f"checkpoint {path} is not a readable checkpoint (corrupt or not a torch file)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise VegaError(f"checkpoint {path} is not a readable checkpoint (truncated or corrupt: "
                        f"{str(e).splitlines()[0][:120]})") from None
    return obj


def split_checkpoint(obj, path):
    """(state_dict, config dict or None, the whole object) from any accepted format."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state, config = obj["state_dict"], obj.get("config")
    elif isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        state, config = obj, None
    else:
        raise VegaError(f"checkpoint {path} holds no state_dict (expected a state_dict or a dict with "
                        "a 'state_dict' entry)")
    if config is not None and not isinstance(config, dict):
        config = None
    return state, config, obj


def _names(keys, limit=10):
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def guess_config(state):
    """What the shapes say about the model that wrote a state_dict (for error messages)."""
    hints = {}
    if "speaker_embeddings.weight" in state:
        n, hidden = state["speaker_embeddings.weight"].shape
        hints.update(hidden_dim=int(hidden), n_speakers=int(n) - 1)
    if "acouf_input.weight" in state:
        hints["audio_dim"] = int(state["acouf_input.weight"].shape[1])
    heads = sorted({int(k.split(".")[1]) for k in state if k.startswith("all_output_layer.")})
    if heads:
        hints["outlayer_num"] = len(heads) // 2 if len(heads) > 1 else 1
        last = f"all_output_layer.{max(heads)}.weight"
        if last in state:
            hints["n_classes"] = int(state[last].shape[0])
        hints["outlayer_drop"] = "0" if heads[:2] == [0, 2] else "> 0" if len(heads) > 1 else "?"
    return hints


def load_backbone(model, state, path, log=print):
    """Load the backbone strictly; VEGA-branch entries in the file are ignored with a notice."""
    expected = {k: v for k, v in model.state_dict().items() if is_backbone_key(k)}
    given = {k: v for k, v in state.items() if is_backbone_key(k)}
    branch = [k for k in state if not is_backbone_key(k)]
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    wrong = {k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape)}
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_names(unexpected)}")
        if wrong:
            k = sorted(wrong)[0]
            parts.append(f"wrong shape {len(wrong)}: {_names(wrong)} (e.g. {k}: file {tuple(given[k].shape)}, "
                         f"model {tuple(expected[k].shape)})")
        hint = ", ".join(f"{k}={v}" for k, v in guess_config(state).items())
        raise VegaError(f"checkpoint {path} does not fit this model: " + "; ".join(parts)
                        + (f". The file looks like a model with {hint}" if hint else ""))
    for k, v in given.items():
        if torch.is_floating_point(v) and not torch.isfinite(v).all():
            raise VegaError(f"checkpoint {path} has non-finite values in {k}")
    model.load_state_dict(given, strict=False)  # strictness checked above, on backbone keys
    if branch:
        log(f"note: ignoring {len(branch)} VEGA-branch entries in {path} (not used for predictions)")
