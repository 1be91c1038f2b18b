"""Several prompts in one batch: a mixed batch of B rows over K prompts vs the same batch with one
prompt, and vs PEFT serving the same requests by switching its active adapter per task.

Rows: B=16 random rows of L tokens; K=4 prompts of P virtual tokens each (`--lengths-of-prompts`
to give them different lengths), every row choosing one (`soft_prompt_names`, 4 rows each,
interleaved). Variants, taking turns call by call in one process (a busy machine slows them alike),
medians over `--rounds`:

- training step (forward + backward + AdamW on the prompts), shared prompt cache (the CPU default)
  and plain path (`shared_prompt_cache=False`, the accelerator default): `mixed` (K prompts) vs
  `single` (every row the same prompt).
- greedy `generate()` of `--new-tokens` tokens: `mixed` vs `single`, and `peft`: a PeftModel with
  the K prompt-tuning adapters, one `generate()` per task after `set_adapter(task)`, as PEFT
  serves mixed traffic (its prompt tuning has no per-row adapter choice).

Usage:
    python benchmarks/bench_multi_prompt.py --threads 1 --out benchmarks/results.md --append
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_softprompt import SoftPromptConfig, add_soft_prompt  # noqa: E402

TASKS = ("sentiment", "topics", "complaints", "names")


def base_model(family: str, vocab_size: int) -> torch.nn.Module:
    """GPT-2 or Llama, 4 layers, 256 wide (the single-prompt benchmark's models)."""
    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=vocab_size)
    else:
        config = LlamaConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=704, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=vocab_size)
    config.pad_token_id = 0
    return AutoModelForCausalLM.from_config(config)


def prompted(base: torch.nn.Module, lengths: list[int], shared: bool) -> torch.nn.Module:
    model = copy.deepcopy(base)
    for task, length in zip(TASKS, lengths, strict=True):
        add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=length, shared_prompt_cache=shared), name=task)
    return model


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_turns(variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each variant, the variants taking turns."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def training_steps(base, lengths, batch, rows, shared: bool) -> dict[str, Callable[[], None]]:
    steps = {}
    for variant in ("mixed", "single"):
        model = prompted(base, lengths, shared).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        names = rows if variant == "mixed" else [TASKS[0]] * len(rows)

        def step(model=model, optimizer=optimizer, names=names):
            model(**batch, soft_prompt_names=names).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[variant] = step
    return steps


def generators(base, lengths, batch, rows, new_tokens: int) -> dict[str, Callable[[], object]]:
    from peft import PromptTuningConfig, get_peft_model

    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model = prompted(base, lengths, shared=True).eval()
    first = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=lengths[0])
    peft = get_peft_model(copy.deepcopy(base), first, adapter_name=TASKS[0])
    for task, length in zip(TASKS[1:], lengths[1:], strict=True):
        peft.add_adapter(task, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length))
    peft.eval()
    groups = {task: [i for i, name in enumerate(rows) if name == task] for task in TASKS}

    def serve_with_peft():
        for task, index in groups.items():
            peft.set_adapter(task)
            peft.generate(input_ids=inputs["input_ids"][index], attention_mask=inputs["attention_mask"][index],
                          **options)

    return {
        "mixed": lambda: model.generate(**inputs, soft_prompt_names=rows, **options),
        "single": lambda: model.generate(**inputs, soft_prompt_names=[TASKS[0]] * len(rows), **options),
        "peft": serve_with_peft,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=["gpt2", "llama"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=32, help="tokens per row")
    parser.add_argument("--lengths-of-prompts", type=int, nargs=4, default=[20, 20, 20, 20])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="append the markdown table to this file")
    parser.add_argument("--append", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = [TASKS[i % len(TASKS)] for i in range(args.batch)]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab_size, (args.batch, args.length), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    lines = [
        f"### Mixed prompts: B={args.batch} rows over K=4 prompts (P={args.lengths_of_prompts}), L={args.length}",
        "",
        f"Command: `python benchmarks/bench_multi_prompt.py {shlex.join(sys.argv[1:])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with {args.threads} "
        f"thread(s), transformers {transformers.__version__}; medians of {args.rounds} turns.",
        "",
        "| model | measurement | mixed | single prompt | mixed / single (tokens/s) | PEFT switching adapters "
        "| ours mixed / PEFT (tokens/s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for family in args.families:
        base = base_model(family, args.vocab_size)
        for shared in (True, False):
            t = run_turns(training_steps(base, args.lengths_of_prompts, batch, rows, shared), args.rounds)
            path = "shared prompt cache" if shared else "plain path"
            lines.append(f"| {family} | training step, {path} | {1e3 * t['mixed']:.0f} ms | {1e3 * t['single']:.0f} ms "
                         f"| {t['single'] / t['mixed']:.2f} | | |")
            print(lines[-1], flush=True)
        with torch.no_grad():
            t = run_turns(generators(base, args.lengths_of_prompts, batch, rows, args.new_tokens), args.rounds)
        gen_tokens = args.batch * args.new_tokens
        lines.append(f"| {family} | greedy generate, {args.new_tokens} new | {gen_tokens / t['mixed']:.0f} tok/s "
                     f"| {gen_tokens / t['single']:.0f} tok/s | {t['single'] / t['mixed']:.2f} "
                     f"| {gen_tokens / t['peft']:.0f} tok/s | {t['peft'] / t['mixed']:.2f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a" if args.append else "w", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
