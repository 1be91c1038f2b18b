"""PEFT's `PromptTuningConfig` and `PromptEncoderConfig` (objects or their dicts) as `SoftPromptConfig`s.

Accepted wherever a `SoftPromptConfig` is (`add_soft_prompt`, `SoftPromptTrainer`,
`SoftPromptCallback`), so a PEFT recipe moves over unchanged. Every PEFT field with a counterpart is
carried over, the init text and tokenizer included; a field set to something this package cannot
do is refused by name; fields PEFT fills in itself (`num_layers`, `peft_version`, ...) are ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .config import SoftPromptConfig

_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING")
# PEFT field -> SoftPromptConfig field.
_SAME = {"num_virtual_tokens": "num_virtual_tokens", "token_dim": "token_dim", "task_type": "task_type",
         "base_model_name_or_path": "base_model_name_or_path", "modules_to_save": "trainable_modules"}
_PROMPT_TUNING = {"prompt_tuning_init": "init", "prompt_tuning_init_text": "init_text",
                  "tokenizer_name_or_path": "tokenizer_name_or_path", "tokenizer_kwargs": "tokenizer_kwargs"}
_P_TUNING = {"encoder_reparameterization_type": "encoder", "encoder_hidden_size": "encoder_hidden_size",
             "encoder_num_layers": "encoder_num_layers", "encoder_dropout": "encoder_dropout"}
# Filled in by PEFT itself (from the model, or as bookkeeping): nothing to carry over.
_IGNORED = ("peft_type", "auto_mapping", "peft_version", "revision", "num_attention_heads", "num_layers")


def is_peft_prompt_config(config: Any) -> bool:
    """Whether `config` is a PEFT prompt-tuning or P-tuning config, as an object or a dict."""
    return _peft_type(config) in _PEFT_TYPES


def from_peft_config(config: Any) -> SoftPromptConfig:
    """The `SoftPromptConfig` of a PEFT `PromptTuningConfig` / `PromptEncoderConfig` (or its dict)."""
    data = _as_dict(config)
    peft_type = _peft_type(data)
    if peft_type not in _PEFT_TYPES:
        raise ValueError(f"A PEFT config of peft_type={peft_type!r} is not a soft prompt; PROMPT_TUNING "
                         "(PromptTuningConfig) and P_TUNING (PromptEncoderConfig) are.")
    fields = {**_SAME, **(_PROMPT_TUNING if peft_type == "PROMPT_TUNING" else _P_TUNING)}
    refused = []
    if data.get("inference_mode"):
        refused.append("inference_mode=True (to load a trained prompt for inference: load_soft_prompt(model, dir))")
    if data.get("num_transformer_submodules") not in (None, 1):
        refused.append(f"num_transformer_submodules={data['num_transformer_submodules']!r} (one prompt table, "
                       "on the encoder of a seq2seq model)")
    unknown = sorted(k for k, v in data.items() if k not in fields and k not in _IGNORED
                     and k not in ("inference_mode", "num_transformer_submodules") and v is not None)
    refused += [f"{k}={data[k]!r}" for k in unknown]
    if refused:
        raise ValueError(f"This PEFT {peft_type} config sets what hf-softprompt does not support: "
                         f"{'; '.join(refused)}. Leave those fields at PEFT's defaults.")
    kwargs = {ours: _plain(data[peft]) for peft, ours in fields.items() if data.get(peft) is not None}
    if peft_type == "P_TUNING":
        kwargs["encoder"] = str(kwargs.get("encoder", "MLP")).lower()
    elif "init" in kwargs:
        kwargs["init"] = str(kwargs["init"]).lower()
    return SoftPromptConfig(**kwargs)


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    raise TypeError(f"Expected a PEFT config or its dict, got {type(config).__name__}.")


def _peft_type(config: Any) -> str | None:
    value = config.get("peft_type") if isinstance(config, Mapping) else getattr(config, "peft_type", None)
    return None if value is None else str(_plain(value))


def _plain(value: Any) -> Any:
    """An enum member's value (PEFT's `TaskType.CAUSAL_LM`, `PromptTuningInit.TEXT`), else `value`."""
    return getattr(value, "value", value)
