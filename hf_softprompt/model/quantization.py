"""Quantized base models: what a prompt can train on, and what it cannot.

A GGUF checkpoint without a GGUF matmul kernel is dequantized on load: every tensor becomes a plain
float `nn.Parameter`, but transformers still attaches its `GgufHfQuantizer`, and `Trainer.__init__`
then refuses the model ("You cannot perform fine-tuning on purely quantized models"). Nothing is
quantized any more, so the first prompt removes that nominal quantizer the way transformers does for
`dequantize=True`. A model still holding quantized blocks keeps its quantizer (and the Trainer's
check).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn


def drop_nominal_gguf_quantizer(model: nn.Module) -> bool:
    """Remove the quantizer of a GGUF model that was dequantized on load; True when removed."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or type(quantizer).__name__ != "GgufHfQuantizer":
        return False
    dequantized = not getattr(quantizer, "supported", True) or quantizer.quantization_config.dequantize
    plain = all(type(p) is nn.Parameter and p.is_floating_point() for p in model.parameters())
    if not (dequantized and plain):
        return False
    quantizer.remove_quantization_config(model)  # what transformers does for `dequantize=True`
    return True



def gguf_file_of(model: nn.Module) -> str | None:
    """The GGUF file a model was loaded from (`from_pretrained(..., gguf_file=...)`), while its
    config still holds the quantization config that names it; None otherwise."""
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    name = (quantization.get("gguf_file") if isinstance(quantization, Mapping)
            else getattr(quantization, "gguf_file", None))
    return name or None
