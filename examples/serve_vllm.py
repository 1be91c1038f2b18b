#!/usr/bin/env python
"""Serve the prompts `run_multitask.py` trained with vLLM: one engine, every task mixed in one batch.

vLLM takes per-request `prompt_embeds`; `hf_softprompt.serving.PromptEmbedder` builds them from the
saved prompts and the base model's embedding table. This script answers the held-out rows of every
task (shuffled together, as `run_multitask.py` scores them) twice, with the same prompts:

- vLLM: one `LLM.generate` call over all rows, each row's `prompt_embeds` carrying its task's prompt;
- transformers: `generate()` in mixed batches with `load_soft_prompt` (what `run_multitask.py` does);

and prints exact match per task for both, how often their answers agree, and the throughput of both.

vLLM does not load this GGUF checkpoint on CPU, so on the first run the script dequantizes
SmolLM2-135M-Instruct once with transformers (`from_pretrained(dir, gguf_file=...)` then
`save_pretrained`, float32 safetensors, ~0.5 GB) into `--base_model` and serves that; the prompts were
trained on the same dequantized weights, which their saved fingerprint of the embedding table
recognises at the new path.

Run it in the vLLM environment (docs/serving.md), after `run_multitask.py`:

    python examples/run_multitask.py --output_dir output/run_multitask          # trains, ~9 min on 2 cores
    python examples/serve_vllm.py --prompts output/run_multitask
    python examples/serve_vllm.py --prompts output/run_multitask --max_eval_samples 16   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU: plenty for 135M params
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from run_multitask import TASKS, MultiTaskArguments, exact_match_by_task, held_out_rows, load_task_splits  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from utils import generate_answers, save_dequantized, smollm2_gguf  # noqa: E402

from hf_softprompt import load_soft_prompt  # noqa: E402
from hf_softprompt.files.prompt_set import saved_prompt_names  # noqa: E402
from hf_softprompt.serving import PromptEmbedder  # noqa: E402


def dequantized_smollm2(directory: str) -> str:
    """SmolLM2-135M-Instruct as float32 safetensors in `directory` (converted from the GGUF once)."""
    if not os.path.isfile(os.path.join(directory, "model.safetensors")):
        save_dequantized(*smollm2_gguf(), directory)
    return directory


def vllm_answers(llm, embedder: PromptEmbedder, tokenizer, inputs: list[str], prompts: list[str | None], *,
                 max_length: int, max_new_tokens: int) -> tuple[list[str], int, float]:
    """Greedy answers from one `LLM.generate` call, tokenized and cut as `generate_answers` does:
    (answers, generated tokens, seconds)."""
    from vllm import SamplingParams

    ids = tokenizer(inputs, truncation=True, max_length=max_length)["input_ids"]
    requests = [{"prompt_embeds": embedder(row, prompt=name)} for row, name in zip(ids, prompts, strict=True)]
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, skip_special_tokens=True)
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    answers = [o.outputs[0].text.strip().split("\n")[0].strip() for o in outputs]
    return answers, sum(len(o.outputs[0].token_ids) for o in outputs), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", default="output/run_multitask", help="run_multitask.py's --output_dir.")
    parser.add_argument("--base_model", default="output/smollm2-135m-instruct",
                        help="The base model as safetensors; created from the GGUF when missing.")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="First N held-out rows per task.")
    parser.add_argument("--max_length", type=int, default=64, help="Input tokens per row, as in training.")
    parser.add_argument("--max_new_tokens", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=16, help="transformers' generate() batch.")
    parser.add_argument("--seed", type=int, default=42, help="Shuffles the rows, as run_multitask.py's --seed.")
    args = parser.parse_args()

    names, _ = saved_prompt_names(args.prompts)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"{args.prompts!r} holds prompts {unknown} that are not tasks of run_multitask.py "
                         f"({list(TASKS)}); pass the --output_dir of a run_multitask.py run.")
    tasks = [TASKS[name] for name in names]
    split_args = MultiTaskArguments(tasks=names, max_eval_samples=args.max_eval_samples)
    splits = {task.name: load_task_splits(task, split_args) for task in tasks}
    row_tasks, inputs, references = held_out_rows(tasks, splits, args.seed)
    base = dequantized_smollm2(args.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base)

    # transformers: what run_multitask.py does after training, the prompts loaded from their files.
    model = load_soft_prompt(AutoModelForCausalLM.from_pretrained(base), args.prompts)
    start = time.perf_counter()
    hf = generate_answers(model, tokenizer, inputs, max_length=args.max_length, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, soft_prompt_names=row_tasks)
    hf_seconds = time.perf_counter() - start
    del model

    from vllm import LLM

    embedder = PromptEmbedder.from_pretrained(base, prompts=args.prompts, max_length=args.max_length + 32)
    llm = LLM(model=base, enable_prompt_embeds=True, dtype="float32", max_model_len=embedder.max_positions,
              gpu_memory_utilization=0.1, enforce_eager=True, seed=0)
    ours, tokens, vllm_seconds = vllm_answers(llm, embedder, tokenizer, inputs, row_tasks, max_length=args.max_length,
                                              max_new_tokens=args.max_new_tokens)

    scores = {"transformers generate()": exact_match_by_task(hf, references, row_tasks, tasks),
              "vLLM prompt_embeds": exact_match_by_task(ours, references, row_tasks, tasks)}
    columns = [*names, "all"]
    counts = {t: row_tasks.count(t) for t in names} | {"all": len(row_tasks)}
    print(f"\nHeld-out exact match (%), {len(inputs)} rows of {len(tasks)} tasks mixed, prompts from {args.prompts}")
    print("| | " + " | ".join(f"{c} ({counts[c]})" for c in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for label, row in scores.items():
        print(f"| {label} | " + " | ".join(f"{100 * row[c]:.1f}" for c in columns) + " |")
    agree = sum(a == b for a, b in zip(hf, ours, strict=True)) / len(inputs)
    # Both answer the same rows greedily: the tokens vLLM generated are the work of both.
    print(f"\nSame answer from both: {100 * agree:.1f} % of rows")
    print(f"transformers generate(): {hf_seconds:.1f} s, {tokens / hf_seconds:.1f} new tokens/s "
          f"(batches of {args.batch_size})")
    print(f"vLLM prompt_embeds:      {vllm_seconds:.1f} s, {tokens / vllm_seconds:.1f} new tokens/s (one call)")
    print(json.dumps({"exact_match": scores, "agreement": agree, "new_tokens": tokens,
                      "seconds": {"transformers": hf_seconds, "vllm": vllm_seconds}}))


if __name__ == "__main__":
    main()
