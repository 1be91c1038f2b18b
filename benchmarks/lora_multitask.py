"""LoRA on the main job: what a LoRA adapter reaches on `examples/run_multitask.py`'s three tasks
with the same data, steps, batch size and held-out rows, for comparison with the soft prompts.

One LoRA adapter (PEFT, `--rank` on the attention projections) learns all three tasks at once, told
apart by their input templates (a LoRA has no per-row choice), then answers the shuffled held-out
rows with greedy `generate()`; exact match per task as in the main job. A script, not a test and
not a dependency of the package (it needs peft: `pip install -e ".[test,examples]"`).

    python benchmarks/lora_multitask.py --seeds 42 1 2 3 4 5 --out benchmarks/results.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
    set_seed,
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from run_multitask import (  # noqa: E402
    DEFAULTS,
    MultiTaskArguments,
    choose_tasks,
    exact_match_by_task,
    held_out_rows,
    load_task_splits,
    training_rows,
)
from utils import generate_answers, smollm2_gguf  # noqa: E402

from hf_softprompt.model.quantization import drop_nominal_gguf_quantizer  # noqa: E402


def run(seed: int, rank: int, learning_rate: float, epochs: float,
        task_args: MultiTaskArguments) -> tuple[dict[str, float], float]:
    from peft import LoraConfig, get_peft_model

    set_seed(seed)
    tasks = choose_tasks(task_args)
    splits = {task.name: load_task_splits(task, task_args) for task in tasks}
    path, gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf)
    drop_nominal_gguf_quantizer(model)  # dequantized on load: LoRA's Trainer would refuse it
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    data = training_rows(tasks, splits, tokenizer, task_args.max_length, seed).remove_columns("soft_prompt_ids")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, learning_rate=learning_rate, num_train_epochs=epochs, seed=seed,
            warmup_steps=DEFAULTS["warmup_steps"], per_device_train_batch_size=DEFAULTS["per_device_train_batch_size"],
            logging_steps=50, save_strategy="no", report_to="none", disable_tqdm=True,
        )
        Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)).train()
    seconds = time.perf_counter() - start
    row_tasks, inputs, references = held_out_rows(tasks, splits, seed)
    answers = generate_answers(model, tokenizer, inputs, max_length=task_args.max_length,
                               max_new_tokens=task_args.max_new_tokens,
                               batch_size=DEFAULTS["per_device_eval_batch_size"])
    return exact_match_by_task(answers, references, row_tasks, tasks), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3, 4, 5])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--epochs", type=float, default=DEFAULTS["num_train_epochs"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="append the markdown table to this file")
    parser.add_argument("--task_file", default=None, help="your own tasks, as for run_multitask.py --task_file")
    args = parser.parse_args()
    task_args = MultiTaskArguments(task_file=args.task_file)
    task_names = [task.name for task in choose_tasks(task_args)]  # a bad task file fails before any training
    torch.set_num_threads(args.threads)

    scores, times = [], []
    for seed in args.seeds:
        result, seconds = run(seed, args.rank, args.learning_rate, args.epochs, task_args)
        scores.append(result)
        times.append(seconds)
        print(f"seed {seed}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in result.items()) + f" ({seconds:.0f} s)",
              flush=True)

    def cell(key: str) -> str:
        values = [100 * s[key] for s in scores]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.1f} ± {spread:.1f}"

    keys = [*task_names, "all"]
    lines = [
        f"### LoRA on the main job (r={args.rank}, lr {args.learning_rate}, {args.epochs} epochs)", "",
        f"Command: `python benchmarks/lora_multitask.py --seeds {' '.join(map(str, args.seeds))} "
        f"--rank {args.rank} --learning-rate {args.learning_rate} --epochs {args.epochs}"
        f"{' --task_file ' + args.task_file if args.task_file else ''}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with {args.threads} "
        f"thread(s), transformers {transformers.__version__}; exact match %, mean ± std over seeds "
        f"{', '.join(map(str, args.seeds))}; training {statistics.mean(times):.0f} s per seed on average.", "",
        "| | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys),
        "| LoRA | " + " | ".join(cell(k) for k in keys) + " |", "",
    ]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
