"""GPU check (not a test; CI has no GPU): the injection on CUDA, in fp32 and bf16, and a timing
of one prompt-tuning step on a mid-size Llama: PEFT vs our plain path vs the shared prompt cache
(forced with shared_prompt_cache=True) vs our default (which trains with the plain path on GPUs).

    python benchmarks/gpu_check.py --out benchmarks/gpu_results.md
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models import make_model  # noqa: E402
from reference import make_batch, reference_outputs  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from hf_softprompt import SoftPromptConfig, add_soft_prompt  # noqa: E402

DEVICE = "cuda"


def to(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def check_equivalence(lines: list[str]) -> None:
    """fp32 on CUDA: loss and real-position logits equal the hand-written reference."""
    for family, task in [("gpt2", "causal_lm"), ("llama", "causal_lm"), ("qwen2", "causal_lm"),
                         ("llama", "seq_cls"), ("bert", "qa"), ("t5", "seq2seq_lm")]:
        for side in ("right", "left") if family in ("gpt2", "llama", "qwen2") else ("right",):
            base = make_model(family, task).to(DEVICE)
            model = add_soft_prompt(copy.deepcopy(base), SoftPromptConfig(num_virtual_tokens=4))
            batch = to(make_batch(task, [7, 3, 5], side), DEVICE)
            ours = model(**batch)
            ref = reference_outputs(base, model.soft_prompts["default"]().detach(), batch, task)
            loss_diff = (ours.loss - ref["loss"]).abs().item()
            lines.append(f"| {family} {task} {side} | fp32 loss diff {loss_diff:.2e} |")
            assert loss_diff < 1e-4, (family, task, side, loss_diff)


def check_generate(lines: list[str]) -> None:
    """Left-padded greedy generation on CUDA equals the same on CPU."""
    for family in ("gpt2", "llama"):
        model = add_soft_prompt(make_model(family, "causal_lm"), SoftPromptConfig(num_virtual_tokens=4))
        batch = make_batch("causal_lm", [6, 3, 4], "left", seed=2)
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        cpu = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        model.to(DEVICE)
        gpu = model.generate(input_ids=batch["input_ids"].to(DEVICE),
                             attention_mask=batch["attention_mask"].to(DEVICE), **kwargs)
        same = cpu.tolist() == gpu.cpu().tolist()
        lines.append(f"| {family} generate left-padded | CUDA tokens == CPU tokens: {same} |")


def check_bf16(lines: list[str]) -> None:
    """A bf16 model keeps a float32 prompt that still receives finite gradients."""
    model = add_soft_prompt(make_model("llama", "causal_lm"), SoftPromptConfig(num_virtual_tokens=4))
    model.to(DEVICE, torch.bfloat16)
    loss = model(**to(make_batch("causal_lm", [7, 5]), DEVICE)).loss
    loss.backward()
    grad = model.soft_prompts["default"].embedding.weight.grad
    ok = model.soft_prompts["default"].embedding.weight.dtype == torch.float32 and bool(torch.isfinite(grad).all())
    lines.append(f"| llama bf16 model | prompt float32 with finite grad: {ok} |")


SIZES = {  # name: (layers, hidden, intermediate, heads)
    "mid": (12, 1024, 2816, 16),
    "large": (16, 2048, 5632, 16),
}


def llama(size: str) -> torch.nn.Module:
    torch.manual_seed(0)
    layers, hidden, intermediate, heads = SIZES[size]
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
                      num_attention_heads=heads, num_key_value_heads=4, vocab_size=32000,
                      max_position_embeddings=2048, pad_token_id=0)
    return AutoModelForCausalLM.from_config(cfg).to(DEVICE, torch.bfloat16)


def time_steps(model, batch, steps: int) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def check_speed(lines: list[str], steps: int, size: str, shapes: list[tuple[int, int]]) -> None:
    from peft import PromptTuningConfig, get_peft_model

    for batch_size, length in shapes:
        vocab = 32000
        batch = make_batch("causal_lm", [length] * batch_size, vocab=vocab)
        batch = to(batch, DEVICE)
        variants = {
            "peft": get_peft_model(llama(size),
                                   PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)),
            "ours plain": add_soft_prompt(llama(size), SoftPromptConfig(num_virtual_tokens=20,
                                                                        shared_prompt_cache=False)),
            "ours shared": add_soft_prompt(llama(size), SoftPromptConfig(num_virtual_tokens=20,
                                                                         shared_prompt_cache=True)),
            # The default: the plain path in training on a GPU, where the shared one measured slower.
            "ours default": add_soft_prompt(llama(size), SoftPromptConfig(num_virtual_tokens=20)),
        }
        for model in variants.values():
            model.train()
            time_steps(model, batch, 3)  # warm-up
        results = {name: [] for name in variants}
        for _ in range(steps // 5):  # take turns, 5 steps each
            for name, model in variants.items():
                results[name] += time_steps(model, batch, 5)
        medians = {name: statistics.median(t) * 1e3 for name, t in results.items()}
        peft_ms = medians["peft"]
        row = ", ".join(f"{n} {ms:.1f} ms ({ms / peft_ms:.2f}x)" for n, ms in medians.items())
        layers, hidden = SIZES[size][:2]
        lines.append(f"| Llama {layers}L/{hidden} bf16 B={batch_size} L={length} P=20 | {row} |")
        del variants
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--speed-only", action="store_true")
    args = parser.parse_args()
    lines = [f"GPU check on {torch.cuda.get_device_name()} (torch {torch.__version__})", "",
             "| case | result |", "|---|---|"]
    if not args.speed_only:
        check_equivalence(lines)
        check_generate(lines)
        check_bf16(lines)
    check_speed(lines, args.steps, "mid", [(8, 128), (16, 128), (8, 512)])
    check_speed(lines, args.steps, "large", [(16, 256), (16, 512)])
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
