"""Training step time, peak memory and generation speed: PEFT prompt tuning vs hf-softprompt.

Variants of one training step (forward + backward + AdamW step on the prompt, P virtual tokens):

- `peft`: `peft.get_peft_model(model, PromptTuningConfig(...))`, the prompt run in every row.
- `plain`: hf-softprompt with `shared_prompt_cache=False` (prompt concatenated to every row).
- `shared`: hf-softprompt with `shared_prompt_cache=True` (its default on CPUs): decoder-only
  models run the prompt once per batch.
- `limit`: the physical limit of per-row concatenation: the frozen base model on a leaf
  `inputs_embeds` of P+L tokens that requires grad, no prompt machinery at all.

Step times are medians over `--steps` timed steps after `--warmup` steps, with the variants
taking turns step by step in one process (so a busy machine slows them alike); wall-clock time,
and process CPU time as a check that does not count time other processes take. Peak RSS is read
per variant in its own process, forked from a server that has imported everything, so every
variant starts from the same baseline. Generation: greedy `generate()` with the prompt (cached
across calls) vs the base model without a prompt vs PEFT.

Usage:
    python benchmarks/bench_soft_prompt.py --vocab-size 8192 --out benchmarks/results.md
    python benchmarks/bench_soft_prompt.py --quick
"""

from __future__ import annotations

import argparse
import copy
import logging
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    LlamaConfig,
)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_softprompt import SoftPromptConfig, add_soft_prompt  # noqa: E402

P = 20
VARIANTS = ("peft", "plain", "shared", "limit")
TASKS = {"causal_lm": AutoModelForCausalLM, "seq_cls": AutoModelForSequenceClassification}
PEFT_TASKS = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}


@dataclass(frozen=True)
class Case:
    family: str
    task: str
    batch: int
    length: int


def model_config(family: str, vocab_size: int | None) -> transformers.PretrainedConfig:
    """GPT2 and Llama, 4 layers, 256 wide; everything else (vocabulary, dropout) their defaults."""
    extra = {} if vocab_size is None else {"vocab_size": vocab_size}
    if family == "gpt2":
        config = GPT2Config(n_layer=4, n_embd=256, n_head=4, **extra)
    elif family == "llama":
        config = LlamaConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=704,
                             num_attention_heads=4, num_key_value_heads=4, **extra)
    else:
        raise ValueError(f"family must be gpt2 or llama, got {family!r}.")
    config.pad_token_id = 0  # sequence classification needs one for batches
    config.num_labels = 2
    return config


def build_base(case: Case, vocab_size: int | None) -> torch.nn.Module:
    torch.manual_seed(0)
    return TASKS[case.task].from_config(model_config(case.family, vocab_size)).train()


def make_batch(case: Case, vocab: int) -> dict[str, torch.Tensor]:
    """Unpadded random rows (all variants see the same tokens) and labels for the task."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (case.batch, case.length), generator=g)
    labels = ids if case.task == "causal_lm" else torch.randint(0, 2, (case.batch,), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def peft_config(task: str):  # -> peft.PromptTuningConfig; peft is imported where used
    from peft import PromptTuningConfig

    return PromptTuningConfig(task_type=PEFT_TASKS[task], num_virtual_tokens=P)


def soft_prompt_config(shared: bool) -> SoftPromptConfig:
    return SoftPromptConfig(num_virtual_tokens=P, shared_prompt_cache=shared)


def make_step(variant: str, base: torch.nn.Module, case: Case, batch: dict) -> Callable[[], None]:
    """A closure running one training step of `variant` on its own copy of `base`."""
    model = copy.deepcopy(base)
    inputs, trainable = batch, None
    if variant == "peft":
        from peft import get_peft_model

        model = get_peft_model(model, peft_config(case.task))
    elif variant in ("plain", "shared"):
        add_soft_prompt(model, soft_prompt_config(shared=variant == "shared"))
    elif variant == "limit":
        model.requires_grad_(False)
        dim = model.get_input_embeddings().weight.shape[1]
        embeds = torch.nn.Parameter(torch.randn(case.batch, P + case.length, dim) * 0.02)  # (B, P+L, D)
        labels = batch["labels"]
        if case.task == "causal_lm":
            labels = torch.cat([torch.full((case.batch, P), -100), labels], 1)
        inputs = {"inputs_embeds": embeds, "labels": labels,
                  "attention_mask": torch.ones(case.batch, P + case.length, dtype=torch.long)}
        trainable = [embeds]
    else:
        raise ValueError(variant)
    trainable = trainable or [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)

    def step() -> None:
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ------------------------------------------------------------------- timing
def time_steps(case: Case, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median wall and CPU step time (s) per variant: {"wall": {variant: s}, "cpu": {...}}. The
    variants take turns, starting at a rotating one."""
    base = build_base(case, args.vocab_size)
    batch = make_batch(case, base.config.vocab_size)
    steps = {v: make_step(v, base, case, batch) for v in VARIANTS}
    times: dict[str, dict[str, list[float]]] = {kind: {v: [] for v in VARIANTS} for kind in ("wall", "cpu")}
    for round_ in range(args.warmup + args.steps):
        order = VARIANTS[round_ % len(VARIANTS):] + VARIANTS[: round_ % len(VARIANTS)]
        for variant in order:
            wall, cpu = time.perf_counter(), time.process_time()
            steps[variant]()
            if round_ >= args.warmup:
                times["wall"][variant].append(time.perf_counter() - wall)
                times["cpu"][variant].append(time.process_time() - cpu)
    return {kind: {v: statistics.median(t) for v, t in per_variant.items()}
            for kind, per_variant in times.items()}


# ------------------------------------------------------------------- memory
def _peak_rss_child(case: Case, variant: str, vocab_size: int | None, steps: int) -> float:
    """Runs in a fresh forked process: `steps` training steps, then the peak RSS (MiB)."""
    torch.set_num_threads(1)  # two children run at once; threads do not change the peak much
    base = build_base(case, vocab_size)
    step = make_step(variant, base, case, make_batch(case, base.config.vocab_size))
    del base
    for _ in range(steps):
        step()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_rss(cases: list[Case], args: argparse.Namespace) -> dict[tuple[Case, str], float]:
    """Peak RSS per (case, variant), each measured in its own process (two at a time: a process's
    peak does not depend on its neighbour, only its speed does)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "peft", "hf_softprompt", __name__])
    keys = [(case, variant) for case in cases for variant in VARIANTS]
    work = [(case, variant, args.vocab_size, args.memory_steps) for case, variant in keys]
    with ctx.Pool(2, maxtasksperchild=1) as pool:
        return dict(zip(keys, pool.starmap(_peak_rss_child, work, chunksize=1), strict=True))


# --------------------------------------------------------------- generation
def time_generation(family: str, length: int, new_tokens: int, args: argparse.Namespace) -> dict[str, float]:
    """Generated tokens per second (median over rounds) for base, shared, plain and PEFT."""
    from peft import get_peft_model

    case = Case(family, "causal_lm", args.gen_batch, length)
    base = build_base(case, args.vocab_size).eval()
    batch = make_batch(case, base.config.vocab_size)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    models = {
        "base": base,
        "shared": add_soft_prompt(copy.deepcopy(base), soft_prompt_config(shared=True)),
        "plain": add_soft_prompt(copy.deepcopy(base), soft_prompt_config(shared=False)),
        "peft": get_peft_model(copy.deepcopy(base), peft_config("causal_lm")),
    }
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for round_ in range(1 + args.gen_rounds):  # round 0 warms up (and fills the prompt cache)
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            start = time.perf_counter()
            models[name].generate(**inputs, **kwargs)
            if round_:
                times[name].append(time.perf_counter() - start)
    tokens = args.gen_batch * new_tokens
    return {name: tokens / statistics.median(t) for name, t in times.items()}


# ------------------------------------------------------------------- report
def training_table(cases: list[Case], timing: dict, memory: dict) -> list[str]:
    lines = [
        "| model | task | B | L | PEFT ms | plain ms | shared ms | limit ms | shared/PEFT | PEFT/limit "
        "| plain/limit | shared/PEFT (CPU) | plain/limit (CPU) "
        "| peak RSS MiB PEFT / plain / shared / limit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        t, c = timing[case]["wall"], timing[case]["cpu"]
        ratios = [t["shared"] / t["peft"], t["peft"] / t["limit"], t["plain"] / t["limit"],
                  c["shared"] / c["peft"], c["plain"] / c["limit"]]
        rss = " / ".join(f"{memory[case, v]:.0f}" for v in VARIANTS) if memory else "-"
        lines.append(
            f"| {case.family} | {case.task} | {case.batch} | {case.length} | "
            + " | ".join([f"{t[v] * 1000:.0f}" for v in VARIANTS] + [f"{r:.2f}" for r in ratios])
            + f" | {rss} |"
        )
    return lines


def generation_table(generation: dict) -> list[str]:
    lines = [
        "| model | L | new tokens | base tok/s | shared (cached) tok/s | plain tok/s | PEFT tok/s "
        "| shared/base | shared/PEFT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (family, length, new), g in generation.items():
        lines.append(
            f"| {family} | {length} | {new} | {g['base']:.0f} | {g['shared']:.0f} | {g['plain']:.0f} | "
            f"{g['peft']:.0f} | {g['shared'] / g['base']:.2f} | {g['shared'] / g['peft']:.2f} |"
        )
    return lines


def target_lines(cases: list[Case], timing: dict, memory: dict, generation: dict) -> list[str]:
    """The issue's targets, each with the numbers behind it (wall-clock ratios)."""
    def mark(ok: bool) -> str:
        return "met" if ok else "MISSED"

    lines = []
    for case in cases:
        if (case.task, case.batch, case.length) == ("causal_lm", 8, 64):
            t = timing[case]["wall"]
            ratio = t["shared"] / t["peft"]
            lines.append(f"- {case.family} causal LM B=8 L=64: shared/PEFT {ratio:.2f} <= 0.85: "
                         f"{mark(ratio <= 0.85)}")
    worst = max(cases, key=lambda c: timing[c]["wall"]["plain"] / timing[c]["wall"]["limit"])
    ratio = timing[worst]["wall"]["plain"] / timing[worst]["wall"]["limit"]
    lines.append(f"- plain path <= 1.03x limit on every row: worst {ratio:.2f} ({worst.family} {worst.task} "
                 f"B={worst.batch} L={worst.length}): {mark(ratio <= 1.03)}")
    for (family, length, new), g in generation.items():
        vs_base, vs_peft = g["shared"] / g["base"], g["shared"] / g["peft"]
        lines.append(f"- {family} generate L={length}, {new} new: shared/base {vs_base:.2f} >= 0.95: "
                     f"{mark(vs_base >= 0.95)}; shared/PEFT {vs_peft:.2f} >= 1.1: {mark(vs_peft >= 1.1)}")
    for variant in ("shared", "plain") if memory else ():
        excess = {c: memory[c, variant] - memory[c, "peft"] for c in cases}
        over = [f"{c.family} {c.task} B={c.batch} L={c.length} +{e:.0f} MiB"
                for c, e in excess.items() if e > 0]
        lines.append(f"- peak RSS of {variant} <= PEFT's on every row: {mark(not over)} (difference "
                     f"{min(excess.values()):+.0f} to {max(excess.values()):+.0f} MiB"
                     + (f"; over on {'; '.join(over)})" if over else ")"))
    return lines


def report(args: argparse.Namespace, cases: list[Case], timing: dict, memory: dict, generation: dict,
           load: tuple[tuple[float, ...], tuple[float, ...]], elapsed: float) -> str:
    import peft

    vocab = "config defaults (GPT2 50257, Llama 32000)" if args.vocab_size is None else str(args.vocab_size)
    lines = [
        f"Command: `{args.command}`",
        "",
        f"- {platform.platform()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}",
        f"- P={P} virtual tokens; models from config, 4 layers, 256 wide, vocabulary {vocab}; train mode "
        "(config dropout: GPT2 0.1, Llama none); unpadded batches; AdamW; denormals "
        f"{'kept' if args.keep_denormals else 'flushed to zero'}.",
        f"- Step = forward + backward + optimizer step; median of {args.steps} timed steps after "
        f"{args.warmup} warm-up steps, variants taking turns in one process. ms and plain ratios: "
        "wall clock; (CPU): process CPU time. Peak RSS: VmHWM of a fresh process per variant and row "
        f"(forked from one server, same baseline) after {args.memory_steps} steps.",
        f"- Load average (1, 5, 15 min) at start {tuple(round(x, 1) for x in load[0])}, at end "
        f"{tuple(round(x, 1) for x in load[1])}: other processes share the cores. "
        f"Total {elapsed / 60:.1f} min.",
        "",
        "### Training step",
        "",
        *training_table(cases, timing, memory),
    ]
    if generation:
        title = f"### Generation (greedy, B={args.gen_batch}, median of {args.gen_rounds} rounds)"
        lines += ["", title, "", *generation_table(generation)]
    lines += ["", "### Targets", "", *target_lines(cases, timing, memory, generation)]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="causal LM, B=8, L=64 only; 10 steps; 3 generation rounds")
    parser.add_argument("--out", help="write the markdown report to this file")
    parser.add_argument("--append", action="store_true", help="append to --out instead of overwriting it")
    parser.add_argument("--families", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--lengths", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--memory-steps", type=int, default=2, help="steps before reading peak RSS (0: skip)")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: each config's own")
    parser.add_argument("--keep-denormals", action="store_true",
                        help="do not flush denormal floats to zero (random weights make many in GELU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for timing (default: torch's, one per core); 1 is steadier "
                             "on a machine other processes share")
    parser.add_argument("--gen-batch", type=int, default=8)
    parser.add_argument("--gen", nargs="*", default=["64:32", "128:8"], metavar="L:NEW",
                        help="generation settings: input length and new tokens (none: skip)")
    parser.add_argument("--gen-rounds", type=int, default=10)
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.batch_sizes, args.lengths, args.gen = ["causal_lm"], [8], [64], ["64:32"]
        args.steps, args.warmup, args.gen_rounds = 10, 2, 3
    args.gen = [tuple(int(x) for x in setting.split(":")) for setting in args.gen]
    args.command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.keep_denormals:
        # Random-init weights give GELU's x**3 many denormal values, whose slow CPU path adds
        # 5-20% noise unrelated to the prompt (timing only: memory does not depend on it).
        torch.set_flush_denormal(True)
    logging.disable(logging.WARNING)  # PEFT and transformers warn about position_ids, caches, ...
    warnings.filterwarnings("ignore")
    started, load_start = time.time(), os.getloadavg()
    cases = [Case(f, t, b, n) for f in args.families for t in args.tasks
             for b in args.batch_sizes for n in args.lengths]
    memory = peak_rss(cases, args) if args.memory_steps else {}
    timing = {}
    for case in cases:
        timing[case] = time_steps(case, args)
        t = timing[case]["wall"]
        print(f"{case}: " + ", ".join(f"{v} {t[v] * 1000:.0f} ms" for v in VARIANTS)
              + f"; shared/PEFT {t['shared'] / t['peft']:.2f}, plain/limit {t['plain'] / t['limit']:.2f}"
              f" [{(time.time() - started) / 60:.1f} min]", flush=True)
    generation = {(f, length, new): time_generation(f, length, new, args)
                  for f in args.families for length, new in args.gen}
    load = (load_start, os.getloadavg())
    text = report(args, cases, timing, memory, generation, load, time.time() - started)
    print(text)
    if args.out:
        with open(args.out, "a" if args.append else "w", encoding="utf-8") as f:
            f.write(("\n" if args.append else "# Soft prompt benchmark\n\n") + text)


if __name__ == "__main__":
    main()
