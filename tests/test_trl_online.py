"""TRL's online trainers (GRPO, RLOO), which collate lists of row dicts, train the prompt alone."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from models import make_model
from transformers import AutoTokenizer

from hf_softprompt import SoftPromptCallback, SoftPromptConfig, SoftPromptMixin

trl = pytest.importorskip("trl")  # in the test extra: always there in CI

TRAINERS = {"grpo": (trl.GRPOTrainer, trl.GRPOConfig), "rloo": (trl.RLOOTrainer, trl.RLOOConfig)}


def reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize("name", list(TRAINERS))
@pytest.mark.parametrize("path", ["mixin", "callback"])
def test_online_trainers_train_the_prompt_and_leave_the_base(tmp_path, tokenizer_dir, name, path):
    trainer_cls, config_cls = TRAINERS[name]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = Dataset.from_dict({"prompt": ["the movie was", "a film is", "the plot", "actors loved"]})
    args = config_cls(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=4, report_to="none", use_cpu=True, learning_rate=0.1, beta=0.0,
                      bf16=False, save_strategy="no")
    model = make_model("llama", "causal_lm", initializer_range=0.2)
    base = copy.deepcopy(model)
    config = SoftPromptConfig(num_virtual_tokens=3)
    if path == "mixin":
        trainer = type("Trainer", (SoftPromptMixin, trainer_cls), {})(
            model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer,
            soft_prompt_config=config)
    else:
        trainer = trainer_cls(model=model, reward_funcs=reward, args=args, train_dataset=data,
                              processing_class=tokenizer, callbacks=[SoftPromptCallback(config)])
    before = model.soft_prompts["default"]().detach().clone()
    trainer.train()
    assert trainer.state.global_step == 2
    assert not torch.equal(model.soft_prompts["default"]().detach(), before)
    base_state = base.state_dict()
    assert all(torch.equal(base_state[k], v) for k, v in model.state_dict().items() if k in base_state)


def test_use_vllm_is_refused_with_what_to_do(tmp_path, tokenizer_dir):
    args = trl.GRPOConfig(output_dir=str(tmp_path), use_vllm=True, report_to="none", use_cpu=True, bf16=False,
                          per_device_train_batch_size=2, num_generations=2)
    data = Dataset.from_dict({"prompt": ["the movie was", "a film is"]})
    with pytest.raises(ValueError, match=r"use_vllm=True\) is not supported with a soft prompt: .* use_vllm=False"):
        type("Trainer", (SoftPromptMixin, trl.GRPOTrainer), {})(
            model=make_model("llama", "causal_lm"), reward_funcs=reward, args=args, train_dataset=data,
            processing_class=AutoTokenizer.from_pretrained(tokenizer_dir),
            soft_prompt_config=SoftPromptConfig(num_virtual_tokens=2))
