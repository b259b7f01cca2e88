"""The speed path: plugs into model.py's plain VEGA, which never imports it.

    from fast import accelerate
    model = accelerate(VEGA(cfg))   # same parameters and names; faster modules and the packed layout

`accelerate` walks the module tree and swaps each plain module for its faster version (layers.SWAPS), the way
timm swaps layers: the module object stays, with its parameters, buffers and hooks; only its class (its forward)
changes. The rooms:
- layers.py: the faster modules;
- layout.py: packed rows of the valid utterances and attention grids of similar-length dialogues;
- cpu_kernels.py / cpu_kernels.c: the one-pass C kernels (dropout, activation + dropout, the gate, row scatter,
  the optimizer step), compiled at first use;
- shadow_weights.py: ShadowAdam, the optimizer that keeps bf16 copies of the weights for CPU bf16 training.
In float32 the accelerated model matches the reference to the parity tolerance (tests/test_parity.py), as the
plain model does.
"""
from . import cpu_kernels  # noqa: F401
from .layers import SWAPS, FastVEGA
from .shadow_weights import ShadowAdam  # noqa: F401  (the optimizer half of the speed path)


def accelerate(model):
    """Swap model's modules for their faster versions, in place; returns the model."""
    for module in model.modules():
        fast = SWAPS.get(type(module))
        if fast is not None and getattr(fast, "accepts", lambda m: True)(module):
            module.__class__ = fast
    return model


def is_accelerated(model):
    return isinstance(model, FastVEGA)
