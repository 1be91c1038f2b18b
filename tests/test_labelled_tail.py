"""A training step's LM head over the labelled tail only: the same loss and prompt update as the
model's full loss, fewer positions through the head, and full logits wherever something reads them."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from models import PAD, VOCAB, make_model
from transformers import Trainer, TrainingArguments

from hf_softprompt import SoftPromptCallback, SoftPromptConfig, SoftPromptMixin, SoftPromptTrainer
from hf_softprompt.training.labelled_tail import labelled_tail_inputs

LENGTH, ANSWER = 10, 2  # rows of 10 positions, each ending in a 2-token answer


def left_padded_rows(n: int = 8, seed: int = 0) -> Dataset:
    """Rows of 4-10 real tokens, padded on the left, each labelled on its last 2 tokens only."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, LENGTH), generator=g)
    mask = torch.ones_like(ids)
    for row, real in enumerate(torch.randint(4, LENGTH + 1, (n,), generator=g).tolist()):
        ids[row, :LENGTH - real], mask[row, :LENGTH - real] = PAD, 0
    labels = torch.full_like(ids, -100)
    labels[:, -ANSWER:] = ids[:, -ANSWER:]
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})


def one_sgd_step(tmp_path, family: str, path: str, shared: bool) -> tuple[Trainer, torch.nn.Module]:
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, optim="sgd",
                             learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1,
                             report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)
    model = make_model(family, "causal_lm", initializer_range=0.2)
    config = SoftPromptConfig(num_virtual_tokens=3, shared_prompt_cache=shared)
    if path == "subclass":
        trainer: Trainer = SoftPromptTrainer(model=model, args=args, train_dataset=left_padded_rows(),
                                             soft_prompt_config=config)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=left_padded_rows(),
                          callbacks=[SoftPromptCallback(config)])
    return trainer, model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("path", ["subclass", "callback"])
@pytest.mark.parametrize("shared", [True, False])
def test_the_step_over_the_labelled_tail_equals_the_full_loss_step(tmp_path, family, path, shared):
    trainer, model = one_sgd_step(tmp_path, family, path, shared)
    # Reference: the model's own mean loss over every position, before the step.
    reference = copy.deepcopy(model)
    batch = {k: torch.tensor(v) for k, v in left_padded_rows().to_dict().items()}
    full = reference(**batch)
    assert full.logits.shape[1] == LENGTH
    full.loss.backward()
    weight = reference.soft_prompts["default"].embedding.weight
    expected = (weight - weight.grad).detach()

    head_positions = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: head_positions.append(args[0].shape[1]))
    trainer.train()
    # Labels sit in the last 2 positions: the head runs over the last 3 (the one before predicts the first).
    assert head_positions == [ANSWER + 1]
    torch.testing.assert_close(model.soft_prompts["default"].embedding.weight.detach(), expected, atol=1e-5, rtol=0)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == [pytest.approx(full.loss.item(), abs=1e-4)]


class LogitsReadingTrainer(Trainer):
    """A Trainer whose loss reads the logits (as TRL's SFTTrainer does for its token accuracy)."""

    seen: list[int]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        self.seen.append(outputs.logits.shape[1])
        return (outputs.loss, outputs) if return_outputs else outputs.loss


class PromptedLogitsReadingTrainer(SoftPromptMixin, LogitsReadingTrainer):
    """The logits-reading loss below SoftPromptMixin."""


class LogitsReadingSoftPromptTrainer(SoftPromptTrainer):
    """The logits-reading loss above SoftPromptMixin (as distill.py's trainer has it)."""

    seen: list[int]
    compute_loss = LogitsReadingTrainer.compute_loss


@pytest.mark.parametrize("trainer_class", [LogitsReadingTrainer, PromptedLogitsReadingTrainer,
                                           LogitsReadingSoftPromptTrainer])
def test_a_trainer_that_reads_the_logits_gets_them_all(tmp_path, trainer_class):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, learning_rate=0.01,
                             report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no")
    config = SoftPromptConfig(num_virtual_tokens=3)
    kwargs = ({"callbacks": [SoftPromptCallback(config)]} if trainer_class is LogitsReadingTrainer
              else {"soft_prompt_config": config})
    trainer = trainer_class(model=make_model("llama", "causal_lm"), args=args, train_dataset=left_padded_rows(),
                            **kwargs)
    trainer.seen = []
    trainer.train()
    trainer.evaluate(left_padded_rows())  # a loss-only pass through the same compute_loss
    assert trainer.seen == [LENGTH, LENGTH]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("path", ["subclass", "callback"])
def test_a_held_out_loss_pass_runs_the_head_over_the_tail_and_a_prediction_pass_over_everything(
        tmp_path, family, path):
    trainer, model = one_sgd_step(tmp_path, family, path, shared=False)
    trainer.train()  # the callback sets up its prompt at train()'s start
    rows = left_padded_rows(seed=1)
    batch = {k: torch.tensor(v) for k, v in rows.to_dict().items()}
    with torch.no_grad():
        full = copy.deepcopy(model)(**batch)  # reference: the model's own loss over every position
    head_positions = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: head_positions.append(args[0].shape[1]))

    metrics = trainer.evaluate(rows)  # no compute_metrics: a loss-only pass
    assert head_positions == [ANSWER + 1]
    assert metrics["eval_loss"] == pytest.approx(full.loss.item(), abs=1e-5)

    head_positions.clear()
    predicted = trainer.predict(rows)  # the logits are returned: every position
    assert head_positions == [full.logits.shape[1]]
    torch.testing.assert_close(torch.as_tensor(predicted.predictions), full.logits, atol=1e-5, rtol=0)
    assert predicted.metrics["test_loss"] == pytest.approx(full.loss.item(), abs=1e-5)


def test_the_tail_keeps_every_target_and_nothing_is_cut_where_it_would_not(tmp_path):
    trainer, _ = one_sgd_step(tmp_path, "llama", "subclass", shared=True)
    labels = torch.full((2, 10), -100)
    labels[0, 7:], labels[1, 4] = 5, 6  # the earliest target at position 4: logits from position 3 on
    cut = labelled_tail_inputs(trainer, {"input_ids": torch.ones(2, 10, dtype=torch.long), "labels": labels})
    assert cut["logits_to_keep"] == 7 and torch.equal(cut["labels"], labels[:, 3:])
    # A target at position 1 needs the logits of position 0: nothing to cut.
    labels[1, 1] = 6
    assert "logits_to_keep" not in labelled_tail_inputs(trainer, {"labels": labels})
    # A caller's own logits_to_keep, or no labels at all, is left alone.
    own = {"labels": labels, "logits_to_keep": 2}
    assert labelled_tail_inputs(trainer, own) is own
    assert "logits_to_keep" not in labelled_tail_inputs(trainer, {"input_ids": torch.ones(2, 10, dtype=torch.long)})
