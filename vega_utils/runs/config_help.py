"""What each config key means, in one line, for the --help of every command that takes config flags (run.py,
sweep.py, inference.py), with the preset default of configs/IEMOCAP.json and configs/MELD.json.

configs/README.md says more about the keys whose value `null` means "derive it".
"""
import os
from functools import lru_cache

from vega_utils.common import PROJECT_ROOT, read_json

PRESETS = ("IEMOCAP", "MELD")
_HEADS = {"t": "text", "a": "audio", "v": "visual"}

CONFIG_HELP = {
    "name": "run name: run folders go to <output_dir>/<name>/",
    "seed": "random seed of the run (weights, batches, anchor draws)",
    "Dataset": "IEMOCAP, MELD, or the path of a dataset JSON (docs/own-data.md)",
    "num_workers": "DataLoader worker processes (0: load batches in the main process)",
    "epochs": "most epochs to train",
    "patience": "stop early after this many epochs without a better F1",
    "batch_size": "dialogues per batch",
    "scheduler": "cosine learning-rate decay with a 1 percent warm-up, stepped every batch",
    "optimizer": "AdamW, Adam or SGD",
    "lr": "learning rate",
    "l2": "weight decay (AdamW's decoupled decay, L2 for Adam and SGD)",
    "momentum": "SGD momentum (SGD only)",
    "cls_lambda": "weight of the classification losses (cls_*_lambda below) in the total loss",
    "cls_all_lambda": "weight of the fused head's classification loss",
    **{f"cls_{m}_lambda": f"weight of the {name} head's classification loss" for m, name in _HEADS.items()},
    "cls_all_cls_kl_lambda": "weight of the heads' distillation from the fused head in the total loss",
    **{f"{m}_cls_all_cls_kl_lambda": f"weight of the {name} head's distillation from the fused head"
       for m, name in _HEADS.items()},
    "clip_lambda": "weight of the VEGA branch's anchor losses (*_clip_lambda below) in the total loss",
    **{f"{m}_clip_lambda": f"weight of the {name} VEGA head's anchor loss" for m, name in _HEADS.items()},
    "all_clip_lambda": "weight of the fused VEGA head's anchor loss",
    "clip_all_clip_kl_lambda": "weight of the VEGA heads' distillation from the fused VEGA head in the total loss",
    **{f"{m}_clip_all_clip_kl_lambda": f"weight of the {name} VEGA head's distillation from the fused VEGA head"
       for m, name in _HEADS.items()},
    "CLIP_Model": "CLIP model of the anchor images: hub name or save_pretrained folder",
    "clip_dim": "CLIP feature width; unset: from --CLIP_Model (512 base, 768 large) or the anchor cache",
    "clip_proj_layer_num": "layers of the projections into CLIP space",
    "clip_proj_activation_fn": "activation of the projections into CLIP space",
    "clip_proj_drop": "dropout of the projections into CLIP space",
    "expr_img_folder": "anchor image folder (the anchor cache is anchor/<expr_img_folder>_anchor.pt)",
    "rand": "probability that a training step draws one anchor image per class instead of the class centres",
    "hidden_dim": "model width (a multiple of n_head)",
    "n_head": "attention heads",
    "dropout": "dropout of the fusion layers",
    "outlayer_drop": "dropout between the output layers of the classifier heads",
    "outlayer_num": "layers of each classifier head",
    "outlayer_activation_fn": "activation between the output layers of the classifier heads",
    "cls_loss": "the classification losses of the heads (cls_lambda's term of the total loss)",
    "cls_all_cls_kl_loss": "the heads' distillation from the fused head (cls_all_cls_kl_lambda's term)",
    "clip_loss": "the VEGA branch: the heads' anchor losses against CLIP features of emotion images",
    "clip_all_clip_kl_loss": "the VEGA heads' distillation from the fused VEGA head (needs clip_loss)",
    "data_path": "feature file, .pkl or .npz; unset: data/IEMOCAP.pkl, data/meld.pkl or the dataset JSON's",
    "anchor_path": "anchor cache; unset: anchor/<expr_img_folder>_anchor.pt",
    "output_dir": "where run folders go",
    "save_last": "when last.pth (everything --resume needs) is written: every epoch, only at the end or on an "
                 "interrupt, or never; a finished run's last.pth drops the optimizer state",
    "device": "auto, cpu, cuda or cuda:N (auto: cuda when available)",
    "amp": "training precision: auto = bf16 autocast on a CPU with native bf16 (AVX512-BF16, AMX, Arm BF16), "
           "float32 on other CPUs, fp16 autocast on CUDA; off = float32; bf16 forces it (slow where emulated)",
    "valid_ratio": "share of training dialogues held out to select the best epoch (0: select on the test set)",
    "eval_amp": "evaluation precision: auto = float32 on the CPU, fp16 autocast on CUDA; off = float32",
    "ablation": "the paper's ablation this run is (it sets other flags)",
    "folder_brackets": "brackets in run folder and checkpoint names, as the reference's "
                       "([MMDD-HHMM], BEST_cls_f1_[F1]_...); --no_folder_brackets: no shell quoting needed",
    "max_bad_steps": "stop after this many consecutive skipped training steps (non-finite loss or gradient)",
    "fast": "the fast package's modules and packed layout (--no_fast: model.py's plain, padded computation)",
    "compile": "capture the training step with torch.compile (for GPUs; slower on the CPU)",
    "threads": "CPU threads; unset: the cores this process may use",
    "tensorboard": "write each epoch's metrics as TensorBoard event files in the run folder",
}


@lru_cache(maxsize=1)
def _presets():
    return {d: read_json(os.path.join(PROJECT_ROOT, "configs", f"{d}.json"), "preset") for d in PRESETS}


def _shown(value):
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def preset_default(key, presets=None):
    """The preset value of `key` as help shows it: `0.53`, or `0.0001 (IEMOCAP), 0.00005 (MELD)` when they differ.
    presets: {dataset: its preset dict} (default: configs/IEMOCAP.json and configs/MELD.json)."""
    presets = presets or _presets()
    if key == "Dataset":
        return "IEMOCAP"
    if key == "name":
        return "the dataset's name"
    values = {d: p.get(key) for d, p in presets.items()}
    if len({repr(v) for v in values.values()}) == 1:
        return _shown(next(iter(values.values())))
    return ", ".join(f"{_shown(v)} ({d})" for d, v in values.items())


def config_help(key, default_text):
    """The help line of a config key's flag, `%` escaped for argparse."""
    return f"{CONFIG_HELP[key]} ({default_text})".replace("%", "%%")
