"""The speed path: plugs into model.py's plain VEGA, which never imports it.

    from fast import accelerate
    model = accelerate(VEGA(cfg))   # same parameters and names; faster modules and the packed layout

`accelerate` walks the module tree and swaps each plain module for its faster version (layers.SWAPS), the way
timm swaps layers: the module object stays, with its parameters, buffers and hooks; only its class (its forward)
changes. The modules:
- layers.py: the faster modules;
- layout.py: packed rows of the valid utterances and attention grids of similar-length dialogues;
- cpu_kernels.py / cpu_kernels.c: the one-pass C kernels (dropout, activation + dropout, the gate, row scatter,
  the optimizer step), compiled at first use;
- shadow_weights.py: ShadowAdam, the optimizer that keeps bf16 copies of the weights for CPU bf16 training.
In float32 the accelerated model matches the reference to the parity tolerance (tests/test_parity.py), as the
plain model does.
"""
import sys

from model import VEGA as VEGA_CLASS

from . import cpu_kernels, fingerprint  # noqa: F401
from .layers import SWAPS, FastVEGA
from .shadow_weights import ShadowAdam  # noqa: F401  (the optimizer half of the speed path)


def accelerate(model):
    """Swap model's modules for their faster versions, in place; returns the model.

    model.py is the truth: a plain class whose code a fast version stands in for has changed since that version
    was written (fingerprint.py) stays plain, and this says so once; if that class is VEGA itself, nothing is
    swapped (the fast modules expect the packed layout). A subclass of a plain layer is never swapped."""
    if unchanged(type(model)) is False:
        return model
    for module in model.modules():
        fast = SWAPS.get(type(module))
        if fast is not None and getattr(fast, "accepts", lambda m: True)(module) and unchanged(type(module)):
            module.__class__ = fast
    return model


_told = set()   # plain classes already named in a message


def unchanged(plain):
    """True when the plain class still has the code its fast version was written against (None: no fast version)."""
    fast = SWAPS.get(plain)
    if fast is None:
        return None
    changed = fingerprint.differences(plain, fast)
    if changed and plain not in _told:
        _told.add(plain)
        where = ", ".join(f"{plain.__name__}.{n}" if hasattr(plain, n) else n for n in changed)
        rest = "nothing is accelerated (the fast modules need FastVEGA's packed layout)" if plain is VEGA_CLASS \
            else "every other module is still fast"
        print(f"note: {where} in model.py differs from the code {fast.__name__} (fast/layers.py) was written "
              f"against, so {plain.__name__} stays plain and your change takes effect; {rest}. To make the change "
              f"fast too, update {fast.__name__} and its fingerprint (python -m fast.fingerprint).", file=sys.stderr)
    return not changed


def is_accelerated(model):
    return isinstance(model, FastVEGA)
