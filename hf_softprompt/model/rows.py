"""Which prompt each row of a call uses, and how rows with prompts of different lengths are laid out.

One call of a prompted model has B rows; each row uses one of the model's named prompts or none
(the bare model). `RowPrompts` records that choice: the distinct prompts used (`slots`) and each
row's slot (`index`, -1 for none). The widest prompt sets the width `width` of the virtual block
every row gets; a shorter prompt fills the rest of it with masked filler slots that no real token
attends to and that are cut out of every output.

Where the filler goes (`Layout`) is chosen so that each row sees exactly what it sees alone:
- `FRONT` (decoder-only models, which take positions from the attention mask): filler first, then
  the prompt, right before the real tokens: `[filler, prompt, tokens]`. Positions count attended
  tokens only, so the filler changes no position, and real tokens are the last L for every row.
- `END` (encoders and seq2seq encoders, whose positions are the index in the sequence): the prompt
  at its place and the filler after the last token: `[prompt, tokens, filler]`. No real position
  moves; the filler is extra right padding.
With one prompt (or prompts of one length) there is no filler and both layouts are the same.

The current call's choice lives in a `ContextVar`, so calls made from several threads (or
asyncio tasks) never see each other's rows; `generate()` sets it once for all its steps.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

NO_PROMPT = -1  # the index of a row that uses no prompt


class Layout(str, enum.Enum):
    """Where a row's filler slots go when its prompt is shorter than the widest in the batch."""

    FRONT = "front"  # [filler, prompt, tokens]: decoder-only models (positions from the mask)
    END = "end"  # [prompt, tokens, filler]: encoders (positions from the sequence index)


@dataclass(frozen=True)
class RowPrompts:
    """The prompt of every row of one call.

    Attributes:
        slots: the distinct prompt names the rows use, in the model's prompt order.
        lengths: the number of virtual tokens of each slot.
        index: (B,) long tensor, each row's slot, or `NO_PROMPT` (-1).
    """

    slots: tuple[str, ...]
    lengths: tuple[int, ...]
    index: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.index.shape[0])

    @property
    def width(self) -> int:
        """Virtual positions every row gets: the longest prompt used (0 when no row has one)."""
        return max(self.lengths, default=0)

    @property
    def uniform(self) -> bool:
        """Whether every row has a prompt of the same length (no filler anywhere)."""
        return len(set(self.lengths)) <= 1 and not self.has_bare_rows

    @property
    def has_bare_rows(self) -> bool:
        return bool(self._bare.any())

    @property
    def single_slot(self) -> int | None:
        """The one slot every row uses, or None when rows differ (or some have no prompt)."""
        if len(self.slots) == 1 and not self.has_bare_rows:
            return 0
        return None

    @property
    def _bare(self) -> torch.Tensor:
        return self.index == NO_PROMPT

    def row_lengths(self) -> torch.Tensor:
        """(B,) long: each row's own prompt length (0 for rows without a prompt)."""
        table = torch.tensor([*self.lengths, 0], dtype=torch.long, device=self.index.device)
        return table[self.index]  # -1 reads the trailing 0

    def to(self, device: torch.device) -> RowPrompts:
        if self.index.device == device:
            return self
        return RowPrompts(self.slots, self.lengths, self.index.to(device))

    def for_batch(self, batch_size: int) -> RowPrompts:
        """The choice for a call of `batch_size` rows: the same, or repeated per row as `generate`
        repeats inputs for beams and `num_return_sequences` (`repeat_interleave`)."""
        if batch_size == self.batch_size:
            return self
        if batch_size % self.batch_size:
            raise ValueError(
                f"soft_prompt_names/soft_prompt_ids give a prompt for {self.batch_size} rows, but the model "
                f"was called with {batch_size} rows. Pass one entry per row of input_ids."
            )
        return RowPrompts(self.slots, self.lengths,
                          self.index.repeat_interleave(batch_size // self.batch_size))

    def rows_of(self, slot: int) -> torch.Tensor:
        """Row indices that use `slot` (or `NO_PROMPT`)."""
        return (self.index == slot).nonzero().flatten()


def choose_rows(names: Sequence[str], lengths: dict[str, int], active: str | None, batch_size: int,
                soft_prompt_names: Sequence[str | None] | None = None,
                soft_prompt_ids: Any = None, device: torch.device | None = None) -> RowPrompts:
    """Resolve one call's choice of prompts, before any compute.

    Args:
        names: the model's prompts in order (the ids of `soft_prompt_ids` index this list).
        lengths: virtual tokens of each prompt.
        active: the prompt of rows the call does not choose for (None: the bare model).
        batch_size: B.
        soft_prompt_names: one prompt name (or None) per row.
        soft_prompt_ids: one id per row (tensor or list of ints; -1 for no prompt).
    """
    if soft_prompt_names is not None and soft_prompt_ids is not None:
        raise ValueError("Pass soft_prompt_names or soft_prompt_ids, not both: they say the same thing.")
    if soft_prompt_names is not None:
        if isinstance(soft_prompt_names, str) or not isinstance(soft_prompt_names, Sequence):
            raise TypeError(
                f"soft_prompt_names must be a list with one prompt name (or None) per row, got "
                f"{soft_prompt_names!r}. For all rows alike use set_active_soft_prompt(model, name)."
            )
        _check_length(len(soft_prompt_names), batch_size, "soft_prompt_names")
        position = {name: i for i, name in enumerate(names)}
        unknown = sorted({str(n) for n in soft_prompt_names if n is not None and n not in position})
        if unknown:
            raise ValueError(
                f"soft_prompt_names names {unknown}, which the model does not carry. Its prompts are "
                f"{list(names)}; use None for a row without a prompt."
            )
        ids = torch.tensor([NO_PROMPT if n is None else position[n] for n in soft_prompt_names], dtype=torch.long)
    elif soft_prompt_ids is not None:
        ids = torch.as_tensor(soft_prompt_ids)
        if ids.dim() == 2 and ids.shape[1] == 1:  # a column collated as (B, 1)
            ids = ids[:, 0]
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(
                f"soft_prompt_ids must be one integer per row (shape ({batch_size},)), got dtype {ids.dtype} "
                f"and shape {tuple(ids.shape)}."
            )
        _check_length(ids.shape[0], batch_size, "soft_prompt_ids")
        ids = ids.to(torch.long)
        if ids.numel() and (int(ids.min()) < NO_PROMPT or int(ids.max()) >= len(names)):
            bad = ids[(ids < NO_PROMPT) | (ids >= len(names))].tolist()
            raise ValueError(
                f"soft_prompt_ids holds {bad}, but the model carries {len(names)} prompts {list(names)}: "
                f"use 0 to {len(names) - 1} (their order in soft_prompt_names(model)), or -1 for none."
            )
    else:
        ids = torch.full((batch_size,), NO_PROMPT if active is None else names.index(active), dtype=torch.long)
    used = sorted(set(ids.tolist()) - {NO_PROMPT})
    remap = torch.full((len(names) + 1,), NO_PROMPT, dtype=torch.long)
    remap[torch.tensor(used, dtype=torch.long)] = torch.arange(len(used))
    index = remap[ids]  # model ids -> slots; -1 reads the trailing -1
    slots = tuple(names[i] for i in used)
    rows = RowPrompts(slots, tuple(lengths[n] for n in slots), index)
    return rows if device is None else rows.to(device)


def _check_length(got: int, batch_size: int, what: str) -> None:
    if got != batch_size:
        raise ValueError(f"{what} has {got} entries for a batch of {batch_size} rows; give one per row.")


# ------------------------------------------------------------ the call in progress
_CURRENT: ContextVar[RowPrompts | None] = ContextVar("hf_softprompt_rows", default=None)


def current_rows() -> RowPrompts | None:
    """The prompt choice of the call in progress in this thread or task (None outside calls)."""
    return _CURRENT.get()


@contextlib.contextmanager
def rows_in_use(rows: RowPrompts | None) -> Iterator[None]:
    """Make `rows` the current choice for the calls made inside the block (nested calls, the
    encoder that `generate` calls, the task heads)."""
    token = _CURRENT.set(rows)
    try:
        yield
    finally:
        _CURRENT.reset(token)


# -------------------------------------------------------------- laying rows out
@dataclass(frozen=True)
class VirtualBlock:
    """Where one call's virtual block goes: `insert_at` (0 or 1), the layout, and the rows."""

    rows: RowPrompts
    layout: Layout
    insert_at: int

    @property
    def width(self) -> int:
        return self.rows.width

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
