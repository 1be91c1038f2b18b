"""generate() with a soft prompt vs the same frozen model fed the prompt by hand, and call-path counts.

Speed: greedy `generate()` of a prompted model (`add_soft_prompt`, `model.generate(input_ids)`)
against the work a prompt needs and nothing more: the bare model's `generate(inputs_embeds=
[prompt; token embeddings], attention_mask=[ones; mask])`. Both generate the same tokens (checked).
Fastest of `--runs` runs each, the two taking turns in one process, one thread by default
(`--threads`), so a busy machine slows both alike. Reports ours / hand-made tokens per second.

Call path: the number of module-to-module switches inside hf_softprompt for one mixed generate()
call (three prompts and a row without one), first step and each decode step, and for one training
step: every call into a function of an hf_softprompt module from code in another module (ours,
transformers', torch's) counts one.

Usage:
    python benchmarks/bench_generate.py                 # Llama 4 x 256, 32 in, 64 out, batch 1 and 16
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --layers 12 --hidden 1024 \
        --prompt-len 128 --batch 1 16 64 --runs 6
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hf_softprompt  # noqa: E402
from hf_softprompt import SoftPromptConfig, add_soft_prompt  # noqa: E402

PACKAGE_DIR = os.path.dirname(os.path.abspath(hf_softprompt.__file__))


def build(args: argparse.Namespace) -> torch.nn.Module:
    config = LlamaConfig(num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_attention_heads=max(args.hidden // 64, 1), num_key_value_heads=max(args.hidden // 64, 1),
                         vocab_size=args.vocab, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device=args.device, dtype=getattr(torch, args.dtype))
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def speed(args: argparse.Namespace) -> list[str]:
    model = build(args)
    bare = copy.deepcopy(model)  # the same frozen weights, never touched by hf_softprompt
    add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=args.virtual_tokens))
    with torch.no_grad():
        model.soft_prompts["default"].embedding.weight.normal_(0, 0.5)
    prompt = model.soft_prompts["default"]().detach().to(model.dtype)  # (P, D)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               pad_token_id=0)
    rows = []
    for batch in args.batch:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(3, args.vocab, (batch, args.prompt_len), generator=g).to(args.device)
        mask = torch.ones_like(ids)
        embeds = torch.cat([prompt.expand(batch, -1, -1), model.get_input_embeddings()(ids)], 1)
        wide_mask = torch.cat([torch.ones(batch, prompt.shape[0], dtype=mask.dtype, device=mask.device), mask], 1)
        def ours(ids=ids, mask=mask) -> torch.Tensor:
            return model.generate(input_ids=ids, attention_mask=mask, **gen)[:, ids.shape[1]:]

        def by_hand(embeds=embeds, wide_mask=wide_mask) -> torch.Tensor:  # the frozen model, prompt by hand
            return bare.generate(inputs_embeds=embeds, attention_mask=wide_mask, **gen)

        with torch.no_grad():
            same = torch.equal(ours(), by_hand())
            # "again": the reference timed a second time, the A/A noise of this machine
            best = {"ours": float("inf"), "by_hand": float("inf"), "again": float("inf")}
            for _ in range(args.runs):
                for name, fn in (("ours", ours), ("by_hand", by_hand), ("again", by_hand)):
                    sync(args.device)
                    start = time.perf_counter()
                    fn()
                    sync(args.device)
                    best[name] = min(best[name], time.perf_counter() - start)
        tokens = batch * args.new_tokens
        rows.append(f"| {batch} | {tokens / best['by_hand']:.1f} | {tokens / best['ours']:.1f} | "
                    f"{best['by_hand'] / best['ours']:.3f}x | {best['by_hand'] / best['again']:.3f}x | "
                    f"{'yes' if same else 'NO'} |")
    return rows


def count_switches(fn) -> tuple[list[int], int]:
    """(switches per forward call of the model, total) while running `fn`."""
    per_forward: list[int] = []
    state = {"count": 0}

    def ours(frame) -> bool:
        return frame is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR)

    def profile(frame, event, arg):
        if event != "call" or not ours(frame):
            return
        caller = frame.f_back
        if caller is None or caller.f_code.co_filename != frame.f_code.co_filename:
            state["count"] += 1
            # methods.py: the wrappers' module before the refactor, so an older checkout counts the same way
            if frame.f_code.co_name == "__call__" and frame.f_code.co_filename.endswith(("wrappers.py", "methods.py")) \
                    and "self" in frame.f_locals and type(frame.f_locals["self"]).__name__ == "PromptedForward":
                per_forward.append(state["count"])

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    marks = per_forward + [state["count"] + 1]
    return [b - a for a, b in zip(marks, marks[1:], strict=False)], state["count"]


def call_path(args: argparse.Namespace) -> list[str]:
    small = argparse.Namespace(**{**vars(args), "layers": 2, "hidden": 128, "device": "cpu", "dtype": "float32"})
    model = build(small)
    for name, n in (("a", 4), ("b", 8), ("c", 2)):
        add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=n), name=name)
    ids = torch.randint(3, 100, (4, 8))
    names = ["a", "b", "c", None]
    with torch.no_grad():
        per_forward, total = count_switches(lambda: model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), soft_prompt_names=names, max_new_tokens=4,
            min_new_tokens=4, do_sample=False, pad_token_id=0))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def training_step() -> None:
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, soft_prompt_names=names).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    _, train_total = count_switches(training_step)
    return [f"- one mixed generate() (3 prompts + a bare row, 4 new tokens): {total} switches; "
            f"per forward call {per_forward} (the first is the first step; the generate() set-up before it "
            f"counts in the total)",
            f"- one training step (forward, backward, AdamW step; mixed rows): {train_total} switches"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"Llama {args.layers} layers x {args.hidden}, {args.virtual_tokens} virtual tokens, "
             f"{args.prompt_len} tokens in, {args.new_tokens} out, {args.dtype} on {args.device}, "
             f"{args.threads} thread(s), fastest of {args.runs} runs each, taking turns; torch {torch.__version__}, "
             f"transformers {transformers.__version__}, {platform.processor() or platform.machine()}",
             "", "| batch | by hand (tokens/s) | ours (tokens/s) | ours / by hand | by hand again / by hand "
             "(noise) | same tokens |", "|---|---|---|---|---|---|", *speed(args), "", *call_path(args)]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
