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

Usage (in the vLLM environment, docs/serving.md):
    python benchmarks/bench_vllm.py --out benchmarks/results.md --append
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from serve_vllm import dequantized_smollm2

    smollm2 = args.base_model.rstrip("/").endswith("smollm2-135m-instruct")
    base = dequantized_smollm2(args.base_model) if smollm2 else args.base_model
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
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a" if args.append else "w", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
