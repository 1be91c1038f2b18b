"""Prompt-health figures for the training logs: what practitioners watch while a prompt trains.

Per prompt, every `logging_steps` (`soft_prompt/<name>/...` in the Trainer's logs):

- `grad_norm`: the L2 norm of the prompt's gradient at the last optimizer step (all its
  parameters, the P-tuning encoder's included; after gradient clipping, i.e. what the optimizer
  applied). Zero for a prompt whose rows were absent from that step.
- `norm_ratio`: the mean norm of the virtual tokens the model sees, over the mean norm of the
  vocabulary's input embeddings. A prompt drifting to many times the vocabulary's scale is a
  known failure of prompt tuning at high learning rates.
- `cosine_to_init`: the mean cosine similarity of each virtual token to itself at the start of
  this `train()` call: how far training has moved the prompt.
"""

from __future__ import annotations

import torch
from torch import nn

from ..accessors import weight_of
from ..distributed import full_table
from ..model.bank import SoftPromptBank


class PromptHealth:
    """The state behind the prompt-health logs of one training run: each prompt's initial value
    and its gradient norm at the last optimizer step."""

    def __init__(self) -> None:
        self.initial: dict[str, torch.Tensor] = {}
        self.grad_norms: dict[str, float] = {}

    @torch.no_grad()
    def start(self, bank: SoftPromptBank) -> None:
        """Remember every prompt as it is now (the start of training)."""
        self.initial = {name: full_table(bank[name]()).detach().float().clone() for name in bank}
        self.grad_norms = {}

    @torch.no_grad()
    def record_gradients(self, bank: SoftPromptBank) -> None:
        """Each prompt's gradient norm now (call before the optimizer step)."""
        for name in bank:
            grads = [p.grad.detach().float().norm() for p in bank[name].parameters() if p.grad is not None]
            self.grad_norms[name] = torch.stack(grads).norm().item() if grads else 0.0

    @torch.no_grad()
    def metrics(self, bank: SoftPromptBank, embeddings: nn.Module) -> dict[str, float]:
        """`{"soft_prompt/<name>/<figure>": value}` for every prompt (see the module docstring)."""
        # Under FSDP2 the tables are shards (DTensors): the figures are of the whole ones.
        vocab_norm = full_table(weight_of(embeddings)).detach().float().norm(dim=-1).mean().item()
        figures: dict[str, float] = {}
        for name in bank:
            prompt = full_table(bank[name]()).detach().float()  # (P, D), what the model sees
            key = f"soft_prompt/{name}"
            if name in self.grad_norms:
                figures[f"{key}/grad_norm"] = self.grad_norms[name]
            figures[f"{key}/norm_ratio"] = prompt.norm(dim=-1).mean().item() / max(vocab_norm, 1e-12)
            initial = self.initial.get(name)
            if initial is not None and initial.shape == prompt.shape:
                cosine = nn.functional.cosine_similarity(prompt, initial.to(prompt.device), dim=-1)
                figures[f"{key}/cosine_to_init"] = cosine.mean().item()
        return figures
