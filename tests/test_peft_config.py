"""PEFT's prompt-tuning configs are taken wherever a SoftPromptConfig is, and mean what they mean in PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from models import make_model
from transformers import TrainingArguments

from hf_softprompt import SoftPromptConfig, SoftPromptTrainer, add_soft_prompt, get_soft_prompt_config

peft = pytest.importorskip("peft")  # in the test extra: always there in CI


def test_text_init_gives_the_prompt_get_peft_model_gives(tokenizer_dir):
    base = make_model("llama", "causal_lm")
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT",
                                     prompt_tuning_init_text="the movie was great",
                                     tokenizer_name_or_path=tokenizer_dir)
    theirs = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    ours = add_soft_prompt(copy.deepcopy(base), config)
    expected = theirs.prompt_encoder["default"].embedding.weight
    assert torch.equal(ours.soft_prompts["default"](), expected)  # bit-identical


@pytest.mark.parametrize("as_dict", [False, True])
def test_every_field_with_a_counterpart_is_carried_over(tokenizer_dir, as_dict):
    tuning = peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                     prompt_tuning_init_text="great", tokenizer_name_or_path=tokenizer_dir,
                                     tokenizer_kwargs={"use_fast": True}, modules_to_save=["classifier"])
    encoder = peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=6,
                                       encoder_reparameterization_type="LSTM", encoder_hidden_size=16,
                                       encoder_num_layers=2, encoder_dropout=0.1)
    model = make_model("bert", "seq_cls")
    for name, config in (("tuning", tuning), ("encoder", encoder)):
        add_soft_prompt(model, config.to_dict() if as_dict else config, name=name)
    got = get_soft_prompt_config(model, "tuning")
    assert (got.num_virtual_tokens, got.init.value, got.init_text, got.tokenizer_name_or_path, got.tokenizer_kwargs,
            got.trainable_modules, got.task_type.value) == (5, "text", "great", tokenizer_dir, {"use_fast": True},
                                                            ["classifier"], "SEQ_CLS")
    got = get_soft_prompt_config(model, "encoder")
    assert (got.num_virtual_tokens, got.encoder.value, got.encoder_hidden_size, got.encoder_num_layers,
            got.encoder_dropout) == (6, "lstm", 16, 2, 0.1)


def test_fields_we_cannot_do_are_refused_by_name():
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, inference_mode=True)
    with pytest.raises(ValueError, match=r"sets what hf-softprompt does not support: inference_mode=True"):
        add_soft_prompt(make_model("llama", "causal_lm"), config)
    data = {**peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4).to_dict(), "layers_pattern": [1]}
    with pytest.raises(ValueError, match=r"layers_pattern=\[1\]"):
        add_soft_prompt(make_model("llama", "causal_lm"), data)
    with pytest.raises(ValueError, match=r"peft_type='LORA' is not a soft prompt"):
        from hf_softprompt.peft_config import from_peft_config

        from_peft_config(peft.LoraConfig(task_type="CAUSAL_LM"))


def test_the_trainer_takes_peft_configs_by_name(tmp_path):
    ids = torch.randint(3, 90, (4, 6)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    model = make_model("llama", "causal_lm")
    trainer = SoftPromptTrainer(
        model=model, train_dataset=data,
        args=TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True),
        soft_prompt_config={"a": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                            "b": SoftPromptConfig(num_virtual_tokens=2)})
    trainer.train()
    assert model.soft_prompts["a"]().shape[0] == 3 and model.soft_prompts["b"]().shape[0] == 2
