"""Stopping training at the first non-finite gradient of a prompt, naming the prompt.

A prompt whose rows produce NaN or inf (a diverged prompt, an overflow in fp16) would otherwise
spread: the Trainer's global gradient clipping scales every gradient by the NaN total norm, so
one step later every prompt is NaN, and the Trainer logs such losses as the running mean
(`logging_nan_inf_filter`), so training runs to its end without a word. The guard notes, as each
backward accumulates into a prompt's gradient (before clipping), whether it is finite, without a
device sync; before each optimizer step it reads the notes once and stops training, with the
prompts still holding their values of the previous step.
"""

from __future__ import annotations

from typing import Any

import torch

from ..model.bank import SoftPromptBank


class NonFiniteGradientGuard:
    """Per-prompt flags set by gradient hooks; `check(step)` raises on a non-finite one."""

    def __init__(self) -> None:
        self._flags: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def start(self, bank: SoftPromptBank) -> None:
        """Hook every trainable parameter of every prompt (its encoder and task heads included)."""
        self.stop()
        for name in bank.names():
            for param in bank.trainable_parameters(name):
                if param.requires_grad:
                    self._handles.append(param.register_post_accumulate_grad_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        def note(param: torch.Tensor) -> None:
            grad = param.grad
            if grad is None:
                return
            local = grad.to_local() if hasattr(grad, "to_local") else grad  # an FSDP2 shard: this rank's part
            bad = (~torch.isfinite(local)).any().float()
            self._flags[name] = torch.maximum(self._flags[name], bad) if name in self._flags else bad
        return note

    def check(self, step: int) -> None:
        """Raise if a prompt's gradient was NaN or inf since the last check; every rank agrees."""
        if not self._flags:
            return
        names = list(self._flags)
        flags = torch.stack([self._flags[n].to(self._flags[names[0]].device) for n in names])
        self._flags.clear()
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad = [n for n, flag in zip(names, flags.tolist(), strict=True) if flag]
        if bad:
            self.stop()
            raise FloatingPointError(
                f"Soft prompt(s) {bad} got a NaN or infinite gradient at step {step}: the loss of their rows "
                "is not finite. Training stopped before the optimizer applied it (and before gradient "
                "clipping spread it to the other prompts), so the prompts hold their values of the previous "
                "step. Lower the learning rate, look for rows that overflow (fp16: try bf16), or resume from "
                "the last checkpoint."
            )

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._flags.clear()
