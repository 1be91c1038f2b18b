"""SoftPromptDistillationTrainer: a soft prompt trained to stand in for a text prompt (no labels)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import WORDS
from datasets import Dataset
from models import make_model
from transformers import AutoTokenizer, TrainingArguments

from hf_softprompt import (
    SoftPromptConfig,
    SoftPromptDistillationTrainer,
    chat_after_prompt,
    distillation_loss,
    load_soft_prompt,
)
from hf_softprompt.training.teacher import generate_continuations, teacher_logits

# Words in the test tokenizer's vocabulary, so every chat token is a real one.
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}the {{ m['content'] }} . "
                 "{% else %}a {{ m['content'] }} ! {% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}it is{% endif %}")


def sentences(n: int, seed: int, low: int = 3, high: int = 8) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(n)]


def teacher_text(n: int = 40, seed: int = 0) -> str:
    return sentences(1, seed, n, n)[0]


def distiller(tmp_path, tokenizer, model=None, *, texts=None, teacher=None, config=None, **overrides):
    model = model if model is not None else make_model("llama", "causal_lm", initializer_range=0.05)
    args = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=8,
                per_device_eval_batch_size=8, learning_rate=0.03, report_to="none", save_strategy="no",
                use_cpu=True, disable_tqdm=True, seed=0)
    trainer_args = {k: overrides.pop(k) for k in list(overrides) if k in args or hasattr(TrainingArguments, k)}
    train = texts if isinstance(texts, Dataset) else Dataset.from_dict({"text": texts or sentences(16, 1)})
    return SoftPromptDistillationTrainer(
        model=model, args=TrainingArguments(**{**args, **trainer_args}), processing_class=tokenizer,
        teacher_prompt=teacher if teacher is not None else teacher_text(),
        soft_prompt_config=config if config is not None else SoftPromptConfig(num_virtual_tokens=8),
        train_dataset=train, max_new_tokens=overrides.pop("max_new_tokens", 4), **overrides)


@pytest.fixture
def tokenizer(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_teacher_reads_the_text_once_per_batch_as_if_in_front_of_each_row(family, tokenizer):
    """The shared text's keys/values give each row's logits as the bare model gives them for the
    text and the row as one sequence."""
    model = make_model(family, "causal_lm", initializer_range=0.2)
    bare = copy.deepcopy(model)  # the reference never carries a prompt
    from hf_softprompt import add_soft_prompt
    add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=4))
    prefix = tokenizer(teacher_text(12))["input_ids"]
    rows = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in sentences(3, 2)]
    ids, mask = right_padded(rows)
    shared = teacher_logits(model, torch.tensor(prefix), ids, mask)
    concatenated = teacher_logits(model, torch.tensor(prefix), ids, mask, share_prefix=False)
    for i, row in enumerate(rows):
        reference = bare(torch.tensor([prefix + row])).logits[0, len(prefix):]
        torch.testing.assert_close(shared[i, :len(row)], reference, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(concatenated[i, :len(row)], reference, atol=2e-5, rtol=1e-4)


def test_teacher_continuations_equal_generating_each_row_after_the_text(tokenizer):
    model = make_model("llama", "causal_lm", initializer_range=0.2)
    bare = copy.deepcopy(model)
    from hf_softprompt import add_soft_prompt
    add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=4))
    prefix = tokenizer(teacher_text(12))["input_ids"]
    rows = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in sentences(5, 3)]
    made = generate_continuations(model, tokenizer, prefix, rows, batch_size=3, max_new_tokens=5)
    for row, continuation in zip(rows, made, strict=True):
        out = bare.generate(torch.tensor([prefix + row]), max_new_tokens=5, do_sample=False, pad_token_id=0)
        expected = out[0, len(prefix) + len(row):].tolist()
        if 2 in expected:  # through the first end-of-sequence token
            expected = expected[:expected.index(2) + 1]
        assert continuation == expected


@pytest.mark.parametrize("temperature, share_teacher_prefix", [(1.0, True), (2.0, True), (1.0, False)])
def test_loss_is_the_kl_of_the_two_forward_passes_written_by_hand(tmp_path, tokenizer, temperature,
                                                                  share_teacher_prefix):
    trainer = distiller(tmp_path, tokenizer, temperature=temperature, share_teacher_prefix=share_teacher_prefix)
    model = trainer.model
    bare = make_model("llama", "causal_lm", initializer_range=0.05)  # same seed: the same weights, no prompt
    with torch.no_grad():
        model.soft_prompts["default"].embedding.weight.normal_(0, 0.5)  # far from any text
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    assert (batch["labels"] != -100).any() and (batch["labels"][:, 0] == -100).all()
    loss = trainer.compute_loss(model, dict(batch))

    prompt = model.soft_prompts["default"].embedding.weight.detach()
    prefix = list(trainer.teachers["default"].prefix_ids)
    total, count = 0.0, 0
    torch.set_grad_enabled(False)
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        row, labels = ids[mask.bool()].tolist(), labels[mask.bool()]  # the row without its padding
        teacher = bare(torch.tensor([prefix + row])).logits[0, len(prefix):]
        embeds = torch.cat([prompt, bare.get_input_embeddings()(torch.tensor(row))])
        student = bare(inputs_embeds=embeds[None]).logits[0, prompt.shape[0]:]
        for t in range(len(row) - 1):
            if labels[t + 1] == -100:
                continue
            p_teacher = F.softmax(teacher[t] / temperature, -1)
            log_student = F.log_softmax(student[t] / temperature, -1)
            total += float((p_teacher * (p_teacher.log() - log_student)).sum()) * temperature**2
            count += 1
    torch.set_grad_enabled(True)
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    assert float(loss) == pytest.approx(total / count, rel=1e-4)


def test_gradients_reach_only_the_prompt(tmp_path, tokenizer):
    trainer = distiller(tmp_path, tokenizer)
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.compute_loss(model, dict(batch)).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert list(grads) == ["soft_prompts.prompts.default.embedding.weight"]
    assert float(grads["soft_prompts.prompts.default.embedding.weight"].abs().sum()) > 0


def agreement(model, tokenizer, prefix, texts, new_tokens=4):
    """(share of rows whose greedy continuation equals the teacher's, share whose first token does)."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    teacher = generate_continuations(model, tokenizer, prefix, rows, batch_size=16, max_new_tokens=new_tokens)
    student = []
    for row in rows:
        out = model.generate(torch.tensor([row]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        tokens = out[0, len(row):].tolist()
        student.append(tokens[:tokens.index(2) + 1] if 2 in tokens else tokens)
    pairs = list(zip(teacher, student, strict=True))
    return sum(t == s for t, s in pairs) / len(pairs), sum(t[:1] == s[:1] for t, s in pairs) / len(pairs)


def test_training_makes_the_student_continue_as_the_teacher(tmp_path, tokenizer):
    """Measured here (2 threads, 32 held-out rows, 200 steps, about 3 s): all 4 greedy tokens equal to
    the teacher's 0.06 -> 0.50, the first token 0.16 -> 0.66 (300 steps or 1024 rows: the same, the
    tiny model's limit). The thresholds leave room for other summation orders."""
    trainer = distiller(tmp_path, tokenizer, texts=sentences(512, 1), max_steps=200, per_device_train_batch_size=16,
                        config=SoftPromptConfig(num_virtual_tokens=16, init="random"))
    model, prefix, held_out = trainer.model, trainer.teachers["default"].prefix_ids, sentences(32, 99)
    model.eval()
    whole_before, first_before = agreement(model, tokenizer, prefix, held_out)
    trainer.train()
    model.eval()
    whole_after, first_after = agreement(model, tokenizer, prefix, held_out)
    assert first_before <= 0.3 and whole_before <= 0.15
    assert first_after >= 0.5 and whole_after >= 0.35


def test_several_teachers_train_each_prompt_from_its_own_rows(tmp_path, tokenizer):
    texts = sentences(12, 4)
    rows = Dataset.from_dict({"text": texts, "soft_prompt_ids": ["a", "b"] * 3 + ["b"] * 6})
    teachers = {"a": teacher_text(20, 5), "b": teacher_text(30, 6)}
    trainer = distiller(tmp_path, tokenizer, texts=rows, teacher=teachers)
    model = trainer.model
    assert trainer.train_dataset["soft_prompt_ids"] == [0, 1] * 3 + [1] * 6
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    # Each row's teacher reads its own prompt's text.
    mixed = trainer.teacher_logits(batch["input_ids"], batch["attention_mask"], batch["soft_prompt_ids"])
    for i, index in enumerate(batch["soft_prompt_ids"].tolist()):
        prefix = torch.tensor(trainer.teachers["ab"[index]].prefix_ids)
        alone = teacher_logits(model, prefix, batch["input_ids"][i:i + 1], batch["attention_mask"][i:i + 1])
        torch.testing.assert_close(mixed[i], alone[0], atol=2e-5, rtol=1e-4)

    def prompt_grads(rows: list[int]) -> dict[str, torch.Tensor | None]:
        model.zero_grad()
        part = {k: v[rows] for k, v in batch.items()}
        outputs = model(**{k: v for k, v in part.items() if k != "labels"})
        teacher = trainer.teacher_logits(part["input_ids"], part["attention_mask"], part["soft_prompt_ids"])
        distillation_loss(outputs.logits, teacher, part["labels"], num_items_in_batch=1).backward()
        return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ids = batch["soft_prompt_ids"].tolist()
    together = prompt_grads(list(range(8)))
    for name, index in (("a", 0), ("b", 1)):
        own = prompt_grads([i for i in range(8) if ids[i] == index])
        key = f"soft_prompts.prompts.{name}.embedding.weight"
        torch.testing.assert_close(together[key], own[key], atol=1e-6, rtol=1e-4)
        others = prompt_grads([i for i in range(8) if ids[i] != index])
        assert others[key] is None or float(others[key].abs().sum()) == 0


def test_chat_teacher_reads_the_template_and_the_student_the_rest(tmp_path, tokenizer):
    system = [{"role": "system", "content": teacher_text(20, 7)}]
    turns = [[{"role": "user", "content": s}] for s in sentences(6, 8)]
    trainer = distiller(tmp_path, tokenizer, texts=Dataset.from_dict({"messages": turns}), teacher=system)
    prefix = list(trainer.teachers["default"].prefix_ids)
    for messages, row in zip(turns, trainer.train_dataset, strict=True):
        whole = tokenizer(tokenizer.apply_chat_template(system + messages, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)["input_ids"]
        student = tokenizer(chat_after_prompt(tokenizer, system, messages), add_special_tokens=False)["input_ids"]
        continuation = [t for t in row["labels"] if t != -100]
        assert prefix + student == whole  # the teacher reads the whole conversation
        assert row["input_ids"] == student + continuation
    assert chat_after_prompt(tokenizer, system, turns[0]).startswith("a ")  # the user's turn, nothing of the system's
    trainer.train()  # one step runs


def test_rows_with_a_completion_distill_over_it_without_generating(tmp_path, tokenizer, monkeypatch):
    import hf_softprompt.training.distill as distill

    monkeypatch.setattr(distill, "generate_continuations", lambda *a, **k: pytest.fail("generated"))
    rows = Dataset.from_dict({"text": ["the movie", "a film"], "completion": ["was great", "is bad"]})
    trainer = distiller(tmp_path, tokenizer, texts=rows)
    first = trainer.train_dataset[0]
    completion = tokenizer("was great", add_special_tokens=False)["input_ids"]
    assert first["labels"] == [-100] * 2 + completion
    assert first["input_ids"] == tokenizer("the movie", add_special_tokens=False)["input_ids"] + completion


def test_the_distilled_prompt_saves_and_loads_as_any_prompt(tmp_path, tokenizer):
    trainer = distiller(tmp_path, tokenizer, max_steps=3)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    fresh = load_soft_prompt(make_model("llama", "causal_lm", initializer_range=0.05), str(tmp_path / "adapter"))
    ids = torch.tensor([tokenizer("the movie was", add_special_tokens=False)["input_ids"]])
    trainer.model.eval()
    torch.testing.assert_close(fresh(ids).logits, trainer.model(ids).logits)


def test_default_prompt_starts_from_the_teacher_text(tmp_path, tokenizer):
    text = teacher_text(40)
    model = make_model("llama", "causal_lm", initializer_range=0.05)
    trainer = SoftPromptDistillationTrainer(
        model=model, args=TrainingArguments(str(tmp_path), report_to="none", use_cpu=True),
        processing_class=tokenizer, teacher_prompt=text, train_dataset=Dataset.from_dict({"text": ["the film"]}),
        max_new_tokens=2)
    table = trainer.model.soft_prompts["default"].embedding.weight
    first = tokenizer(text, add_special_tokens=False)["input_ids"][:16]
    assert table.shape[0] == 16
    torch.testing.assert_close(table, model.get_input_embeddings().weight[first].float())


@pytest.mark.parametrize("case, message", [
    ({"teacher": "  "}, "teacher_prompt is empty"),
    ({"teacher": {}}, "names no prompt"),
    ({"teacher": [{"role": "system", "content": ""}]}, "all empty"),
    ({"teacher": " ".join(["the"] * 200)}, "is 200 tokens, but the model has 128 positions"),
    ({"texts": [" ".join(["a"] * 120)]}, "Row 0 of the training dataset"),
    ({"texts": Dataset.from_dict({"prompt": ["the film"]})}, "'text' column"),
    ({"texts": Dataset.from_dict({"text": ["a", "b"]}), "teacher": {"x": "the film", "y": "a film"}},
     "Row 0 of the training dataset names no prompt"),
    ({"texts": Dataset.from_dict({"text": ["a"], "soft_prompt_ids": [2]}), "teacher": {"x": "the", "y": "a"}},
     "soft_prompt_ids=2"),
    ({"temperature": 0}, "temperature must be > 0"),
    ({"config": {"z": SoftPromptConfig(num_virtual_tokens=4)}, "teacher": {"x": "the", "y": "a"}},
     "give one config, or one per teacher prompt name"),
])
def test_bad_input_is_refused_with_the_fix(tmp_path, tokenizer, case, message):
    with pytest.raises(ValueError, match=message):
        distiller(tmp_path, tokenizer, **case)


def test_only_causal_lms_and_tokenizers_with_a_chat_template_for_messages(tmp_path, tokenizer, tokenizer_dir):
    with pytest.raises(ValueError, match="decoder-only causal LM"):
        distiller(tmp_path, tokenizer, model=make_model("llama", "seq_cls"))
    plain = AutoTokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(ValueError, match="no chat_template"):
        distiller(tmp_path, plain, teacher=[{"role": "system", "content": "the film"}])


def test_evaluate_reports_the_distillation_loss_of_the_eval_rows(tmp_path, tokenizer):
    held_out = Dataset.from_dict({"text": sentences(6, 11)})
    trainer = distiller(tmp_path, tokenizer, eval_dataset=held_out)
    assert trainer.eval_dataset.column_names == ["input_ids", "labels", "soft_prompt_ids"]
    metrics = trainer.evaluate()
    trainer.model.eval()
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))])
    with torch.no_grad():
        expected = float(trainer.compute_loss(trainer.model, dict(batch)))
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5) and expected > 0


def test_accumulated_halves_equal_the_whole_batch(tmp_path, tokenizer):
    """With the Trainer's count of target tokens over all accumulation steps, two half batches (each
    padded to its own width) add up to the whole batch's loss."""
    trainer = distiller(tmp_path, tokenizer, texts=sentences(8, 12, 2, 12))
    assert trainer.model_accepts_loss_kwargs  # llama: the Trainer then leaves the division to the loss
    rows = [trainer.train_dataset[i] for i in range(8)]
    whole = trainer.data_collator(rows)
    count = int((whole["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        total = trainer.compute_loss(trainer.model, dict(whole), num_items_in_batch=count)
        halves = [trainer.compute_loss(trainer.model, dict(trainer.data_collator(part)), num_items_in_batch=count)
                  for part in (rows[:4], rows[4:])]
    assert float(sum(halves)) == pytest.approx(float(total), rel=1e-5)
