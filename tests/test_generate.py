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


def two_prompts(family="llama"):
    base = make_model(family, "causal_lm")
    model = copy.deepcopy(base)
    for name, n in (("a", 2), ("b", 5)):
        add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=n), name=name)
        with torch.no_grad():
            model.soft_prompts[name].embedding.weight.normal_(0, 1.0)
    return base, model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("shared", [True, False])
@torch.no_grad()
def test_a_hand_written_decoding_loop_equals_generate(family, shared):
    """A loop that passes the cache back with a mask of its own tokens (no prompt) and no positions:
    the decode steps widen the mask and move positions themselves."""
    base = make_model(family, "causal_lm")
    model = copy.deepcopy(base)
    for name, n in (("a", 2), ("b", 5)):
        add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=n, shared_prompt_cache=shared), name=name)
        with torch.no_grad():
            model.soft_prompts[name].embedding.weight.normal_(0, 1.0)
    batch = make_batch("causal_lm", [6, 3, 4], padding_side="left")
    names = ["a", "b", None]
    expected = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              soft_prompt_names=names, **gen_kwargs())
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = model(input_ids=ids, attention_mask=mask, soft_prompt_names=names, use_cache=True)
    for _ in range(NEW):
        token = next_token(out.logits)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        out = model(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values,
                    soft_prompt_names=names, use_cache=True)
    assert torch.equal(ids, expected)


class AtStep:
    """A logits processor that runs `action` once, at decode step `step` (what another thread could do then)."""

    def __init__(self, step, action):
        self.step, self.action, self.calls = step, action, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.step:
            self.action()
        return scores


@pytest.mark.parametrize("change", ["set_active", "remove"])
@torch.no_grad()
def test_generate_keeps_the_prompts_it_started_with(change):
    from transformers import LogitsProcessorList

    from hf_softprompt import remove_soft_prompt, set_active_soft_prompt

    base, model = two_prompts()
    set_active_soft_prompt(model, "a")
    batch = make_batch("causal_lm", [6, 4], padding_side="left")
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = model.generate(**inputs, **gen_kwargs())  # "a" for every row, start to end
    other = model.generate(**inputs, **gen_kwargs(soft_prompt_names=["b", "b"]))
    assert not torch.equal(expected, other)
    action = (lambda: set_active_soft_prompt(model, "b")) if change == "set_active" else \
        (lambda: remove_soft_prompt(model))
    changed = model.generate(**inputs, **gen_kwargs(logits_processor=LogitsProcessorList([AtStep(2, action)])))
    assert torch.equal(changed, expected)


@torch.no_grad()
def test_generate_refuses_to_continue_an_earlier_generate_cache():
    """transformers' multi-turn cache reuse would drop as many new tokens as the prompt is long."""
    _, model = prompted("llama")
    ids = torch.randint(3, 90, (1, 6))
    out = model.generate(input_ids=ids, return_dict_in_generate=True, **gen_kwargs())
    longer = torch.cat([out.sequences, torch.randint(3, 90, (1, 3))], 1)
    with pytest.raises(ValueError, match=r"cache from an earlier call .* without the cache"):
        model.generate(input_ids=longer, past_key_values=out.past_key_values, **gen_kwargs())
    fresh = model.generate(input_ids=longer, **gen_kwargs())  # the supported way
    assert fresh.shape[1] == longer.shape[1] + NEW
