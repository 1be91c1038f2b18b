"""Several prompts trained in one Trainer run: a per-row `soft_prompt_ids` column, stock collators,
gradient isolation, per-prompt metrics and exact resume."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from datasets import Dataset
from models import VOCAB, make_model
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from hf_softprompt import (
    PerPromptMetrics,
    SoftPromptCallback,
    SoftPromptConfig,
    SoftPromptTrainer,
    soft_prompt_names,
)
from hf_softprompt.files.save import adapter_state_dict
from hf_softprompt.model.injector import get_injector

CONFIGS = {"sentiment": SoftPromptConfig(num_virtual_tokens=4),
           "topics": SoftPromptConfig(num_virtual_tokens=6, encoder="residual", encoder_hidden_size=8)}
TARGETS = {0: 1, 1: 2}  # class (seq_cls) or token (seq2seq) of each task: only the prompt tells them apart


def tiny(family, task):
    scale = {"t5": {}}.get(family, {"initializer_range": 0.2})
    return make_model(family, task, **scale)


def multitask_rows(task, n=24, tasks=(0, 1), seed=0):
    """Ragged rows of random tokens; the label depends only on the row's task (its prompt id)."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": [], "soft_prompt_ids": [], "text": []}
    for i in range(n):
        task_id = tasks[i % len(tasks)]
        length = int(torch.randint(3, 9, (1,), generator=g))
        rows["input_ids"].append(torch.randint(4, VOCAB, (length,), generator=g).tolist())
        rows["labels"].append(TARGETS[task_id] if task == "seq_cls" else [TARGETS[task_id] + 5, 2])
        rows["soft_prompt_ids"].append(task_id)
        rows["text"].append("a column the model does not take")  # removed by remove_unused_columns
    return Dataset.from_dict(rows)


def args(tmp_path, **overrides):
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, max_steps=30,
                    learning_rate=0.05, save_strategy="no", logging_steps=5, report_to="none", use_cpu=True,
                    disable_tqdm=True, seed=0, remove_unused_columns=True)
    return TrainingArguments(**{**defaults, **overrides})


def build(kind, model, training_args, data, collator, **kwargs):
    if kind == "subclass":
        return SoftPromptTrainer(model=model, args=training_args, train_dataset=data, data_collator=collator,
                                 soft_prompt_config=CONFIGS, **kwargs)
    return Trainer(model=model, args=training_args, train_dataset=data, data_collator=collator,
                   callbacks=[SoftPromptCallback(CONFIGS)], **kwargs)


def predicted_classes(model, data, collator):
    batch = collator([{k: data[i][k] for k in ("input_ids", "soft_prompt_ids")} for i in range(len(data))])
    with torch.no_grad():
        return model(**batch).logits.argmax(-1)


@pytest.mark.parametrize("kind", ["subclass", "callback"])
def test_two_prompts_learn_their_own_tasks_through_stock_collators(tmp_path, tokenizer_dir, kind):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    collator = DataCollatorWithPadding(tokenizer)
    data = multitask_rows("seq_cls")
    model = tiny("bert", "seq_cls")
    trainer = build(kind, model, args(tmp_path), data, collator)
    assert soft_prompt_names(model) == ["sentiment", "topics"]
    trainer.train()
    predictions = predicted_classes(model, data, collator)
    wanted = torch.tensor([TARGETS[t] for t in data["soft_prompt_ids"]])
    # Each row through its own prompt and head: one model, two tasks, told apart by the prompt alone.
    assert (predictions == wanted).float().mean() > 0.9, predictions


def test_rows_of_one_task_never_change_the_other_prompt(tmp_path, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = multitask_rows("seq_cls", tasks=(1,))  # topics rows only
    model = tiny("bert", "seq_cls")
    trainer = build("subclass", model, args(tmp_path, max_steps=4), data, DataCollatorWithPadding(tokenizer))
    bank = get_injector(model).bank
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    trainer.train()
    after = bank.state_dict()
    for key, value in before.items():
        moved = not torch.equal(after[key], value)
        assert moved == (".topics." in key), key  # the column chose each row's prompt and head


def test_seq2seq_collator_keeps_the_column(tmp_path, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny("t5", "seq2seq_lm")
    data = multitask_rows("seq2seq_lm", tasks=(1,))  # topics rows; "sentiment" is the active prompt
    trainer = build("callback", model, args(tmp_path, max_steps=3), data,
                    DataCollatorForSeq2Seq(tokenizer, model=model))
    bank = get_injector(model).bank
    before = copy.deepcopy(bank.state_dict())
    trainer.train()
    after = bank.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if ".sentiment." in k)
    assert any(not torch.equal(after[k], v) for k, v in before.items() if ".topics." in k)


def accuracy(prediction):
    predictions = np.asarray(prediction.predictions).argmax(-1)
    return {"accuracy": float((predictions == np.asarray(prediction.label_ids)).mean())}


def test_evaluate_reports_per_prompt_metrics(tmp_path, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = multitask_rows("seq_cls")
    model = tiny("bert", "seq_cls")
    trainer = build("subclass", model, args(tmp_path, label_names=["labels", "soft_prompt_ids"]), data,
                    DataCollatorWithPadding(tokenizer), eval_dataset=data,
                    compute_metrics=PerPromptMetrics(accuracy, list(CONFIGS)))
    metrics = trainer.evaluate()
    predictions = predicted_classes(model, data, DataCollatorWithPadding(tokenizer)).numpy()
    labels, ids = np.array(data["labels"]), np.array(data["soft_prompt_ids"])
    assert metrics["eval_accuracy"] == pytest.approx(float((predictions == labels).mean()))
    for prompt_id, name in enumerate(CONFIGS):
        rows = ids == prompt_id
        assert metrics[f"eval_{name}_accuracy"] == pytest.approx(float((predictions[rows] == labels[rows]).mean()))


def test_per_prompt_metrics_explains_the_label_names_it_needs():
    from transformers import EvalPrediction

    with pytest.raises(ValueError, match=r"label_names=\['labels', 'soft_prompt_ids'\]"):
        PerPromptMetrics(accuracy, ["a"])(EvalPrediction(predictions=np.zeros((2, 3)), label_ids=np.zeros(2)))


def test_resume_with_several_prompts_is_exact(tmp_path, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = multitask_rows("seq_cls", n=12)
    run = dict(max_steps=5, save_steps=2, save_strategy="steps", per_device_train_batch_size=4)
    full = tiny("bert", "seq_cls")
    build("subclass", full, args(tmp_path / "full", **run), data, DataCollatorWithPadding(tokenizer)).train()
    model = tiny("bert", "seq_cls")
    trainer = build("subclass", model, args(tmp_path / "resumed", **run), data, DataCollatorWithPadding(tokenizer))
    with torch.no_grad():
        for param in get_injector(model).bank.parameters():
            param.zero_()  # the resumed prompts must come from the checkpoint
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2"))
    for name in CONFIGS:
        ours, reference = adapter_state_dict(model, name), adapter_state_dict(full, name)
        assert ours.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(ours[key], reference[key], atol=0, rtol=0, msg=f"{name}: {key}")


@pytest.mark.parametrize("kind", ["subclass", "callback"])
@pytest.mark.parametrize("bad,match", [
    (7, r"Row 17 of the training dataset has soft_prompt_ids=7, but the model carries 2 prompts "
        r"\['sentiment', 'topics'\]: use 0 to 1"),
    (-2, r"Row 17 of the training dataset has soft_prompt_ids=-2"),
])
def test_a_bad_prompt_id_in_the_dataset_is_named_before_the_first_step(tmp_path, tokenizer_dir, kind, bad, match):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = multitask_rows("seq_cls", n=24)
    ids = list(data["soft_prompt_ids"])
    ids[17] = bad
    data = data.remove_columns("soft_prompt_ids").add_column("soft_prompt_ids", ids)
    trainer = build(kind, tiny("bert", "seq_cls"), args(tmp_path), data, DataCollatorWithPadding(tokenizer))
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("kind", ["subclass", "callback"])
def test_a_prompt_with_a_non_finite_gradient_stops_training_before_it_spreads(tmp_path, tokenizer_dir, kind):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny("bert", "seq_cls")
    trainer = build(kind, model, args(tmp_path, max_steps=5, max_grad_norm=1.0), multitask_rows("seq_cls"),
                    DataCollatorWithPadding(tokenizer))
    with torch.no_grad():  # the topics prompt overflows: its rows' loss, and its gradient, are NaN
        model.soft_prompts.prompts["topics"].embedding.weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.soft_prompts.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"Soft prompt\(s\) \['topics'\] got a NaN or infinite gradient "
                                                 r"at step 1: .* Training stopped before the optimizer"):
        trainer.train()
    after = model.soft_prompts.state_dict()
    for key, value in before.items():  # nothing applied: the sentiment prompt is not NaN-polluted either
        assert torch.equal(after[key], value), key
    assert all(bool(v.isfinite().all()) for k, v in after.items() if "topics" not in k)


def test_per_prompt_metric_keys_never_overwrite_each_other():
    from transformers import EvalPrediction

    def accuracy(p):
        return {"accuracy": float((np.asarray(p.predictions).argmax(-1) == p.label_ids).mean())}

    with pytest.raises(ValueError, match=r"A prompt is named 'none', the label of rows without a prompt"):
        PerPromptMetrics(accuracy, ["none", "b"])
    predictions = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    labels, ids = np.array([0, 1, 1]), np.array([0, -1, 1])
    metrics = PerPromptMetrics(accuracy, ["none", "b"], no_prompt_label="no_prompt")(
        EvalPrediction(predictions=predictions, label_ids=(labels, ids)))
    assert metrics == {"accuracy": 2 / 3, "none_accuracy": 1.0, "no_prompt_accuracy": 1.0, "b_accuracy": 0.0}

    def two(p):
        return {"x": 1.0, "b_x": 2.0}  # prompt "a" + "b_x" and prompt "a_b" + "x" both give "a_b_x"

    with pytest.raises(ValueError, match=r"The metrics of prompt 'a_b' would overwrite \['a_b_x'\]"):
        PerPromptMetrics(two, ["a", "a_b"])(EvalPrediction(predictions=predictions, label_ids=(labels, ids)))
