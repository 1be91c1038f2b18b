"""Putting named soft prompts on a model and taking them off.

`add_soft_prompt` checks everything before the model is touched (it must take `inputs_embeds`,
the config must fit it and the prompts already there), then builds the prompt (or loads it from a
saved state dict) and its own copies of the trainable modules (by default the task head of
classification and QA models), and registers them in the model's `SoftPromptBank`. The first
prompt installs the injection (`injector.py`) and freezes the base model; `remove_soft_prompt` of
the last one undoes all of it, `requires_grad` flags included, leaving the bare base model.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..accessors import encoder_of, input_embeddings, weight_of
from ..config import Placement, SoftPromptConfig, TaskType, config_enum
from ..peft_config import from_peft_config, is_peft_prompt_config
from ..prompt import SoftPrompt
from .bank import BANK_MODULE_NAME, DEFAULT_NAME, SoftPromptBank, check_prompt_name
from .fingerprint import embedding_fingerprint
from .heads import copy_module, install_routing, uninstall_routing
from .injector import SoftPromptInjector, get_injector, install_injector, require_bank, uninstall_injector
from .quantization import drop_nominal_gguf_quantizer, gguf_file_of
from .tasks import TASK_SPECS, known_task_type, max_positions

# Settings of the injection itself: every prompt on one model must agree on them.
MODEL_LEVEL_FIELDS = ("task_type", "placement", "shared_prompt_cache")


def add_soft_prompt(model: nn.Module, config: SoftPromptConfig | Any = None, name: str = DEFAULT_NAME) -> nn.Module:
    """Add a trainable soft prompt to a transformers model, in place.

    The first prompt freezes every base parameter and hooks the model so every forward and
    `generate()` call carries a prompt. A model may carry several named prompts (of any length,
    init and P-tuning encoder): calls use the active one (`set_active_soft_prompt`), or one per
    row with `model(**batch, soft_prompt_names=[...])`. Classification and QA prompts get their own
    copy of the task head (or of `config.trainable_modules`), trained with them; the base head
    stays as it is.

    Args:
        model (`PreTrainedModel`): any `AutoModelFor*` model that accepts `inputs_embeds`.
        config (`SoftPromptConfig`, *optional*): defaults to 20 randomly initialised tokens. PEFT's
            `PromptTuningConfig` / `PromptEncoderConfig` (or their dicts) are taken too.
        name (`str`, defaults to `"default"`): the prompt's name, unique on the model.

    Returns:
        The same model object (its class, `config` and `forward` signature unchanged).

    Example:
        ```python
        model = add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=8))
        model = add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=16), name="topics")
        loss = model(**batch, soft_prompt_names=["default", "topics", None]).loss
        ```
    """
    config = SoftPromptConfig() if config is None else as_soft_prompt_config(config)
    return attach_soft_prompt(model, config, name=name)


def as_soft_prompt_config(config: Any) -> SoftPromptConfig:
    """`config` itself, or the `SoftPromptConfig` of a PEFT prompt-tuning / P-tuning config."""
    if isinstance(config, SoftPromptConfig):
        return config
    if is_peft_prompt_config(config):
        return from_peft_config(config)
    raise TypeError(f"config must be a SoftPromptConfig (or PEFT's PromptTuningConfig / PromptEncoderConfig), got "
                    f"{type(config).__name__}.")


def attach_soft_prompt(
    model: nn.Module,
    config: SoftPromptConfig,
    state_dict: dict[str, torch.Tensor] | None = None,
    trainable: bool = True,
    name: str = DEFAULT_NAME,
    head_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> nn.Module:
    """Put a prompt named `name` on `model`: new (initialised from `config.init`) or from a
    `SoftPrompt` state dict, with `head_tensors` (`{module path: state dict}`) for its head copies.
    With `trainable=False` the prompt and its heads are frozen. On any error the model is left
    exactly as it was."""
    if not isinstance(config, SoftPromptConfig):
        raise TypeError(f"config must be a SoftPromptConfig, got {type(config).__name__}.")
    _check_name(model, name)
    embeddings = _check_model(model)
    config = complete_config(config, model, embeddings)
    prompt, heads = _build(model, config, embeddings, state_dict, head_tensors)
    # Nothing above touched the model; from here on every step is undone on failure.
    injector = get_injector(model)
    first = injector is None
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        if injector is None:  # the model's first prompt
            injector = install_injector(model, SoftPromptBank(), config)
            injector.frozen_flags = flags
            for param in model.parameters():
                param.requires_grad_(False)
        injector.bank.add(name, config, prompt, heads)
        for path in heads:
            install_routing(model, path, injector.bank)
        for param in injector.bank.trainable_parameters(name):
            param.requires_grad_(trainable)
        if first:
            drop_nominal_gguf_quantizer(model)  # a GGUF base dequantized on load trains like any other
    except BaseException:
        if first and get_injector(model) is not None:
            uninstall_injector(model)
        elif not first and injector is not None and name in injector.bank:
            _detach(model, injector, name)
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
        raise
    return model


def _build(model: nn.Module, config: SoftPromptConfig, embeddings: nn.Module,
           state_dict: dict[str, torch.Tensor] | None,
           head_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None) -> tuple[SoftPrompt, dict[str, nn.Module]]:
    """The prompt and its head copies, on the embeddings' device; the model is not touched."""
    if state_dict is None:
        prompt = SoftPrompt(config, embeddings)
    else:
        # The init is about to be overwritten: skip tokenizer loading and vocabulary sampling.
        prompt = SoftPrompt(dataclasses.replace(config, init="random", init_text=None,
                                                tokenizer_name_or_path=None, tokenizer_kwargs=None))
        prompt.load_state_dict(state_dict)
    prompt.to(weight_of(embeddings).device)
    heads = {path: copy_module(module) for path, module in resolve_trainable_modules(model, config)}
    for path, state in (head_tensors or {}).items():
        if path not in heads:
            raise ValueError(f"Head weights for {path!r}, but the prompt owns {sorted(heads)} "
                             "(config.trainable_modules).")
        heads[path].load_state_dict(state)
    return prompt, heads


def _check_name(model: nn.Module, name: str) -> None:
    check_prompt_name(name)
    injector = get_injector(model)
    if injector is not None and name in injector.bank:
        raise ValueError(
            f"{type(model).__name__} already carries a soft prompt named {name!r} (its prompts: "
            f"{injector.bank.names()}). Pick another name, or call remove_soft_prompt(model, {name!r}) first."
        )


def _check_model(model: nn.Module) -> nn.Module:
    """Fail before any compute when `model` cannot carry a prompt; returns its input embeddings."""
    if not hasattr(model, "get_input_embeddings") or not hasattr(model, "config"):
        raise TypeError(
            f"add_soft_prompt needs a transformers PreTrainedModel, got {type(model).__name__}."
        )
    is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    target = encoder_of(model) if is_encoder_decoder else model
    if "inputs_embeds" not in inspect.signature(target.forward).parameters:
        raise ValueError(
            f"{type(target).__name__}.forward does not accept `inputs_embeds`, so a soft prompt "
            "cannot be prepended to its input. Use a model class whose forward takes inputs_embeds."
        )
    embeddings = input_embeddings(model)
    if embeddings is None or getattr(embeddings, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no input embedding table to prompt.")
    if embeddings.weight.device.type == "meta":
        raise ValueError(
            f"{type(model).__name__}'s weights are on the meta device (not loaded), so a prompt cannot be "
            "initialised from them. Load the weights first (from_pretrained without device_map='meta', "
            "or model.to_empty(...) and load_state_dict)."
        )
    if hasattr(embeddings.weight, "ds_id"):  # created under deepspeed.zero.Init: (0,)-shaped partitions
        raise ValueError(
            f"{type(model).__name__}'s weights are partitioned by DeepSpeed ZeRO-3 (the model was created "
            "under zero.Init, e.g. after TrainingArguments(deepspeed=<a stage-3 config>)), so a prompt cannot "
            "be sized or initialised from them; hf-softprompt does not support ZeRO-3. Shard with FSDP2 "
            "instead (TrainingArguments(fsdp='full_shard', fsdp_config={'fsdp_version': 2}))."
        )
    if embeddings.weight.dim() != 2:  # FSDP1 (use_orig_params=True) outside forward: a flat piece
        raise ValueError(
            f"{type(model).__name__}'s input embeddings read as a {tuple(embeddings.weight.shape)} tensor, not a "
            "(vocabulary, width) table: the model is already wrapped by FSDP1, which keeps flattened pieces. "
            "Add the prompt before wrapping (the Trainer does), or shard with FSDP2 (fully_shard)."
        )
    if get_injector(model) is None and hasattr(model, BANK_MODULE_NAME):
        raise ValueError(f"{type(model).__name__} already has an attribute {BANK_MODULE_NAME!r}.")
    return embeddings


def complete_config(config: SoftPromptConfig, model: nn.Module, embeddings: nn.Module) -> SoftPromptConfig:
    """Fill task_type, token_dim and base_model_name_or_path from the model; check they agree with
    it and with the prompts already on it."""
    token_dim = weight_of(embeddings).shape[1]
    if config.token_dim is not None and config.token_dim != token_dim:
        raise ValueError(
            f"config.token_dim={config.token_dim} does not match the model's embedding width "
            f"{token_dim}. Leave token_dim=None to infer it."
        )
    inferred = known_task_type(model)
    task_type = config.task_type or inferred
    if task_type is None:
        allowed = ", ".join(t.value for t in TaskType)
        raise ValueError(f"Cannot infer the task type of {type(model).__name__}. Pass "
                         f"SoftPromptConfig(task_type=...), one of {allowed}.")
    task_type = config_enum(TaskType, task_type, "task_type")
    if inferred is not None and task_type is not inferred and task_type is not TaskType.FEATURE_EXTRACTION:
        raise ValueError(
            f"task_type={task_type.value!r} does not match {type(model).__name__}, a "
            f"{inferred.value} model: its labels and outputs would be misaligned. Leave task_type=None "
            f"to infer it, or load the model with the AutoModelFor... class of {task_type.value}."
        )
    if config.placement is Placement.AFTER_FIRST_TOKEN and task_type is TaskType.CAUSAL_LM:
        raise ValueError(
            "placement='after_first_token' is for encoders with a [CLS] token; a causal LM needs "
            "placement='front'."
        )
    limit = max_positions(model.config)
    if limit is not None and config.num_virtual_tokens >= limit:
        raise ValueError(
            f"num_virtual_tokens={config.num_virtual_tokens} leaves no room for input: "
            f"{type(model).__name__} has {limit} positions. Use fewer virtual tokens (typically 8 to 32)."
        )
    injector = get_injector(model)
    first = injector.bank.configs[injector.bank.names()[0]] if injector is not None else None
    base_name = config.base_model_name_or_path or getattr(model.config, "_name_or_path", None) or None
    # The first prompt drops a dequantized GGUF base's quantizer (and the file name with it).
    gguf_file = gguf_file_of(model) or (
        first.base_model_gguf_file if first is not None else config.base_model_gguf_file)
    config = dataclasses.replace(config, token_dim=token_dim, task_type=task_type,
                                 base_model_name_or_path=base_name, base_model_gguf_file=gguf_file,
                                 base_model_fingerprint=embedding_fingerprint(weight_of(embeddings)))
    if first is not None:
        for field in MODEL_LEVEL_FIELDS:
            if getattr(config, field) != getattr(first, field):
                value = lambda v: getattr(v, "value", v)  # noqa: E731
                raise ValueError(
                    f"The new prompt has {field}={value(getattr(config, field))!r}, but the prompts on the "
                    f"model have {field}={value(getattr(first, field))!r}; all prompts of one model share "
                    f"{', '.join(MODEL_LEVEL_FIELDS)}. Use the same {field}."
                )
    resolve_trainable_modules(model, config)  # fails here, before anything is built, on a bad name
    return config


def resolve_trainable_modules(model: nn.Module, config: SoftPromptConfig) -> list[tuple[str, nn.Module]]:
    """The base submodules a prompt owns a copy of (`config.trainable_modules` or the task head), as
    `(path, module)`; a module inside another one listed is covered by it."""
    explicit = config.trainable_modules is not None
    names = (config.trainable_modules if config.trainable_modules is not None
             else TASK_SPECS[config_enum(TaskType, config.task_type, "task_type")].default_trainable)
    found: dict[str, nn.Module] = {}
    for wanted in names:
        matches = [(n, m) for n, m in model.named_modules()
                   if (n == wanted or n.endswith("." + wanted)) and not n.startswith(BANK_MODULE_NAME)]
        if explicit and not matches:
            raise ValueError(
                f"trainable_modules names {wanted!r}, but {type(model).__name__} has no such "
                "submodule. Use a name from model.named_modules()."
            )
        found.update(matches)
    outermost = [p for p in found if not any(p.startswith(q + ".") for q in found if q != p)]
    return [(p, found[p]) for p in sorted(outermost)]


def _detach(model: nn.Module, injector: SoftPromptInjector, name: str) -> None:
    """Take prompt `name` out of the bank, and the routing of heads no other prompt owns."""
    bank = injector.bank
    paths = bank.owned.get(name, [])
    bank.remove(name)
    still_owned = {p for other in bank.names() for p in bank.owned[other]}
    for path in paths:
        if path not in still_owned:
            uninstall_routing(model, path)


def soft_prompt_names(model: nn.Module) -> list[str]:
    """The names of the prompts on `model`, in order (`[]` without any). The ids of a
    `soft_prompt_ids` dataset column are positions in this list."""
    injector = get_injector(model)
    return [] if injector is None else injector.bank.names()


def set_active_soft_prompt(model: nn.Module, name: str | None) -> nn.Module:
    """Choose the prompt (and with it the task head) of calls that name none; None for the bare
    model. Per-row `soft_prompt_names` still choose for themselves."""
    bank = require_bank(model)
    if name is not None and name not in bank:
        raise ValueError(f"No soft prompt named {name!r}; the model carries {bank.names()} (or None for none).")
    bank.active = name
    return model


def get_active_soft_prompt(model: nn.Module) -> str | None:
    """The name of the prompt calls use when they name none (None: the bare model)."""
    return require_bank(model).active


def get_soft_prompt_config(model: nn.Module, name: str | None = None) -> SoftPromptConfig:
    """The complete config (task_type and token_dim filled in) of prompt `name`, by default the
    active one, else the first."""
    bank = require_bank(model)
    return bank.configs[bank.resolve(name)]


def remove_soft_prompt(model: nn.Module, name: str | None = None) -> nn.Module:
    """Remove prompt `name` (with its own task heads), or with `name=None` every prompt. Removing
    the last one unwraps the model and restores every `requires_grad` flag: the bare base model."""
    injector = get_injector(model)
    if injector is None:
        raise ValueError(f"{type(model).__name__} carries no soft prompt to remove.")
    bank = injector.bank
    if name is not None and name not in bank:
        raise ValueError(f"No soft prompt named {name!r} to remove; the model carries {bank.names()}.")
    for each in ([name] if name is not None else bank.names()):
        _detach(model, injector, each)
    if len(bank) == 0:
        uninstall_injector(model)
        for param_name, param in model.named_parameters():
            if param_name in injector.frozen_flags:
                param.requires_grad_(injector.frozen_flags[param_name])
    return model
