"""The shared prompt cache (prompt run once per batch) gives what plain concatenation gives."""

from __future__ import annotations

import copy
import logging
from unittest import mock

import pytest
import torch
from models import CASES, PAD, config_for, enable_activation_checkpointing, make_model
from reference import make_batch
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache, MistralConfig, StaticCache

from hf_softprompt import SoftPromptConfig, add_soft_prompt
from hf_softprompt.model.injector import get_injector
from hf_softprompt.model.prompt_cache import SharedPromptCache

P = 4
ATOL = 1e-5
LOGGER = "hf_softprompt.model.prompt_cache"
DECODER_CASES = [c for c in CASES if c[0] in ("gpt2", "llama", "qwen2")]


def pair(family, task="causal_lm", base=None, **config):
    """The same base model and prompt twice: shared prompt cache on, and off (plain path)."""
    base = make_model(family, task) if base is None else base
    shared = add_soft_prompt(copy.deepcopy(base), SoftPromptConfig(num_virtual_tokens=P, **config))
    with torch.no_grad():  # a prompt far from zero, so a dropped prompt cannot pass unnoticed
        shared.soft_prompts["default"].embedding.weight.normal_(0, 1.0)
    plain_config = SoftPromptConfig(num_virtual_tokens=P, **{**config, "shared_prompt_cache": False})
    plain = add_soft_prompt(copy.deepcopy(base), plain_config)
    plain.soft_prompts["default"].load_state_dict(shared.soft_prompts["default"].state_dict())
    return shared, plain


def count_prompt_passes(model):
    """Patch the prompt pass of `model` to count its calls (the mock's `call_count`)."""
    shared = get_injector(model).shared
    return mock.patch.object(shared, "_run_prompts", wraps=shared._run_prompts)


def real(t, mask):
    """Zero the padded positions of a per-position output, so only real ones are compared."""
    return t * mask.view(*mask.shape, *([1] * (t.dim() - 2)))


def prompt_grads(model):
    return [p.grad for p in model.soft_prompts["default"].parameters()]


# ----------------------------------------------------------------- forward
@pytest.mark.parametrize("family,task", DECODER_CASES)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_matches_plain_path(family, task, padding_side):
    shared, plain = pair(family, task)
    batch = make_batch(task, [7, 3, 5], padding_side)
    mask = batch["attention_mask"]
    with count_prompt_passes(shared) as passes:
        ours = shared(**batch, output_hidden_states=True)
    assert passes.call_count == (0 if task == "qa" else 1)  # once for the batch of 3
    ref = plain(**batch, output_hidden_states=True)

    torch.testing.assert_close(ours.loss, ref.loss, atol=ATOL, rtol=0)
    for key in ("logits", "start_logits", "end_logits"):
        if key in ref:
            assert ours[key].shape == ref[key].shape, key
            if task == "seq_cls":
                torch.testing.assert_close(ours[key], ref[key], atol=ATOL, rtol=0)
            else:
                torch.testing.assert_close(real(ours[key], mask), real(ref[key], mask), atol=ATOL, rtol=0)
    for got, want in zip(ours.hidden_states, ref.hidden_states, strict=True):
        assert got.shape == want.shape == (3, 7, got.shape[-1])
        torch.testing.assert_close(real(got, mask), real(want, mask), atol=ATOL, rtol=0)

    ours.loss.backward()
    ref.loss.backward()
    for got, want in zip(prompt_grads(shared), prompt_grads(plain), strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("encoder", ["mlp", "lstm", "residual"])
def test_p_tuning_encoder_gradients_match(encoder):
    shared, plain = pair("llama", encoder=encoder)
    batch = make_batch("causal_lm", [6, 2, 4], "left")
    shared(**batch).loss.backward()
    plain(**batch).loss.backward()
    for got, want in zip(prompt_grads(shared), prompt_grads(plain), strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_num_items_in_batch_and_position_ids_pass_through(family):
    shared, plain = pair(family)
    batch = make_batch("causal_lm", [5, 5, 5])
    extra = {"num_items_in_batch": torch.tensor(17), "position_ids": torch.arange(5).unsqueeze(0) + 2}
    torch.testing.assert_close(shared(**batch, **extra).loss, plain(**batch, **extra).loss, atol=ATOL, rtol=0)


def test_prompt_pass_runs_with_batch_size_one():
    shared, _ = pair("llama")
    seen = []
    hook = shared.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    shared(**make_batch("causal_lm", [6, 6, 6, 6]))
    # The prompt once; each row runs its 6 tokens only, with labels or without.
    assert seen == [(1, P), (4, 6)]
    seen.clear()
    shared(input_ids=make_batch("causal_lm", [6, 6])["input_ids"])
    hook.remove()
    assert seen == [(1, P), (2, 6)]


@pytest.mark.parametrize("use_shared", [True, False])
def test_lm_head_skips_every_virtual_position(use_shared):
    model = pair("gpt2")[0 if use_shared else 1]
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape[:2])))
    batch = make_batch("causal_lm", [6, 6])
    model(**batch)
    model(input_ids=batch["input_ids"])
    assert seen == [(2, 6), (2, 6)]


def test_use_cache_false_returns_no_cache():
    shared, plain = pair("llama")
    batch = make_batch("causal_lm", [4, 4])
    for use_cache in (False, True):
        ours, ref = shared(**batch, use_cache=use_cache), plain(**batch, use_cache=use_cache)
        assert (ours.past_key_values is None) == (ref.past_key_values is None) == (not use_cache)
    assert ours.past_key_values.get_seq_length() == ref.past_key_values.get_seq_length() == P + 4
    as_tuple = shared(**batch, use_cache=False, return_dict=False)
    assert len(as_tuple) == 2  # (loss, logits): no cache slot


# -------------------------------------------------------------- generation
def gen_kwargs(**extra):
    return dict(max_new_tokens=6, min_new_tokens=6, pad_token_id=PAD, **extra)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("options", [
    {"do_sample": False},
    {"do_sample": False, "num_beams": 3},
    {"do_sample": False, "num_beams": 3, "num_return_sequences": 2},
    {"do_sample": True, "top_k": 5, "num_return_sequences": 2},
    {"do_sample": False, "use_cache": False},
], ids=["greedy", "beams", "beams_return2", "sample_return2", "no_cache"])
def test_generate_token_identical_to_plain_path(family, options):
    shared, plain = pair(family)
    batch = make_batch("causal_lm", [6, 2, 4], "left", seed=3)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    torch.manual_seed(0)
    ours = shared.generate(**inputs, **gen_kwargs(**options))
    torch.manual_seed(0)
    ref = plain.generate(**inputs, **gen_kwargs(**options))
    assert ours.tolist() == ref.tolist()


def test_generate_runs_each_prompt_once_per_call():
    shared, plain = pair("llama")
    inputs = {k: v for k, v in make_batch("causal_lm", [5, 3], "left").items() if k != "labels"}
    with count_prompt_passes(shared) as passes:
        first = shared.generate(**inputs, **gen_kwargs())
        assert passes.call_count == 1  # once for the batch, and the decode steps read it from the cache
        shared.generate(**inputs, **gen_kwargs(num_beams=2))
        assert passes.call_count == 2
    assert first.tolist() == plain.generate(**inputs, **gen_kwargs()).tolist()


def test_every_call_computes_the_prompt_afresh():
    # Nothing is kept between calls, so no edit of the weights can leave stale keys/values.
    shared, _ = pair("gpt2")
    batch = make_batch("causal_lm", [4, 4])
    with count_prompt_passes(shared) as passes:
        shared(**batch)
        shared.train()
        shared(**batch)
        shared.eval()
        with torch.no_grad():
            shared(**batch)
            shared(**batch)
    assert passes.call_count == 4


def test_fills_the_empty_cache_generate_made():
    shared, plain = pair("qwen2")
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache(config=shared.config)
    out = shared(input_ids=ids, past_key_values=cache, use_cache=True)
    assert out.past_key_values is cache and cache.get_seq_length() == P + 5
    ref = plain(input_ids=ids, use_cache=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    step = torch.randint(3, 96, (2, 1))
    torch.testing.assert_close(shared(input_ids=step, past_key_values=cache).logits,
                               plain(input_ids=step, past_key_values=ref.past_key_values).logits,
                               atol=ATOL, rtol=0)


# ---------------------------------------------------------------- fallbacks
def sliding_window_mistral():
    torch.manual_seed(0)
    config = MistralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=96, pad_token_id=PAD, sliding_window=16)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("case,reason", [
    ("checkpointing", "activation checkpointing is on"),
    ("sliding_window", "DynamicSlidingWindowLayer layers (sliding-window or hybrid attention)"),
    ("switched_off", "disabled by SoftPromptConfig(shared_prompt_cache=False)"),
    ("encoder", "not a decoder-only model"),
    ("token_type_ids", "the call passes token_type_ids"),
])
def test_fallback_uses_plain_path_and_logs_why_once(case, reason, caplog):
    task = "seq_cls" if case == "encoder" else "causal_lm"
    base = {"sliding_window": sliding_window_mistral(), "encoder": make_model("bert", task)}.get(case)
    config = {"shared_prompt_cache": False} if case == "switched_off" else {}
    shared, plain = pair("gpt2", task, base=base, **config)
    batch = make_batch(task, [6, 4])
    if case == "token_type_ids":
        batch["token_type_ids"] = torch.ones_like(batch["input_ids"])
    if case == "checkpointing":
        for model in (shared, plain):
            enable_activation_checkpointing(model, {"use_reentrant": False})
            model.train()
    with caplog.at_level(logging.INFO, logger=LOGGER), count_prompt_passes(shared) as passes:
        ours = shared(**batch)
        shared(**batch)
    assert passes.call_count == 0
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 1
    assert "concatenated to every row (plain path)" in messages[0]
    assert caplog.records[0].levelno == logging.INFO
    assert reason in messages[0]
    torch.testing.assert_close(ours.loss, plain(**batch).loss, atol=ATOL, rtol=0)


def test_shared_path_is_logged_once(caplog):
    shared, _ = pair("llama")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        shared(**make_batch("causal_lm", [3, 3]))
        shared.generate(input_ids=torch.tensor([[5, 6], [7, 8]]), **gen_kwargs())
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert messages == ["LlamaForCausalLM: soft prompt computed once per batch (shared prompt cache)."]


@pytest.mark.parametrize("lengths,names", [([4], None), ([4, 3], ["a", "b"]), ([4, 3], ["a", None])])
def test_one_row_per_prompt_concatenates_unless_forced(caplog, lengths, names):
    """With each prompt in one row there is nothing to share: the default (None) concatenates,
    saving the prompt pass; True still shares. Both give the concatenated result."""
    base = make_model("llama", "causal_lm")
    models = {}
    for setting in (None, True, False):
        models[setting] = model = copy.deepcopy(base)
        for name in ("a", "b"):
            add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=3, shared_prompt_cache=setting), name=name)
        model.soft_prompts.load_state_dict(models[None].soft_prompts.state_dict())
    batch = make_batch("causal_lm", lengths)
    choice = {} if names is None else {"soft_prompt_names": names}
    with caplog.at_level(logging.INFO, logger=LOGGER):
        outs = {s: m(**batch, **choice).logits for s, m in models.items()}
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("plain path): each prompt serves a single row" in m for m in messages)
    assert any("shared prompt cache" in m for m in messages)  # forced by True
    for setting in (None, True):
        torch.testing.assert_close(outs[setting], outs[False], atol=ATOL, rtol=0)


def test_checkpointing_in_eval_mode_still_shares():
    shared, plain = pair("llama")
    enable_activation_checkpointing(shared, {"use_reentrant": False})
    batch = make_batch("causal_lm", [5, 2], "left")
    with count_prompt_passes(shared) as passes:
        loss = shared(**batch).loss
    assert passes.call_count == 1
    torch.testing.assert_close(loss, plain(**batch).loss, atol=ATOL, rtol=0)


def test_static_cache_falls_back(caplog):
    shared, plain = pair("llama")
    batch = make_batch("causal_lm", [5, 3], "left")
    with caplog.at_level(logging.INFO, logger=LOGGER), count_prompt_passes(shared) as passes:
        ours = shared(**batch, past_key_values=StaticCache(config=shared.config, max_cache_len=16))
    assert passes.call_count == 0
    assert "passes a StaticCache" in caplog.records[0].getMessage()
    ref = plain(**batch, past_key_values=StaticCache(config=plain.config, max_cache_len=16))
    torch.testing.assert_close(ours.loss, ref.loss, atol=ATOL, rtol=0)


def test_feature_extraction_model_runs_its_prompt_pass_without_the_hooks():
    base = AutoModel.from_config(config_for("llama")).eval()
    shared, plain = pair("llama", base=base)
    assert isinstance(get_injector(shared).shared, SharedPromptCache)
    batch = make_batch("causal_lm", [5, 3], "left")
    del batch["labels"]
    with count_prompt_passes(shared) as passes:
        ours = shared(**batch).last_hidden_state
    assert passes.call_count == 1
    mask = batch["attention_mask"]
    want = plain(**batch).last_hidden_state
    torch.testing.assert_close(real(ours, mask), real(want, mask), atol=ATOL, rtol=0)


def test_qa_shares_for_inference_only():
    shared, plain = pair("llama", "qa")
    batch = make_batch("qa", [6, 4], "left")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with count_prompt_passes(shared) as passes:
        ours = shared(**inputs)
        shared(**batch)  # start/end positions: the span loss needs the virtual positions
    assert passes.call_count == 1
    mask = batch["attention_mask"]
    torch.testing.assert_close(real(ours.start_logits, mask), real(plain(**inputs).start_logits, mask),
                               atol=ATOL, rtol=0)


# ------------------------------------------------------------------- config
def test_config_switch_validated_and_round_trips():
    with pytest.raises(TypeError, match=r"shared_prompt_cache must be None \(where faster\), True or "
                                        r"False, got str 'no'"):
        SoftPromptConfig(shared_prompt_cache="no")
    for setting in (None, True, False):
        config = SoftPromptConfig(shared_prompt_cache=setting)
        assert SoftPromptConfig.from_dict(config.to_dict()) == config
    assert SoftPromptConfig().shared_prompt_cache is None


@pytest.mark.parametrize("setting", [None, True])
def test_default_trains_with_the_plain_path_on_accelerators_only(setting):
    # The decision alone (CI has no GPU): the device is only compared, never used.
    model = add_soft_prompt(make_model("llama", "causal_lm"),
                            SoftPromptConfig(num_virtual_tokens=P, shared_prompt_cache=setting))
    shared = get_injector(model).shared
    kwargs = {"attention_mask": torch.ones(2, 3, dtype=torch.long)}
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    model.train()
    on_gpu = shared.reason_against(kwargs, cuda)
    if setting is None:
        assert on_gpu.startswith("training on cuda, where the extra prompt pass")
        assert "SoftPromptConfig(shared_prompt_cache=True) forces the shared path" in on_gpu
    else:
        assert on_gpu is None
    assert shared.reason_against(kwargs, cpu) is None
    model.eval()
    with torch.no_grad():  # evaluation and generate keep the prompt's keys/values: always shared
        assert shared.reason_against(kwargs, cuda) is None
