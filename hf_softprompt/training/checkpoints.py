"""The three Trainer methods soft prompts need changed, for the subclass and the callback alike.

- Checkpoint loading (resume, `load_best_model_at_end`): our checkpoints hold the adapters, not
  base weights, so the Trainer's own loaders (which look for full-model weights) cannot read them.
- The target-token count (`num_items_in_batch`): a causal LM predicts `labels[:, 1:]`, with a
  prompt as without, but the Trainer knows that only from the config's `loss_type` (Llama has
  it; GPT-2 has none, so the stock count includes `labels[:, 0]` and the mean loss is too small).

`SoftPromptMixin` overrides the methods with these functions; with the stock `Trainer`,
`SoftPromptCallback` puts the same functions on the Trainer instance it belongs to
(`adopt_trainer_hooks`), so both train, count and resume alike.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..files.load import load_soft_prompt_weights
from ..files.prompt_set import has_saved_prompts
from ..model.injector import get_injector

logger = logging.getLogger(__name__)


def load_prompts_from_checkpoint(model: nn.Module, checkpoint: str | None, what: str = "soft prompts") -> bool:
    """Load `checkpoint`'s saved prompts into `model`'s; False (nothing done) when `model` carries
    no prompt or `checkpoint` holds none, for the Trainer's own loader to handle."""
    if get_injector(model) is None or checkpoint is None or not has_saved_prompts(checkpoint):
        return False
    logger.info(f"Loading the {what} from {checkpoint}.")
    load_soft_prompt_weights(model, checkpoint)
    return True


def load_from_checkpoint(stock: Callable, trainer: Any, resume_from_checkpoint: str,
                         model: nn.Module | None = None) -> None:
    """`Trainer._load_from_checkpoint` for adapter-only checkpoints; `stock` loads any other."""
    if not load_prompts_from_checkpoint(trainer.model if model is None else model, resume_from_checkpoint):
        stock(resume_from_checkpoint, model)


def load_best_model(stock: Callable, trainer: Any) -> None:
    """`Trainer._load_best_model` for an adapter-only best checkpoint; `stock` loads any other."""
    best = trainer.state.best_model_checkpoint
    if not load_prompts_from_checkpoint(trainer.model, best, f"best soft prompts (score {trainer.state.best_metric})"):
        stock()


def shifted_label_batches(trainer: Any, batch_samples: list) -> list:
    """`batch_samples` with `shift_labels = labels[..., 1:]` where the model is a prompted causal LM
    computing its own loss, so the Trainer counts the targets that loss counts; else unchanged."""
    injector = get_injector(trainer.model)
    model_computes_loss = trainer.label_smoother is None and trainer.compute_loss_func is None
    if injector is None or not model_computes_loss or not injector.spec.shifts_labels:
        return batch_samples
    return [{**batch, "shift_labels": batch["labels"][..., 1:]}
            if isinstance(batch.get("labels"), torch.Tensor) and "shift_labels" not in batch else batch
            for batch in batch_samples]


def get_num_items_in_batch(stock: Callable, trainer: Any, batch_samples: list, device: torch.device) -> Any:
    """`Trainer._get_num_items_in_batch` counting the targets the prompted model's loss counts."""
    return stock(shifted_label_batches(trainer, batch_samples), device)


def adopt_trainer_hooks(trainer: Any) -> None:
    """Give a stock `Trainer` instance the checkpoint loading and target count of `SoftPromptMixin`."""
    for name, hook in (("_load_from_checkpoint", load_from_checkpoint), ("_load_best_model", load_best_model),
                       ("_get_num_items_in_batch", get_num_items_in_batch)):
        setattr(trainer, name, functools.partial(hook, getattr(trainer, name), trainer))
