"""`SoftPromptCallback`: soft-prompt tuning with the stock `transformers.Trainer`.

The callback puts the prompt on the Trainer's model at `on_init_end`, before `train()` builds
the optimizer from the parameters that require grad, and makes the model's `save_pretrained`
write the adapter. Everything else (forward, loss, `evaluate`, `predict`, `generate`) is the
injection of `inject.py`, which needs no help from the Trainer.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .attach import add_soft_prompt
from .config import SoftPromptConfig
from .inject import get_injector
from .serialization import save_soft_prompt

logger = logging.getLogger(__name__)


class SoftPromptCallback(TrainerCallback):
    """Trains a soft prompt with the stock `Trainer`: pass it (or its class) in `callbacks`.

    At the end of `Trainer.__init__` the callback adds a prompt built from `config` to the model,
    which freezes every base parameter, so `train()` builds its optimizer over the prompt alone
    (plus the task head of classifiers, or `config.trainable_modules`). A model that already
    carries a prompt (`add_soft_prompt`, or an adapter loaded with `is_trainable=True`) is used as
    it is. From then on the model's `save_pretrained`, and so `trainer.save_model(dir)` and every
    `checkpoint-N`, writes the adapter (`adapter_config.json` and `adapter_model.safetensors`)
    instead of the base weights.

    What only [`SoftPromptTrainer`] does, because a callback cannot reach those parts of the
    Trainer: resuming from an adapter-only checkpoint (`train(resume_from_checkpoint=...)`) and
    `load_best_model_at_end=True` (the stock Trainer loads checkpoints as base weights before any
    callback event; both are refused here at construction when set in the training arguments),
    the trainable-parameter count in the log history (the callback prints it once at the start,
    and logs it at INFO), and the loss normalisation of Llama-style
    causal LMs, whose target tokens the Trainer counts before the prompt exists (the loss comes
    out a few percent too large; the gradient direction is unchanged).

    Args:
        config (`SoftPromptConfig`, *optional*): the prompt to add. Defaults to
            `SoftPromptConfig()` (20 randomly initialised virtual tokens). Leave it out to train a
            prompt the model already carries.

    Example:
        ```python
        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          callbacks=[SoftPromptCallback(SoftPromptConfig(num_virtual_tokens=8))])
        trainer.train()
        trainer.save_model("out")  # out/adapter_config.json, out/adapter_model.safetensors
        ```
    """

    def __init__(self, config: SoftPromptConfig | None = None) -> None:
        if config is not None and not isinstance(config, SoftPromptConfig):
            raise TypeError(
                f"SoftPromptCallback takes a SoftPromptConfig or None, got {type(config).__name__}. "
                "Build one with SoftPromptConfig(num_virtual_tokens=...)."
            )
        self.config = config
        # Set by SoftPromptTrainer, whose overrides load adapter checkpoints and which logs the
        # trainable-parameter count through Trainer.log.
        self._in_soft_prompt_trainer = False

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        model: nn.Module | None = None, **kwargs: Any,
    ) -> None:
        # Now, not at on_train_begin: by then `train()` has built the optimizer without the prompt.
        if not self._in_soft_prompt_trainer:
            # The stock Trainer loads checkpoints as base-model weights, before any callback event:
            # refuse now what would fail later (resume_from_checkpoint is what scripts pass to train()).
            wanted = [n for n in ("load_best_model_at_end", "resume_from_checkpoint") if getattr(args, n)]
            if wanted:
                raise ValueError(
                    f"{wanted[0]}={getattr(args, wanted[0])!r} needs SoftPromptTrainer: the stock Trainer "
                    "loads a checkpoint as base-model weights, and soft-prompt checkpoints hold only "
                    "the adapter. Use SoftPromptTrainer(..., soft_prompt_config=...), or load the "
                    "adapter yourself with load_soft_prompt_weights(model, checkpoint_dir)."
                )
        prepare_model(model, self.config)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        model: nn.Module | None = None, **kwargs: Any,
    ) -> None:
        if get_injector(model) is None:
            # `model_init` builds a new model inside `train()`, after on_init_end.
            raise ValueError(
                f"The {type(model).__name__} being trained carries no soft prompt: with model_init, "
                "the Trainer builds a new model inside train(). Call add_soft_prompt(model, config) "
                "at the end of your model_init function."
            )
        if state.is_world_process_zero:
            summary = describe_trainable(model)
            logger.info(summary)
            if not self._in_soft_prompt_trainer:
                # A callback cannot reach the stock Trainer's logs: print the count once, as PEFT's
                # print_trainable_parameters() does (SoftPromptTrainer puts it in the logs instead).
                print(summary)


def prepare_model(model: nn.Module | None, config: SoftPromptConfig | None) -> nn.Module:
    """Put a prompt on `model` (unless it carries one) and make `save_pretrained` write the adapter.

    The single setup step of both `SoftPromptCallback` and `SoftPromptTrainer`.
    """
    if model is None:
        raise ValueError(
            "SoftPromptCallback got no model from the Trainer. Pass model=... to the Trainer "
            "(with model_init, call add_soft_prompt inside model_init)."
        )
    injector = get_injector(model)
    if injector is None:
        add_soft_prompt(model, config)
    elif config is not None:
        raise ValueError(
            f"The {type(model).__name__} already carries a soft prompt "
            f"({injector.config.num_virtual_tokens} virtual tokens), and a SoftPromptConfig was given "
            "too. Pass no config to train the existing prompt, or call remove_soft_prompt(model) "
            "first to train a new one."
        )
    elif not any(p.requires_grad for p in model.parameters()):
        logger.warning(
            "The model's soft prompt has no trainable parameters (an adapter loaded for inference): "
            "evaluate() and predict() work, train() will fail. Load it with is_trainable=True to "
            "continue training."
        )
    model.save_pretrained = AdapterSavePretrained(model)
    return model


class AdapterSavePretrained:
    """`save_pretrained` of a soft-prompted model: the adapter files, never the base weights.

    Set on the model instance by `prepare_model` (an object rather than a bound method, so the
    model still pickles and deep-copies). The Trainer's `_save` calls it for `save_model` and
    every checkpoint, with `is_main_process=False` on all ranks but the first. Sharding
    arguments do not apply to an adapter and are ignored.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(
        self, save_directory: str | os.PathLike, is_main_process: bool = True,
        state_dict: dict | None = None, push_to_hub: bool = False, **kwargs: Any,
    ) -> None:
        model = self.model
        if get_injector(model) is None:  # remove_soft_prompt since: the plain model again
            return type(model).save_pretrained(
                model, save_directory, is_main_process=is_main_process, state_dict=state_dict,
                push_to_hub=push_to_hub, **kwargs,
            )
        if push_to_hub:
            raise ValueError(
                "save_pretrained(push_to_hub=True) is not supported for a soft-prompted model. Use "
                "save_soft_prompt(model, dir, push_to_hub=True, repo_id=...), which uploads the "
                "adapter and its model card."
            )
        if is_main_process:
            save_soft_prompt(model, save_directory)
        return None


def trainable_counts(model: nn.Module) -> dict[str, float]:
    """Virtual tokens, trainable parameters and their share of all parameters, for the logs."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "soft_prompt_virtual_tokens": get_injector(model).config.num_virtual_tokens,
        "trainable_params": trainable,
        "trainable_percent": 100.0 * trainable / max(total, 1),
    }


def describe_trainable(model: nn.Module) -> str:
    """E.g. "soft prompt: 20 virtual tokens, 15,360 trainable parameters (0.0123 %)"."""
    counts = trainable_counts(model)
    return (
        f"soft prompt: {counts['soft_prompt_virtual_tokens']} virtual tokens, "
        f"{counts['trainable_params']:,} trainable parameters ({counts['trainable_percent']:.3g} %)"
    )
