"""Adapter files in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

Export (what inference and PEFT need): `prompt_embeddings`, the (P, D) prompt already through
the P-tuning encoder. Training state (what exact resume needs): the raw embedding table and the
encoder weights under `hf_softprompt.*`, and trained task heads under PEFT's `base_model.*` keys.
PEFT ignores the extra tensors; our own config rides in the safetensors metadata, so the JSON
holds only keys PEFT knows.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import SoftPromptConfig, TaskType
from .inject import PROMPT_MODULE_NAME, attach_soft_prompt, get_injector, resolve_trainable_modules

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)
PROMPT_KEY = "prompt_embeddings"
STATE_PREFIX = "hf_softprompt."
HEAD_PREFIX = "base_model."
METADATA_CONFIG_KEY = "hf_softprompt_config"


def peft_config_dict(config: SoftPromptConfig, model: nn.Module) -> dict[str, Any]:
    """`config` as PEFT's `PromptTuningConfig` / `PromptEncoderConfig` JSON."""
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_names = [n for n, _ in _trainable_module_items(model, config)]
    out: dict[str, Any] = {
        "auto_mapping": None,
        "base_model_name_or_path": config.base_model_name_or_path,
        "inference_mode": True,
        "modules_to_save": head_names or None,
        "num_attention_heads": getattr(text_config, "num_attention_heads", None),
        "num_layers": getattr(text_config, "num_hidden_layers", None),
        # One prompt table, on the encoder for seq2seq (PEFT would otherwise expect 2P rows).
        "num_transformer_submodules": 1,
        "num_virtual_tokens": config.num_virtual_tokens,
        "revision": None,
        "task_type": config.task_type.value if config.task_type is not TaskType.MASKED_LM else None,
        "token_dim": config.token_dim,
    }
    if config.is_p_tuning:
        out.update(
            peft_type="P_TUNING",
            encoder_reparameterization_type=config.encoder.value.upper(),
            encoder_hidden_size=config.encoder_hidden_size or config.token_dim,
            encoder_num_layers=config.encoder_num_layers,
            encoder_dropout=config.encoder_dropout,
        )
    else:
        out.update(
            peft_type="PROMPT_TUNING",
            prompt_tuning_init=config.init.value.upper(),
            prompt_tuning_init_text=config.init_text,
            tokenizer_name_or_path=config.tokenizer_name_or_path,
            tokenizer_kwargs=config.tokenizer_kwargs,
        )
    return out


def config_from_peft_dict(data: dict[str, Any]) -> SoftPromptConfig:
    """A `SoftPromptConfig` from a PEFT `adapter_config.json` (for adapters PEFT saved)."""
    peft_type = data.get("peft_type")
    if peft_type not in ("PROMPT_TUNING", "P_TUNING"):
        raise ValueError(
            f"adapter_config.json has peft_type={peft_type!r}; only PROMPT_TUNING and P_TUNING "
            "adapters are soft prompts."
        )
    # No encoder even for P_TUNING: PEFT saves only the encoder's output, which is the prompt.
    return SoftPromptConfig(
        num_virtual_tokens=int(data["num_virtual_tokens"]),
        task_type=data.get("task_type"),
        token_dim=data.get("token_dim"),
        base_model_name_or_path=data.get("base_model_name_or_path"),
    )


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the adapter files hold: export, training state and trained heads."""
    injector = _require_prompt(model)
    prompt = getattr(model, PROMPT_MODULE_NAME)
    with torch.no_grad():
        tensors = {PROMPT_KEY: prompt().detach().float().cpu().contiguous()}
    if injector.config.is_p_tuning:
        for name, value in prompt.state_dict().items():
            tensors[STATE_PREFIX + name] = value.detach().cpu().contiguous()
    for name, module in _trainable_module_items(model, injector.config):
        for param_name, value in module.state_dict().items():
            tensors[f"{HEAD_PREFIX}{name}.{param_name}"] = value.detach().cpu().contiguous()
    return tensors


def save_soft_prompt(model: nn.Module, save_directory: str | os.PathLike) -> list[str]:
    """Write the adapter of a soft-prompted model into `save_directory`.

    Each file is written to a temporary name and renamed into place, so a crash never leaves a
    half-written adapter where the last good one was.

    Returns:
        The paths written.
    """
    injector = _require_prompt(model)
    os.makedirs(save_directory, exist_ok=True)
    config_json = json.dumps(peft_config_dict(injector.config, model), indent=2, sort_keys=True) + "\n"
    metadata = {"format": "pt", METADATA_CONFIG_KEY: injector.config.to_json_string()}
    weights_path = os.path.join(save_directory, ADAPTER_WEIGHTS_NAME)
    config_path = os.path.join(save_directory, ADAPTER_CONFIG_NAME)
    tensors = adapter_state_dict(model)
    _atomic_write(weights_path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    _atomic_write(config_path, lambda tmp: _write_text(tmp, config_json))
    return [config_path, weights_path]


def read_adapter(directory: str | os.PathLike) -> tuple[SoftPromptConfig, dict[str, torch.Tensor]]:
    """Read and check the adapter files in a local directory: (config, tensors)."""
    directory = os.fspath(directory)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    config_path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No {os.path.basename(path)} in {directory!r}. A soft-prompt adapter directory holds "
                f"{' and '.join(ADAPTER_FILES)} (written by save_soft_prompt or PEFT)."
            )
    try:
        with safe_open(weights_path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(
            f"{weights_path!r} is not a readable safetensors file ({err}). The file is corrupt or "
            "truncated: save the adapter again."
        ) from err
    if METADATA_CONFIG_KEY in metadata:
        config = SoftPromptConfig.from_dict(json.loads(metadata[METADATA_CONFIG_KEY]))
    else:
        with open(config_path, encoding="utf-8") as f:
            config = config_from_peft_dict(json.load(f))
    if PROMPT_KEY not in tensors:
        raise ValueError(f"{weights_path!r} holds no {PROMPT_KEY!r} tensor; it is not a prompt adapter.")
    return config, tensors


def load_soft_prompt_weights(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load saved adapter weights into the prompt (and heads) already on `model`, for resume."""
    injector = _require_prompt(model)
    config, tensors = read_adapter(directory)
    _check_compatible(injector.config, config, directory)
    prompt = getattr(model, PROMPT_MODULE_NAME)
    prompt.load_state_dict(_prompt_state(config, tensors))
    _load_heads(model, config, tensors)
    return model


def load_local_soft_prompt(model: nn.Module, directory: str | os.PathLike, is_trainable: bool = False) -> nn.Module:
    """Put the adapter saved in `directory` onto a model that carries no prompt yet."""
    config, tensors = read_adapter(directory)
    attach_soft_prompt(model, config, state_dict=_prompt_state(config, tensors), trainable=is_trainable)
    _load_heads(model, config, tensors)
    return model


# -------------------------------------------------------------------- helpers
def _prompt_state(config: SoftPromptConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {k[len(STATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
    if not state:
        # Export only (prompt tuning, or a P-tuning adapter PEFT saved): the table is the prompt.
        # PEFT's seq2seq tables have 2P rows; the first P are the encoder prompt, as in its forward.
        state = {"embedding.weight": tensors[PROMPT_KEY][: config.num_virtual_tokens]}
    return state


def _load_heads(model: nn.Module, config: SoftPromptConfig, tensors: dict[str, torch.Tensor]) -> None:
    for name, module in _trainable_module_items(model, config):
        prefix = f"{HEAD_PREFIX}{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if state:
            module.load_state_dict(state)


def _trainable_module_items(model: nn.Module, config: SoftPromptConfig) -> list[tuple[str, nn.Module]]:
    modules = {id(m) for m in resolve_trainable_modules(model, config)}
    return [(n, m) for n, m in model.named_modules() if id(m) in modules]


def _check_compatible(expected: SoftPromptConfig, saved: SoftPromptConfig, where: Any) -> None:
    for field in ("num_virtual_tokens", "token_dim", "task_type", "encoder"):
        a, b = getattr(expected, field), getattr(saved, field)
        if b is not None and a != b:
            raise ValueError(
                f"The adapter in {os.fspath(where)!r} has {field}={getattr(b, 'value', b)!r}, but the "
                f"model's prompt has {field}={getattr(a, 'value', a)!r}."
            )


def _require_prompt(model: nn.Module):
    injector = get_injector(model)
    if injector is None:
        raise ValueError(f"{type(model).__name__} carries no soft prompt; call add_soft_prompt first.")
    return injector


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _atomic_write(path: str, write: Any) -> None:
    """Write via `write(tmp_path)` next to `path`, fsync, then rename over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
