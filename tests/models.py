"""Tiny models built from config, shared by every test (no Hub, a few ms each)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BartConfig,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
    T5Config,
)

VOCAB = 96
PAD = 0
COMMON = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)


def config_for(family: str, **overrides):
    """A tiny config of `family` (gpt2, llama, qwen2, bert, t5, bart)."""
    if family == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, **COMMON)
    elif family == "llama":
        cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, **COMMON)
    elif family == "qwen2":
        cfg = Qwen2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, **COMMON)
    elif family == "bert":
        cfg = BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         max_position_embeddings=128, **COMMON)
    elif family == "t5":
        cfg = T5Config(num_layers=2, num_decoder_layers=2, d_model=32, d_ff=64, num_heads=2, d_kv=16,
                       decoder_start_token_id=PAD, **COMMON)
    elif family == "bart":
        cfg = BartConfig(encoder_layers=2, decoder_layers=2, d_model=32, encoder_ffn_dim=64,
                         decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2,
                         max_position_embeddings=128, decoder_start_token_id=2, forced_eos_token_id=None,
                         **COMMON)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


AUTO = {
    "causal_lm": AutoModelForCausalLM,
    "seq2seq_lm": AutoModelForSeq2SeqLM,
    "seq_cls": AutoModelForSequenceClassification,
    "token_cls": AutoModelForTokenClassification,
    "qa": AutoModelForQuestionAnswering,
    "masked_lm": AutoModelForMaskedLM,
    "base": AutoModel,  # no head: feature extraction
}

# (family, task) pairs the injection must support; the reference tests run over all of them.
CASES = [
    ("gpt2", "causal_lm"), ("llama", "causal_lm"), ("qwen2", "causal_lm"),
    ("t5", "seq2seq_lm"), ("bart", "seq2seq_lm"),
    ("bert", "seq_cls"), ("gpt2", "seq_cls"), ("llama", "seq_cls"),
    ("bert", "token_cls"), ("gpt2", "token_cls"),
    ("bert", "qa"), ("llama", "qa"),
    ("bert", "masked_lm"),
]


def make_model(family: str, task: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A fresh tiny `family` model with a `task` head, fp32, eval mode, dropout off."""
    torch.manual_seed(seed)
    cfg = config_for(family, **overrides)
    if task in ("seq_cls", "token_cls"):
        cfg.num_labels = 3
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
                "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout_rate", "classifier_dropout"):
        if hasattr(cfg, key):
            setattr(cfg, key, 0.0)
    model = AUTO[task].from_config(cfg)
    return model.float().eval()


def perturb_trainable(model: torch.nn.Module, seed: int = 1, std: float = 0.5) -> torch.nn.Module:
    """Move every trainable parameter far from its init, as training would (so a dropped prompt
    or head cannot pass a comparison unnoticed)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, std)
    return model


def enable_activation_checkpointing(model: torch.nn.Module, kwargs: dict) -> None:
    """`activation_checkpointing_enable` (transformers >= 5.20), `gradient_checkpointing_enable` before:
    the suite also runs on the transformers that vLLM pins."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(kwargs)


def is_activation_checkpointing(model: torch.nn.Module) -> bool:
    """`is_activation_checkpointing`, or `is_gradient_checkpointing` before transformers 5.20."""
    return bool(getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing)
