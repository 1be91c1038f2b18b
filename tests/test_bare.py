"""`without_soft_prompt(model)`: inside it the prompted model computes exactly as its bare base model."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from models import CASES, make_model
from reference import make_batch

from hf_softprompt import SoftPromptConfig, add_soft_prompt, without_soft_prompt

P = 4


def prompted(family, task):
    base = make_model(family, task)
    model = add_soft_prompt(copy.deepcopy(base), SoftPromptConfig(num_virtual_tokens=P))
    with torch.no_grad():  # a prompt (and an own task head) far from the base's, so both show
        model.soft_prompts["default"].embedding.weight.normal_(0, 1.0)
        for param in model.soft_prompts.heads.parameters():
            param.add_(1.0)
    return base, model


def outputs(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("family,task", CASES)
def test_inside_the_block_the_model_is_the_bare_base_model(family, task):
    base, model = prompted(family, task)
    batch = make_batch(task, [5, 3])
    expected = outputs(base, batch)
    prompted_out = outputs(model, batch)
    assert any(not torch.allclose(prompted_out[k], v) for k, v in expected.items() if k in prompted_out)
    with without_soft_prompt(model) as same:
        assert same is model
        inside = outputs(model, {**batch, "soft_prompt_names": ["default", "default"]})  # choice dropped
    for key, value in expected.items():
        torch.testing.assert_close(inside[key], value, atol=0, rtol=0)
    torch.testing.assert_close(outputs(model, batch)["loss"], prompted_out["loss"])  # the prompt is back


@pytest.mark.parametrize("family,task", [("llama", "causal_lm"), ("t5", "seq2seq_lm")])
def test_generate_inside_the_block_is_the_base_model_s(family, task):
    base, model = prompted(family, task)
    batch = make_batch(task, [5, 5])
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4,
                  do_sample=False)
    with without_soft_prompt(model):
        inside = model.generate(**kwargs)
    assert torch.equal(inside, base.generate(**kwargs))


def test_the_block_covers_its_own_thread_only():
    base, model = prompted("llama", "causal_lm")
    batch = make_batch("causal_lm", [5, 4])
    expected_prompted = outputs(model, batch)["logits"]
    entered, other_done = threading.Event(), threading.Event()
    seen = {}

    def other_thread():
        entered.wait(5)
        seen["logits"] = outputs(model, batch)["logits"]
        other_done.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with without_soft_prompt(model):
        entered.set()
        other_done.wait(5)
        bare = outputs(model, batch)["logits"]
    thread.join()
    torch.testing.assert_close(seen["logits"], expected_prompted, atol=0, rtol=0)
    torch.testing.assert_close(bare, outputs(base, batch)["logits"], atol=0, rtol=0)


def test_a_model_without_a_prompt_is_refused():
    bare = make_model("gpt2", "causal_lm")
    with pytest.raises(ValueError, match="carries no soft prompt"), without_soft_prompt(bare):
        pass
