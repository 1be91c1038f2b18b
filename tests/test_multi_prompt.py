"""Several named prompts on one model: each row of a mixed batch gets exactly what it gets alone."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import PAD, make_model, perturb_trainable
from peft import PeftModel, PromptTuningConfig, get_peft_model
from reference import make_batch

from hf_softprompt import (
    SoftPromptConfig,
    add_soft_prompt,
    get_active_soft_prompt,
    load_soft_prompt,
    remove_soft_prompt,
    save_soft_prompt,
    set_active_soft_prompt,
    soft_prompt_names,
)
from hf_softprompt.model.injector import get_injector

ATOL = 1e-5
# Three prompts of different lengths and kinds; None rows run the bare model.
PROMPTS = {"default": dict(num_virtual_tokens=4), "short": dict(num_virtual_tokens=2),
           "mlp": dict(num_virtual_tokens=3, encoder="mlp", encoder_hidden_size=8)}
ROWS = ["default", "short", None, "mlp", "short"]
LENGTHS = [7, 3, 5, 6, 2]
PER_POSITION = ("causal_lm", "token_cls", "masked_lm")
CASES = [("gpt2", "causal_lm"), ("llama", "causal_lm"), ("bert", "seq_cls"), ("gpt2", "seq_cls"),
         ("llama", "seq_cls"), ("t5", "seq2seq_lm"), ("bart", "seq2seq_lm"), ("bert", "token_cls"),
         ("bert", "masked_lm"), ("bert", "qa")]
DECODERS = ("gpt2", "llama")


def multi(family, task, base=None, seed=1, **shared):
    """A model carrying the three PROMPTS, far from their init (as after training)."""
    base = make_model(family, task) if base is None else base
    model = copy.deepcopy(base)
    for name, config in PROMPTS.items():
        add_soft_prompt(model, SoftPromptConfig(**config, **shared), name=name)
    return base, perturb_trainable(model, seed)


def row_alone(batch, row, padding_side, task):
    """Row `row` of `batch` as its own unpadded batch of one."""
    mask = batch["attention_mask"][row]
    width, length = mask.shape[0], int(mask.sum())
    cols = slice(0, length) if padding_side == "right" else slice(width - length, width)
    out = {}
    for key, value in batch.items():
        value = value[row:row + 1]
        if key in ("input_ids", "attention_mask") or (key == "labels" and task in PER_POSITION):
            value = value[:, cols]
        if key in ("start_positions", "end_positions"):
            value = value - cols.start
        out[key] = value
    return out, cols


def per_row_loss(model, task, batch, rows):
    """Sum of target losses of each row, and the number of targets (the model's loss = sum / count)."""
    out = model(**batch, soft_prompt_names=rows)
    labels = batch["labels"]
    if task == "causal_lm":
        logits, labels = out.logits[:, :-1], labels[:, 1:]
    elif task == "seq_cls":
        logits, labels = out.logits.unsqueeze(1), labels.unsqueeze(1)
    else:
        logits = out.logits
    losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
    return losses.view(labels.shape).sum(1), (labels != -100).sum(1)


@pytest.mark.parametrize("family,task,padding_side,shared",
                         [(f, t, "right", None) for f, t in CASES]
                         + [(f, t, "left", None) for f, t in CASES if f in DECODERS]
                         + [(f, t, "left", False) for f, t in CASES if f in DECODERS])
def test_each_row_equals_the_row_alone(family, task, padding_side, shared):
    _, model = multi(family, task, shared_prompt_cache=shared)
    batch = make_batch(task, LENGTHS, padding_side, seed=2)
    if task == "causal_lm":  # a row's first token is no target alone; left-padded, a pad would predict it
        first = batch["attention_mask"].argmax(1)
        batch["labels"][torch.arange(len(LENGTHS)), first] = -100
    mixed = model(**batch, soft_prompt_names=ROWS)
    keys = ("start_logits", "end_logits") if task == "qa" else ("logits",)
    for row, name in enumerate(ROWS):
        alone_batch, cols = row_alone(batch, row, padding_side, task)
        alone = model(**alone_batch, soft_prompt_names=[name])
        for key in keys:
            got, want = getattr(mixed, key)[row:row + 1], getattr(alone, key)
            if task in PER_POSITION or task == "qa":
                assert got.shape[1] == batch["input_ids"].shape[1]  # no virtual position shows
                got = got[:, cols]
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    if task == "qa":
        return  # HF's span loss is a softmax over padding too: not row-invariant even without a prompt
    # Each row's loss contribution: the batch loss is the target-weighted mean of the rows alone.
    sums, counts = zip(*(per_row_loss(model, task, row_alone(batch, r, padding_side, task)[0], [n])
                         for r, n in enumerate(ROWS)), strict=True)
    expected = torch.cat(sums).sum() / torch.cat(counts).sum()
    torch.testing.assert_close(mixed.loss, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", DECODERS)
def test_mixed_gradients_come_from_each_prompt_s_own_rows(family):
    _, model = multi(family, "causal_lm")
    batch = make_batch("causal_lm", LENGTHS, "left", seed=4)
    batch["labels"][torch.arange(len(LENGTHS)), batch["attention_mask"].argmax(1)] = -100  # as alone
    sums, counts = per_row_loss(model, "causal_lm", batch, ROWS)
    (sums.sum() / counts.sum()).backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for row, name in enumerate(ROWS):  # the same sum, one row at a time
        alone, _ = row_alone(batch, row, "left", "causal_lm")
        row_sum, _ = per_row_loss(model, "causal_lm", alone, [name])
        if name is not None:  # a row without a prompt trains nothing
            (row_sum.sum() / counts.sum()).backward()
    for param_name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(mixed[param_name], param.grad, atol=ATOL, rtol=1e-4)
    assert set(mixed) == {n for n, p in model.named_parameters() if p.grad is not None}


def test_a_prompt_without_rows_gets_no_gradient_and_never_moves():
    _, model = multi("llama", "causal_lm")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = make_batch("causal_lm", [4, 4], seed=1)
    model(**batch, soft_prompt_names=["short", "default"]).loss.backward()  # "short" gets momentum
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    short = {k: v.clone() for k, v in model.soft_prompts["short"].state_dict().items()}
    for _ in range(3):  # rows of "default" and "mlp" only
        model(**batch, soft_prompt_names=["default", "mlp"]).loss.backward()
        assert all(p.grad is None for p in model.soft_prompts["short"].parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = model.soft_prompts["short"].state_dict()
    assert all(torch.equal(after[k], short[k]) for k in short)


# ------------------------------------------------------------------ the shared prompt cache
def test_shared_cache_runs_each_distinct_prompt_once():
    _, model = multi("llama", "causal_lm")
    shared = get_injector(model).shared
    seen = []
    run = shared._run_prompts
    shared._run_prompts = lambda prompts, rows: seen.append([p.shape[0] for p in prompts]) or run(prompts, rows)
    model(**make_batch("causal_lm", [3] * 16), soft_prompt_names=(ROWS * 4)[:16])
    assert seen == [[4, 2, 3]]  # one pass over the K=3 distinct prompts for 16 rows, not 16 rows


# ------------------------------------------------------------------ generate
def gen_kwargs(**extra):
    return dict(max_new_tokens=5, min_new_tokens=5, pad_token_id=PAD, **extra)


@pytest.mark.parametrize("family,task", [("gpt2", "causal_lm"), ("llama", "causal_lm"), ("t5", "seq2seq_lm")])
@pytest.mark.parametrize("options", [{"do_sample": False}, {"do_sample": False, "num_beams": 3}],
                         ids=["greedy", "beams"])
def test_generate_each_row_as_alone(family, task, options):
    _, model = multi(family, task)
    side = "left" if task == "causal_lm" else "right"
    batch = make_batch(task, LENGTHS, side, seed=5)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    out = model.generate(**inputs, soft_prompt_names=ROWS, **gen_kwargs(**options))
    for row, name in enumerate(ROWS):
        alone, _ = row_alone(inputs, row, side, task)
        want = model.generate(**alone, soft_prompt_names=[name], **gen_kwargs(**options))
        if task == "causal_lm":
            assert out[row, -5:].tolist() == want[0, -5:].tolist()
        else:
            assert out[row, :want.shape[1]].tolist() == want[0].tolist()


@pytest.mark.parametrize("family", DECODERS)
def test_sampling_equals_hand_built_prompts_with_the_same_seed(family):
    # Sampling draws per batch, so the reference is the same batch: the bare model on each row's own
    # [prompt; tokens], left-padded by hand, sampled from the same seed.
    base, model = multi(family, "causal_lm")
    batch = make_batch("causal_lm", LENGTHS, "left", seed=6)
    width = max(LENGTHS) + 4
    embeds = torch.zeros(len(ROWS), width, base.config.hidden_size if family == "llama" else base.config.n_embd)
    mask = torch.zeros(len(ROWS), width, dtype=torch.long)
    for row, name in enumerate(ROWS):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        parts = [base.get_input_embeddings()(ids)]
        if name is not None:
            parts.insert(0, model.soft_prompts[name]().detach())
        seq = torch.cat(parts)
        embeds[row, width - seq.shape[0]:], mask[row, width - seq.shape[0]:] = seq, 1
    options = gen_kwargs(do_sample=True, top_k=20, num_return_sequences=2)
    torch.manual_seed(0)
    ours = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          soft_prompt_names=ROWS, **options)
    torch.manual_seed(0)
    with torch.no_grad():
        ref = base.generate(inputs_embeds=embeds, attention_mask=mask, **options)
    assert ours[:, -5:].tolist() == ref[:, -5:].tolist()


# ------------------------------------------------------------------ task heads
def test_each_prompt_owns_its_head_and_the_active_prompt_switches_it():
    base, model = multi("bert", "seq_cls")
    bank = get_injector(model).bank
    assert set(bank.heads) == set(PROMPTS)
    heads = [bank.head_modules(n)["classifier"].weight for n in PROMPTS]
    assert not torch.equal(heads[0], heads[1])  # trained apart
    batch = make_batch("seq_cls", [5, 5], seed=1)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    by_name = {}
    for name in PROMPTS:
        set_active_soft_prompt(model, name)
        by_name[name] = model(**inputs).logits
        torch.testing.assert_close(by_name[name], model(**inputs, soft_prompt_names=[name] * 2).logits)
    assert not torch.allclose(by_name["default"], by_name["short"])
    set_active_soft_prompt(model, None)  # the bare model, its own head
    torch.testing.assert_close(model(**inputs).logits, base(**inputs).logits, atol=0, rtol=0)
    mixed = model(**inputs, soft_prompt_names=["mlp", None]).logits
    torch.testing.assert_close(mixed[0], by_name["mlp"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], base(**inputs).logits[1], atol=ATOL, rtol=0)


# ------------------------------------------------------------------ management
def test_names_active_and_removal_back_to_the_bare_model():
    base = make_model("llama", "causal_lm")
    base.model.layers[0].mlp.requires_grad_(False)  # the user's own flags survive
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    batch = make_batch("causal_lm", [5, 3], "left")
    want = base(**batch).logits.detach()
    model = add_soft_prompt(base, SoftPromptConfig(num_virtual_tokens=3))
    add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=5, init="sample_vocab"), name="topics")
    assert soft_prompt_names(model) == ["default", "topics"] and get_active_soft_prompt(model) == "default"
    set_active_soft_prompt(model, "topics")
    torch.testing.assert_close(model(**batch).logits, model(**batch, soft_prompt_names=["topics"] * 2).logits)
    remove_soft_prompt(model, "topics")
    assert soft_prompt_names(model) == ["default"] and get_active_soft_prompt(model) == "default"
    add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=2), name="again")
    remove_soft_prompt(model)  # every prompt
    assert soft_prompt_names(model) == [] and not hasattr(model, "soft_prompts")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(model(**batch).logits, want)  # bit-identical


def test_rows_without_a_prompt_are_the_bare_model_bit_for_bit():
    base, model = multi("gpt2", "causal_lm")
    batch = make_batch("causal_lm", [5, 3], "left")
    with torch.no_grad():
        assert torch.equal(model(**batch, soft_prompt_names=[None, None]).logits, base(**batch).logits)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"soft_prompt_names": ["default", "nope"]}, ValueError,
     r"soft_prompt_names names \['nope'\], which the model does not carry. Its prompts are \['default', "
     r"'short', 'mlp'\]; use None for a row without a prompt."),
    ({"soft_prompt_names": ["default"]}, ValueError, r"soft_prompt_names has 1 entries for a batch of 2 rows"),
    ({"soft_prompt_names": "default"}, TypeError, r"soft_prompt_names must be a list with one prompt name"),
    ({"soft_prompt_ids": torch.tensor([0, 3])}, ValueError,
     r"soft_prompt_ids holds \[3\] \(in rows \[1\] of the batch\), but the model carries 3 prompts"),
    ({"soft_prompt_ids": ["short", "mlp"]}, TypeError,
     r"soft_prompt_ids holds prompt names \(\['short', 'mlp'\]\); .* Pass the names as soft_prompt_names"),
    ({"soft_prompt_names": [["short"], "mlp"]}, TypeError,
     r"one prompt name \(a str\) or None per row, got \['short'\] in row 0"),
    ({"soft_prompt_ids": torch.tensor([0.0, 1.0])}, ValueError, r"soft_prompt_ids must be one integer per row"),
    ({"soft_prompt_ids": [0, 1], "soft_prompt_names": ["short", "short"]}, ValueError, "not both"),
])
@pytest.mark.parametrize("method", ["forward", "generate"])
def test_bad_choices_are_refused_before_any_compute(kwargs, error, match, method):
    _, model = multi("gpt2", "causal_lm")
    calls = []
    model.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(3, 96, (2, 4))
    with pytest.raises(error, match=match):
        if method == "forward":
            model(input_ids=ids, **kwargs)
        else:
            model.generate(input_ids=ids, max_new_tokens=2, pad_token_id=PAD, **kwargs)
    assert calls == []


def test_prompts_of_one_model_must_agree_on_its_settings():
    model = add_soft_prompt(make_model("bert", "seq_cls"), SoftPromptConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match=r"The new prompt has placement='after_first_token', but the prompts on "
                                         r"the model have placement='front'"):
        add_soft_prompt(model, SoftPromptConfig(placement="after_first_token"), name="b")
    with pytest.raises(ValueError, match=r"Invalid soft prompt name 'a\.b': a prompt name is a non-empty string"):
        add_soft_prompt(model, SoftPromptConfig(), name="a.b")
    assert soft_prompt_names(model) == ["default"]


# ------------------------------------------------------------------ save and load
def test_save_layout_and_round_trip(tmp_path):
    _, model = multi("bert", "seq_cls")
    set_active_soft_prompt(model, "short")
    save_soft_prompt(model, tmp_path)
    assert set(os.listdir(tmp_path)) == {"adapter_config.json", "adapter_model.safetensors", "README.md",
                                         "soft_prompts.json", "short", "mlp"}
    for name in ("short", "mlp"):
        assert set(os.listdir(tmp_path / name)) == {"adapter_config.json", "adapter_model.safetensors",
                                                    "README.md"}
    loaded = load_soft_prompt(make_model("bert", "seq_cls"), tmp_path)
    assert soft_prompt_names(loaded) == list(PROMPTS) and get_active_soft_prompt(loaded) == "short"
    batch = make_batch("seq_cls", [4, 6, 5], seed=3)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    names = ["mlp", "default", "short"]
    torch.testing.assert_close(loaded(**inputs, soft_prompt_names=names).logits,
                               model(**inputs, soft_prompt_names=names).logits, atol=ATOL, rtol=0)


def test_load_one_prompt_by_name_beside_others(tmp_path):
    _, model = multi("gpt2", "causal_lm")
    save_soft_prompt(model, tmp_path)
    target = add_soft_prompt(make_model("gpt2", "causal_lm"), SoftPromptConfig(num_virtual_tokens=2), name="own")
    own = target.soft_prompts["own"].embedding.weight.detach().clone()
    load_soft_prompt(target, tmp_path, name="mlp")
    assert soft_prompt_names(target) == ["own", "mlp"] and get_active_soft_prompt(target) == "own"
    assert torch.equal(target.soft_prompts["own"].embedding.weight, own)
    batch = make_batch("causal_lm", [5], seed=2)
    torch.testing.assert_close(target(**batch, soft_prompt_names=["mlp"]).logits,
                               model(**batch, soft_prompt_names=["mlp"]).logits, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"already carries a soft prompt named 'mlp'"):
        load_soft_prompt(target, tmp_path, name="mlp")
    with pytest.raises(ValueError, match=r"holds the prompts \['default', 'short', 'mlp'\], none named 'x'"):
        load_soft_prompt(target, tmp_path, name="x")
    assert soft_prompt_names(target) == ["own", "mlp"]


def test_a_failing_load_attaches_nothing(tmp_path):
    _, model = multi("gpt2", "causal_lm")
    save_soft_prompt(model, tmp_path)
    (tmp_path / "mlp" / "adapter_model.safetensors").write_bytes(b"broken")
    target = make_model("gpt2", "causal_lm")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_soft_prompt(target, tmp_path)
    assert get_injector(target) is None and "forward" not in target.__dict__


@pytest.mark.parametrize("family,task", [("gpt2", "causal_lm"), ("bert", "seq_cls")])
def test_each_of_our_folders_loads_in_peft(tmp_path, family, task):
    _, model = multi(family, task)
    save_soft_prompt(model, tmp_path)
    batch = make_batch(task, [6, 6], seed=1)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    for name in ("default", "short"):
        folder = tmp_path if name == "default" else tmp_path / name
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            peft_model = PeftModel.from_pretrained(make_model(family, task), str(folder))
        with torch.no_grad():
            theirs = peft_model(**inputs).logits
            ours = model(**inputs, soft_prompt_names=[name] * 2).logits
        if task == "causal_lm":
            theirs = theirs[:, PROMPTS[name]["num_virtual_tokens"]:]
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_a_peft_adapter_loads_under_a_name(tmp_path):
    peft_model = perturb_trainable(get_peft_model(make_model("bert", "seq_cls"),
                                                  PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)))
    peft_model.save_pretrained(str(tmp_path))
    model = add_soft_prompt(make_model("bert", "seq_cls"), SoftPromptConfig(num_virtual_tokens=2))
    load_soft_prompt(model, tmp_path, name="from_peft")
    batch = make_batch("seq_cls", [5, 5], seed=2)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, soft_prompt_names=["from_peft"] * 2).logits,
                                   peft_model(**inputs).logits, atol=ATOL, rtol=0)


# ------------------------------------------------------------------ devices
@pytest.mark.parametrize("family,task", [("llama", "causal_lm"), ("gpt2", "causal_lm"), ("bert", "seq_cls"),
                                         ("bert", "qa"), ("t5", "seq2seq_lm")])
@pytest.mark.parametrize("choice", ["names", "ids", "active"])
def test_routing_builds_nothing_on_the_default_device(family, task, choice):
    """A routing table built where torch's default device is (the CPU) instead of where the call's
    tensors are crashed multi-prompt training on a GPU. With `meta` as the default device, any
    tensor built without an explicit device lands there and the call fails or differs; no GPU needed."""
    def run(default_device):
        model = make_model(family, task)
        for name, tokens in (("a", 2), ("b", 3)):
            add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=tokens), name=name)
        perturb_trainable(model, seed=4)
        ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
        kwargs = {"names": {"soft_prompt_names": ["a", "b", "a"]},
                  "ids": {"soft_prompt_ids": torch.tensor([1, -1, 0])}, "active": {}}[choice]
        extra = {"labels": ids} if task == "seq2seq_lm" else {}
        with torch.device(default_device), torch.no_grad():
            out = model(input_ids=ids, **kwargs, **extra)
            generated = (model.generate(ids, max_new_tokens=3, do_sample=False, **kwargs)
                         if task in ("causal_lm", "seq2seq_lm") else None)
        return out, generated

    (out, generated), (want, want_generated) = run("meta"), run("cpu")
    for key in want.keys():
        if isinstance(want[key], torch.Tensor):
            assert out[key].device.type == "cpu"
            torch.testing.assert_close(out[key], want[key], rtol=0, atol=0)
    if want_generated is not None:
        assert torch.equal(generated, want_generated)
