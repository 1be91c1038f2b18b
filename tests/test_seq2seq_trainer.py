"""`SoftPromptSeq2SeqTrainer` and `SoftPromptMixin`: the soft-prompt Trainer behaviour on top of
`Seq2SeqTrainer` (`predict_with_generate`), checked against the prompted model's own `generate()`."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from models import VOCAB, make_model, perturb_trainable
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
)

from hf_softprompt import (
    SoftPromptConfig,
    SoftPromptMixin,
    SoftPromptSeq2SeqTrainer,
    SoftPromptTrainer,
    add_soft_prompt,
)
from hf_softprompt.model.injector import get_injector


def rows(n=6, prompt_ids=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = {"input_ids": [], "labels": []}
    for i in range(n):
        data["input_ids"].append(torch.randint(4, VOCAB, (3 + i % 4,), generator=g).tolist() + [2])
        data["labels"].append(torch.randint(4, VOCAB, (2 + i % 3,), generator=g).tolist() + [2])
    if prompt_ids is not None:
        data["soft_prompt_ids"] = [prompt_ids[i % len(prompt_ids)] for i in range(n)]
    return Dataset.from_dict(data)


def seq2seq_args(tmp_path, **overrides):
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_eval_batch_size=4, predict_with_generate=True,
                    generation_max_length=6, report_to="none", use_cpu=True, disable_tqdm=True, max_steps=2,
                    save_strategy="no", learning_rate=0.1)
    return Seq2SeqTrainingArguments(**{**defaults, **overrides})


def generated_alone(model, data, max_length, num_beams=1, names=None):
    """Each row's `generate()` on its own (no batch, no padding): the reference."""
    out = []
    for i in range(len(data)):
        ids = torch.tensor([data[i]["input_ids"]])
        routing = {} if names is None else {"soft_prompt_names": [names[i]]}
        with torch.no_grad():
            out.append(model.generate(input_ids=ids, max_length=max_length, num_beams=num_beams,
                                      do_sample=False, **routing)[0].tolist())
    return out


def without_padding(row, pad):
    row = list(row)
    while row and row[-1] in (pad, -100):
        row.pop()
    return row


def test_the_mixin_composes_with_any_trainer_subclass():
    assert issubclass(SoftPromptTrainer, SoftPromptMixin) and issubclass(SoftPromptTrainer, Trainer)
    assert issubclass(SoftPromptSeq2SeqTrainer, Seq2SeqTrainer)
    # The mixin's methods win over the Trainer's, and reach them through super().
    mro = SoftPromptSeq2SeqTrainer.__mro__
    assert mro.index(SoftPromptMixin) < mro.index(Seq2SeqTrainer) < mro.index(Trainer)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_predict_with_generate_returns_the_prompted_models_generations(tmp_path, tokenizer_dir, num_beams):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = make_model("t5", "seq2seq_lm")
    add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=3))
    perturb_trainable(model)  # a prompt far from init, so a dropped prompt changes the tokens
    data = rows()
    seen = {}

    def compute_metrics(prediction):
        # What run_summarization.py does with the predictions: decode them as token ids.
        seen["texts"] = tokenizer.batch_decode(np.where(prediction.predictions < 0, 0, prediction.predictions),
                                               skip_special_tokens=True)
        seen["ids"] = prediction.predictions
        return {"rows": len(prediction.predictions)}

    trainer = SoftPromptSeq2SeqTrainer(
        model=model, args=seq2seq_args(tmp_path, generation_num_beams=num_beams), eval_dataset=data,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model), compute_metrics=compute_metrics,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_rows"] == len(data)
    expected = generated_alone(model, data, max_length=6, num_beams=num_beams)
    got = [without_padding(row, tokenizer.pad_token_id) for row in seen["ids"].tolist()]
    assert got == [without_padding(row, tokenizer.pad_token_id) for row in expected]
    assert len(seen["texts"]) == len(data)

    # The same model without its prompt generates something else: the prompt was used.
    get_injector(model).bank.active = None
    bare = generated_alone(model, data, max_length=6, num_beams=num_beams)
    get_injector(model).bank.active = "default"
    assert bare != expected


def test_predict_with_generate_serves_each_row_its_own_prompt(tmp_path, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = make_model("t5", "seq2seq_lm")
    add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=3), name="a")
    add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=5, encoder="mlp", encoder_hidden_size=8), name="b")
    perturb_trainable(model)
    data = rows(8, prompt_ids=[0, 1, -1])
    trainer = SoftPromptSeq2SeqTrainer(model=model, args=seq2seq_args(tmp_path), eval_dataset=data,
                                       data_collator=DataCollatorForSeq2Seq(tokenizer, model=model))
    predictions = trainer.predict(data).predictions.tolist()
    names = [{0: "a", 1: "b", -1: None}[i] for i in data["soft_prompt_ids"]]
    expected = generated_alone(model, data, max_length=6, names=names)
    assert [without_padding(r, 0) for r in predictions] == [without_padding(r, 0) for r in expected]


def test_trains_and_saves_only_the_adapter(tmp_path, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = make_model("t5", "seq2seq_lm")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = SoftPromptSeq2SeqTrainer(model=model, args=seq2seq_args(tmp_path), train_dataset=rows(8),
                                       data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
                                       soft_prompt_config=SoftPromptConfig(num_virtual_tokens=4))
    before = get_injector(model).bank["default"]().detach().clone()
    trainer.train()
    trainer.save_model()
    after = get_injector(model).bank["default"]().detach()
    assert not torch.equal(before, after)
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items() if k in base)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "out"))
    assert "model.safetensors" not in os.listdir(tmp_path / "out")
