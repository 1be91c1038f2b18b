"""transformers pipelines: the prompt chosen per call or per input reaches the model."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from models import make_model, perturb_trainable
from transformers import AutoTokenizer, pipeline

from hf_softprompt import (
    SoftPromptConfig,
    add_soft_prompt,
    prompted_pipeline,
    remove_soft_prompt,
    set_active_soft_prompt,
    using_soft_prompt,
)

TEXTS = ["the movie was good", "bad film", "a the of", "good good bad movie"]
NAMES = ["a", "b", None, "a"]


def prompted(family: str, task: str) -> torch.nn.Module:
    model = make_model(family, task)
    for name, tokens in [("a", 3), ("b", 5)]:
        add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=tokens, init="random"), name=name)
    return perturb_trainable(model, seed=3, std=1.0)  # prompts (and heads) far apart


def one_by_one(pipe, model, texts, names, **kwargs):
    """The reference: each input alone, its prompt made the model's active one."""
    out = []
    for text, name in zip(texts, names, strict=True):
        set_active_soft_prompt(model, name)
        out.append(pipe([text], **kwargs)[0])
    set_active_soft_prompt(model, "a")
    return out


@pytest.mark.parametrize("task,family,kwargs", [
    ("text-classification", "bert", {"top_k": None}),
    ("token-classification", "bert", {}),
    ("text-generation", "llama", {"max_new_tokens": 4, "do_sample": False, "return_full_text": False}),
    ("feature-extraction", "bert", {}),
])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_per_input_prompts_equal_each_input_alone(tokenizer_dir, task, family, kwargs, batch_size):
    head = {"text-classification": "seq_cls", "token-classification": "token_cls",
            "text-generation": "causal_lm", "feature-extraction": "base"}[task]
    model = prompted(family, head)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pipe = pipeline(task, model=model, tokenizer=tokenizer, batch_size=batch_size)
    want = one_by_one(pipe, model, TEXTS, NAMES, **kwargs)
    got = unpadded(prompted_pipeline(pipe)(TEXTS, soft_prompt_names=NAMES, **kwargs), want, task)
    assert_same(got, want)
    # The prompts matter: the same inputs under prompt "b" alone give other outputs.
    other = prompted_pipeline(pipe)(TEXTS, soft_prompt_names="b", **kwargs)
    alone = one_by_one(pipe, model, TEXTS, ["b"] * len(TEXTS), **kwargs)
    assert not same(alone, want)
    assert_same(unpadded(other, alone, task), alone)


def unpadded(outputs, alone, task):
    # The feature-extraction pipeline returns a batch's padding positions too: keep each input's own.
    if task != "feature-extraction":
        return outputs
    return [[out[0][: len(ref[0])]] for out, ref in zip(outputs, alone, strict=True)]


def test_using_soft_prompt_holds_for_the_block_and_this_thread_only(tokenizer_dir):
    model = prompted("bert", "seq_cls")
    pipe = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir),
                    top_k=None)
    want = {name: one_by_one(pipe, model, TEXTS, [name] * len(TEXTS)) for name in ("a", "b", None)}
    with using_soft_prompt(model, "b"):
        assert_same(pipe(TEXTS), want["b"])
        with using_soft_prompt(model, None):
            assert_same(pipe(TEXTS), want[None])
        seen = {}
        thread = threading.Thread(target=lambda: seen.update(out=pipe(TEXTS)))
        thread.start()
        thread.join()
        assert_same(seen["out"], want["a"])  # another thread keeps the model's active prompt
        assert_same(pipe(TEXTS), want["b"])
    assert_same(pipe(TEXTS), want["a"])
    # An explicit choice in a call wins over the block's.
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad(), using_soft_prompt(model, "b"):
        inside = model(ids, soft_prompt_names=["a"]).logits
    with torch.no_grad():
        torch.testing.assert_close(inside, model(ids, soft_prompt_names=["a"]).logits, rtol=0, atol=0)


def test_bad_choices_are_refused_with_the_fix(tokenizer_dir):
    model = prompted("bert", "seq_cls")
    pipe = prompted_pipeline(pipeline("text-classification", model=model,
                                      tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir)))
    with pytest.raises(ValueError, match=r"soft_prompt_names has 2 entries for 4 inputs"):
        pipe(TEXTS, soft_prompt_names=["a", "b"])
    with pytest.raises(TypeError, match=r"inputs must be a list, got str"):
        pipe("good film", soft_prompt_names=["a"])
    with pytest.raises(ValueError, match=r"using_soft_prompt names 'c', which BertForSequenceClassification does "
                                         r"not carry; its prompts are \['a', 'b'\]"):
        pipe(TEXTS, soft_prompt_names=["a", "c", None, "a"])
    with pytest.raises(ValueError, match=r"carries no soft prompt"):
        prompted_pipeline(pipeline("text-classification", model=make_model("bert", "seq_cls"),
                                   tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir)))
    with using_soft_prompt(model, "b"):
        remove_soft_prompt(model, "b")
        with pytest.raises(ValueError, match=r"inside using_soft_prompt\(model, 'b'\), but 'b' was removed"):
            pipe.pipeline(TEXTS)


def same(a, b) -> bool:
    try:
        assert_same(a, b)
    except AssertionError:
        return False
    return True


def assert_same(a, b) -> None:
    """Equal structures; floats (scores, features) to 1e-5 (batched and single calls pad differently)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (a, b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, (float, np.floating)):
        assert a == pytest.approx(b, abs=1e-5), (a, b)
    else:
        assert a == b, (a, b)
