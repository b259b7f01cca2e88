"""The packed layout: where the computed rows of a batch sit, for the fast model (fast/layers.py: FastVEGA).

Every layer but attention works per utterance, so the fast model computes the N valid utterances of a batch as
rows (R, H), R = N plus a few spare rows, instead of model.py's B*L padded positions. Attention needs each
dialogue's utterances side by side: a grid (Bg, h, Lg, dh) of some dialogues padded to a common length Lg.
pad_mask convention everywhere: True = padding. Same methods as model.PaddedLayout.

Two kinds, built by `make_layout` once per forward pass and passed to every encoder:
- float32: the valid rows (and spare rows at padding positions), one grid of all B dialogues at length L.
  Keeping the reference's grid keeps the softmax sums in the same order (parity to 1e-6).
- lower precision (autocast): rows rounded up to a multiple of ROW_BUCKET and grids of dialogues of
  similar length. oneDNN builds a kernel for every new matrix shape (about 1 ms each), so rounding keeps the
  shapes few (32: 19 row counts over IEMOCAP's batches, 3% spare rows; 64 spent 6% on spare rows); grouping
  dialogues by length shrinks the attention work, which grows with Lg^2 for every dialogue of a grid (lengths
  8-110 in one batch wasted about half of it).
Spare rows sit at padding positions of one grid: masked as keys, never read as outputs.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import cpu_kernels

ROW_BUCKET, KEY_BUCKET = 32, 16  # packed rows and attention grid lengths are rounded up to multiples of these
SENTINEL_ROWS = 2  # buffer rows after the grids, never covered (see _grid_index)
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


@dataclass
class Layout:
    valid: torch.Tensor       # (N,) flat indices into B*L of the valid utterances, in row order
    positions: torch.Tensor   # (R,) utterance position of every row (spare rows: their grid position, clamped)
    grids: list               # [Grid], their rows covering 0..R-1 in order
    B: int
    L: int
    cache: dict = field(default_factory=dict, repr=False)   # grid indices, masks, scratch: built on first use

    @property
    def n_rows(self):
        return self.positions.shape[0]

    @property
    def key_pads(self):
        return [g.key_pad for g in self.grids]

    def prepare(self, n_head):
        """Build now, from the host-side mask, the grid indices attention will need: built later from a device
        tensor, `nonzero` would make the host wait for the device."""
        self._grid_index(None)   # from_grids of whole rows, and the fused evaluation attention's grids
        self._grid_index(n_head)
        self._uncovered(n_head)  # the only zero rows attention asks for: its head-major grids
        return self

    def to(self, device, extra=()):
        """(this layout on `device`, the `extra` tensors there too), all in one copy (`upload`)."""
        keys = [k for k in self.cache if k[0] in ("index", "uncovered")]
        held = [self.cache[k][0] if k[0] == "index" else self.cache[k] for k in keys]
        tensors = [self.valid, self.positions] + [t for g in self.grids for t in (g.slot, g.positions, g.key_pad)]
        moved = iter(upload(tensors + held + list(extra), device))
        valid, positions = next(moved), next(moved)
        grids = [Grid(g.rows, next(moved), next(moved), next(moved)) for g in self.grids]
        cache = {k: (next(moved),) + self.cache[k][1:] if k[0] == "index" else next(moved) for k in keys}
        return Layout(valid, positions, grids, self.B, self.L, cache), [next(moved) for _ in extra]

    def _grid_index(self, h):
        """Where each row goes in the grids laid end to end, with the size of each grid's block.

        h=None, row-major: (R,) indices into sum(Bg*Lg) rows of width H (grid position (slot, pos) -> a row).
        h given, head-major: (R*h,) indices into sum(Bg*h*Lg) rows of width H/h (row r's head j goes to
        (slot*h + j)*Lg + pos of its grid's block), the (Bg, h, Lg, dh) layout batched matmuls want.
        """
        key = ("index", h)
        if key not in self.cache:
            parts, sizes, offset = [], [], 0
            for g in self.grids:
                Bg, Lg = g.key_pad.shape
                if h is None:
                    parts.append(offset + g.slot * Lg + g.positions)                               # (R_g,)
                else:
                    heads = torch.arange(h, device=g.slot.device)
                    parts.append((offset + (g.slot[:, None] * h + heads) * Lg + g.positions[:, None]).flatten())
                sizes.append(Bg * Lg * (h or 1))
                offset += sizes[-1]
            # two rows past the grids that no row lands on: the zero-fill index (_uncovered) is then never empty
            # or one row long, sizes torch.compile would specialise on (a recompilation each; fast/capture.py)
            sizes.append(SENTINEL_ROWS)
            self.cache[key] = (torch.cat(parts), sizes, offset + SENTINEL_ROWS)
        return self.cache[key]

    def _uncovered(self, h):
        """The buffer rows of _grid_index(h) that no row lands on (padding positions), as indices."""
        key = ("uncovered", h)
        if key not in self.cache:
            index, _, total = self._grid_index(h)
            free = torch.ones(total, dtype=torch.bool, device=index.device)
            free[index] = False
            self.cache[key] = free.nonzero().squeeze(1)
        return self.cache[key]

    def to_grids(self, x, h, contiguous=True, scratch=None):
        """Rows (R, H) -> one (Bg, h, Lg, H/h) tensor per grid, zeros where no row sits (one copy for all grids).

        contiguous: stored in that layout, as batched matmuls want it. Otherwise rows are copied whole into
        (Bg, Lg, H) blocks and transposed views are returned, which the fused attention takes as they are.
        scratch (a name), without gradients: the zeroed buffer of that name is reused by every later call of
        this layout. The rows always land on the same positions, so the others stay zero.
        """
        R, H = x.shape
        index, sizes, total = self._grid_index(h if contiguous else None)
        width = H // h if contiguous else H
        rows = x.reshape(-1, width)                                                    # (R or R*h, width)
        if scratch is not None and not torch.is_grad_enabled():
            key = ("scratch", scratch, x.dtype, width)
            if key not in self.cache:
                self.cache[key] = x.new_zeros(total, width)
            buffer = scatter_rows(rows, index, None, total, out=self.cache[key])
        else:   # zeros where no row lands (they must be finite: masked keys still meet 0 * value), the rest copied
            buffer = scatter_rows(rows, index, self._uncovered(h if contiguous else None), total)
        blocks = []
        for block, g in zip(buffer.split(sizes), self.grids):
            Bg, Lg = g.key_pad.shape
            blocks.append(block.view(Bg, h, Lg, -1) if contiguous else block.view(Bg, Lg, h, -1).transpose(1, 2))
        return blocks

    def from_grids(self, blocks):
        """One (Bg, h, Lg, dh) tensor per grid -> the rows (R, h*dh)."""
        _, h, _, dh = blocks[0].shape
        if all(b.transpose(1, 2).is_contiguous() for b in blocks):   # stored (Bg, Lg, h, dh): whole rows
            flat = torch.cat([b.transpose(1, 2).reshape(-1, h * dh) for b in blocks])  # (sum Bg*Lg, H)
            return flat.index_select(0, self._grid_index(None)[0])
        flat = torch.cat([b.reshape(-1, dh) for b in blocks])                         # (sum Bg*h*Lg, dh)
        return flat.index_select(0, self._grid_index(h)[0]).view(-1, h * dh)

    def attend_masks(self):
        """Per grid, (Bg, 1, 1, Lg) bool, True = a key to attend to (the fused attention's convention)."""
        if "attend" not in self.cache:
            self.cache["attend"] = [~g.key_pad[:, None, None, :] for g in self.grids]
        return self.cache["attend"]

    def to_rows(self, x, fill=0):
        """(B, L, ...) -> (R, ...); spare rows hold `fill`."""
        x = x.flatten(0, 1)
        spare = self.n_rows - self.valid.shape[0]
        return torch.cat([x.index_select(0, self.valid), x.new_full((spare,) + x.shape[1:], fill)])

    def to_padded(self, x):
        """(R, ...) -> (B, L, ...), zeros at positions not computed."""
        n = self.valid.shape[0]
        x = x.new_zeros((self.B * self.L,) + x.shape[1:]).index_copy(0, self.valid, x[:n])
        return x.view(self.B, self.L, *x.shape[1:])


def upload(tensors, device):
    """Integer and bool tensors, the same on `device`: packed into one buffer, pinned on CUDA, one non-blocking
    copy (a layout's dozens of small index tensors would otherwise be as many copies)."""
    device = torch.device(device)
    if all(t.device == device for t in tensors):
        return list(tensors)
    flat = torch.cat([t.reshape(-1).to(torch.int64) for t in tensors])
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    out, start = [], 0
    for t in tensors:
        part = flat[start:start + t.numel()].view(t.shape)
        out.append(part if t.dtype == torch.int64 else part.to(t.dtype))
        start += t.numel()
    return out


def scatter_rows(rows, index, zero_rows, total, out=None):
    """out[index] = rows and out[zero_rows] = 0, out a new (total, W) tensor unless given: the whole-row C kernel
    (fast/cpu_kernels.py), or torch's index ops without it."""
    y = cpu_kernels.scatter_rows(rows, index, zero_rows, total, out=out)
    if y is not None:
        return y
    if out is None:
        out = cpu_kernels.empty((total, rows.shape[1]), rows).index_fill_(0, zero_rows, 0)
    return out.index_copy_(0, index, rows)


def group_by_length(lengths, grid_cost=GRID_COST):
    """Split dialogues into grids of similar length: minimise sum over grids of (Bg * Lg^2 + grid_cost).

    lengths: list of ints (each dialogue's extent). Returns lists of dialogue indices, longest first.
    Dynamic programming over the
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


def _clamp(positions, max_position):
    return positions if max_position is None else positions.clamp(max=max_position)


def make_layout(pad_mask, grouped, max_position=None):
    """pad_mask (B, L) bool, True = padding. grouped: lower precision (several grids, rounded shapes).
    max_position: row positions are clamped to it (spare rows of a batch near the positional table's end)."""
    B, L = pad_mask.shape
    device = pad_mask.device
    valid_mask = ~pad_mask
    n_valid = int(valid_mask.sum())
    if not grouped:   # float32: the reference's single grid; spare rows at its first padding positions
        n_rows = min(round_up(n_valid, ROW_BUCKET), B * L)
        valid = valid_mask.flatten().nonzero().squeeze(1)                          # (N,)
        spare = pad_mask.flatten().nonzero().squeeze(1)[:n_rows - n_valid]
        flat = torch.cat([valid, spare])                                           # (R,) flat into B*L
        grid = Grid(slice(0, n_rows), flat // L, flat % L, pad_mask)
        return Layout(valid=valid, positions=_clamp(flat % L, max_position), grids=[grid], B=B, L=L)

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
    positions = _clamp(torch.cat(pos_parts), max_position)
    return Layout(valid=torch.cat(valid_parts), positions=positions, grids=grids, B=B, L=L)
