"""generate() with a prompt equals a greedy loop over [prompt; tokens] with no cache."""

from __future__ import annotations

import copy

import pytest
import torch
from models import COMMON, PAD, make_model
from reference import make_batch

from hf_softprompt import SoftPromptConfig, add_soft_prompt

P = 3
NEW = 5
EOS = COMMON["eos_token_id"]


def prompted(family, task="causal_lm", **config):
    base = make_model(family, task)
    model = add_soft_prompt(copy.deepcopy(base), SoftPromptConfig(num_virtual_tokens=P, **config))
    with torch.no_grad():
        model.soft_prompts["default"].embedding.weight.normal_(0, 1.0)
    return base, model


def next_token(logits):
    """Greedy choice at the last position; EOS is barred, as `min_new_tokens` bars it in generate."""
    last = logits[:, -1].clone()
    last[:, EOS] = float("-inf")
    return last.argmax(-1, keepdim=True)


@torch.no_grad()
def greedy_reference_decoder(base, prompt, ids):
    """Greedy decoding of one unpadded row: full forward over [prompt; ids] each step, no cache."""
    ids = ids.clone()
    for _ in range(NEW):
        emb = base.get_input_embeddings()(ids)
        logits = base(inputs_embeds=torch.cat([prompt.unsqueeze(0), emb], 1), use_cache=False).logits
        ids = torch.cat([ids, next_token(logits)], 1)
    return ids


@torch.no_grad()
def greedy_reference_seq2seq(base, prompt, ids):
    emb = base.get_input_embeddings()(ids)
    encoded = base.get_encoder()(inputs_embeds=torch.cat([prompt.unsqueeze(0), emb], 1))
    out = torch.tensor([[base.config.decoder_start_token_id]])
    for _ in range(NEW):
        logits = base(encoder_outputs=encoded, decoder_input_ids=out, use_cache=False).logits
        out = torch.cat([out, next_token(logits)], 1)
    return out


def gen_kwargs(**extra):
    return dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=PAD, **extra)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_decoder_greedy_matches_no_cache_reference(family, padding_side, use_cache):
    base, model = prompted(family)
    lengths = [6, 3, 4] if padding_side == "left" else [5, 5, 5]  # right padding: equal lengths
    batch = make_batch("causal_lm", lengths, padding_side, seed=3)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         **gen_kwargs(use_cache=use_cache))
    prompt = model.soft_prompts["default"]().detach()
    width = batch["input_ids"].shape[1]
    # The returned sequences are the caller's ids plus new tokens: no virtual tokens.
    assert out.shape == (len(lengths), width + NEW)
    torch.testing.assert_close(out[:, :width], batch["input_ids"])
    for row, mask_row in enumerate(batch["attention_mask"]):
        ids = batch["input_ids"][row][mask_row.bool()].unsqueeze(0)
        want = greedy_reference_decoder(base, prompt, ids)[0, -NEW:]
        assert out[row, -NEW:].tolist() == want.tolist()


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_seq2seq_greedy_matches_reference(family, use_cache):
    base, model = prompted(family, "seq2seq_lm")
    batch = make_batch("seq2seq_lm", [6, 3, 4], "right", seed=5)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         **gen_kwargs(use_cache=use_cache))
    prompt = model.soft_prompts["default"]().detach()
    for row, mask_row in enumerate(batch["attention_mask"]):
        ids = batch["input_ids"][row][mask_row.bool()].unsqueeze(0)
        want = greedy_reference_seq2seq(base, prompt, ids)[0]
        assert out[row, : want.shape[0]].tolist() == want.tolist()


@pytest.mark.parametrize("family,task", [("llama", "causal_lm"), ("t5", "seq2seq_lm")])
def test_beam_search_and_sampling_run_without_virtual_tokens(family, task):
    base, model = prompted(family, task)
    batch = make_batch(task, [5, 3], "left" if task == "causal_lm" else "right", seed=1)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    beams = model.generate(**inputs, **gen_kwargs(num_beams=3, num_return_sequences=2))
    assert beams.shape[0] == 4
    torch.manual_seed(0)
    sampled = model.generate(**inputs, max_new_tokens=NEW, do_sample=True, top_k=5, pad_token_id=PAD)
    torch.manual_seed(0)
    again = model.generate(**inputs, max_new_tokens=NEW, do_sample=True, top_k=5, pad_token_id=PAD)
    assert sampled.tolist() == again.tolist()
    if task == "causal_lm":
        width = inputs["input_ids"].shape[1]
        assert beams.shape[1] <= width + NEW
        torch.testing.assert_close(beams[::2, :width], inputs["input_ids"])
        torch.testing.assert_close(sampled[:, :width], inputs["input_ids"])


def test_beam_search_top_beam_matches_single_row_beam_search():
    _, model = prompted("gpt2")
    batch = make_batch("causal_lm", [5, 2], "left", seed=7)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         **gen_kwargs(num_beams=3))
    for row, mask_row in enumerate(batch["attention_mask"]):
        ids = batch["input_ids"][row][mask_row.bool()].unsqueeze(0)
        alone = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen_kwargs(num_beams=3))
        assert out[row, -NEW:].tolist() == alone[0, -NEW:].tolist()


def test_prompt_changes_generation():
    """Guard against a silently dropped prompt: a different prompt gives different tokens."""
    base, model = prompted("llama")
    ids = torch.randint(3, 96, (1, 4), generator=torch.Generator().manual_seed(0))
    plain = base.generate(input_ids=ids, **gen_kwargs())
    with_prompt = model.generate(input_ids=ids, **gen_kwargs())
    assert plain.tolist() != with_prompt.tolist()
