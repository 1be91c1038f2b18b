"""Putting a soft prompt on a model and taking it off: `add_soft_prompt`, `remove_soft_prompt`.

Before anything is touched the model is checked (it must take `inputs_embeds`) and the config is
completed from it (task type, token width, base model name). Then the prompt is built (or loaded
from a saved state dict), installed with its hooks (`inject.py`), and the base model is frozen
except for the trainable modules (by default the fresh task head of classification and QA
models). `remove_soft_prompt` undoes all of it, `requires_grad` flags included.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

from .config import Placement, SoftPromptConfig, TaskType
from .inject import PROMPT_MODULE_NAME, get_injector, install_injector, uninstall_injector
from .prompt import SoftPrompt
from .tasks import TASK_SPECS, infer_task_type


def add_soft_prompt(model: nn.Module, config: SoftPromptConfig | None = None) -> nn.Module:
    """Add a trainable soft prompt to a transformers model, in place.

    Freezes every base parameter (except the task head of classification/QA models, or
    `config.trainable_modules`), registers the prompt as `model.soft_prompt` and hooks the model
    so every forward and `generate()` call carries the prompt.

    Args:
        model (`PreTrainedModel`): any `AutoModelFor*` model that accepts `inputs_embeds`.
        config (`SoftPromptConfig`, *optional*): defaults to 20 randomly initialised tokens.

    Returns:
        The same model object (its class, `config` and `forward` signature unchanged).

    Example:
        ```python
        model = add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=8))
        loss = model(**batch).loss
        ```
    """
    config = SoftPromptConfig() if config is None else config
    return attach_soft_prompt(model, config)


def attach_soft_prompt(
    model: nn.Module,
    config: SoftPromptConfig,
    state_dict: dict[str, torch.Tensor] | None = None,
    trainable: bool = True,
) -> nn.Module:
    """Put a prompt on `model`: new (initialised from `config.init`) or from a `SoftPrompt` state
    dict (as saved by the serialization module). With `trainable=False` the prompt is frozen too.
    """
    if not isinstance(config, SoftPromptConfig):
        raise TypeError(f"config must be a SoftPromptConfig, got {type(config).__name__}.")
    if get_injector(model) is not None:
        raise ValueError(
            f"{type(model).__name__} already carries a soft prompt. Call remove_soft_prompt(model) "
            "first, or reuse the existing one."
        )
    embeddings = _check_model(model)
    config = _complete_config(config, model, embeddings)
    if state_dict is None:
        prompt = SoftPrompt(config, embeddings)
    else:
        # The init is about to be overwritten: skip tokenizer loading and vocabulary sampling.
        prompt = SoftPrompt(dataclasses.replace(config, init="random", init_text=None,
                                                tokenizer_name_or_path=None, tokenizer_kwargs=None))
        prompt.load_state_dict(state_dict)
    injector = install_injector(model, config, prompt)
    injector.frozen_flags = _freeze(model, config)
    if not trainable:  # an adapter loaded for inference: nothing trains
        prompt.requires_grad_(False)
        for module in resolve_trainable_modules(model, config):
            module.requires_grad_(False)
    return model


def _check_model(model: nn.Module) -> nn.Module:
    """Fail before any compute when `model` cannot carry a prompt; returns its input embeddings."""
    if not hasattr(model, "get_input_embeddings") or not hasattr(model, "config"):
        raise TypeError(
            f"add_soft_prompt needs a transformers PreTrainedModel, got {type(model).__name__}."
        )
    is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    target = model.get_encoder() if is_encoder_decoder else model
    if "inputs_embeds" not in inspect.signature(target.forward).parameters:
        raise ValueError(
            f"{type(target).__name__}.forward does not accept `inputs_embeds`, so a soft prompt "
            "cannot be prepended to its input. Use a model class whose forward takes inputs_embeds."
        )
    embeddings = model.get_input_embeddings()
    if embeddings is None or getattr(embeddings, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no input embedding table to prompt.")
    if hasattr(model, PROMPT_MODULE_NAME):
        raise ValueError(f"{type(model).__name__} already has an attribute {PROMPT_MODULE_NAME!r}.")
    return embeddings


def _complete_config(config: SoftPromptConfig, model: nn.Module, embeddings: nn.Module) -> SoftPromptConfig:
    """Fill task_type, token_dim and base_model_name_or_path from the model; check they agree."""
    token_dim = embeddings.weight.shape[1]
    if config.token_dim is not None and config.token_dim != token_dim:
        raise ValueError(
            f"config.token_dim={config.token_dim} does not match the model's embedding width "
            f"{token_dim}. Leave token_dim=None to infer it."
        )
    task_type = config.task_type or infer_task_type(model)
    if config.placement is Placement.AFTER_FIRST_TOKEN and task_type is TaskType.CAUSAL_LM:
        raise ValueError(
            "placement='after_first_token' is for encoders with a [CLS] token; a causal LM needs "
            "placement='front'."
        )
    base_name = config.base_model_name_or_path or getattr(model.config, "_name_or_path", None) or None
    return dataclasses.replace(
        config, token_dim=token_dim, task_type=task_type, base_model_name_or_path=base_name
    )


def _freeze(model: nn.Module, config: SoftPromptConfig) -> dict[str, bool]:
    """Freeze the base model; unfreeze the prompt and the trainable modules. Returns the old flags."""
    prompt = getattr(model, PROMPT_MODULE_NAME)
    prompt_ids = {id(p) for p in prompt.parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters() if id(p) not in prompt_ids}
    for param in model.parameters():
        param.requires_grad_(id(param) in prompt_ids)
    for module in resolve_trainable_modules(model, config):
        module.requires_grad_(True)
    return flags


def resolve_trainable_modules(model: nn.Module, config: SoftPromptConfig) -> list[nn.Module]:
    """The base submodules trained with the prompt (`config.trainable_modules` or the task head)."""
    explicit = config.trainable_modules is not None
    names = config.trainable_modules if explicit else TASK_SPECS[config.task_type].default_trainable
    found = []
    for wanted in names:
        matches = [m for n, m in model.named_modules()
                   if (n == wanted or n.endswith("." + wanted)) and not n.startswith(PROMPT_MODULE_NAME)]
        if explicit and not matches:
            raise ValueError(
                f"trainable_modules names {wanted!r}, but {type(model).__name__} has no such "
                "submodule. Use a name from model.named_modules()."
            )
        found.extend(matches)
    return found


def get_soft_prompt_config(model: nn.Module) -> SoftPromptConfig:
    """The complete config of the prompt on `model` (task_type and token_dim filled in)."""
    injector = get_injector(model)
    if injector is None:
        raise ValueError(f"{type(model).__name__} carries no soft prompt; call add_soft_prompt first.")
    return injector.config


def remove_soft_prompt(model: nn.Module) -> nn.Module:
    """Undo `add_soft_prompt`: remove hooks and the prompt, restore every `requires_grad` flag."""
    injector = uninstall_injector(model)
    for name, param in model.named_parameters():
        if name in injector.frozen_flags:
            param.requires_grad_(injector.frozen_flags[name])
    return model
