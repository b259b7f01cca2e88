"""fast/layout.py: packed rows and length-grouped attention grids give the padded computation's numbers."""
import copy
import itertools
import random

import pytest
import torch

from fast import accelerate, layers
from fast.layout import KEY_BUCKET, ROW_BUCKET, group_by_length, make_layout, round_up
from model import VEGA, PaddedLayout
from vega_utils.runs.config import load_preset, resolve


def grid_cost(groups, lengths, fixed):
    return sum(len(g) * round_up(max(lengths[d] for d in g), KEY_BUCKET) ** 2 + fixed for g in groups)


def test_grouping_is_optimal():
    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 110) for _ in range(rng.randint(1, 8))]
        fixed = rng.choice([0, 3000, 12000, 10 ** 9])
        groups = group_by_length(lengths, fixed)
        assert sorted(d for g in groups for d in g) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        brute = min(grid_cost([order[a:b] for a, b in zip((0,) + cuts, cuts + (len(order),))], lengths, fixed)
                    for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k))
        assert grid_cost(groups, lengths, fixed) == pytest.approx(brute)
    assert len(group_by_length([110, 100, 9, 8, 10], 12000)) == 2   # long and short dialogues apart
    assert len(group_by_length([110, 100, 9, 8, 10], 10 ** 9)) == 1


def random_pad_mask(rng, B, L, suffix=True):
    mask = torch.ones(B, L, dtype=torch.bool)
    for b in range(B):
        n = rng.randint(1, L)
        if suffix:
            mask[b, :n] = False
        else:
            mask[b, torch.randperm(L)[:n]] = False
    if suffix:
        mask[0, :] = False   # one dialogue as long as the batch
    return mask


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("suffix", [True, False])
def test_layout_places_every_utterance_once(grouped, suffix):
    rng = random.Random(1)
    torch.manual_seed(1)
    for B, L in [(1, 8), (9, 110), (31, 112), (5, 3)]:
        pad = random_pad_mask(rng, B, L, suffix)
        lay = make_layout(pad, grouped=grouped)
        n_valid = int((~pad).sum())
        assert lay.n_rows >= n_valid and (not grouped or lay.n_rows == round_up(n_valid, ROW_BUCKET))
        # rows -> (dialogue, position) through the grids; the first N rows are the valid utterances in order
        owners = torch.cat([grid_members(lay, pad, g) for g in lay.grids])
        positions = torch.cat([g.positions for g in lay.grids])
        assert [g.rows.start for g in lay.grids] == [0] + [g.rows.stop for g in lay.grids[:-1]]
        assert lay.grids[-1].rows.stop == lay.n_rows
        assert torch.equal(owners[:n_valid] * L + positions[:n_valid], lay.valid)
        assert torch.equal(positions, lay.positions)
        for g in lay.grids:   # valid rows at valid positions, spare rows at padding positions of their grid
            sub = g.key_pad[g.slot, g.positions]
            n_g = (g.rows.stop - g.rows.start) - int(sub.sum())
            assert not sub[:n_g].any() and sub[n_g:].all()
        x = torch.randn(B, L, 3)
        back = lay.to_padded(lay.to_rows(x))
        assert torch.equal(back[~pad], x[~pad]) and not back[pad].any()


def grid_members(lay, pad, grid):
    """The batch dialogue of each row of a grid, recovered from the layout's valid indices."""
    L = pad.shape[1]
    n_valid = lay.valid.shape[0]
    rows = torch.arange(grid.rows.start, grid.rows.stop)
    owner = torch.full((rows.shape[0],), -1)
    is_valid = rows < n_valid
    owner[is_valid] = lay.valid[rows[is_valid]] // L
    slot_owner = {}
    for s, o in zip(grid.slot[is_valid].tolist(), owner[is_valid].tolist()):
        assert slot_owner.setdefault(s, o) == o       # one dialogue per slot
    owner[~is_valid] = torch.tensor([slot_owner.get(s, -1) for s in grid.slot[~is_valid].tolist()],
                                    dtype=torch.long)
    return owner


def small_model():
    cfg = resolve(load_preset("IEMOCAP").replace(hidden_dim=64, n_head=4, clip_dim=16))
    torch.manual_seed(0)
    return cfg, VEGA(cfg).eval()


def make_batch(cfg, lengths):
    from dataloader import Batch
    B, L = len(lengths), max(lengths)
    pad = torch.ones(B, L, dtype=torch.bool)
    for b, n in enumerate(lengths):
        pad[b, :n] = False
    g = torch.Generator().manual_seed(2)
    feats = {k: torch.randn(B, L, d, generator=g) * (~pad)[..., None]
             for k, d in (("text", cfg.text_dim), ("audio", cfg.audio_dim), ("visual", cfg.visual_dim))}
    speakers = torch.where(pad, cfg.n_speakers, torch.randint(0, cfg.n_speakers, (B, L), generator=g))
    return Batch(**feats, speakers=speakers, pad_mask=pad, labels=torch.where(pad, -1, 0), dialogue_ids=list(range(B)))


def test_grouped_grids_compute_the_padded_numbers(monkeypatch):
    """Float32 through several length-grouped grids: outputs and gradients equal the padded computation."""
    cfg, model = small_model()
    fast = accelerate(copy.deepcopy(model))
    batch = make_batch(cfg, [110, 9, 100, 20, 8, 57])
    anchors = torch.nn.functional.normalize(torch.randn(cfg.n_classes, cfg.clip_dim), dim=-1)
    ref = model(batch, anchors)                                   # model.py's padded computation
    calls = []

    def grouped_layout(pad_mask, grouped, max_position=None):
        lay = make_layout(pad_mask, grouped=True, max_position=max_position)
        calls.append(len(lay.grids))
        return lay

    monkeypatch.setattr(layers, "make_layout", grouped_layout)
    out = fast(batch, anchors)
    assert calls and calls[0] >= 2
    valid = ~batch.pad_mask
    for k in ("all_logit", "t_logit", "all_clip_logit", "all_transformer_out"):
        torch.testing.assert_close(out[k][valid], ref[k][valid], rtol=1e-5, atol=1e-5)
    grads = {}
    for name, o, net in (("ref", ref, model), ("grouped", out, fast)):
        net.zero_grad()
        (o["all_logit"][valid].square().sum() + o["v_clip_logit"][valid].sum()).backward()
        grads[name] = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    scale = max(g.abs().max() for g in grads["ref"].values())
    for n, g in grads["ref"].items():
        # relative to the largest gradient entry: some are zero but for rounding (a key bias shifts every score)
        err = (grads["grouped"][n] - g).abs().max() / max(g.abs().max(), 1e-3 * scale)
        assert err < 1e-5, (n, err.item())


def test_padded_layout_grid_is_the_batch():
    pad = random_pad_mask(random.Random(3), 9, 110)
    lay, x = PaddedLayout(pad), torch.randn(9 * 110, 32)
    (grid,) = lay.to_grids(x, 4)
    assert grid.shape == (9, 4, 110, 8) and torch.equal(grid[2, 1, 5], x[2 * 110 + 5, 8:16])
    assert torch.equal(lay.from_grids([grid]), x) and torch.equal(lay.key_pads[0], pad)


@pytest.mark.parametrize("kind", ["packed", "grouped"])
def test_rows_to_grids_and_back(kind):
    """to_grids puts each row at its (slot, position) of its grid, zeros elsewhere; from_grids reads them back."""
    rng = random.Random(3)
    pad = random_pad_mask(rng, 9, 110)
    lay = make_layout(pad, grouped=kind == "grouped")
    h, H = 4, 32
    for contiguous in (True, False):
        for scratch in (None, "q"):
            for _ in range(2):   # a reused scratch buffer must give the same as a fresh one the second time too
                x = torch.randn(lay.n_rows, H)
                with torch.no_grad():
                    blocks = lay.to_grids(x, h, contiguous=contiguous, scratch=scratch)
                assert len(blocks) == len(lay.grids)
                for block, g in zip(blocks, lay.grids):
                    Bg, Lg = g.key_pad.shape
                    assert block.shape == (Bg, h, Lg, H // h) and block.is_contiguous() == contiguous
                    expected = torch.zeros(Bg, Lg, H)
                    expected[g.slot, g.positions] = x[g.rows]
                    assert torch.equal(block.transpose(1, 2).reshape(Bg, Lg, H), expected)
                assert torch.equal(lay.from_grids(blocks), x)
                assert torch.equal(lay.from_grids([b.contiguous() for b in blocks]), x)


def test_fused_evaluation_attention_matches_the_plain_one():
    """bf16 evaluation takes the fused attention on reused grid buffers; with gradients on, the same model and
    layout take the plain batched-matmul path. Both compute the same numbers up to bf16 rounding."""
    cfg, model = small_model()
    model = accelerate(model)
    batch = make_batch(cfg, [110, 9, 100, 20, 8, 57])
    valid = ~batch.pad_mask
    outs = {}
    for name, grad in (("fused", False), ("plain", True)):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            outs[name] = model(batch)["all_logit"][valid].float().detach()
    ref = model(batch)["all_logit"][valid]   # float32
    assert (outs["fused"] - outs["plain"]).abs().max() < 0.02 * ref.abs().max()   # attending to padding: 0.03
    assert (outs["fused"] - ref).abs().max() < 0.02 * ref.abs().max()
