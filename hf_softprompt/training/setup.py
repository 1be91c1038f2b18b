"""Setting a model up for training, shared by `SoftPromptCallback` and `SoftPromptTrainer`: its
prompts, what the core's errors tell a Trainer's user, and the trainable-parameter counts."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..config import SoftPromptConfig
from ..model.attach import add_soft_prompt, as_soft_prompt_config, remove_soft_prompt
from ..model.bank import DEFAULT_NAME
from ..model.injector import get_injector, require_bank, require_injector
from ..peft_config import is_peft_prompt_config

logger = logging.getLogger(__name__)

PromptConfigs = SoftPromptConfig | Mapping[str, SoftPromptConfig]

# What the core's input errors add for the clients that train through a Trainer: the knob that
# makes their inputs fit (`{fits}`: the most input tokens that do), and how TRL turns packing off.
CLIENT_ADVICE = {
    "too_long": (" In transformers' run_glue.py, run_ner.py or run_qa.py --max_seq_length {fits}; with texts "
                 "grouped into blocks as in run_clm.py, --block_size {fits}; with TRL, SFTConfig(max_length={fits})."),
    "packed": " With TRL: SFTConfig(packing=False, padding_free=False).",
    "dropped": (" TRL's SFTTrainer collator drops it: train several prompts through TRL one prompt per run "
                "(set_active_soft_prompt), or use SoftPromptTrainer with transformers' DataCollatorWithPadding "
                "or default_data_collator, which keep the column."),
}


def check_prompt_configs(config: PromptConfigs | None) -> dict[str, SoftPromptConfig] | None:
    """`{name: config}` from a config, a mapping of them, or None (the model's own prompts)."""
    if config is None:
        return None
    if isinstance(config, SoftPromptConfig) or is_peft_prompt_config(config):
        return {DEFAULT_NAME: as_soft_prompt_config(config)}
    if isinstance(config, Mapping) and config and all(
            isinstance(k, str) and (isinstance(v, SoftPromptConfig) or is_peft_prompt_config(v))
            for k, v in config.items()):
        return {name: as_soft_prompt_config(each) for name, each in config.items()}
    raise TypeError(
        f"Expected a SoftPromptConfig (or PEFT's PromptTuningConfig / PromptEncoderConfig), a non-empty dict of "
        f"them by prompt name, or None; got {config!r}. Build one with SoftPromptConfig(num_virtual_tokens=...)."
    )


def prepare_model(model: nn.Module | None, config: PromptConfigs | None) -> nn.Module:
    """Put prompts on `model` (unless it carries some) and make `save_pretrained` write the adapters.

    The single setup step of both `SoftPromptCallback` and `SoftPromptTrainer`.
    """
    if model is None:
        raise ValueError(
            "SoftPromptCallback got no model from the Trainer. Pass model=... to the Trainer "
            "(with model_init, call add_soft_prompt inside model_init)."
        )
    injector = get_injector(model)
    configs = check_prompt_configs(config)
    if injector is None:
        added = []
        try:
            for name, each in (configs or {DEFAULT_NAME: SoftPromptConfig()}).items():
                add_soft_prompt(model, each, name=name)
                added.append(name)
        except BaseException:
            for name in reversed(added):
                remove_soft_prompt(model, name)
            raise
    elif configs is not None:
        raise ValueError(
            f"The {type(model).__name__} already carries soft prompts {injector.bank.names()}, and "
            "SoftPromptConfigs were given too. Pass no config to train the existing prompts, or call "
            "remove_soft_prompt(model) first to train new ones."
        )
    elif not any(p.requires_grad for p in model.parameters()):
        logger.warning(
            "The model's soft prompt has no trainable parameters (an adapter loaded for inference): "
            "evaluate() and predict() work, train() will fail. Load it with is_trainable=True to "
            "continue training."
        )
    require_injector(model).client_advice.update(CLIENT_ADVICE)
    return model


def trainable_counts(model: nn.Module) -> dict[str, float]:
    """Virtual tokens (all prompts), trainable parameters and their share of all parameters, for the logs."""
    bank = require_bank(model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts = {
        "soft_prompt_virtual_tokens": sum(bank.lengths().values()),
        "trainable_params": trainable,
        "trainable_percent": 100.0 * trainable / max(total, 1),
    }
    if len(bank) > 1:
        counts["soft_prompts"] = len(bank)
    return counts


def describe_trainable(model: nn.Module) -> str:
    """E.g. "soft prompt: 20 virtual tokens, 15,360 trainable parameters (0.0123 %)", or for several
    "3 soft prompts (a: 8, b: 16, c: 4 virtual tokens), ..."."""
    counts = trainable_counts(model)
    lengths = require_bank(model).lengths()
    prompts = (f"soft prompt: {counts['soft_prompt_virtual_tokens']} virtual tokens" if len(lengths) == 1 else
               f"{len(lengths)} soft prompts ({', '.join(f'{n}: {p}' for n, p in lengths.items())} virtual tokens)")
    return f"{prompts}, {counts['trainable_params']:,} trainable parameters ({counts['trainable_percent']:.3g} %)"


# Prompts train at rates a thousand times a full fine-tune's (Lester et al.: 0.3 with Adafactor; AdamW
# 3e-2..1e-1 on the main job, 0.1 the best measured). Below this, a few hundred steps move a prompt by
# almost nothing.
MIN_PROMPT_LEARNING_RATE = 1e-3


def warn_if_prompt_rate_is_too_low(optimizer: Any, model: nn.Module) -> str | None:
    """Warn (and return the message) when the optimizer trains the prompts at a rate below
    `MIN_PROMPT_LEARNING_RATE`, e.g. `TrainingArguments`' default 5e-5."""
    prompt_params = {id(p) for p in require_bank(model).parameters()}
    rates = sorted({group.get("initial_lr", group.get("lr")) for group in getattr(optimizer, "param_groups", [])
                    if any(id(p) in prompt_params for p in group["params"])} - {None})
    if not rates or rates[0] >= MIN_PROMPT_LEARNING_RATE:
        return None
    message = (
        f"The soft prompts train at learning_rate={rates[0]:g}, which moves a prompt by almost nothing in a few "
        f"hundred steps (TrainingArguments' default 5e-05 is meant for full fine-tuning). Prompts train at "
        f"{MIN_PROMPT_LEARNING_RATE:g} or more: TrainingArguments(learning_rate=0.1) with AdamW (the main job's "
        "setting), or 0.3 with Adafactor as in Lester et al. (2021)."
    )
    warnings.warn(message, UserWarning, stacklevel=2)
    logger.warning(message)
    return message
