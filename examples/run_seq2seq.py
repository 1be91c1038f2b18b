#!/usr/bin/env python
"""Prompt-tune a T5-family model for a text-to-text task, base model frozen (Lester et al. 2021).

The soft prompt goes in front of the encoder input; the decoder learns nothing. The score is the
exact match of greedy `generate()` outputs on held-out data, before training (the initial
prompt) and after. Writes the adapter, `results.json` and `nearest_tokens.txt` into
`--output_dir`, and prints the vocabulary tokens nearest to each learned virtual token.

Default: google-t5/t5-small from the Hub on the embedded `examples/data/topics` data (headline ->
sports / business / science / politics). `--tiny` builds a small random T5 and a word-level
tokenizer from the training texts instead, offline, for smoke tests.

    python examples/run_seq2seq.py
    python examples/run_seq2seq.py --tiny --max_steps 5 --output_dir /tmp/s2s   # smoke test, offline
    python examples/run_seq2seq.py --model_name_or_path google/flan-t5-small \\
        --train_file my_train.json --validation_file my_dev.json --text_column source --label_column target

Every `TrainingArguments` and `SoftPromptConfig` field is a flag (`--help` lists them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    TrainingArguments,
    set_seed,
)
from utils import (
    DataArguments,
    GenerationArguments,
    ModelArguments,
    format_inputs,
    load_kwargs,
    load_raw_datasets,
    make_tiny_model,
    parse_args,
    setup_logging,
    train_and_score_generation,
)

from hf_softprompt import SoftPromptConfig, SoftPromptTrainer

DEFAULT_MODEL = "google-t5/t5-small"

# Every one of these can be overridden by a flag. Not measured here (t5-small needs the Hub);
# the learning rate follows Lester et al. (0.3, Adafactor).
DEFAULTS: dict[str, Any] = dict(
    # data
    text_column="text",
    label_column="target",
    input_template="{text}",
    max_length=64,
    # soft prompt
    num_virtual_tokens=20,
    init="text",
    init_text="Which topic is this headline about: sports, business, science or politics?",
    # training
    output_dir="output/run_seq2seq",
    optim="adafactor",
    learning_rate=0.3,
    num_train_epochs=10,
    warmup_steps=0.1,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=32,
    logging_steps=20,
    save_strategy="no",
    report_to="none",
    seed=42,
)


@dataclass
class Seq2SeqGenerationArguments(GenerationArguments):
    """How targets are generated for the exact-match evaluation, and how long they may be."""

    max_target_length: int = field(default=8, metadata={"help": "Maximum target tokens in training."})


def main() -> None:
    model_args, data_args, generation_args, prompt_config, training_args = parse_args(
        (ModelArguments, DataArguments, Seq2SeqGenerationArguments, SoftPromptConfig, TrainingArguments),
        DEFAULTS, default_model=lambda: (DEFAULT_MODEL, None),
    )
    model_args: ModelArguments
    data_args: DataArguments
    generation_args: Seq2SeqGenerationArguments
    prompt_config: SoftPromptConfig
    training_args: TrainingArguments
    setup_logging()
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args, default_data="topics", seed=training_args.seed)
    if model_args.tiny:
        texts = [*raw["train"][data_args.text_column], *map(str, raw["train"][data_args.label_column]),
                 data_args.input_template, prompt_config.init_text or ""]
        make_tiny_model("t5", texts, model_args.model_name_or_path, seed=training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, **load_kwargs(model_args))
    model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path, **load_kwargs(model_args))

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(format_inputs(data_args, batch[data_args.text_column]), truncation=True,
                            max_length=data_args.max_length)
        targets = [str(target) for target in batch[data_args.label_column]]
        encoded["labels"] = tokenizer(text_target=targets, truncation=True,
                                      max_length=generation_args.max_target_length)["input_ids"]
        return encoded

    with training_args.main_process_first(desc="tokenizing"):
        train_dataset = raw["train"].map(tokenize, batched=True, remove_columns=raw["train"].column_names)

    eval_inputs = format_inputs(data_args, raw["validation"][data_args.text_column])
    references = [str(target) for target in raw["validation"][data_args.label_column]]

    trainer = SoftPromptTrainer(
        model=model,
        args=training_args,
        soft_prompt_config=prompt_config,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        # Pads labels with -100 and builds decoder_input_ids from them (the model's own shift).
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
    )
    train_and_score_generation(
        trainer, tokenizer, eval_inputs, references, max_length=data_args.max_length,
        max_new_tokens=generation_args.max_new_tokens, task="text2text-generation",
        finetuned_from=model_args.model_name_or_path,
        results={"model": model_args.model_name_or_path,
                 "num_virtual_tokens": prompt_config.num_virtual_tokens},
    )


if __name__ == "__main__":
    main()
