"""Prompt-health logs: gradient norm, norm ratio and cosine to the initial prompt in every training
log (and so in every `report_to` logger), nearest tokens at evaluation; checked against figures
computed independently from the prompt's values before and after training."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset
from models import VOCAB, make_model
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_softprompt import SoftPromptCallback, SoftPromptConfig, SoftPromptTrainer
from hf_softprompt.model.injector import get_injector

FIGURES = ("grad_norm", "norm_ratio", "cosine_to_init")


def rows(n=12, prompt_ids=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = {"input_ids": [torch.randint(4, VOCAB, (int(torch.randint(3, 8, (1,), generator=g)),),
                                        generator=g).tolist() for _ in range(n)],
            "labels": [i % 2 for i in range(n)]}
    if prompt_ids is not None:
        data["soft_prompt_ids"] = [prompt_ids[i % len(prompt_ids)] for i in range(n)]
    return Dataset.from_dict(data)


def args(tmp_path, **overrides):
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, learning_rate=0.1,
                    logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    return TrainingArguments(**{**defaults, **overrides})


class Recorder(TrainerCallback):
    """A stand-in for a `report_to` logger: what each on_log call received."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def collator(tokenizer_dir):
    return DataCollatorWithPadding(AutoTokenizer.from_pretrained(tokenizer_dir))


def prompt_value(model, name="default"):
    return get_injector(model).bank[name]().detach().clone()


def test_gradient_norm_is_the_step_the_optimizer_took(tmp_path, tokenizer_dir):
    # Plain SGD without clipping moves the prompt by exactly lr * gradient: the logged norm must be
    # the norm of that move divided by lr.
    model = make_model("gpt2", "seq_cls")
    trainer = SoftPromptTrainer(
        model=model, args=args(tmp_path, max_steps=1, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant",
                               weight_decay=0.0),
        train_dataset=rows(), data_collator=collator(tokenizer_dir),
        soft_prompt_config=SoftPromptConfig(num_virtual_tokens=4, trainable_modules=[]),
    )
    before = prompt_value(trainer.model)
    trainer.train()
    after = prompt_value(trainer.model)
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert logged["soft_prompt/default/grad_norm"] == pytest.approx(((after - before).norm() / 0.1).item(), rel=1e-4)
    assert logged["soft_prompt/default/grad_norm"] > 0


def test_norm_ratio_and_cosine_match_the_prompt_itself(tmp_path, tokenizer_dir):
    model = make_model("llama", "causal_lm")
    data = rows().map(lambda row: {"labels": row["input_ids"]})
    trainer = SoftPromptTrainer(model=model, args=args(tmp_path), train_dataset=data,
                                data_collator=DataCollatorForSeq2Seq(AutoTokenizer.from_pretrained(tokenizer_dir)),
                                soft_prompt_config=SoftPromptConfig(num_virtual_tokens=5))
    initial = prompt_value(trainer.model)
    trainer.train()
    final = prompt_value(trainer.model)
    last = [entry for entry in trainer.state.log_history if "loss" in entry][-1]  # after the last step
    vocab_norm = model.get_input_embeddings().weight.detach().norm(dim=-1).mean()
    assert last["soft_prompt/default/norm_ratio"] == pytest.approx((final.norm(dim=-1).mean() / vocab_norm).item(),
                                                                   rel=1e-5)
    cosine = torch.nn.functional.cosine_similarity(final, initial, dim=-1).mean().item()
    assert last["soft_prompt/default/cosine_to_init"] == pytest.approx(cosine, abs=1e-6)
    assert cosine < 0.999  # the prompt moved, so the figure is not trivially 1


@pytest.mark.parametrize("kind", ["subclass", "callback"])
def test_every_prompt_reports_and_a_prompt_without_rows_has_zero_gradient(tmp_path, tokenizer_dir, kind):
    configs = {"a": SoftPromptConfig(num_virtual_tokens=3), "b": SoftPromptConfig(num_virtual_tokens=5)}
    recorder = Recorder()
    training_args = args(tmp_path, logging_steps=2, max_steps=4)
    common = dict(model=make_model("gpt2", "seq_cls"), args=training_args, train_dataset=rows(prompt_ids=[0]),
                  data_collator=collator(tokenizer_dir))
    if kind == "subclass":
        trainer = SoftPromptTrainer(**common, soft_prompt_config=configs, callbacks=[recorder])
    else:
        trainer = Trainer(**common, callbacks=[recorder, SoftPromptCallback(configs)])  # recorder first
    trainer.train()
    training_logs = [entry for entry in recorder.logs if "loss" in entry]
    assert len(training_logs) == 2  # steps 2 and 4
    for entry in training_logs:
        for name in ("a", "b"):
            assert {f"soft_prompt/{name}/{f}" for f in FIGURES} <= set(entry)
        assert entry["soft_prompt/a/grad_norm"] > 0
        assert entry["soft_prompt/b/grad_norm"] == 0.0  # no row chose b
        assert entry["soft_prompt/b/cosine_to_init"] == pytest.approx(1.0, abs=1e-6)
        assert entry["soft_prompt/a/cosine_to_init"] < 1.0
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [{k: v for k, v in h.items() if k.startswith("soft_prompt/")} for h in history] == \
        [{k: v for k, v in e.items() if k.startswith("soft_prompt/")} for e in training_logs]


def test_switched_off(tmp_path, tokenizer_dir):
    trainer = Trainer(model=make_model("gpt2", "seq_cls"), args=args(tmp_path), train_dataset=rows(),
                      data_collator=collator(tokenizer_dir),
                      callbacks=[SoftPromptCallback(SoftPromptConfig(num_virtual_tokens=3), log_prompt_health=False)])
    trainer.train()
    assert not any(key.startswith("soft_prompt/") for entry in trainer.state.log_history for key in entry)


def test_nearest_tokens_are_logged_at_each_evaluation(tmp_path, tokenizer_dir, caplog):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    callback = SoftPromptCallback(SoftPromptConfig(num_virtual_tokens=3))
    trainer = Trainer(model=make_model("gpt2", "seq_cls"), args=args(tmp_path, eval_strategy="steps", eval_steps=3),
                      train_dataset=rows(), eval_dataset=rows(4, seed=1), processing_class=tokenizer,
                      data_collator=collator(tokenizer_dir), callbacks=[callback])
    with caplog.at_level(logging.INFO, logger="hf_softprompt.training.callback"):
        trainer.train()
    table = callback.nearest_tokens["default"]
    assert table.splitlines()[0].startswith("virtual token")
    assert len(table.splitlines()) == 1 + 3
    assert any("nearest vocabulary tokens" in r.getMessage() and table in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", ["subclass", "callback"])
def test_figures_reach_tensorboard(tmp_path, tokenizer_dir, kind, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging_dir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logging_dir))  # read by transformers' TensorBoardCallback
    training_args = args(tmp_path, report_to="tensorboard", max_steps=2)
    common = dict(model=make_model("gpt2", "seq_cls"), args=training_args, train_dataset=rows(),
                  data_collator=collator(tokenizer_dir))
    config = SoftPromptConfig(num_virtual_tokens=3)
    if kind == "subclass":
        trainer = SoftPromptTrainer(**common, soft_prompt_config=config)
    else:
        trainer = Trainer(**common, callbacks=[SoftPromptCallback(config)])
    trainer.train()
    events = list(logging_dir.rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for path in events:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {f"train/soft_prompt/default/{f}" for f in FIGURES} <= tags, sorted(tags)
