"""Stopping training when a prompt's gradient is not what training needs, naming the prompt.

Two checks, each before the optimizer applies anything:
- No gradient at all: at the first optimizer step, a prompt whose rows were in the step's batches
  but whose parameters got no gradient means the base model does not pass gradients back to its
  input embeddings (e.g. torch.ao dynamic int8 quantization): training would never move it. A
  gradient of exactly zero (possible when every label of its rows is masked) is warned about once.
- Not finite: see below.

A prompt whose rows produce NaN or inf (a diverged prompt, an overflow in fp16) would otherwise
spread: the Trainer's global gradient clipping scales every gradient by the NaN total norm, so
one step later every prompt is NaN, and the Trainer logs such losses as the running mean
(`logging_nan_inf_filter`), so training runs to its end without a word. The guard notes, as each
backward accumulates into a prompt's gradient (before clipping), whether it is finite, without a
device sync; before each optimizer step it reads the notes once and stops training, with the
prompts still holding their values of the previous step.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from ..model.bank import SoftPromptBank

logger = logging.getLogger(__name__)


class PromptGradientGuard:
    """Per-prompt flags set by gradient hooks; `check(step)` raises on a missing or non-finite gradient."""

    def __init__(self) -> None:
        self._flags: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._usage_handles: list[Any] = []
        self._used: set[str] = set()  # prompts run with gradients on since training began
        self._params: dict[str, list[torch.nn.Parameter]] = {}

    def start(self, bank: SoftPromptBank) -> None:
        """Hook every trainable parameter of every prompt (its encoder and task heads included), and
        note which prompts run until the first optimizer step."""
        self.stop()
        for name in bank.names():
            self._params[name] = [p for p in bank.trainable_parameters(name) if p.requires_grad]
            for param in self._params[name]:
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook(name)))
            self._usage_handles.append(bank[name].register_forward_hook(self._usage(name)))

    def _usage(self, name: str) -> Any:
        def note(module: torch.nn.Module, args: Any, output: Any) -> None:
            if torch.is_grad_enabled():
                self._used.add(name)
        return note

    def _hook(self, name: str) -> Any:
        def note(param: torch.Tensor) -> None:
            grad = param.grad
            if grad is None:
                return
            bad = (~torch.isfinite(_local(grad))).any().float()
            self._flags[name] = torch.maximum(self._flags[name], bad) if name in self._flags else bad
        return note

    def check(self, step: int) -> None:
        """Raise if a prompt's gradient was NaN or inf since the last check (every rank agrees), or,
        at the first check, if a prompt that ran got no gradient at all."""
        if self._usage_handles:
            self._check_first_step(step)
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

    def _check_first_step(self, step: int) -> None:
        for handle in self._usage_handles:
            handle.remove()
        self._usage_handles.clear()
        used = [name for name in self._params if name in self._used and self._params[name]]
        grads = {name: [p.grad for p in self._params[name]] for name in used}
        none = [name for name, gs in grads.items() if all(g is None for g in gs)]
        if none:
            self.stop()
            raise ValueError(
                f"Soft prompt(s) {none} ran in the batches of step {step} but got no gradient: the base model "
                "does not pass gradients back to its input embeddings, so training would never move them. "
                "A base quantized with torch.ao dynamic int8 (quantize_dynamic) does this: train on the float "
                "model (or one dequantized on load, such as a GGUF checkpoint) and quantize for serving. Also "
                "check that nothing detaches inputs_embeds (a custom forward, torch.no_grad around the loss)."
            )
        zero = [name for name, gs in grads.items()
                if all(g is None or not bool(_local(g).any()) for g in gs)]
        if zero:
            message = (f"Soft prompt(s) {zero} ran in the batches of step {step} but got an all-zero gradient: "
                       "their rows may have no target token (every label -100), or the loss ignores them.")
            logger.warning(message)
            warnings.warn(message, stacklevel=2)

    def stop(self) -> None:
        for handle in [*self._handles, *self._usage_handles]:
            handle.remove()
        self._handles.clear()
        self._usage_handles.clear()
        self._flags.clear()
        self._used.clear()


def _local(grad: torch.Tensor) -> torch.Tensor:
    """This rank's part of a gradient (an FSDP2 shard is a DTensor), else the gradient itself."""
    return grad.to_local() if hasattr(grad, "to_local") else grad
