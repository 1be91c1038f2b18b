"""How rows whose prompts differ in length are laid out in one batch: the virtual block.

The widest prompt of a call sets the width W of the virtual block every row gets; a shorter prompt
fills the rest of it with masked filler slots that no real token attends to and that are cut out
of every output. Where the filler goes (`Layout`) is chosen so that each row sees exactly what it
sees alone:
- `FRONT` (decoder-only models, which take positions from the attention mask): filler first, then
  the prompt, right before the real tokens: `[filler, prompt, tokens]`. Positions count attended
  tokens only, so the filler changes no position, and real tokens are the last L for every row.
- `END` (encoders and seq2seq encoders, whose positions are the index in the sequence): the prompt
  at its place and the filler after the last token: `[prompt, tokens, filler]`. No real position
  moves; the filler is extra right padding.
With one prompt (or prompts of one length) there is no filler and both layouts are the same.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from .rows import RowPrompts


class Layout(str, enum.Enum):
    """Where a row's filler slots go when its prompt is shorter than the widest in the batch."""

    FRONT = "front"  # [filler, prompt, tokens]: decoder-only models (positions from the mask)
    END = "end"  # [prompt, tokens, filler]: encoders (positions from the sequence index)


@dataclass(frozen=True)
class VirtualBlock:
    """Where one call's virtual block goes: `insert_at` (0 or 1), the layout, and the rows."""

    rows: RowPrompts
    layout: Layout
    insert_at: int

    @property
    def width(self) -> int:
        return self.rows.width

    @cached_property
    def mask(self) -> torch.Tensor:
        """(B, W) long: 1 at each row's prompt slots, 0 at its filler."""
        device = self.rows.index.device
        return self.block([torch.ones(n, dtype=torch.long, device=device) for n in self.rows.lengths],
                          torch.zeros((), dtype=torch.long, device=device))

    def widen_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A (B, L) attention mask of the caller's tokens -> (B, W+L) with each row's prompt slots."""
        return self.assemble(mask, self.mask.to(mask.dtype))

    @property
    def needs_gather(self) -> bool:
        """END layout with prompts of different lengths: real positions differ per row."""
        return self.layout is Layout.END and not self.rows.uniform and self.width > 0

    def block(self, per_slot: Sequence[torch.Tensor], fill: torch.Tensor) -> torch.Tensor:
        """The (B, width, *) virtual block: each row's slot tensor ((P_k, *) rows), placed after
        (FRONT) or before (END) `fill` filler, a scalar or (*) tensor."""
        rows, width = self.rows, self.width
        if rows.single_slot is not None:
            return per_slot[0].unsqueeze(0).expand(rows.batch_size, *per_slot[0].shape)  # a view, no copy
        trailing = per_slot[0].shape[1:] if per_slot else fill.shape
        filler = fill.to(per_slot[0].dtype if per_slot else fill.dtype).expand(width, *trailing)
        table = []
        for values in per_slot:
            pad = filler[: width - values.shape[0]]
            table.append(torch.cat([pad, values] if self.layout is Layout.FRONT else [values, pad]))
        table.append(filler)  # rows without a prompt: all filler
        return torch.stack(table)[rows.index]  # -1 reads the filler row

    def assemble(self, x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """Put the (B, width, *) block into x (B, L, *): the model's (B, width + L, *) sequence."""
        if self.width == 0:
            return x
        i = self.insert_at
        if not self.needs_gather:
            return torch.cat([x[:, :i], block.to(x.dtype), x[:, i:]], dim=1)
        source = torch.cat([x, block.to(x.dtype)], dim=1)  # (B, L + width, *)
        return gather_rows(source, self._source_index(x.shape[1]))

    def real_positions(self, length: int) -> torch.Tensor | None:
        """(B, L) index of each real token in the model's sequence, or None when the real tokens
        sit at the same places in every row (then `extract` slices)."""
        if not self.needs_gather:
            return None
        j = torch.arange(length, device=self.rows.index.device).unsqueeze(0)
        return torch.where(j < self.insert_at, j, j + self.rows.row_lengths().unsqueeze(1))

    def extract(self, y: torch.Tensor, length: int) -> torch.Tensor:
        """The real positions of a (B, width + L, *) output, in the caller's order: (B, L, *)."""
        i, width = self.insert_at, self.width
        if width == 0 or y.shape[1] != width + length:
            return y
        index = self.real_positions(length)
        if index is not None:
            return gather_rows(y, index)
        if i == 0:
            return y[:, width:]  # a view: a copy of (B, L, V) logits costs time and peak memory
        return torch.cat([y[:, :i], y[:, i + width:]], dim=1)

    def shift_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """QA start/end token indices (B,) moved to where the tokens are in the model's sequence."""
        if self.layout is Layout.FRONT or self.rows.uniform:
            shift = torch.full_like(positions, self.width)
        else:
            shift = self.rows.row_lengths().to(positions.device)
        return torch.where(positions >= self.insert_at, positions + shift, positions)

    def _source_index(self, length: int) -> torch.Tensor:
        """END layout: for each row, where each of the width + L positions comes from in
        [x (L); block (width)]: `x[:i]`, the prompt, `x[i:]`, then the filler."""
        i, width = self.insert_at, self.width
        p = self.rows.row_lengths().unsqueeze(1)  # (B, 1)
        c = torch.arange(length + width, device=p.device).unsqueeze(0)  # (1, W)
        return torch.where(c < i, c, torch.where(c < i + p, length + c - i,
                                                 torch.where(c < length + p, c - p, c)))


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, j], ...] for every row b: per-row reordering along dim 1."""
    index = index.to(x.device)
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return torch.gather(x.expand(index.shape[0], *x.shape[1:]), 1, index)
