"""The main job's training step with the LM head over the labelled tail, against the full head.

The main job's rows (three prompts on SmolLM2-135M-Instruct, batches of 8 mixing tasks) go
through `SoftPromptTrainer.training_step` padded on the left, where every row ends with its answer
and the step computes the last few logits only (`hf_softprompt/training/labelled_tail.py`), and
padded on the right, the same rows, where the answers end at different positions and the step
keeps every logit. The two take turns batch by batch in one process (a busy machine slows both
alike); the medians and their ratio are printed. Both steps give the same loss (printed too).

    python benchmarks/bench_labelled_tail.py --threads 2 --batches 12 [--num_virtual_tokens 8]
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
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import DataCollatorForSeq2Seq, TrainingArguments  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from run_multitask import (  # noqa: E402
    DEFAULTS,
    MultiTaskArguments,
    load_tasks_and_model,
    make_trainer,
    training_rows,
)
from utils import ModelArguments, smollm2_gguf  # noqa: E402

from hf_softprompt import SoftPromptConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--num_virtual_tokens", type=int, default=DEFAULTS["num_virtual_tokens"],
                        help="Virtual tokens per prompt (default: the main job's).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_path, gguf = smollm2_gguf()
    model_args = ModelArguments(model_name_or_path=model_path, gguf_file=gguf)
    task_args = MultiTaskArguments()
    tasks, splits, model, tokenizer = load_tasks_and_model(model_args, task_args, seed=42)
    configs = {task.name: SoftPromptConfig(num_virtual_tokens=args.num_virtual_tokens) for task in tasks}
    rows = training_rows(tasks, splits, tokenizer, task_args.max_length, seed=42)
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(output_dir=out, per_device_train_batch_size=8, learning_rate=0.03,
                                          report_to="none", disable_tqdm=True)
        trainer = make_trainer(model, configs, rows, tokenizer, training_args)
        trainer.create_optimizer_and_scheduler(num_training_steps=args.batches)
        trainer.current_gradient_accumulation_steps = 1  # set by train(), which this loop stands in for
        seconds: dict[str, list[float]] = {"left (labelled tail)": [], "right (every logit)": []}
        losses: dict[str, list[float]] = {key: [] for key in seconds}
        for start in range(0, 8 * args.batches, 8):
            features = [rows[i] for i in range(start, start + 8)]
            for side, key in zip(("left", "right"), seconds, strict=True):
                tokenizer.padding_side = side
                batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)(features)
                begin = time.perf_counter()
                loss = trainer.training_step(trainer.model, batch, num_items_in_batch=None)
                seconds[key].append(time.perf_counter() - begin)
                losses[key].append(float(loss))
                trainer.model.zero_grad(set_to_none=True)
    print(f"SmolLM2-135M-Instruct, 3 prompts x {args.num_virtual_tokens} virtual tokens, batches of 8 "
          f"main-job rows, {args.batches} batches each, taking turns; {args.threads} threads, torch "
          f"{torch.__version__}, transformers {transformers.__version__}, {platform.machine()}\n")
    print("| padding | median s/step | mean loss |\n|---|---:|---:|")
    for key in seconds:
        print(f"| {key} | {statistics.median(seconds[key]):.3f} | {statistics.mean(losses[key]):.4f} |")
    left, right = (statistics.median(v) for v in seconds.values())
    print(f"\nlabelled tail / every logit: {left / right:.2f}")


if __name__ == "__main__":
    main()
