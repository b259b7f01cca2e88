"""Where the computed rows of a batch sit: packed rows for the per-utterance layers, grids for attention.

Every layer but attention works per utterance, so the model computes the N valid utterances of a batch as rows
(R, H), R = N plus a few spare rows. Attention needs each dialogue's utterances side by side: a grid
(Bg, h, Lg, dh) of some dialogues padded to a common length Lg. pad_mask convention everywhere: True = padding.

Three layouts, built by `make_layout` once per forward pass and passed to every encoder:
- padded (compute_padding=True): every position of the (B, L) batch is a row, one grid; the reference's computation.
- packed, float32: the valid rows (and spare rows at padding positions), one grid of all B dialogues at length L.
  Keeping the reference's grid keeps the softmax sums in the same order (parity to 1e-6).
- packed, lower precision (autocast): rows rounded up to a multiple of ROW_BUCKET and grids of dialogues of
  similar length. oneDNN builds a kernel for every new matrix shape (about 1 ms each), so rounding keeps the
  shapes few; grouping dialogues by length shrinks the attention work, which grows with Lg^2 for every dialogue
  of a grid (lengths 8-110 in one batch wasted about half of it).
Spare rows sit at padding positions of one grid: masked as keys, never read as outputs.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROW_BUCKET, KEY_BUCKET = 64, 16  # packed rows and attention grid lengths are rounded up to multiples of these
GRID_COST = 12000  # fixed cost of one more grid, in units of (one dialogue x Lg^2): ~20 extra small ops/encoder


def round_up(n, k):
    return -(-n // k) * k


@dataclass
class Grid:
    """One attention grid: Bg dialogues padded to length Lg, holding the rows `rows` of the row order."""
    rows: slice
    slot: torch.Tensor        # (R_g,) dialogue slot (0..Bg-1) of each of its rows
    positions: torch.Tensor   # (R_g,) position of each row in the grid (= utterance index for a valid row)
    key_pad: torch.Tensor     # (Bg, Lg) bool, True = padding: keys the attention must ignore
    dense: bool = False       # rows are exactly the grid positions in (Bg, Lg) order (the padded layout)

    def to_heads(self, x, h, contiguous=True):
        """Its rows (R_g, H) -> (Bg, h, Lg, H/h), zeros where no row sits.

        contiguous: scattered straight into that layout, as batched matmuls want it (a transposed view would
        cost them a copy). Otherwise rows are copied whole into (Bg, Lg, H) and a transposed view is returned,
        which the fused attention takes as it is (a third faster than the scatter).
        """
        Bg, Lg = self.key_pad.shape
        if self.dense:
            x = x.view(Bg, Lg, h, -1).transpose(1, 2)
            return x.contiguous() if contiguous else x
        if not contiguous:
            out = x.new_zeros(Bg * Lg, x.shape[-1]).index_copy_(0, self.slot * Lg + self.positions, x)
            return out.view(Bg, Lg, h, -1).transpose(1, 2)
        x = x.view(x.shape[0], h, -1)                                              # (R_g, h, dh)
        out = x.new_zeros(Bg, h, Lg, x.shape[-1])
        out[self.slot, :, self.positions] = x
        return out

    def from_heads(self, x):
        """(Bg, h, Lg, dh) -> its rows (R_g, h*dh)."""
        Bg, h, Lg, dh = x.shape
        if self.dense:
            return x.transpose(1, 2).reshape(Bg * Lg, h * dh)
        if x.transpose(1, 2).is_contiguous():   # stored as (Bg, Lg, h, dh): whole rows, one index_select
            return x.transpose(1, 2).reshape(Bg * Lg, h * dh).index_select(0, self.slot * Lg + self.positions)
        return x[self.slot, :, self.positions].flatten(1)                         # (R_g, h, dh) -> (R_g, H)


@dataclass
class Layout:
    valid: torch.Tensor       # (N,) flat indices into B*L of the valid utterances, in row order; None = padded
    positions: torch.Tensor   # (R,) utterance position of every row (spare rows: their grid position)
    grids: list               # [Grid], their rows covering 0..R-1 in order
    B: int
    L: int

    @property
    def n_rows(self):
        return self.positions.shape[0]

    def to_rows(self, x, fill=0):
        """(B, L, ...) -> (R, ...); spare rows hold `fill`."""
        x = x.flatten(0, 1)
        if self.valid is None:
            return x
        spare = self.n_rows - self.valid.shape[0]
        return torch.cat([x.index_select(0, self.valid), x.new_full((spare,) + x.shape[1:], fill)])

    def to_padded(self, x):
        """(R, ...) -> (B, L, ...), zeros at positions not computed."""
        if self.valid is not None:
            n = self.valid.shape[0]
            x = x.new_zeros((self.B * self.L,) + x.shape[1:]).index_copy(0, self.valid, x[:n])
        return x.view(self.B, self.L, *x.shape[1:])


def group_by_length(lengths, grid_cost=GRID_COST):
    """Split dialogues into grids of similar length: minimise sum over grids of (Bg * Lg^2 + grid_cost).

    lengths: list of ints (each dialogue's extent). Returns lists of dialogue indices, longest first. Dynamic programming over the
    dialogues sorted by length (an optimal grouping of sorted items is contiguous).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)    # best[j]: cost of the first j dialogues
    for j in range(1, n + 1):
        for i in range(j):   # grid = order[i:j], its longest is order[i]
            cost = best[i] + (j - i) * round_up(lengths[order[i]], KEY_BUCKET) ** 2 + grid_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def make_layout(pad_mask, compute_padding, grouped):
    """pad_mask (B, L) bool, True = padding. grouped: lower precision (several grids, rounded shapes)."""
    B, L = pad_mask.shape
    device = pad_mask.device
    if compute_padding:
        flat = torch.arange(B * L, device=device)
        grid = Grid(slice(0, B * L), flat // L, flat % L, pad_mask, dense=True)
        return Layout(valid=None, positions=flat % L, grids=[grid], B=B, L=L)
    valid_mask = ~pad_mask
    n_valid = int(valid_mask.sum())
    if not grouped:   # float32: the reference's single grid; spare rows at its first padding positions
        n_rows = min(round_up(n_valid, ROW_BUCKET), B * L)
        valid = valid_mask.flatten().nonzero().squeeze(1)                          # (N,)
        spare = pad_mask.flatten().nonzero().squeeze(1)[:n_rows - n_valid]
        flat = torch.cat([valid, spare])                                           # (R,) flat into B*L
        grid = Grid(slice(0, n_rows), flat // L, flat % L, pad_mask)
        return Layout(valid=valid, positions=flat % L, grids=[grid], B=B, L=L)

    counts = valid_mask.sum(1).tolist()                                            # valid utterances
    # extent: last valid position + 1 (= the count when padding is at the end, as collate makes it)
    extents = (valid_mask * torch.arange(1, L + 1, device=device)).amax(1).tolist()
    groups = group_by_length(extents)
    n_rows = round_up(n_valid, ROW_BUCKET)
    spare = n_rows - n_valid
    # the grid with the most free positions hosts the spare rows (made long enough), and goes last in row order
    free = [len(g) * round_up(extents[g[0]], KEY_BUCKET) - sum(counts[d] for d in g) for g in groups]
    host = max(range(len(groups)), key=lambda i: free[i])
    groups.append(groups.pop(host))
    valid_parts, pos_parts, grids, start = [], [], [], 0
    for gi, members in enumerate(groups):
        idx = torch.tensor(members, device=device)
        sub_valid = valid_mask.index_select(0, idx)                                # (Bg, L)
        need = sum(counts[d] for d in members) + (spare if gi == len(groups) - 1 else 0)
        Lg = round_up(max(extents[members[0]], -(-need // len(members))), KEY_BUCKET)
        key_pad = F.pad(~sub_valid, (0, max(Lg - L, 0)), value=True)[:, :Lg]       # (Bg, Lg)
        slot_pos = sub_valid.nonzero()                                             # (N_g, 2): slot, position
        valid_parts.append(idx[slot_pos[:, 0]] * L + slot_pos[:, 1])
        if gi == len(groups) - 1 and spare:
            slot_pos = torch.cat([slot_pos, key_pad.nonzero()[:spare]])           # spare rows at padding
        grids.append(Grid(slice(start, start + slot_pos.shape[0]), slot_pos[:, 0], slot_pos[:, 1], key_pad))
        pos_parts.append(slot_pos[:, 1])
        start += slot_pos.shape[0]
    return Layout(valid=torch.cat(valid_parts), positions=torch.cat(pos_parts), grids=grids, B=B, L=L)
