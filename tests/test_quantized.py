"""Quantized bases: a GGUF checkpoint dequantized on load trains a prompt like any float model."""

from __future__ import annotations

import pytest
import torch
from models import make_model
from transformers import Trainer, TrainingArguments

from hf_softprompt import SoftPromptCallback, SoftPromptConfig, SoftPromptTrainer, add_soft_prompt

quantizer_gguf = pytest.importorskip("transformers.quantizers.quantizer_gguf",
                                     reason="this transformers loads GGUF without a quantizer")
GgufConfig = pytest.importorskip("transformers.utils.quantization_config").GgufConfig


def dequantized_gguf_model():
    """What `from_pretrained(..., gguf_file=...)` returns without a GGUF kernel: float weights and a
    nominal `GgufHfQuantizer` (dequantize=True) that the Trainer refuses to fine-tune."""
    model = make_model("llama", "causal_lm")
    quantizer = quantizer_gguf.GgufHfQuantizer(GgufConfig(dequantize=True))
    model.hf_quantizer, model.is_quantized = quantizer, True
    model.config.quantization_config = quantizer.quantization_config
    return model


def args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True,
                             per_device_train_batch_size=2, learning_rate=0.1)


def data():
    from datasets import Dataset

    ids = torch.randint(3, 90, (4, 6)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def test_the_stock_trainer_refuses_the_bare_model_as_transformers_does(tmp_path):
    with pytest.raises(ValueError, match="purely quantized models"):
        Trainer(model=dequantized_gguf_model(), args=args(tmp_path))


@pytest.mark.parametrize("how", ["subclass", "add_soft_prompt_then_callback"])
def test_a_prompt_trains_on_a_dequantized_gguf_model(tmp_path, how):
    model = dequantized_gguf_model()
    config = SoftPromptConfig(num_virtual_tokens=2)
    if how == "subclass":
        trainer = SoftPromptTrainer(model=model, args=args(tmp_path), train_dataset=data(), soft_prompt_config=config)
    else:
        add_soft_prompt(model, config)
        trainer = Trainer(model=model, args=args(tmp_path), train_dataset=data(), callbacks=[SoftPromptCallback()])
    before = model.soft_prompts["default"]().detach().clone()
    trainer.train()
    assert not model.is_quantized and getattr(model, "hf_quantizer", None) is None
    assert not torch.equal(model.soft_prompts["default"]().detach(), before)


def test_a_model_still_holding_quantized_weights_keeps_its_quantizer():
    model = dequantized_gguf_model()
    model.hf_quantizer.quantization_config.dequantize = False
    model.hf_quantizer.supported = True  # a kernel runs the GGUF blocks: they are really quantized
    add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=2))
    assert model.is_quantized and model.hf_quantizer is not None


def test_a_base_quantized_with_torch_ao_dynamic_int8_is_refused_at_the_first_step(tmp_path):
    """quantize_dynamic's int8 Linear layers pass no gradient back to the input embeddings: the
    prompt would never move. Refused before the first optimizer step, naming the prompt."""
    model = make_model("llama", "causal_lm")
    model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    trainer = SoftPromptTrainer(model=model, args=args(tmp_path), train_dataset=data(),
                                soft_prompt_config=SoftPromptConfig(num_virtual_tokens=2))
    before = model.soft_prompts["default"]().detach().clone()
    with pytest.raises(ValueError, match=r"Soft prompt\(s\) \['default'\] ran in the batches of step 1 but got no "
                                         r"gradient: .* torch\.ao dynamic int8"):
        trainer.train()
    assert torch.equal(model.soft_prompts["default"]().detach(), before)
