"""Typed access to what transformers adds to a model that this package holds as an `nn.Module`.

torch types every attribute an `nn.Module` does not declare as `Tensor | Module` (what
`Module.__getattr__` finds among its parameters, buffers and submodules), so to a type checker
`model.get_input_embeddings` is a tensor that cannot be called. These helpers read the same
attributes and call the same methods, nothing more, typed as transformers types them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


def input_embeddings(model: nn.Module) -> nn.Module:
    """`model.get_input_embeddings()`: the input embedding module (`nn.Embedding` for text models)."""
    return cast(Callable[[], nn.Module], model.get_input_embeddings)()


def encoder_of(model: nn.Module) -> nn.Module:
    """`model.get_encoder()`: the encoder of an encoder-decoder model."""
    return cast(Callable[[], nn.Module], model.get_encoder)()


def model_config(model: nn.Module) -> PreTrainedConfig:
    """`model.config`: the model's `PreTrainedConfig`."""
    return cast("PreTrainedConfig", model.config)


def weight_of(module: nn.Module) -> torch.Tensor:
    """`module.weight`: e.g. an embedding's (V, D) table."""
    return cast(torch.Tensor, module.weight)
