"""One adapter in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`, read and written.

Export (what inference and PEFT need): `prompt_embeddings`, the (P, D) prompt already through
the P-tuning encoder. Training state (what exact resume needs): the raw embedding table and the
encoder weights under `hf_softprompt.*`, and the prompt's own task heads under PEFT's
`base_model.<module>.*` keys (its `modules_to_save`). PEFT ignores the extra tensors; our own
config rides in the safetensors metadata, so the JSON holds only keys PEFT knows. The metadata
also holds a hash of the JSON written with it: a weights file beside another save's config (an
interrupted save, files copied by hand) is refused instead of loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..accessors import model_config
from ..config import EncoderType, PromptInit, SoftPromptConfig, TaskType, config_enum

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_BIN_NAME = "adapter_model.bin"  # older PEFT adapters: read with torch.load(weights_only=True)
ADAPTER_FILES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)
PROMPT_KEY = "prompt_embeddings"
STATE_PREFIX = "hf_softprompt."
HEAD_PREFIX = "base_model."
METADATA_CONFIG_KEY = "hf_softprompt_config"
METADATA_JSON_HASH_KEY = "hf_softprompt_adapter_config_sha256"


def peft_config_dict(config: SoftPromptConfig, model: nn.Module, head_paths: list[str]) -> dict[str, Any]:
    """`config` as PEFT's `PromptTuningConfig` / `PromptEncoderConfig` JSON."""
    model_conf = model_config(model)
    text_config = model_conf.get_text_config() if hasattr(model_conf, "get_text_config") else model_conf
    out: dict[str, Any] = {
        "auto_mapping": None,
        "base_model_name_or_path": config.base_model_name_or_path,
        "inference_mode": True,
        "modules_to_save": list(head_paths) or None,
        "num_attention_heads": getattr(text_config, "num_attention_heads", None),
        "num_layers": getattr(text_config, "num_hidden_layers", None),
        # One prompt table, on the encoder for seq2seq (PEFT would otherwise expect 2P rows).
        "num_transformer_submodules": 1,
        "num_virtual_tokens": config.num_virtual_tokens,
        "revision": None,
        "task_type": (config_enum(TaskType, config.task_type, "task_type").value
                      if config.task_type is not TaskType.MASKED_LM else None),
        "token_dim": config.token_dim,
    }
    if config.is_p_tuning:
        out.update(
            peft_type="P_TUNING",
            encoder_reparameterization_type=config_enum(EncoderType, config.encoder, "encoder").value.upper(),
            encoder_hidden_size=config.encoder_hidden_size or config.token_dim,
            encoder_num_layers=config.encoder_num_layers,
            encoder_dropout=config.encoder_dropout,
        )
    else:  # plain prompt tuning, and a residual prompt: PEFT has no such encoder, but its output is a prompt
        out.update(
            peft_type="PROMPT_TUNING",
            prompt_tuning_init=config_enum(PromptInit, config.init, "init").value.upper(),
            prompt_tuning_init_text=config.init_text,
            tokenizer_name_or_path=config.tokenizer_name_or_path,
            tokenizer_kwargs=config.tokenizer_kwargs,
        )
    return out


def config_from_peft_dict(data: Any, where: str = "adapter_config.json") -> SoftPromptConfig:
    """A `SoftPromptConfig` from a PEFT `adapter_config.json` (for adapters PEFT saved)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} holds a JSON {type(data).__name__}, not an object; it is not an adapter "
                         "config. Save the adapter again.")
    peft_type = data.get("peft_type")
    if peft_type not in ("PROMPT_TUNING", "P_TUNING"):
        raise ValueError(
            f"{where} has peft_type={peft_type!r}; only PROMPT_TUNING and P_TUNING adapters are soft "
            "prompts (a LoRA or prefix-tuning adapter loads with PEFT)."
        )
    num = data.get("num_virtual_tokens")
    if isinstance(num, bool) or not isinstance(num, int):
        raise ValueError(f"{where} has num_virtual_tokens={num!r}; a prompt adapter needs a positive integer.")
    task_type = data.get("task_type")
    # No encoder even for P_TUNING: PEFT saves only the encoder's output, which is the prompt.
    return SoftPromptConfig(
        num_virtual_tokens=num,
        task_type=None if task_type == TaskType.FEATURE_EXTRACTION.value else task_type,
        token_dim=data.get("token_dim"),
        base_model_name_or_path=data.get("base_model_name_or_path"),
    )


def config_json(config: SoftPromptConfig, model: nn.Module, head_paths: list[str]) -> str:
    return json.dumps(peft_config_dict(config, model, head_paths), indent=2, sort_keys=True) + "\n"


def weights_metadata(config: SoftPromptConfig, json_text: str) -> dict[str, str]:
    """The safetensors metadata: our full config, and the hash that ties the file to its JSON."""
    return {"format": "pt", METADATA_CONFIG_KEY: config.to_json_string(),
            METADATA_JSON_HASH_KEY: hashlib.sha256(json_text.encode("utf-8")).hexdigest()}


# ------------------------------------------------------------------------ reading
def local_adapter_files(directory: str) -> tuple[str, str]:
    """(config path, weights path) of a local adapter directory; safetensors preferred over .bin."""
    config_path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    weights = [os.path.join(directory, n) for n in (ADAPTER_WEIGHTS_NAME, ADAPTER_BIN_NAME)]
    weights = [p for p in weights if os.path.isfile(p)]
    if not os.path.isfile(config_path) or not weights:
        missing = ADAPTER_CONFIG_NAME if not os.path.isfile(config_path) else ADAPTER_WEIGHTS_NAME
        raise FileNotFoundError(
            f"No {missing} in {directory!r}. A soft-prompt adapter directory holds "
            f"{' and '.join(ADAPTER_FILES)} (written by save_soft_prompt or PEFT)."
        )
    return config_path, weights[0]


def read_adapter_files(
    config_path: str, weights_path: str
) -> tuple[SoftPromptConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Parse and check one adapter: (config, tensors, the adapter_config.json dict)."""
    try:
        with open(config_path, "rb") as f:
            raw = f.read()
        peft_json = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path!r} is not valid JSON ({err}). The file is corrupt: save the "
                         "adapter again.") from err
    metadata, tensors = _read_weights(weights_path)
    expected_hash = metadata.get(METADATA_JSON_HASH_KEY)
    if expected_hash is not None and expected_hash != hashlib.sha256(raw).hexdigest():
        raise ValueError(
            f"{weights_path!r} and {config_path!r} come from different saves (an interrupted save, or files "
            "copied from two adapters). Save the adapter again, or restore both files from one save."
        )
    if METADATA_CONFIG_KEY in metadata:
        try:
            config = SoftPromptConfig.from_dict(json.loads(metadata[METADATA_CONFIG_KEY]))
        except json.JSONDecodeError as err:
            raise ValueError(f"The hf-softprompt config in {weights_path!r} is not valid JSON ({err}). "
                             "Save the adapter again.") from err
        config_from_peft_dict(peft_json, config_path)  # the JSON must still be a prompt adapter's
    else:
        config = config_from_peft_dict(peft_json, config_path)
    prompt = tensors.get(PROMPT_KEY)
    if prompt is None:
        raise ValueError(f"{weights_path!r} holds no {PROMPT_KEY!r} tensor; it is not a prompt adapter.")
    if not prompt.is_floating_point():
        raise ValueError(f"{weights_path!r} holds {PROMPT_KEY} of dtype {prompt.dtype}; a prompt is a table "
                         "of floating-point embeddings. The file is not a valid adapter.")
    num = config.num_virtual_tokens
    rows = {num, num * int(peft_json.get("num_transformer_submodules") or 1)}  # PEFT seq2seq: 2P
    json_num = peft_json.get("num_virtual_tokens")
    if prompt.dim() != 2 or prompt.shape[0] not in rows or json_num != num or (
            config.token_dim not in (None, prompt.shape[1])):
        raise ValueError(
            f"The adapter in {os.path.dirname(weights_path)!r} is inconsistent: {PROMPT_KEY} has shape "
            f"{tuple(prompt.shape)}, its config says {json_num} virtual tokens (metadata: {num}) of width "
            f"{config.token_dim}. Save it again."
        )
    bad = [key for key, value in tensors.items() if value.is_floating_point() and not bool(value.isfinite().all())]
    if bad:
        raise ValueError(
            f"{weights_path!r} holds NaN or infinite values in {sorted(bad)}: the prompt diverged before it "
            "was saved (or the file is damaged). Load an earlier checkpoint, or train again with a lower "
            "learning rate."
        )
    return config, tensors, peft_json


def _read_weights(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file, or of a .bin through torch.load(weights_only=True)."""
    if not path.endswith(".bin"):
        try:
            with safe_open(path, framework="pt") as f:
                return f.metadata() or {}, {key: f.get_tensor(key) for key in f.keys()}
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueError(
                f"{path!r} is not a readable safetensors file ({err}). The file is corrupt or "
                "truncated: save (or download, with force_download=True) the adapter again."
            ) from err
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses any pickled object that is not a tensor
        raise ValueError(
            f"{path!r} could not be read with torch.load(weights_only=True) ({type(err).__name__}). "
            "Pickled code is never run: convert the adapter to safetensors with a trusted tool."
        ) from err
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"{path!r} holds a {type(tensors).__name__}, not a dict of tensors.")
    return {}, tensors


def prompt_state_dict(config: SoftPromptConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `SoftPrompt` state dict an adapter's tensors hold."""
    state = {k[len(STATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
    if not state:
        # Export only (prompt tuning, or a P-tuning adapter PEFT saved): the table is the prompt.
        # PEFT's seq2seq tables have 2P rows; the first P are the encoder prompt, as in its forward.
        state = {"embedding.weight": tensors[PROMPT_KEY][: config.num_virtual_tokens].float()}
    return state


def head_tensors_by_path(tensors: dict[str, torch.Tensor], heads: Mapping[str, nn.Module],
                         where: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Split the adapter's `base_model.<path>.<param>` tensors over the head modules (`{path: module}`)
    the prompt owns; raise a `ValueError` for a tensor no head takes or one of the wrong shape."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(HEAD_PREFIX):
            continue
        name = key[len(HEAD_PREFIX):]
        path = max((p for p in heads if name.startswith(p + ".")), key=len, default=None)
        if path is None:
            raise ValueError(f"The adapter in {os.fspath(where)!r} holds {key!r}, but the model has no task "
                             f"head {name.rsplit('.', 1)[0]!r} (heads: {sorted(heads)}). Load the base model "
                             "it was trained on.")
        param = name[len(path) + 1:]
        target = heads[path].state_dict().get(param)
        if target is None:
            raise ValueError(f"The adapter in {os.fspath(where)!r} holds {key!r}, but the model's {path} has "
                             f"no {param!r}. Load the base model it was trained on.")
        if target.shape != value.shape:
            raise ValueError(
                f"The adapter in {os.fspath(where)!r} has {name} of shape {tuple(value.shape)}, but the model's "
                f"is {tuple(target.shape)}. Load the base model with the same head (e.g. the same num_labels)."
            )
        out.setdefault(path, {})[param] = value.to(target.dtype)
    for path, state in out.items():
        missing = sorted(set(heads[path].state_dict()) - set(state))
        if missing:
            raise ValueError(f"The adapter in {os.fspath(where)!r} holds {path} without {missing}. Save it again.")
    return out


# ------------------------------------------------------------------------ writing
def write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
