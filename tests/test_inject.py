"""The injection agrees with a hand-written [prompt; embeddings] reference on every task head."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import CASES, make_model
from reference import make_batch, reference_outputs

from hf_softprompt import SoftPromptConfig, add_soft_prompt

P = 4
ATOL = 1e-5


def prompted(family, task, **config):
    base = make_model(family, task)
    model = add_soft_prompt(copy.deepcopy(base), SoftPromptConfig(num_virtual_tokens=P, **config))
    with torch.no_grad():  # a prompt far from zero, so a dropped prompt cannot pass unnoticed
        model.soft_prompts["default"].embedding.weight.normal_(0, 1.0)
    return base, model


def real(t, mask):
    """Zero the padded positions of a per-position output, so only real ones are compared."""
    return t * mask.view(*mask.shape, *([1] * (t.dim() - 2)))


# Left padding only for decoder-only models: encoders with absolute or relative positions are not
# left-padding invariant even without a prompt.
PADDED_CASES = [(f, t, "right") for f, t in CASES] + [
    (f, t, "left") for f, t in CASES if f in ("gpt2", "llama", "qwen2")
]


@pytest.mark.parametrize("family,task,padding_side", PADDED_CASES)
def test_matches_hand_written_reference(family, task, padding_side):
    base, model = prompted(family, task)
    batch = make_batch(task, [7, 3, 5], padding_side)
    ours = model(**batch)
    prompt = model.soft_prompts["default"]().detach().clone().requires_grad_(True)
    ref = reference_outputs(base, prompt, batch, task)

    torch.testing.assert_close(ours.loss, ref["loss"], atol=ATOL, rtol=0)
    mask = batch["attention_mask"]
    for key, value in ref.items():
        if key == "loss":
            continue
        got = getattr(ours, key)
        assert got.shape == value.shape, key  # aligned with the caller's input, no virtual positions
        if task in ("seq_cls", "seq2seq_lm"):
            torch.testing.assert_close(got, value, atol=ATOL, rtol=0)
        else:
            torch.testing.assert_close(real(got, mask), real(value, mask), atol=ATOL, rtol=0)

    ours.loss.backward()
    ref["loss"].backward()
    torch.testing.assert_close(model.soft_prompts["default"].embedding.weight.grad, prompt.grad, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family,task", [("bert", "seq_cls"), ("bert", "token_cls"), ("bert", "qa"),
                                         ("t5", "seq2seq_lm")])
def test_after_first_token_placement(family, task):
    base, model = prompted(family, task, placement="after_first_token")
    batch = make_batch(task, [6, 4, 5])
    ours = model(**batch)
    ref = reference_outputs(base, model.soft_prompts["default"]().detach(), batch, task, at=1)
    torch.testing.assert_close(ours.loss, ref["loss"], atol=ATOL, rtol=0)
    for key, value in ref.items():
        if key != "loss":
            got = getattr(ours, key)
            mask = batch["attention_mask"] if got.dim() > 2 or key.endswith("_logits") else None
            if mask is not None and task != "seq2seq_lm":
                got, value = real(got, mask), real(value, mask)
            torch.testing.assert_close(got, value, atol=ATOL, rtol=0)


def test_qa_no_answer_position_stays_on_cls_after_first_token():
    base, model = prompted("bert", "qa", placement="after_first_token")
    batch = make_batch("qa", [6, 6])
    batch["start_positions"][:] = 0
    batch["end_positions"][:] = 0
    ref = reference_outputs(base, model.soft_prompts["default"]().detach(), batch, "qa", at=1)
    torch.testing.assert_close(model(**batch).loss, ref["loss"], atol=ATOL, rtol=0)


def _row_outputs(out, task, row, mask_row):
    if task in ("seq_cls",):
        return [out.logits[row]]
    if task == "qa":
        return [out.start_logits[row][mask_row.bool()], out.end_logits[row][mask_row.bool()]]
    return [out.logits[row][mask_row.bool()]]


DECODER_CASES = [c for c in CASES if c[0] in ("gpt2", "llama", "qwen2")]
ENCODER_CASES = [c for c in CASES if c[0] in ("bert",)]


@settings(max_examples=12, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=2, max_size=4),
       case=st.sampled_from(DECODER_CASES + ENCODER_CASES),
       padding_side=st.sampled_from(["left", "right"]), seed=st.integers(0, 1000))
def test_batch_invariance(lengths, case, padding_side, seed):
    """An example's outputs do not depend on the other rows or on the padding."""
    family, task = case
    if family == "bert":
        padding_side = "right"
    _, model = prompted(family, task)
    batch = make_batch(task, lengths, padding_side, seed=seed)
    out = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
    for row, n in enumerate(lengths):
        mask_row = batch["attention_mask"][row]
        single_ids = batch["input_ids"][row][mask_row.bool()].unsqueeze(0)
        alone = model(input_ids=single_ids, attention_mask=torch.ones_like(single_ids))
        for got, want in zip(_row_outputs(out, task, row, mask_row),
                             _row_outputs(alone, task, 0, torch.ones(n)), strict=True):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


def test_positional_arguments_and_missing_mask():
    base, model = prompted("gpt2", "causal_lm")
    ids = torch.randint(3, 96, (2, 5))
    by_position = model(ids).logits
    by_keyword = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(by_position, by_keyword)
    assert by_position.shape == (2, 5, 96)


def test_user_position_ids_are_shifted_not_dropped():
    _, model = prompted("llama", "causal_lm")
    ids = torch.randint(3, 96, (1, 6))
    default = model(input_ids=ids).logits
    explicit = model(input_ids=ids, position_ids=torch.arange(6).unsqueeze(0)).logits
    torch.testing.assert_close(default, explicit, atol=ATOL, rtol=0)
    shifted = model(input_ids=ids, position_ids=torch.arange(6).unsqueeze(0) + 3).logits
    assert not torch.allclose(default, shifted, atol=1e-3)


def test_bert_token_type_ids_kept():
    base, model = prompted("bert", "seq_cls")
    batch = make_batch("seq_cls", [5, 5])
    types = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    ours = model(**batch, token_type_ids=types).logits
    prompt = model.soft_prompts["default"]().detach()
    emb = base.get_input_embeddings()(batch["input_ids"])
    full = torch.cat([prompt.expand(2, -1, -1), emb], 1)
    ref = base(inputs_embeds=full, attention_mask=torch.ones(2, P + 5, dtype=torch.long),
               token_type_ids=torch.cat([torch.zeros(2, P, dtype=torch.long), types], 1)).logits
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    without_types = model(**batch).logits
    assert not torch.allclose(ours, without_types, atol=1e-4)


def test_return_dict_false_gives_aligned_tuple():
    _, model = prompted("gpt2", "causal_lm")
    batch = make_batch("causal_lm", [4, 4])
    as_tuple = model(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[1], model(**batch).logits)
