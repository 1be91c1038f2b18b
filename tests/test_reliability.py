"""What is guaranteed under stress: concurrent calls, edits of the weights, failed attaches, bad
inputs, crashes while saving."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from models import PAD, make_model, perturb_trainable
from reference import make_batch
from safetensors.torch import save_file

from hf_softprompt import (
    SoftPromptConfig,
    SoftPromptTrainer,
    add_soft_prompt,
    load_soft_prompt,
    save_soft_prompt,
    soft_prompt_names,
)
from hf_softprompt.files.load import load_soft_prompt_weights
from hf_softprompt.model.injector import get_injector
from hf_softprompt.training.checkpoints import last_complete_checkpoint

HERE = os.path.dirname(__file__)


def prompted(family="llama", task="causal_lm", seed=1, **config):
    model = add_soft_prompt(make_model(family, task), SoftPromptConfig(num_virtual_tokens=4, **config))
    add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=2, **config), name="other")
    return perturb_trainable(model, seed)


# ------------------------------------------------------------------ 1. threads
def _calls(case):
    """(model, [inputs of different shapes], run)"""
    if case in ("plain", "shared", "mixed"):
        model = prompted(shared_prompt_cache=case != "plain")
        inputs = [make_batch("causal_lm", [3 + i % 5] * (1 + i % 3), "left", seed=i) for i in range(12)]
        if case == "mixed":
            for i, batch in enumerate(inputs):
                rows = range(len(batch["labels"]))
                batch["soft_prompt_names"] = [("default", "other", None)[(i + r) % 3] for r in rows]

        def run(batch):
            with torch.no_grad():
                out = model(**batch)
            return [out.loss, out.logits]
    elif case == "seq2seq":
        model = prompted("t5", "seq2seq_lm")
        inputs = [make_batch("seq2seq_lm", [2 + i % 6] * (1 + i % 3), seed=i, target_len=2 + i % 3) for i in range(12)]

        def run(batch):
            with torch.no_grad():
                out = model(**batch)
            return [out.loss, out.logits]
    else:  # generate, greedy, with per-row prompts
        model = prompted()
        inputs = []
        for i in range(8):
            batch = make_batch("causal_lm", [2 + i % 4] * (1 + i % 2), "left", seed=i)
            inputs.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                           "soft_prompt_names": [("default", "other")[(i + r) % 2] for r in range(1 + i % 2)]})

        def run(batch):
            return [model.generate(**batch, max_new_tokens=4, min_new_tokens=4, pad_token_id=PAD)]
    return model, inputs, run


@pytest.mark.parametrize("case", ["plain", "shared", "mixed", "seq2seq", "generate"])
def test_concurrent_calls_equal_sequential_ones(case):
    _, inputs, run = _calls(case)
    sequential = [run(x) for x in inputs]
    with ThreadPoolExecutor(max_workers=6) as pool:
        concurrent = list(pool.map(run, inputs * 4))
    for i, got in enumerate(concurrent):
        for a, b in zip(got, sequential[i % len(inputs)], strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ 2. fresh prompt cache
def _edit(model, how, tmp_path):
    prompt = model.soft_prompts["default"]
    weight = prompt.embedding.weight
    v_proj = model.model.layers[0].self_attn.v_proj.weight
    if how == "optimizer_step":
        optimizer = torch.optim.SGD(prompt.parameters(), lr=1000.0)
        model(**make_batch("causal_lm", [5, 3])).loss.backward()
        optimizer.step()
    elif how == "load_state_dict":
        prompt.load_state_dict({"embedding.weight": torch.randn_like(weight)})
    elif how == "in_place_no_grad":
        with torch.no_grad():
            weight.mul_(-1.5)
    elif how == "data_copy":
        weight.data.copy_(torch.randn_like(weight))
    elif how == "data_slice":
        weight.data[:] = torch.randn_like(weight)
    elif how == "base_data":  # the prompt's keys/values depend on every layer's weights
        v_proj.data.normal_(0, 2.0, generator=torch.Generator().manual_seed(0))
    elif how == "base_no_grad":
        with torch.no_grad():
            v_proj.normal_(0, 2.0, generator=torch.Generator().manual_seed(0))
    elif how == "other_adapter":
        other = prompted(seed=9)
        save_soft_prompt(other, tmp_path / "other")
        load_soft_prompt_weights(model, tmp_path / "other")
    elif how == "to_dtype":
        model.to(torch.float64)


@pytest.mark.parametrize("how", ["optimizer_step", "load_state_dict", "in_place_no_grad", "data_copy",
                                 "data_slice", "base_data", "base_no_grad", "other_adapter", "to_dtype"])
def test_generate_never_uses_a_stale_prompt_cache(how, tmp_path):
    model = prompted()
    batch = make_batch("causal_lm", [5, 3], "left", seed=2)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    options = dict(max_new_tokens=6, min_new_tokens=6, pad_token_id=PAD)
    before = model.generate(**inputs, **options)
    _edit(model, how, tmp_path)
    after = model.generate(**inputs, **options)
    # A model that never generated, with the edited weights, computed from scratch.
    fresh = prompted().to(next(model.parameters()).dtype)
    fresh.load_state_dict(model.state_dict())
    assert after.tolist() == fresh.generate(**inputs, **options).tolist()
    if how != "to_dtype":  # float64 computes the same tokens
        assert after.tolist() != before.tolist()  # the edit mattered


# ------------------------------------------------------------------ 3. atomic attach
def _snapshot(model):
    return ({n: p.requires_grad for n, p in model.named_parameters()},
            {k: v.clone() for k, v in model.state_dict().items()}, dict(model.__dict__.items()))


def _assert_same(model, snapshot):
    flags, state, attrs = snapshot
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert set(model.__dict__) == set(attrs) and model.__dict__.get("forward") is attrs.get("forward")


@pytest.mark.parametrize("bad", [
    dict(trainable_modules=["classifier", "nope"]),
    dict(task_type="CAUSAL_LM"),
    dict(num_virtual_tokens=128),
    dict(token_dim=7),
])
def test_a_failed_add_leaves_the_model_as_it_was(bad):
    model = make_model("bert", "seq_cls")
    model.bert.encoder.layer[0].requires_grad_(False)
    before = _snapshot(model)
    with pytest.raises(ValueError):
        add_soft_prompt(model, SoftPromptConfig(**bad))
    _assert_same(model, before)
    add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=2))  # a retry just works
    assert soft_prompt_names(model) == ["default"]


def test_a_failure_late_in_attach_is_rolled_back(monkeypatch):
    import hf_softprompt.model.attach as attach

    model = add_soft_prompt(make_model("bert", "seq_cls"), SoftPromptConfig(num_virtual_tokens=2))
    before = _snapshot(model)

    def fail(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(attach, "install_routing", fail)  # after the bank took the second prompt
    with pytest.raises(RuntimeError, match="injected"):
        add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=3), name="second")
    _assert_same(model, before)
    assert soft_prompt_names(model) == ["default"]
    bare = make_model("bert", "seq_cls")
    flags = {n: p.requires_grad for n, p in bare.named_parameters()}
    with pytest.raises(RuntimeError, match="injected"):  # the first prompt: nothing left behind at all
        add_soft_prompt(bare, SoftPromptConfig(num_virtual_tokens=3))
    assert get_injector(bare) is None and "forward" not in bare.__dict__ and not hasattr(bare, "soft_prompts")
    assert {n: p.requires_grad for n, p in bare.named_parameters()} == flags


# ------------------------------------------------------------------ 4-5. refused with a clear message
def test_mismatched_and_bad_inputs_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"task_type='SEQ_CLS' does not match GPT2LMHeadModel, a CAUSAL_LM model"):
        add_soft_prompt(make_model("gpt2", "causal_lm"), SoftPromptConfig(task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match=r"task_type='CAUSAL_LM' does not match BertForSequenceClassification"):
        add_soft_prompt(make_model("bert", "seq_cls"), SoftPromptConfig(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match=r"num_virtual_tokens=200 leaves no room for input: GPT2LMHeadModel has 128"):
        add_soft_prompt(make_model("gpt2", "causal_lm"), SoftPromptConfig(num_virtual_tokens=200))
    with pytest.raises(ValueError, match=r"a number in \[0, 1\), got 'abc'"):
        SoftPromptConfig(encoder_dropout="abc")
    with pytest.warns(UserWarning, match=r"encoder_dropout=0.1 has no effect with an MLP encoder"):
        SoftPromptConfig(encoder="mlp", encoder_dropout=0.1)
    with pytest.warns(UserWarning, match=r"has no effect with a 1-layer LSTM"):
        SoftPromptConfig(encoder="lstm", encoder_num_layers=1, encoder_dropout=0.1)
    with pytest.raises(ValueError, match=r"a PEFT adapter_config.json \(peft_type='LORA'\)"):
        SoftPromptConfig.from_dict({"peft_type": "LORA", "r": 8, "target_modules": ["q"]})
    with pytest.raises(ValueError, match=r"None of the keys \['r'\] is a SoftPromptConfig field"):
        SoftPromptConfig.from_dict({"r": 8})
    meta = make_model("gpt2", "causal_lm").to("meta")
    with pytest.raises(ValueError, match=r"weights are on the meta device"):
        add_soft_prompt(meta, SoftPromptConfig())

    model = prompted("gpt2")
    ids = torch.randint(3, 96, (2, 5))
    with pytest.raises(ValueError, match=r"Pass input_ids or inputs_embeds, not both"):
        model(input_ids=ids, inputs_embeds=model.get_input_embeddings()(ids))
    with pytest.raises(ValueError, match=r"labels has shape \(2, 4\) for an input of shape \(2, 5\)"):
        model(input_ids=ids, labels=ids[:, :4])


def _peft_style_adapter(directory, prompt, **json_overrides):
    os.makedirs(directory, exist_ok=True)
    save_file({"prompt_embeddings": prompt}, os.path.join(directory, "adapter_model.safetensors"))
    data = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": prompt.shape[0],
            "token_dim": 32, **json_overrides}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))


@pytest.mark.parametrize("prompt,json_overrides,match", [
    (torch.randn(4, 32), {"num_virtual_tokens": 6}, r"inconsistent: prompt_embeddings has shape \(4, 32\), its "
                                                    r"config says 6 virtual tokens"),
    (torch.ones(4, 32, dtype=torch.long), {}, r"prompt_embeddings of dtype torch.int64; a prompt is a table"),
    (torch.randn(4, 32), {"num_virtual_tokens": None}, r"num_virtual_tokens=None; a prompt adapter needs"),
    (torch.randn(4, 32), {"peft_type": "LORA"}, r"peft_type='LORA'; only PROMPT_TUNING and P_TUNING"),
])
def test_bad_adapter_files_are_refused(tmp_path, prompt, json_overrides, match):
    _peft_style_adapter(tmp_path, prompt, **json_overrides)
    with pytest.raises(ValueError, match=match):
        load_soft_prompt(make_model("gpt2", "causal_lm"), tmp_path)


def test_adapter_config_that_is_not_an_object_and_bad_subfolders(tmp_path):
    _peft_style_adapter(tmp_path, torch.randn(4, 32))
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"holds a JSON list, not an object"):
        load_soft_prompt(make_model("gpt2", "causal_lm"), tmp_path)
    with pytest.raises(ValueError, match=r"subfolder must be a relative path inside the repo"):
        load_soft_prompt(make_model("gpt2", "causal_lm"), tmp_path, subfolder="../elsewhere")


def test_weights_beside_another_save_s_config_are_refused(tmp_path):
    model = prompted("gpt2")
    save_soft_prompt(model, tmp_path / "a")
    other = add_soft_prompt(make_model("gpt2", "causal_lm"), SoftPromptConfig(num_virtual_tokens=4, init="sample_vocab",
                                                                              trainable_modules=["lm_head"]))
    save_soft_prompt(other, tmp_path / "b")
    (tmp_path / "a" / "adapter_config.json").write_bytes((tmp_path / "b" / "adapter_config.json").read_bytes())
    with pytest.raises(ValueError, match=r"come from different saves \(an interrupted save"):
        load_soft_prompt(make_model("gpt2", "causal_lm"), tmp_path / "a")


# ------------------------------------------------------------------ 6. files
def test_saved_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_soft_prompt(prompted("gpt2"), tmp_path)
    finally:
        os.umask(old)
    for root, _, files in os.walk(tmp_path):
        for name in files:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o644, name


def test_temporary_files_of_a_crashed_save_are_cleared_by_the_next(tmp_path):
    save_soft_prompt(prompted("gpt2"), tmp_path)
    leftovers = [tmp_path / ".adapter_model.safetensors.abc123.tmp",
                 tmp_path / ".soft_prompts.pending.json.abc123.tmp"]  # killed while writing the journal
    for leftover in leftovers:
        leftover.write_bytes(b"half")
    save_soft_prompt(prompted("gpt2"), tmp_path)
    assert [leftover.exists() for leftover in leftovers] == [False, False]


# ------------------------------------------------------------------ 7. kill -9
@pytest.mark.slow
def test_kill_9_while_saving_never_leaves_an_unloadable_adapter(tmp_path):
    out = tmp_path / "adapter"
    script = f"""
import sys; sys.path.insert(0, {HERE!r})
from models import make_model
from hf_softprompt import SoftPromptConfig, add_soft_prompt, save_soft_prompt
model = add_soft_prompt(make_model("gpt2", "causal_lm"), SoftPromptConfig(
    num_virtual_tokens=8, encoder="mlp", encoder_hidden_size=1024))  # ~4 MB: a save takes a while
save_soft_prompt(model, {str(out)!r})
print("ready", flush=True)
while True:
    with __import__("torch").no_grad():
        for p in model.soft_prompts["default"].parameters():
            p.add_(1.0)
    save_soft_prompt(model, {str(out)!r})
"""
    for kill in range(6):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.07 * kill)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        load_soft_prompt(make_model("gpt2", "causal_lm"), out)  # the last complete save, whole
    save_soft_prompt(prompted("gpt2"), out)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_resume_true_skips_an_incomplete_newest_checkpoint(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    ids = torch.randint(3, 96, (8, 5), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, save_steps=1, save_strategy="steps",
                             per_device_train_batch_size=4, report_to="none", use_cpu=True, disable_tqdm=True)
    SoftPromptTrainer(model=make_model("llama", "causal_lm"), args=args, train_dataset=data,
                      soft_prompt_config=SoftPromptConfig(num_virtual_tokens=2)).train()
    broken = tmp_path / "checkpoint-3"  # what a kill during the third save leaves: no trainer_state.json
    os.makedirs(broken)
    (broken / "adapter_model.safetensors").write_bytes(b"")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    args = copy.deepcopy(args)
    args.max_steps = 3
    trainer = SoftPromptTrainer(model=make_model("llama", "causal_lm"), args=args, train_dataset=data,
                                soft_prompt_config=SoftPromptConfig(num_virtual_tokens=2))
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 3
