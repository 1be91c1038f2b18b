"""The prompt set as a unit: one rule for names wherever they enter, and what `soft_prompts.json` may say."""

from __future__ import annotations

import base64
import io
import json
import os

import pytest
import torch
from models import make_model

from hf_softprompt import (
    SoftPromptConfig,
    add_soft_prompt,
    get_active_soft_prompt,
    load_soft_prompt,
    save_soft_prompt,
    set_active_soft_prompt,
    soft_prompt_names,
)
from hf_softprompt.serving import PromptEmbedder, encode_prompt_embeds

RULE = r"Invalid soft prompt name .*: a prompt name is a non-empty string of at most 128 characters"
BAD_NAMES = ["type", "train", "to", "forward", "state_dict", "a.b", "../x", "/abs", "a\\b", "a\x00b", "x" * 129,
             "界" * 90, " padded", "", None, 3]


def two_prompts(family="llama"):
    model = make_model(family, "causal_lm")
    for name in ("x", "y"):
        add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=2), name=name)
    return model


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_bad_name_is_refused_at_add_with_the_rule_and_the_model_untouched(name):
    model = two_prompts()
    with pytest.raises(ValueError, match=RULE):
        add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=2), name=name)
    assert soft_prompt_names(model) == ["x", "y"]


@pytest.mark.parametrize("name", ["sentiment", "名前", "täst-1", "a b", "x" * 128])
def test_good_names_save_and_load_back(tmp_path, name):
    model = add_soft_prompt(make_model("gpt2", "causal_lm"), SoftPromptConfig(num_virtual_tokens=2), name=name)
    save_soft_prompt(model, tmp_path)
    other = load_soft_prompt(make_model("gpt2", "causal_lm"), tmp_path)
    assert soft_prompt_names(other) == [name]
    torch.testing.assert_close(other.soft_prompts[name](), model.soft_prompts[name](), atol=0, rtol=0)


def test_a_bad_name_is_refused_at_load():
    with pytest.raises(ValueError, match=RULE):
        load_soft_prompt(make_model("gpt2", "causal_lm"), "/nonexistent", name="type")


def saved_set(tmp_path):
    model = two_prompts()
    save_soft_prompt(model, tmp_path)
    return model


def edit_index(directory, **changes):
    path = os.path.join(directory, "soft_prompts.json")
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.mark.parametrize("prompts", [["x", "../y"], ["x", "/tmp/y"], ["x", "type"]])
def test_an_index_naming_a_path_or_a_bad_name_is_refused_by_load_and_serving(tmp_path, prompts):
    saved_set(tmp_path / "set")
    edit_index(tmp_path / "set", prompts=prompts)
    with pytest.raises(ValueError, match=r"Invalid soft prompt name .* in .*soft_prompts\.json: a prompt name is"):
        load_soft_prompt(make_model("llama", "causal_lm"), tmp_path / "set")
    make_model("llama", "causal_lm").save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=RULE):
        PromptEmbedder.from_pretrained(str(tmp_path / "base"), prompts=str(tmp_path / "set"))


def test_an_index_listing_a_name_twice_is_refused_as_damaged(tmp_path):
    saved_set(tmp_path)
    edit_index(tmp_path, prompts=["x", "y", "x"])
    with pytest.raises(ValueError, match=r"lists \['x'\] more than once, so the set it describes is damaged"):
        load_soft_prompt(make_model("llama", "causal_lm"), tmp_path)


def test_no_active_prompt_loads_as_no_active_prompt(tmp_path):
    model = two_prompts()
    set_active_soft_prompt(model, None)  # calls that name no prompt: the bare model
    save_soft_prompt(model, tmp_path)
    loaded = load_soft_prompt(make_model("llama", "causal_lm"), tmp_path)
    assert get_active_soft_prompt(loaded) is None
    ids = torch.randint(3, 90, (2, 5))
    bare = make_model("llama", "causal_lm")
    torch.testing.assert_close(loaded(input_ids=ids).logits, bare(input_ids=ids).logits, atol=0, rtol=0)


def test_an_index_with_an_unknown_active_prompt_is_refused(tmp_path):
    saved_set(tmp_path)
    edit_index(tmp_path, active="z")
    with pytest.raises(ValueError, match=r"names active='z', which is not one of its prompts \['x', 'y'\]"):
        load_soft_prompt(make_model("llama", "causal_lm"), tmp_path)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@torch.no_grad()
def test_rows_that_each_fit_share_a_batch_however_wide_it_is(family):
    """128 positions: 8 virtual + 110 real and 100 virtual + 20 real each fit, though the padded
    batch is 100 + 110 wide; each row's output equals the row alone. A row that does not fit is
    refused by number."""
    model = make_model(family, "causal_lm")
    for name, n in (("short", 8), ("long", 100)):
        add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=n), name=name)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (2, 110), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :90] = 0  # left padding: the second row has 20 real tokens
    names = ["short", "long"]
    logits = model(input_ids=ids, attention_mask=mask, soft_prompt_names=names).logits
    for row, name in enumerate(names):
        alone = model(input_ids=ids[row:row + 1, -int(mask[row].sum()):], soft_prompt_names=[name]).logits
        torch.testing.assert_close(logits[row:row + 1, -alone.shape[1]:], alone, atol=1e-4, rtol=0)
    out = model.generate(input_ids=ids, attention_mask=mask, soft_prompt_names=names, max_new_tokens=2,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (2, 112)
    mask[1, 80:90] = 1  # 100 virtual + 30 real: one row too long
    with pytest.raises(ValueError, match=r"The prompt \(100 virtual tokens\) plus the input \(30 tokens\) in row 1 "
                                         r"exceed the model's 128 positions\. Truncate inputs to at most 28 tokens"):
        model(input_ids=ids, attention_mask=mask, soft_prompt_names=names)


# ------------------------------------------------------------------- serving trusts no input
def served(tmp_path, num_virtual_tokens=8):
    base = tmp_path / "base"
    make_model("llama", "causal_lm").save_pretrained(base)
    model = add_soft_prompt(make_model("llama", "causal_lm"), SoftPromptConfig(num_virtual_tokens=num_virtual_tokens))
    save_soft_prompt(model, tmp_path / "p")
    return str(base), model


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_prompt_holding_nan_or_inf_is_refused_by_serving_and_load(tmp_path, value):
    base, model = served(tmp_path)
    with torch.no_grad():
        model.soft_prompts["default"].embedding.weight[3, 5] = value
    save_soft_prompt(model, tmp_path / "p")
    with pytest.raises(ValueError, match=r"holds NaN or infinite values in \['prompt_embeddings'"):
        PromptEmbedder.from_pretrained(base, prompts=tmp_path / "p")
    with pytest.raises(ValueError, match=r"NaN or infinite values .* Load an earlier checkpoint"):
        load_soft_prompt(make_model("llama", "causal_lm"), tmp_path / "p")


def test_too_long_advice_is_never_a_negative_number_of_tokens(tmp_path):
    base, _ = served(tmp_path)
    embedder = PromptEmbedder.from_pretrained(base, prompts=tmp_path / "p")  # 128 positions, 8 virtual
    with pytest.raises(ValueError, match=r"Truncate the input to at most 20 tokens\.$"):
        embedder([5] * 30, prompt="default", max_new_tokens=100)
    with pytest.raises(ValueError, match=r"leave no room for an input: lower max_new_tokens below 120") as err:
        embedder([5] * 30, prompt="default", max_new_tokens=125)
    assert "at most -" not in str(err.value)


def test_one_request_sliced_from_a_batch_sends_only_its_own_rows():
    batch = torch.randn(64, 40, 32)
    alone = encode_prompt_embeds(batch[3].clone())
    sliced = encode_prompt_embeds(batch[3])
    assert abs(len(sliced) - len(alone)) < 200  # the same payload, not the 64x larger storage
    decoded = torch.load(io.BytesIO(base64.b64decode(sliced)), weights_only=True)
    assert torch.equal(decoded, batch[3])


# ------------------------------------------------------------------ the set on disk is one unit
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
KILL_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {here!r})
from models import make_model
from hf_softprompt import SoftPromptConfig, add_soft_prompt, save_soft_prompt
import hf_softprompt.files.commit as commit
model = make_model("llama", "causal_lm")
for name in ("x", "y", "z"):
    add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=2), name=name)
    with torch.no_grad():
        model.soft_prompts[name].embedding.weight.fill_({value})
calls = {{"n": 0}}
real_replace, real_write = os.replace, commit._write_journal
def dying_replace(src, dst):  # the process is killed after `after` renames of the commit
    if src.endswith(".tmp") and "pending" not in src:
        if calls["n"] == {after}:
            os._exit(9)
        calls["n"] += 1
    return real_replace(src, dst)
def dying_journal(root, journal):  # killed while the files are written, before the commit point
    if {after} < 0:
        os._exit(9)
    return real_write(root, journal)
os.replace, commit._write_journal = dying_replace, dying_journal
save_soft_prompt(model, sys.argv[1])
"""


_BASE_WEIGHTS = make_model("llama", "causal_lm").state_dict()


def base_model():
    # make_model seeds torch's one global generator, which other threads draw from meanwhile (a
    # prompt's random init): the same weights every time, whatever the threads do.
    model = make_model("llama", "causal_lm")
    model.load_state_dict(_BASE_WEIGHTS)
    return model


def values_of(directory):
    model = load_soft_prompt(base_model(), directory)
    return {name: float(model.soft_prompts[name]().mean()) for name in soft_prompt_names(model)}


def save_all(directory, value):
    model = base_model()
    for name in ("x", "y", "z"):
        add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=2), name=name)
        with torch.no_grad():
            model.soft_prompts[name].embedding.weight.fill_(value)
    save_soft_prompt(model, directory)


@pytest.mark.parametrize("after", [-1, 0, 1, 3, 6])
def test_a_save_killed_at_any_point_leaves_the_old_or_the_new_set(tmp_path, after):
    save_all(tmp_path, 1.0)
    script = KILL_SCRIPT.format(here=HERE, value=2.0, after=after)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 9, result.stderr[-2000:]
    expected = 1.0 if after < 0 else 2.0  # before the commit point: the old set; after it: the new one
    assert values_of(tmp_path) == {"x": expected, "y": expected, "z": expected}

    def leftovers():
        return [name for _, _, files in os.walk(tmp_path) for name in files
                if name.endswith(".tmp") or "pending" in name]

    if after >= 0:  # the reader finished the interrupted commit: nothing of it is left
        assert leftovers() == []
    save_all(tmp_path, 3.0)  # the next save clears what a kill before the commit point left
    assert leftovers() == [] and values_of(tmp_path) == {"x": 3.0, "y": 3.0, "z": 3.0}


def test_concurrent_writers_take_turns_and_readers_never_see_a_mix(tmp_path):
    save_all(tmp_path, 0.0)
    errors, seen = [], []

    def writer(value):
        try:
            for _ in range(3):
                save_all(tmp_path, value)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def reader():
        try:
            for _ in range(6):
                seen.append(values_of(tmp_path))
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(float(v),)) for v in range(1, 5)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert seen and all(len(set(values.values())) == 1 for values in seen), seen  # each read: one save's set
    assert len(set(values_of(tmp_path).values())) == 1


def test_a_prompt_removed_during_a_call_fails_that_call_clearly():
    """A head a prompt owns is looked up as the call reaches it: a prompt removed in between (from
    another thread) must fail the call, never send its rows through the base head."""
    from hf_softprompt import remove_soft_prompt

    model = make_model("bert", "seq_cls")
    for name in ("a", "b"):
        add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=2), name=name)
    encoder = model.bert.encoder
    def remove_b(*args):  # mid-call, between the encoder and the heads
        remove_soft_prompt(model, "b")

    handle = encoder.register_forward_hook(remove_b)
    with pytest.raises(RuntimeError, match=r"Soft prompt 'b' was removed while a call using it was running"):
        model(input_ids=torch.randint(3, 90, (2, 5)), soft_prompt_names=["a", "b"])
    handle.remove()
