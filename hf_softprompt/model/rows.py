"""Which prompt each row of a call uses, and the choice of the call in progress.

One call of a prompted model has B rows; each row uses one of the model's named prompts or none
(the bare model). `RowPrompts` records that choice: the distinct prompts used (`slots`) and each
row's slot (`index`, -1 for none). How rows of different prompt lengths share a batch is
layout.py's job.

The current call's choice lives in a `ContextVar`, so calls made from several threads (or
asyncio tasks) never see each other's rows; `generate()` sets it once, at its start, for all its
steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

NO_PROMPT = -1  # the index of a row that uses no prompt


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
        odd = next(((i, n) for i, n in enumerate(soft_prompt_names) if n is not None and not isinstance(n, str)), None)
        if odd is not None:
            raise TypeError(
                f"soft_prompt_names must hold one prompt name (a str) or None per row, got {odd[1]!r} in row "
                f"{odd[0]}. A row takes one prompt; for ids use soft_prompt_ids=[...]."
            )
        position = {name: i for i, name in enumerate(names)}
        unknown = sorted({str(n) for n in soft_prompt_names if n is not None and n not in position})
        if unknown:
            raise ValueError(
                f"soft_prompt_names names {unknown}, which the model does not carry. Its prompts are "
                f"{list(names)}; use None for a row without a prompt."
            )
        ids = torch.tensor([NO_PROMPT if n is None else position[n] for n in soft_prompt_names], dtype=torch.long,
                           device="cpu")  # host-side; moved with the rows at the end
    elif soft_prompt_ids is not None:
        if isinstance(soft_prompt_ids, str) or (isinstance(soft_prompt_ids, Sequence) and any(
                isinstance(i, str) for i in soft_prompt_ids)):
            raise TypeError(
                f"soft_prompt_ids holds prompt names ({soft_prompt_ids!r}); ids are positions in "
                f"soft_prompt_names(model) = {list(names)}. Pass the names as soft_prompt_names=[...] instead, "
                "or map them to ids (e.g. dataset.map) before training."
            )
        ids = soft_prompt_ids if isinstance(soft_prompt_ids, torch.Tensor) else torch.as_tensor(
            soft_prompt_ids, device="cpu")
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
            out_of_range = (ids < NO_PROMPT) | (ids >= len(names))
            raise ValueError(
                f"soft_prompt_ids holds {ids[out_of_range].tolist()} (in rows "
                f"{out_of_range.nonzero().flatten().tolist()} of the batch), but the model carries {len(names)} "
                f"prompts {list(names)}: {id_rule(len(names))}."
            )
    else:
        ids = torch.full((batch_size,), NO_PROMPT if active is None else names.index(active), dtype=torch.long,
                         device="cpu")
    used = sorted(set(ids.tolist()) - {NO_PROMPT})
    # The table lives where the ids do (the Trainer moves a soft_prompt_ids column to the GPU).
    remap = torch.full((len(names) + 1,), NO_PROMPT, dtype=torch.long, device=ids.device)
    remap[torch.tensor(used, dtype=torch.long, device=ids.device)] = torch.arange(len(used), device=ids.device)
    index = remap[ids]  # model ids -> slots; -1 reads the trailing -1
    slots = tuple(names[i] for i in used)
    rows = RowPrompts(slots, tuple(lengths[n] for n in slots), index)
    return rows if device is None else rows.to(device)


def id_rule(num_prompts: int) -> str:
    """What a `soft_prompt_ids` entry may be, for a model carrying `num_prompts` prompts."""
    return (f"use 0 to {num_prompts - 1} (their order in soft_prompt_names(model)), or -1 for none"
            if num_prompts else "the model carries no prompt: use -1")


def _check_length(got: int, batch_size: int, what: str) -> None:
    if got != batch_size:
        raise ValueError(f"{what} has {got} entries for a batch of {batch_size} rows; give one per row. (A "
                         "transformers pipeline calls the model with batches of its own: wrap it with "
                         "hf_softprompt.prompted_pipeline(pipe) and pass soft_prompt_names to that.)")


# ------------------------------------------------------------ the call in progress
@dataclass(frozen=True)
class CallChoice:
    """The prompt choice of the call in progress, fixed at its start.

    Attributes:
        rows: each row's prompt.
        widened: `generate()` has put the prompt's positions into the `attention_mask` and
            `position_ids` it keeps between steps, so its decode steps need nothing more.
    """

    rows: RowPrompts
    widened: bool = False


_CURRENT: ContextVar[CallChoice | None] = ContextVar("hf_softprompt_call", default=None)


def current_choice() -> CallChoice | None:
    """The choice of the call in progress in this thread or task (None outside calls)."""
    return _CURRENT.get()


def current_rows() -> RowPrompts | None:
    """The rows of the call in progress in this thread or task (None outside calls)."""
    choice = _CURRENT.get()
    return None if choice is None else choice.rows


# The models that compute as their bare base model in this thread/task (scoped.py), by id.
_BARE: ContextVar[frozenset[int]] = ContextVar("hf_softprompt_bare", default=frozenset())


def is_bare(model: object) -> bool:
    """Whether calls of `model` run as its bare base model here (`without_soft_prompt`)."""
    return id(model) in _BARE.get()


@contextlib.contextmanager
def bare_calls(model: object) -> Iterator[None]:
    """Inside the block, calls of `model` in this thread/task run without any prompt."""
    token = _BARE.set(_BARE.get() | {id(model)})
    try:
        with rows_in_use(None):
            yield
    finally:
        _BARE.reset(token)


# Each model's prompt for calls that choose none, where a block of code set one (scoped.py), by id.
_SCOPED: ContextVar[tuple[tuple[int, str | None], ...]] = ContextVar("hf_softprompt_scoped", default=())


def scoped_prompt(model: object, default: str | None) -> str | None:
    """The prompt of `model`'s calls that choose none, here: the innermost `using_soft_prompt`
    block's, else `default` (the model's active prompt)."""
    for key, name in reversed(_SCOPED.get()):
        if key == id(model):
            return name
    return default


@contextlib.contextmanager
def scoped_calls(model: object, name: str | None) -> Iterator[None]:
    """Inside the block, calls of `model` in this thread/task that choose no prompt use `name`."""
    token = _SCOPED.set((*_SCOPED.get(), (id(model), name)))
    try:
        yield
    finally:
        _SCOPED.reset(token)


@contextlib.contextmanager
def rows_in_use(rows: RowPrompts | None, widened: bool = False) -> Iterator[None]:
    """Make `rows` the current choice for the calls made inside the block (nested calls, the
    encoder that `generate` calls, the task heads); None: no prompted call in progress."""
    token = _CURRENT.set(None if rows is None else CallChoice(rows, widened))
    try:
        yield
    finally:
        _CURRENT.reset(token)
