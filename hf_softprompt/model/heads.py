"""Task heads that belong to a prompt: each row goes through the head of its own prompt.

A classifier trained with a prompt is that prompt's: `add_soft_prompt` gives the prompt its own
copy of each trainable module (the task head by default, PEFT's `modules_to_save`), and the base
module stays frozen and untouched. The base module's `forward` is replaced (on the instance, so
the model's class, structure and `state_dict` keys do not change) by a `RoutedForward` that
sends each row of the current call (`rows.current_rows()`) through the copy of its prompt, or
through the base module when its prompt owns none (or the row has no prompt). When every row
uses one module, that module alone runs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .bank import SoftPromptBank
from .rows import NO_PROMPT, current_rows


def copy_module(module: nn.Module) -> nn.Module:
    """A trainable copy of a base module, without the routing and hooks of the original."""
    # Do not copy a RoutedForward along (it would copy the whole bank): the memo maps it to None.
    memo = {id(sub.__dict__["forward"]): None for sub in module.modules() if "forward" in sub.__dict__}
    twin = copy.deepcopy(module, memo)
    for sub in twin.modules():
        sub.__dict__.pop("forward", None)  # a RoutedForward copied along
        sub._forward_hooks.clear()
        sub._forward_pre_hooks.clear()
    return twin


class RoutedForward:
    """`forward` of a base module that some prompts own a copy of.

    Kept as an object rather than a closure, so the model still pickles and deep-copies.
    """

    def __init__(self, module: nn.Module, path: str, bank: SoftPromptBank) -> None:
        self.module = module
        self.path = path
        self.bank = bank

    def original(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rows = current_rows()
        if rows is None:  # called outside a prompted call: the base module
            return self.original(*args, **kwargs)
        runners = [self._runner(name) for name in rows.slots]
        if rows.single_slot is not None:
            return runners[0](*args, **kwargs)
        if not rows.has_bare_rows and all(r is runners[0] for r in runners):
            return runners[0](*args, **kwargs)
        return self._per_row(rows, runners, args, kwargs)

    def _runner(self, name: str) -> Any:
        if name not in self.bank:  # removed (by another thread) while this call was running
            raise RuntimeError(
                f"Soft prompt {name!r} was removed while a call using it was running, so its rows have no "
                f"{self.path!r} head to go through. Remove prompts between calls, not during them."
            )
        head = self.bank.head(name, self.path)
        return self.original if head is None else head

    def _per_row(self, rows: Any, runners: list, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """Each group of rows through its own module; outputs put back in row order (None: no rows)."""
        if not args or not isinstance(args[0], torch.Tensor) or args[0].shape[0] != rows.batch_size:
            first = args[0] if args else None
            got = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
            raise ValueError(
                f"Rows whose prompts own different copies of {self.path!r} cannot share a call here: "
                f"{self.path} gets input {got}, not one row per example ({rows.batch_size}). Call the model "
                "once per prompt, or do not list this module in trainable_modules."
            )
        groups = [(slot, runners[slot]) for slot in range(len(runners))] + [(NO_PROMPT, self.original)]
        out: torch.Tensor | None = None
        for slot, run in groups:
            index = rows.rows_of(slot).to(args[0].device)
            if index.numel() == 0:
                continue
            part = run(args[0].index_select(0, index), *args[1:], **kwargs)
            if not isinstance(part, torch.Tensor):
                raise ValueError(f"{self.path} returns {type(part).__name__}; a head shared by rows of "
                                 "different prompts must return a tensor.")
            if out is None:
                out = part.new_zeros(rows.batch_size, *part.shape[1:])
            out = out.index_copy(0, index, part)
        return out


def install_routing(model: nn.Module, path: str, bank: SoftPromptBank) -> None:
    """Route the base module at `path` by row (once per module, whichever prompt asks first)."""
    module = model.get_submodule(path)
    if not isinstance(module.__dict__.get("forward"), RoutedForward):
        module.forward = RoutedForward(module, path, bank)


def uninstall_routing(model: nn.Module, path: str) -> None:
    module = model.get_submodule(path)
    if isinstance(module.__dict__.get("forward"), RoutedForward):
        del module.forward
