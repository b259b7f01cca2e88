"""Checkpoints: written atomically, read with weights_only=True, loaded strictly on the backbone.

Formats read:
- a bare backbone state_dict (the published `IEMOCAP.pth`);
- a dict whose `state_dict` entry is one (the reference's other form, and this project's files, which also
  carry `config` (plain dict), `metrics` and `epoch`).
"""
import glob
import os
import pickle
import re
import zipfile

import torch

from vega_utils.common import HTML_PAGE, VegaError, atomic_torch_save, is_html_page

FORMAT = "vega-checkpoint-v1"


def is_backbone_key(name):
    """What a best-epoch checkpoint holds (as the reference's): everything but the VEGA branch (its projections
    and temperatures) and the unused gate logit."""
    return not ("_clip_proj." in name or name.endswith("_clip_temp") or name == "prob_gate_logit")


def backbone_state_dict(model):
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if is_backbone_key(k)}


# The best epoch's file: `BEST_cls_f1_[<f1>]_epoch<n>.pth` as the reference names it, `BEST_cls_f1_<f1>_epoch<n>.pth`
# with --no_folder_brackets (no shell quoting). Readers take both.
BEST_GLOB = "BEST_cls_f1_*_epoch*.pth"
BEST_NAME = re.compile(r"^BEST_cls_f1_\[?(\d+(?:\.\d+)?)\]?_epoch(\d+)\.pth$")


def best_file_name(f1, epoch, brackets=True):
    score = f"{100 * f1:.2f}"
    return f"BEST_cls_f1_{f'[{score}]' if brackets else score}_epoch{epoch}.pth"


def best_files(folder):
    """The best-epoch checkpoints in a run folder (either naming), oldest epoch first: one, unless a run was
    stopped between writing a new best and removing the old one."""
    found = [p for p in glob.glob(os.path.join(glob.escape(folder), BEST_GLOB))
             if BEST_NAME.match(os.path.basename(p))]
    return sorted(found, key=lambda p: int(BEST_NAME.match(os.path.basename(p)).group(2)))


def save_best(path, model, cfg, epoch, metrics):
    """Best-epoch file: backbone parameters and buffers only (as the reference), plus what rebuilds it."""
    atomic_torch_save({"format": FORMAT, "state_dict": backbone_state_dict(model), "config": cfg.to_dict(),
                       "epoch": int(epoch), "metrics": metrics}, path)


# The best epoch's VEGA branch (the projections and their temperatures), kept beside the backbone-only best
# checkpoint so that the anchor analysis can be redone from the run folder (python -m vega_utils.insight.analyze).
BRANCH_FILE = "best_vega_branch.pth"


def save_branch(path, model, cfg, epoch):
    branch = {k: v.detach().cpu() for k, v in model.state_dict().items() if not is_backbone_key(k)}
    atomic_torch_save({"format": FORMAT, "branch_state_dict": branch, "config": cfg.to_dict(),
                       "epoch": int(epoch)}, path)


def load_branch(model, path, epoch=None):
    """Load a save_branch file into model (strict on the branch keys); epoch: the one it must be from."""
    obj = read_checkpoint(path)
    state = obj.get("branch_state_dict") if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise VegaError(f"{path} holds no VEGA-branch weights (no 'branch_state_dict' entry)")
    if epoch is not None and obj.get("epoch") != epoch:
        raise VegaError(f"{path} is from epoch {obj.get('epoch')}, the best checkpoint from epoch {epoch}")
    expected = {k: v for k, v in model.state_dict().items() if not is_backbone_key(k)}
    wrong = sorted(k for k in set(expected) | set(state)
                   if k not in state or k not in expected or tuple(state[k].shape) != tuple(expected[k].shape))
    if wrong:
        raise VegaError(f"{path} does not fit this model's VEGA branch: {_names(wrong)}")
    model.load_state_dict(state, strict=False)
    return int(obj.get("epoch", -1))


def _what_file_is_this(path):
    """None for a file that starts as a torch checkpoint can (a zip archive, or a pickle of the legacy format);
    else a phrase saying what it looks like instead, from its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None   # torch.load reports it
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    if not head:
        return "an empty file"
    if is_html_page(path):
        return HTML_PAGE
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "neither a zip archive nor a pickle"


def _first_sentence(error):
    """The first sentence of an exception's message: torch's can run on for lines."""
    line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return line.split(". ")[0].rstrip(".")


def read_checkpoint(path):
    """torch.load with weights_only=True and one clear error per way a file can be wrong."""
    kind = _what_file_is_this(path) if os.path.isfile(path) else None
    if kind:
        raise VegaError(f"checkpoint {path} is not a torch checkpoint: it is {kind}. Download it again")
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
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, IndexError, KeyError) as e:
        raise VegaError(f"checkpoint {path} is not a readable checkpoint (truncated or corrupt: "
                        f"{_first_sentence(e)})") from None
    return obj


def split_checkpoint(obj, path):
    """(state_dict, config dict or None, the whole object) from any accepted format."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state, config = obj["state_dict"], obj.get("config")
    elif isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        state, config = obj, None
    elif isinstance(obj, dict) and isinstance(obj.get("branch_state_dict"), dict):
        raise VegaError(f"checkpoint {path} is a run's {BRANCH_FILE}: the VEGA branch of its best epoch (anchor "
                        f"projections, for python -m vega_utils.insight.analyze), not a model to score; "
                        f"give {_model_file_beside(path)} instead")
    else:
        raise VegaError(f"checkpoint {path} holds no state_dict (expected a state_dict or a dict with "
                        "a 'state_dict' entry)")
    if config is not None and not isinstance(config, dict):
        config = None
    return state, config, obj


def _model_file_beside(path):
    """The checkpoint to score in the run folder of `path`: its best-epoch file, else its last.pth."""
    folder = os.path.dirname(os.path.abspath(path))
    best = best_files(folder)
    if best:
        return os.path.join(os.path.dirname(path), os.path.basename(best[-1]))
    if os.path.exists(os.path.join(folder, "last.pth")):
        return os.path.join(os.path.dirname(path), "last.pth")
    return f"the {BEST_GLOB} checkpoint (or last.pth) of its run folder"


def _names(keys, limit=10):
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def describe_shapes(state):
    """What the shapes say about the model that wrote a state_dict, in words: `hidden_dim=768, outlayer_num=3,
    dropout in the output layers`; empty when they say nothing."""
    found = fitting_settings(state)
    words = [f"{k}={found[k]}" for k in ("Dataset", "hidden_dim", "outlayer_num") if k in found]
    if "outlayer_dropout" in found:
        words.append(("dropout" if found["outlayer_dropout"] else "no dropout") + " in the output layers")
    return ", ".join(words)


def load_backbone(model, state, path, log=print, advice=None):
    """Load the backbone strictly; VEGA-branch entries in the file are ignored with a notice.

    A file that does not fit: what the file looks like and `advice(fitting_settings(state))` (a caller's fix,
    e.g. inference.py's flags) come first, then a few of the differing entries."""
    expected = {k: v for k, v in model.state_dict().items() if is_backbone_key(k)}
    given = {k: v for k, v in state.items() if is_backbone_key(k)}
    branch = [k for k in state if not is_backbone_key(k)]
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    wrong = {k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape)}
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = sorted(wrong)[0]
            parts.append(f"wrong shape {len(wrong)} (e.g. {k}: file {tuple(given[k].shape)}, "
                         f"model {tuple(expected[k].shape)}): {_names(wrong, 3)}")
        if missing:
            parts.append(f"missing {len(missing)}: {_names(missing, 3)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_names(unexpected, 3)}")
        looks = describe_shapes(state)
        fix = advice(fitting_settings(state)) if advice else ""
        lead = "; ".join(x for x in (fix, f"the file looks like a model with {looks}" if looks else "") if x)
        raise VegaError(f"checkpoint {path} does not fit this model: " + (f"{lead}. Entries: " if lead else "")
                        + "; ".join(parts))
    for k, v in given.items():
        if torch.is_floating_point(v) and not torch.isfinite(v).all():
            raise VegaError(f"checkpoint {path} has non-finite values in {k}")
    model.load_state_dict(given, strict=False)  # strictness checked above, on backbone keys
    if branch:
        log(f"note: ignoring {len(branch)} VEGA-branch entries in {path} (not used for predictions)")


# How an optimizer runs (chosen when it is built for a device and precision), as opposed to what it has learned.
RUNTIME_GROUP_KEYS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer, saved, path):
    """optimizer.load_state_dict that also works across optimizer implementations and devices.

    torch's load_state_dict takes every group option from the file, including how the optimizer runs: a file of
    ShadowAdam (CPU bf16 training) has no `fused`, so a fused AdamW resuming it on CUDA lost `fused` while
    GradScaler still passed it grad_scale/found_inf (an AssertionError at the first step). Here hyperparameters
    and moments come from the file; the runtime options stay this optimizer's, and each `step` counter goes where
    this optimizer keeps it (fused or capturable: on the parameter's device; otherwise on the CPU).
    """
    runtime = [{k: g[k] for k in RUNTIME_GROUP_KEYS if k in g} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, TypeError) as e:
        raise VegaError(f"{path}: its optimizer state does not fit this run's {type(optimizer).__name__} "
                        f"({str(e).splitlines()[0][:160]})") from None
    for group, keep in zip(optimizer.param_groups, runtime):
        group.update(keep)
        on_param_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(p.device if on_param_device else "cpu", torch.float32)


def describe_format(obj):
    """One phrase naming the layout of a loaded checkpoint, for the report."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        kind = "this project's resume file" if "model" in obj else "this project's best-epoch checkpoint"
        return f"{kind} (epoch {obj.get('epoch', obj.get('state', {}).get('epoch', '?'))})"
    if isinstance(obj, dict) and "state_dict" in obj:
        return "a dict with a 'state_dict' entry"
    return "a bare state_dict (the published format)"


def fitting_settings(state):
    """Config values a state_dict's shapes reveal: Dataset, hidden_dim, outlayer_num and whether the heads
    have dropout modules (`outlayer_dropout`). n_head, activations and dropout rates leave no trace in
    the shapes, so they cannot be recovered."""
    from vega_utils.data.datasets import DATASETS
    found = {}
    speakers, audio = state.get("speaker_embeddings.weight"), state.get("acouf_input.weight")
    if torch.is_tensor(speakers) and speakers.dim() == 2:
        found["hidden_dim"] = int(speakers.shape[1])
        for name, info in DATASETS.items():
            if (speakers.shape[0] == info.n_speakers + 1 and torch.is_tensor(audio) and audio.dim() == 3
                    and audio.shape[1] == info.audio_dim):
                found["Dataset"] = name
    # Module indices of the `all` head's linears: a step of 3 means Linear, activation, Dropout; 2, no Dropout.
    layers = sorted({int(k.split(".")[1]) for k in state
                     if k.startswith("all_output_layer.") and k.split(".")[1].isdigit()})
    if layers:
        found["outlayer_num"] = len(layers)
        if len(layers) > 1:
            found["outlayer_dropout"] = layers[1] - layers[0] == 3
    return found
