"""model.py is the truth: an edit to a plain layer that fast/ replaces takes effect in the default (fast) model,
because fast.accelerate leaves that layer plain and says so; subclasses are never swapped."""
import copy

import pytest
import torch
from test_parity import fixture_setup

import fast
import main
import model as model_py
from fast import fingerprint, layers


def scaled_forward(self, x):
    """The plain feed-forward with its residual branch scaled, as a researcher might try."""
    inter = self.dropout_1(model_py.gelu_tanh(self.w_1(self.layer_norm(x))))
    return 0.5 * self.dropout_2(self.w_2(inter)) + x


@pytest.fixture
def setup():
    fast._told.clear()
    yield fixture_setup("iemocap")
    fast._told.clear()


def outputs(net, batch, anchors):
    with torch.no_grad():
        return net(batch, anchors)["all_logit"]


def test_patched_forward_takes_effect_in_the_default_model(setup, monkeypatch, capsys):
    fx, cfg, plain, batch, anchors, _ = setup
    before = outputs(plain, batch, anchors)
    monkeypatch.setattr(model_py.PositionwiseFeedForward, "forward", scaled_forward)
    expected = outputs(plain, batch, anchors)                      # the plain model with the edit
    assert (expected - before).abs().max() > 1e-3                  # the edit changes the numbers

    built = main.build_model(cfg.replace(fast=True))               # what a default run builds
    built.load_state_dict(plain.state_dict())
    built.eval()
    got = outputs(built, batch, anchors)
    valid = ~batch.pad_mask
    assert torch.allclose(got[valid], expected[valid], atol=1e-5), "the default model ignored model.py's edit"
    kinds = {type(m) for m in built.modules()}
    assert model_py.PositionwiseFeedForward in kinds and layers.FastFeedForward not in kinds
    assert layers.FastLinear in kinds and layers.FastVEGA in kinds   # every other module still fast
    err = capsys.readouterr().err
    assert err.count("PositionwiseFeedForward.forward in model.py differs") == 1 and "stays plain" in err
    main.build_model(cfg.replace(fast=True))
    assert "differs" not in capsys.readouterr().err                # said once


def test_changed_layout_leaves_the_whole_model_plain(setup, monkeypatch, capsys):
    fx, cfg, plain, batch, anchors, _ = setup
    monkeypatch.setattr(model_py.VEGA, "layout", lambda self, pad_mask, device=None: model_py.PaddedLayout(pad_mask))
    built = fast.accelerate(copy.deepcopy(plain))
    assert not any(type(m).__name__.startswith("Fast") for m in built.modules())
    assert "nothing is accelerated" in capsys.readouterr().err


def test_subclass_of_a_plain_layer_is_not_swapped(setup):
    fx, cfg, plain, batch, anchors, _ = setup

    class Scaled(model_py.PositionwiseFeedForward):
        forward = scaled_forward

    edited = copy.deepcopy(plain)
    for m in edited.modules():
        if type(m) is model_py.PositionwiseFeedForward:
            m.__class__ = Scaled
    expected = outputs(edited, batch, anchors)
    built = fast.accelerate(edited)
    assert Scaled in {type(m) for m in built.modules()}
    valid = ~batch.pad_mask
    assert torch.allclose(outputs(built, batch, anchors)[valid], expected[valid], atol=1e-5)


def test_fingerprint_ignores_comments_and_layout_not_code():
    def a(self, x):
        """One docstring."""
        return x + 1   # a comment

    def b(self, x):
        return (x
                + 1)

    def c(self, x):
        return x + 2

    assert fingerprint.code_hash(a) == fingerprint.code_hash(b) != fingerprint.code_hash(c)
    assert fingerprint.code_hash(lambda self, x: x) is None        # unreadable code never matches


def test_model_py_as_shipped_is_fully_accelerated(setup):
    fx, cfg, plain, *_ = setup
    for plain_cls, fast_cls in layers.SWAPS.items():
        assert fingerprint.differences(plain_cls, fast_cls) == [], plain_cls
