"""The one run configuration: a flat dataclass whose defaults live in configs/<Dataset>.json.

Flags only override what they name. The resolved config (with dataset sizes filled in) is saved in every
run folder and checkpoint, so a model can be rebuilt from a checkpoint alone.
"""
import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

from vega_utils.common import PROJECT_ROOT, VegaError, read_json
from vega_utils.data.datasets import dataset_arg, dataset_of

# The paper's ablations: each only sets flags (explicit flags still win); run.py --ablation NAME.
ABLATIONS = {
    "no_vega": {"clip_loss": False},                      # backbone only (SDT-style self-distillation)
    "no_cls_kl": {"cls_all_cls_kl_loss": False},          # no distillation between classifier heads
    "no_vega_kl": {"clip_all_clip_kl_loss": False},       # VEGA branch without its distillation
    "no_stochastic_anchors": {"rand": 0.0},               # always the class centres
}
AMP_CHOICES = ("auto", "off", "bf16", "fp16")
SAVE_LAST_CHOICES = ("every", "end", "never")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "leaky_relu", "elu", "none")
KNOWN_CLIP_DIMS = {
    "openai/clip-vit-base-patch32": 512, "openai/clip-vit-base-patch16": 512,
    "openai/clip-vit-large-patch14": 768, "openai/clip-vit-large-patch14-336": 768,
}


@dataclass
class Config:
    name: str
    seed: int
    Dataset: str
    num_workers: int
    epochs: int
    patience: int                      # early stop after this many epochs without a better F1
    batch_size: int
    scheduler: bool
    optimizer: str
    lr: float
    l2: float
    momentum: float                    # SGD only
    cls_lambda: float
    cls_all_lambda: float
    cls_t_lambda: float
    cls_a_lambda: float
    cls_v_lambda: float
    cls_all_cls_kl_lambda: float
    t_cls_all_cls_kl_lambda: float
    a_cls_all_cls_kl_lambda: float
    v_cls_all_cls_kl_lambda: float
    clip_lambda: float
    t_clip_lambda: float
    a_clip_lambda: float
    v_clip_lambda: float
    all_clip_lambda: float
    clip_all_clip_kl_lambda: float
    t_clip_all_clip_kl_lambda: float
    a_clip_all_clip_kl_lambda: float
    v_clip_all_clip_kl_lambda: float
    CLIP_Model: str
    clip_dim: Optional[int]
    clip_proj_layer_num: int
    clip_proj_activation_fn: str
    clip_proj_drop: float
    expr_img_folder: str
    rand: float
    hidden_dim: int
    n_head: int
    dropout: float
    outlayer_drop: float
    outlayer_num: int
    outlayer_activation_fn: str
    cls_loss: bool
    cls_all_cls_kl_loss: bool
    clip_loss: bool
    clip_all_clip_kl_loss: bool
    data_path: Optional[str]
    anchor_path: Optional[str]
    output_dir: str
    device: str
    amp: str
    valid_ratio: float
    # Evaluation precision, whatever training used: auto = float32 on the CPU, the reference's fp16 autocast on
    # CUDA. A default, so configs saved before it existed still load.
    eval_amp: str = "auto"
    # The paper's ablation this run is (run.py --ablation sets its flags), also part of the run folder's name.
    ablation: Optional[str] = None
    # Run folders are named like the reference's `[MMDD-HHMM]`; False drops the brackets (no shell quoting).
    folder_brackets: bool = True
    # stop after this many consecutive skipped training steps (non-finite loss or gradient;
    # vega_utils/runs/step_guard.py).
    # The default is for configs saved before the key existed; the presets set it too.
    max_bad_steps: int = 10
    # The fast package (fast/) swaps its modules and packed layout into model.py's plain VEGA; False runs the
    # plain model (the reference's padded computation, several times slower on the CPU; same float32 numbers).
    fast: bool = True
    # Capture the training step's forward + losses (and backward) with torch.compile (fast/capture.py): for
    # GPUs, where a step waits on kernel launches; slower than the default on the CPU.
    compile: bool = False
    threads: Optional[int] = None      # CPU threads; None: the cores this process may use (vega_utils/runs/threads.py)
    # each epoch's metrics as TensorBoard event files in the run folder (vega_utils/insight/live.py), when installed
    tensorboard: bool = True
    # When last.pth (what --resume needs) is written: after every epoch, only when the run ends or is interrupted,
    # or never (vega_utils/runs/run_folder.py; docs/run-folder.md has the sizes).
    save_last: str = "every"
    # Filled by resolve() from the dataset table; part of every saved config.
    text_dim: Optional[int] = None
    audio_dim: Optional[int] = None
    visual_dim: Optional[int] = None
    n_speakers: Optional[int] = None
    n_classes: Optional[int] = None
    # A dataset JSON's description as resolved (classes, speakers, sizes, label map); None for IEMOCAP/MELD.
    # Saved with the run, so its checkpoints are scored with the classes they were trained on.
    dataset_spec: Optional[dict] = None

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise VegaError(f"unknown config keys: {', '.join(unknown)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in d and f.default is dataclasses.MISSING)
        if missing:
            raise VegaError(f"config lacks keys: {', '.join(missing)}")
        return cls(**d)

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


def preset_path(dataset):
    return os.path.join(PROJECT_ROOT, "configs", f"{dataset}.json")


def load_preset(dataset, spec=None):
    """configs/<Dataset>.json; for a dataset JSON, the preset it names (default IEMOCAP) with its Dataset and
    name, and its description `spec` (a run's dataset_spec) when given instead of reading the file again."""
    info = dataset_of(dataset, spec)  # clear error for an unknown name, a bad file
    cfg = Config.from_dict(read_json(preset_path(info.preset), "preset"))
    return cfg if info.builtin else cfg.replace(Dataset=dataset, name=info.name, dataset_spec=spec)


def read_config_file(path):
    """A preset file (run.py --config; sweep.py writes the best trial's as one): {key: value} of config keys.
    Keys a run folder's config.json adds (git_commit, command, ...) are ignored; an unknown key is an error."""
    saved = read_json(path, "config file")
    if not isinstance(saved, dict):
        raise VegaError(f"config file {path} must hold a JSON object of config keys")
    keys = set(Config.__dataclass_fields__) - DERIVED
    unknown = sorted(set(saved) - keys - set(RUN_RECORD_KEYS) - DERIVED)
    if unknown:
        raise VegaError(f"config file {path}: unknown keys {', '.join(unknown)}")
    return {k: v for k, v in saved.items() if k in keys}


# What a run folder's config.json holds besides the settings (main.train_run): a run's config.json is a preset too.
RUN_RECORD_KEYS = ("git_commit", "torch_version", "resolved_device", "train_precision", "train_precision_reason",
                   "eval_precision", "resolved_threads", "class_weights", "command", "resumes", "sweep")


def clip_dim_for(model_name):
    """Feature width K of a CLIP model: a known hub name, or projection_dim of a local folder; else None."""
    if model_name in KNOWN_CLIP_DIMS:
        return KNOWN_CLIP_DIMS[model_name]
    cfg_file = os.path.join(model_name, "config.json")
    if os.path.isfile(cfg_file):
        try:
            with open(cfg_file) as f:
                return int(json.load(f)["projection_dim"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def resolve(cfg):
    """Fill derived values (dataset sizes, default paths, clip_dim) and check value ranges."""
    info = dataset_of(cfg.Dataset, cfg.dataset_spec)
    data_path = cfg.data_path or info.default_data_path
    if None in (info.text_dim, info.audio_dim, info.visual_dim, info.n_speakers):   # left to the data by a JSON
        if data_path is None:
            raise VegaError(f"dataset {cfg.Dataset} names no data file: give --data_path or 'data_path' in it")
        from vega_utils.data.dialogues import settle_from_data
        info = settle_from_data(info, data_path)
    cfg = cfg.replace(
        text_dim=info.text_dim, audio_dim=info.audio_dim, visual_dim=info.visual_dim,
        n_speakers=info.n_speakers, n_classes=len(info.class_names),
        dataset_spec=None if info.builtin else info.to_dict(), data_path=data_path,
        anchor_path=cfg.anchor_path or os.path.join("anchor", f"{cfg.expr_img_folder}_anchor.pt"),
        clip_dim=cfg.clip_dim or clip_dim_for(cfg.CLIP_Model),
    )
    check(cfg)
    return cfg


def check(cfg):
    def bad(msg):
        raise VegaError(f"invalid setting: {msg}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):   # a negative rate trains "uphill" until the loss overflows
        bad(f"lr {cfg.lr} must be a positive number")
    if not (math.isfinite(cfg.l2) and cfg.l2 >= 0):
        bad(f"l2 (weight decay) {cfg.l2} must be 0 or positive")
    if not 0.0 <= cfg.momentum < 1.0:
        bad(f"momentum {cfg.momentum} must be in [0, 1)")
    if cfg.hidden_dim <= 0 or cfg.n_head <= 0 or cfg.hidden_dim % cfg.n_head:
        bad(f"hidden_dim {cfg.hidden_dim} must be a positive multiple of n_head {cfg.n_head}")
    for key in ("dropout", "outlayer_drop", "clip_proj_drop"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            bad(f"{key} {getattr(cfg, key)} must be in [0, 1)")
    if not 0.0 <= cfg.rand <= 1.0:
        bad(f"rand {cfg.rand} must be in [0, 1]")
    if not 0.0 <= cfg.valid_ratio < 1.0:
        bad(f"valid_ratio {cfg.valid_ratio} must be in [0, 1)")
    for key in ("outlayer_num", "clip_proj_layer_num", "batch_size", "epochs", "patience", "max_bad_steps"):
        if getattr(cfg, key) < 1:
            bad(f"{key} must be at least 1")
    for key in ("outlayer_activation_fn", "clip_proj_activation_fn"):
        if getattr(cfg, key) not in ACTIVATIONS:
            bad(f"{key} {getattr(cfg, key)!r} is not one of {', '.join(ACTIVATIONS)}")
    if cfg.optimizer not in ("AdamW", "Adam", "SGD"):
        bad(f"optimizer {cfg.optimizer!r} is not one of AdamW, Adam, SGD")
    for key in ("amp", "eval_amp"):
        if getattr(cfg, key) not in AMP_CHOICES:
            bad(f"{key} {getattr(cfg, key)!r} is not one of {', '.join(AMP_CHOICES)}")
    if cfg.save_last not in SAVE_LAST_CHOICES:
        bad(f"save_last {cfg.save_last!r} is not one of {', '.join(SAVE_LAST_CHOICES)}")
    if cfg.ablation is not None and cfg.ablation not in ABLATIONS:
        bad(f"ablation {cfg.ablation!r} is not one of {', '.join(ABLATIONS)}")
    if cfg.clip_dim is not None and cfg.clip_dim < 1:
        bad("clip_dim must be positive")
    if cfg.threads is not None and cfg.threads < 1:
        bad(f"threads {cfg.threads} must be at least 1")


# ---------------------------------------------------------------- command-line flags
# Flags whose names differ from the config key (the reference's spelling).
FLAG_ALIASES = {"batch_size": ["--batch-size", "--batch_size"], "Dataset": ["--Dataset", "--dataset"],
                "lr": ["--lr", "--learning_rate"], "l2": ["--l2", "--weight_decay"]}
DERIVED = {"text_dim", "audio_dim", "visual_dim", "n_speakers", "n_classes", "dataset_spec"}


def add_config_flags(parser, skip=()):
    """One flag per config key, default SUPPRESS so only flags actually given reach the config; its help says
    what the key means and its preset default (vega_utils/runs/config_help.py)."""
    from vega_utils.runs.config_help import config_help, preset_default
    group = parser.add_argument_group("settings (defaults: configs/<Dataset>.json; a flag overrides only its key)")
    for f in dataclasses.fields(Config):
        if f.name in DERIVED or f.name in skip:
            continue
        flags = FLAG_ALIASES.get(f.name, [f"--{f.name}"])
        helped = config_help(f.name, f"preset default: {preset_default(f.name)}")
        if f.type is bool:
            group.add_argument(*flags, dest=f.name, action="store_true", default=argparse.SUPPRESS, help=helped)
            group.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", default=argparse.SUPPRESS,
                               help=f"turn {flags[0]} off")
            continue
        # Optional[int] and friends: the first type argument
        kind = f.type if f.type in (int, float, str) else f.type.__args__[0]
        choices = None
        if f.name == "Dataset":
            kind = dataset_arg
        elif f.name in ("outlayer_activation_fn", "clip_proj_activation_fn"):
            choices = list(ACTIVATIONS)
        elif f.name == "optimizer":
            choices = ["AdamW", "Adam", "SGD"]
        elif f.name in ("amp", "eval_amp"):
            choices = list(AMP_CHOICES)
        elif f.name == "save_last":
            choices = list(SAVE_LAST_CHOICES)
        group.add_argument(*flags, dest=f.name, type=kind, choices=choices, default=argparse.SUPPRESS, help=helped)
    return parser


def config_from_args(args, skip=()):
    """Preset of --Dataset (default IEMOCAP) updated with the config flags that were given."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
             if f.name not in skip and hasattr(args, f.name)}
    cfg = load_preset(given.get("Dataset", "IEMOCAP"))
    return resolve(cfg.replace(**given))
