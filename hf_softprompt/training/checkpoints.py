"""The Trainer methods soft prompts change, for the subclass and the callback alike.

- Checkpoint loading (resume, `load_best_model_at_end`): our checkpoints hold the adapters, not
  base weights, so the Trainer's own loaders (which look for full-model weights) cannot read them.
- The target-token count (`num_items_in_batch`): a causal LM predicts `labels[:, 1:]`, with a
  prompt as without, but the Trainer knows that only from the config's `loss_type` (Llama has
  it; GPT-2 has none, so the stock count includes `labels[:, 0]` and the mean loss is too small).

- A training step's loss (`compute_loss`) and a loss-only held-out pass (`prediction_step`): the
  LM head over the labelled tail of the batch only (labelled_tail.py), where the Trainer's loss is
  the model's own.

`SoftPromptMixin` overrides the methods with these functions; with the stock `Trainer`,
`SoftPromptCallback` puts the same functions on the Trainer instance it belongs to
(`adopt_trainer_hooks`), so both train, count and resume alike. `last_complete_checkpoint` finds
the checkpoint `resume_from_checkpoint=True` resumes from, skipping one a crash left half written.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..files.adapter import local_adapter_files, read_adapter_files
from ..files.commit import reading
from ..files.load import load_soft_prompt_weights
from ..files.prompt_set import has_saved_prompts, prompt_folder, saved_prompt_names
from ..model.injector import get_injector
from .labelled_tail import (
    compute_loss_over_labelled_tail,
    prediction_step_over_labelled_tail,
    runs_trainer_method,
)

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
    # A batch that is not a mapping (TRL's online trainers collate lists of row dicts) holds no labels.
    return [{**batch, "shift_labels": batch["labels"][..., 1:]}
            if isinstance(batch, Mapping) and isinstance(batch.get("labels"), torch.Tensor)
            and "shift_labels" not in batch else batch
            for batch in batch_samples]


def get_num_items_in_batch(stock: Callable, trainer: Any, batch_samples: list, device: torch.device) -> Any:
    """`Trainer._get_num_items_in_batch` counting the targets the prompted model's loss counts."""
    return stock(shifted_label_batches(trainer, batch_samples), device)


def adopt_trainer_hooks(trainer: Any) -> None:
    """Give a stock `Trainer` instance the checkpoint loading and target count of `SoftPromptMixin`."""
    hooks: list[tuple[str, Callable]] = [("_load_from_checkpoint", load_from_checkpoint),
                                         ("_load_best_model", load_best_model),
                                         ("_get_num_items_in_batch", get_num_items_in_batch)]
    if runs_trainer_method(trainer, "compute_loss"):  # the model's own loss: a training step reads no logits
        hooks.append(("compute_loss", compute_loss_over_labelled_tail))
        if runs_trainer_method(trainer, "prediction_step"):  # nor does a loss-only held-out pass
            hooks.append(("prediction_step", prediction_step_over_labelled_tail))
    for name, hook in hooks:
        setattr(trainer, name, functools.partial(hook, getattr(trainer, name), trainer))


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` of `output_dir` that a save finished (its `trainer_state.json`, written
    last, parses and its adapters read), or None. Incomplete ones are named in a warning."""
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return None
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name))
             and os.path.isdir(os.path.join(output_dir, name))]
    skipped = []
    for _, name in sorted(found, reverse=True):
        path = os.path.join(output_dir, name)
        try:
            with open(os.path.join(path, TRAINER_STATE_NAME), encoding="utf-8") as f:
                json.load(f)
            with reading(path):
                names, _ = saved_prompt_names(path)
                for prompt in names:
                    read_adapter_files(*local_adapter_files(os.path.join(path, prompt_folder(prompt))))
        except (OSError, ValueError) as err:
            skipped.append(f"{name} ({type(err).__name__}: {err})")
            continue
        if skipped:
            logger.warning("Skipping incomplete checkpoints (a crash while saving?): %s.", "; ".join(skipped))
        return path
    return None
