"""The base model's files a server needs: its config and its input-embedding table, read alone."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors import safe_open

from ..files.hub import download_files

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# Where the input-embedding table lives in the checkpoints of common decoder families, in order.
EMBEDDING_KEYS = (
    "model.embed_tokens.weight",  # Llama, Mistral, Qwen, Phi-3, SmolLM, OLMo, ...
    "embed_tokens.weight",
    "transformer.wte.weight",  # GPT-2, GPT-J, StarCoder
    "wte.weight",
    "gpt_neox.embed_in.weight",  # GPT-NeoX, Pythia
    "transformer.word_embeddings.weight",  # Bloom, Falcon
    "model.decoder.embed_tokens.weight",  # OPT
    "model.language_model.embed_tokens.weight",  # multimodal wrappers of a text decoder
    "language_model.model.embed_tokens.weight",
)
TIED_KEY = "lm_head.weight"  # tied embeddings may be stored only under the head's name
# Families whose model scales (or otherwise transforms) the embeddings after the lookup: an engine's
# embedding step for them is not the bare table, so the table alone would give wrong inputs.
_TRANSFORMED_EMBEDDINGS = ("gemma", "granite", "falcon_h1", "mup")


def read_embedding_table(source: str, model_config: Mapping[str, Any], **hub: Any) -> torch.Tensor:
    """The (V, D) input-embedding table of the base model at `source`, read alone from its
    safetensors (one shard downloaded for a sharded Hub model)."""
    model_type = str(model_config.get("model_type", ""))
    scaled = [name for name in _TRANSFORMED_EMBEDDINGS if model_type.startswith(name)]
    if scaled or model_config.get("embedding_multiplier") not in (None, 1, 1.0):
        raise ValueError(f"{source!r} is a {model_type!r} model, which transforms its embeddings after the "
                         "lookup; PromptEmbedder serves models whose inputs are the bare embedding table "
                         "(Llama, Qwen, Mistral, SmolLM, GPT-2, ...).")
    index_or_weights = base_file(source, (WEIGHTS_INDEX_FILE, WEIGHTS_FILE), hub)
    if index_or_weights.endswith(".json"):
        weight_map = read_json(index_or_weights).get("weight_map", {})
        key = _embedding_key(weight_map, model_config, source)
        path = base_file(source, weight_map[key], hub)
    else:
        with safe_open(index_or_weights, framework="pt") as f:
            key = _embedding_key(list(f.keys()), model_config, source)
        path = index_or_weights
    with safe_open(path, framework="pt") as f:
        table = f.get_tensor(key)
    hidden = model_config.get("hidden_size") or model_config.get("n_embd")
    if table.dim() != 2 or (hidden and table.shape[1] != hidden):
        raise ValueError(f"{key!r} in {path!r} has shape {tuple(table.shape)}, not (vocab, hidden_size={hidden}); "
                         "it is not this model's embedding table.")
    return table


def _embedding_key(keys: Sequence[str] | Mapping[str, str], model_config: Mapping[str, Any], source: str) -> str:
    for key in EMBEDDING_KEYS:
        if key in keys:
            return key
    if model_config.get("tie_word_embeddings", True) and TIED_KEY in keys:
        return TIED_KEY
    raise ValueError(f"Found no input-embedding table in {source!r} (looked for {', '.join(EMBEDDING_KEYS)}, "
                     f"and {TIED_KEY} for tied embeddings). Save the model with save_pretrained "
                     "(safetensors) from transformers.")


def base_file(source: str, names: str | Sequence[str], hub: dict[str, Any]) -> str:
    """A base-model file, local or downloaded: the first of `names` that exists."""
    names = [names] if isinstance(names, str) else list(names)
    if os.path.isdir(source):
        for name in names:
            if os.path.isfile(os.path.join(source, name)):
                return os.path.join(source, name)
        raise FileNotFoundError(f"No {' or '.join(names)} in {source!r}. The base model must be a transformers "
                                "checkpoint in safetensors (save_pretrained writes one).")
    return download_files(source, [names], note="There is no local directory of that name either.", **hub)[0]


def text_config(data: Mapping[str, Any]) -> Mapping[str, Any]:
    # Multimodal configs nest the language model's settings.
    return data.get("text_config") or data


def config_dtype(model_config: Mapping[str, Any]) -> torch.dtype | None:
    name = model_config.get("dtype") or model_config.get("torch_dtype")
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) else None


def read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
