"""The learned prompt: a (P, D) float32 table, its three inits, and the encoders that
reparameterize it (P-tuning's MLP and LSTM, residual prompt tuning's bottleneck MLP)."""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import torch
from torch import nn

from .accessors import weight_of
from .config import EncoderType, PromptInit, SoftPromptConfig, config_enum
from .distributed import full_table


class MLPPromptEncoder(nn.Sequential):
    """P-tuning MLP: input -> hidden -> hidden -> output with ReLU (PEFT's `mlp_head` layout)."""

    def __init__(self, token_dim: int, hidden_size: int) -> None:
        super().__init__(
            nn.Linear(token_dim, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, token_dim),
        )


class LSTMPromptEncoder(nn.Module):
    """P-tuning LSTM: a bidirectional LSTM over the P rows, then a 2-layer MLP back to token_dim."""

    def __init__(self, token_dim: int, hidden_size: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm_head = nn.LSTM(
            input_size=token_dim,
            hidden_size=hidden_size,
            num_layers=num_layers,
            dropout=dropout if num_layers > 1 else 0.0,  # torch warns on dropout with one layer
            bidirectional=True,
            batch_first=True,
        )
        self.mlp_head = nn.Sequential(
            nn.Linear(2 * hidden_size, 2 * hidden_size),
            nn.ReLU(),
            nn.Linear(2 * hidden_size, token_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (P, D) -> (1, P, D) for the LSTM, back to (P, D)
        return self.mlp_head(self.lstm_head(x.unsqueeze(0))[0]).squeeze(0)


class ResidualPromptEncoder(nn.Module):
    """Residual reparameterization (Razdaibiedina et al., 2023, *Residual Prompt Tuning*): each row
    plus `LayerNorm(up(ReLU(down(row))))`, one bottleneck MLP shared by the rows.

    The paper's LayerNorm starts with weight 1, which adds unit-scale noise to rows whose scale is
    the vocabulary's (about 0.02-0.1 here), undoing a text or vocabulary init. Here its weight
    starts at 0, so the prompt starts exactly at its init and the branch grows from the first step
    (the LayerNorm weight gets a gradient at once; the MLP from the second step on, as LoRA's B=0).
    """

    def __init__(self, token_dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(token_dim, bottleneck)
        self.up = nn.Linear(bottleneck, token_dim)
        self.norm = nn.LayerNorm(token_dim)
        nn.init.zeros_(self.norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.up(torch.relu(self.down(x))))


class SoftPrompt(nn.Module):
    """The trainable prompt. `forward()` returns the (P, D) float32 prompt embeddings.

    For plain prompt tuning these are the rows of `embedding`; with an encoder (P-tuning,
    residual) they are `encoder(embedding.weight)`. Parameters stay float32 whatever the base model's dtype;
    the injector casts the result at the point of use.

    Args:
        config (`SoftPromptConfig`): must have `token_dim` set.
        word_embeddings (`nn.Embedding`, *optional*): the model's input embeddings, needed by the
            `sample_vocab` and `text` inits.
    """

    def __init__(self, config: SoftPromptConfig, word_embeddings: nn.Module | None = None) -> None:
        super().__init__()
        if config.token_dim is None:
            raise ValueError("SoftPrompt needs config.token_dim; add_soft_prompt fills it in.")
        self.num_virtual_tokens = config.num_virtual_tokens
        self.token_dim = config.token_dim
        self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim, dtype=torch.float32)
        self.encoder: nn.Module | None = None
        if config.encoder is EncoderType.RESIDUAL:
            self.encoder = ResidualPromptEncoder(config.token_dim,
                                                 config.encoder_hidden_size or max(1, config.token_dim // 8))
        elif config.encoder is not None:
            hidden = config.encoder_hidden_size or config.token_dim
            if config.encoder is EncoderType.MLP:
                self.encoder = MLPPromptEncoder(config.token_dim, hidden)
            else:
                self.encoder = LSTMPromptEncoder(
                    config.token_dim, hidden, config.encoder_num_layers, config.encoder_dropout
                )
        if self.encoder is not None:
            self.encoder.float()
        with torch.no_grad():
            self.embedding.weight.copy_(initial_prompt(config, word_embeddings))

    def _apply(self, fn: Any, recurse: bool = True) -> SoftPrompt:
        # `model.to(torch.bfloat16)` / `model.half()` reach us too: follow device moves but keep
        # the trainable parameters in float32 (they are cast at the point of use).
        super()._apply(fn, recurse)
        for param in self.parameters():
            if param.dtype != torch.float32:
                param.data = param.data.float()
        return self

    def forward(self) -> torch.Tensor:
        """The (P, D) prompt embeddings in float32."""
        prompt = self.embedding.weight
        return prompt if self.encoder is None else self.encoder(prompt)


def initial_prompt(config: SoftPromptConfig, word_embeddings: nn.Module | None) -> torch.Tensor:
    """The (P, D) float32 starting table for `config.init` (random, sample_vocab or text)."""
    num, dim = config.num_virtual_tokens, config.token_dim
    if config.init is PromptInit.RANDOM:
        if dim is None:
            raise ValueError("initial_prompt needs config.token_dim; add_soft_prompt fills it in.")
        # Same scale as real token embeddings, so the prompt starts where the model expects input.
        std = 0.02
        if word_embeddings is not None and getattr(word_embeddings, "weight", None) is not None:
            std = float(full_table(weight_of(word_embeddings)).detach().float().std()) or 0.02
        return torch.randn(num, dim) * std
    if word_embeddings is None:
        raise ValueError(f"init={config_enum(PromptInit, config.init, 'init').value!r} needs the model's input "
                         "embeddings.")
    weight = full_table(weight_of(word_embeddings))
    if config.init is PromptInit.SAMPLE_VOCAB:
        token_ids = torch.randint(0, weight.shape[0], (num,))
    else:
        token_ids = text_init_token_ids(config)
    return weight.detach()[token_ids.to(weight.device)].float().cpu().clone()


def _files_stamp(path: str) -> tuple[tuple[str, int, int], ...]:
    """The names, sizes and modification times of a local tokenizer folder's (or file's) files: a
    tokenizer saved again over the same path is loaded again."""
    if os.path.isfile(path):
        stat = os.stat(path)
        return ((path, stat.st_size, stat.st_mtime_ns),)
    if not os.path.isdir(path):
        return ()  # a Hub id: cached by name
    return tuple((entry.name, entry.stat().st_size, entry.stat().st_mtime_ns)
                 for entry in sorted(os.scandir(path), key=lambda e: e.name) if entry.is_file())


def _load_tokenizer(path: str, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, **kwargs)


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(path: str, kwargs_json: str, stamp: tuple) -> Any:
    """The tokenizer of a text init, loaded once per (path, kwargs, files): several prompts initialised
    from one tokenizer (one per task) load it once; a GGUF tokenizer takes seconds to build."""
    return _load_tokenizer(path, json.loads(kwargs_json))


def text_init_token_ids(config: SoftPromptConfig) -> torch.Tensor:
    """Token ids of `config.init_text`, truncated to P or repeated to fill it (PEFT semantics)."""
    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # never run Hub code to build a prompt
    path = str(config.tokenizer_name_or_path)
    try:
        key = json.dumps(kwargs, sort_keys=True)
    except TypeError:  # kwargs JSON cannot hold: load it uncached
        tokenizer = _load_tokenizer(path, kwargs)
    else:
        tokenizer = _cached_tokenizer(path, key, _files_stamp(path))
    ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(
            f"init_text={config.init_text!r} tokenizes to no tokens with "
            f"{config.tokenizer_name_or_path!r}. Use a non-empty text."
        )
    num = config.num_virtual_tokens
    repeated = (ids * (num // len(ids) + 1))[:num]
    return torch.tensor(repeated, dtype=torch.long)
