"""A sweep's search space: which config keys a trial draws, from a JSON file (configs/sweep_space.json).

    {"lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": true},
     "hidden_dim": {"type": "categorical", "choices": [256, 512, 768]}, ...}

Types: float (low, high, optional log or step), int (low, high, optional log or step), categorical (choices).
A key fixed on the sweep's command line (its flag, or set by --ablation, --demo or --config) is not drawn:
that value holds for every trial.
"""

from vega_utils.common import VegaError, read_json

TYPES = {"float": ("low", "high"), "int": ("low", "high"), "categorical": ("choices",)}
OPTIONAL = {"float": ("log", "step"), "int": ("log", "step"), "categorical": ()}


def load_space(path):
    """The space as {key: spec}, checked against the config's keys; one-line errors naming the file."""
    from vega_utils.runs.config import DERIVED, Config
    space = read_json(path, "search space")
    if not isinstance(space, dict) or not space:
        raise VegaError(f"search space {path} must be a non-empty JSON object of config keys")
    keys = set(Config.__dataclass_fields__) - DERIVED
    for key, spec in space.items():
        where = f"search space {path}, key {key!r}"
        if key.startswith("_"):   # "_comment" and friends: documentation inside the file
            continue
        if key not in keys:
            raise VegaError(f"{where}: not a config key (see configs/IEMOCAP.json)")
        if not isinstance(spec, dict) or spec.get("type") not in TYPES:
            raise VegaError(f"{where}: needs \"type\": one of {', '.join(TYPES)}")
        kind = spec["type"]
        missing = [k for k in TYPES[kind] if k not in spec]
        unknown = sorted(set(spec) - {"type", *TYPES[kind], *OPTIONAL[kind]})
        if missing or unknown:
            raise VegaError(f"{where}: " + (f"lacks {', '.join(missing)}" if missing else
                                            f"unknown entries {', '.join(unknown)}"))
        if kind == "categorical":
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise VegaError(f"{where}: choices must be a non-empty list")
        elif not spec["low"] < spec["high"]:
            raise VegaError(f"{where}: low {spec['low']} must be below high {spec['high']}")
        elif spec.get("log") and spec["low"] <= 0:
            raise VegaError(f"{where}: a log range needs low > 0")
    return {k: v for k, v in space.items() if not k.startswith("_")}


def suggest(trial, space, fixed=()):
    """Draw the trial's settings: {key: value} for every key of the space not in `fixed`."""
    params = {}
    for key, spec in space.items():
        if key in fixed:
            continue
        kind = spec["type"]
        if kind == "categorical":
            params[key] = trial.suggest_categorical(key, spec["choices"])
        elif kind == "int":
            params[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), step=spec.get("step", 1),
                                            log=spec.get("log", False))
        else:
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]),
                                              step=spec.get("step"), log=spec.get("log", False))
    return params
