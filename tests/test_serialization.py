"""Adapter files: exact layout, config round trip, PEFT interop both ways, checks on load."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import warnings

import pytest
import torch
from models import make_model, perturb_trainable
from peft import PeftModel, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from reference import make_batch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer

from hf_softprompt import SoftPromptConfig, add_soft_prompt, load_soft_prompt, save_soft_prompt
from hf_softprompt.files.adapter import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, METADATA_CONFIG_KEY
from hf_softprompt.files.load import load_soft_prompt_weights, read_adapter
from hf_softprompt.model.injector import get_injector

P = 4
ADAPTER = {ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME}
SAVED = ADAPTER | {"README.md"}  # save_soft_prompt writes a model card next to the adapter
# (family, task, PEFT task type, encoder): the interop matrix.
INTEROP = [
    ("gpt2", "causal_lm", "CAUSAL_LM", None),
    ("gpt2", "causal_lm", "CAUSAL_LM", "mlp"),
    ("llama", "causal_lm", "CAUSAL_LM", "lstm"),
    ("bert", "seq_cls", "SEQ_CLS", None),
    ("bert", "seq_cls", "SEQ_CLS", "mlp"),
    ("t5", "seq2seq_lm", "SEQ_2_SEQ_LM", None),
    ("t5", "seq2seq_lm", "SEQ_2_SEQ_LM", "mlp"),
]


def trained(family, task, seed=0, **config):
    """A prompted model whose prompt and head are far from their init (as after training)."""
    model = add_soft_prompt(make_model(family, task), SoftPromptConfig(num_virtual_tokens=P, **config))
    return perturb_trainable(model, seed + 1)


def outputs(model, task, lengths=(6, 6)):
    batch = make_batch(task, list(lengths))
    if task != "seq2seq_lm":
        batch.pop("labels", None)
    with torch.no_grad():
        return model(**batch).logits


def assert_untouched(model, before):
    assert get_injector(model) is None and not hasattr(model, "soft_prompts")
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


# ------------------------------------------------------------------ layout
@pytest.mark.parametrize("encoder", [None, "lstm", "residual"])
def test_exact_files_and_peft_only_json(tmp_path, encoder):
    model = trained("bert", "seq_cls", encoder=encoder)
    written = save_soft_prompt(model, tmp_path)
    assert set(os.listdir(tmp_path)) == SAVED
    assert sorted(written) == sorted(str(tmp_path / n) for n in SAVED)

    data = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    p_tuning = encoder in ("mlp", "lstm")  # PEFT has no residual encoder: its output exports as a prompt
    peft_cls = PromptEncoderConfig if p_tuning else PromptTuningConfig
    assert set(data) <= {f.name for f in dataclasses.fields(peft_cls)}  # nothing PEFT would reject
    assert data["peft_type"] == ("P_TUNING" if p_tuning else "PROMPT_TUNING")
    assert (data["task_type"], data["num_virtual_tokens"], data["token_dim"]) == ("SEQ_CLS", P, 32)
    assert data["num_transformer_submodules"] == 1
    with safe_open(tmp_path / ADAPTER_WEIGHTS_NAME, framework="pt") as f:
        keys = set(f.keys())
        prompt = f.get_tensor("prompt_embeddings")
    assert {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"} <= keys
    assert any(k.startswith("hf_softprompt.encoder.") for k in keys) == bool(encoder)
    torch.testing.assert_close(prompt, model.soft_prompts["default"]().detach())  # the export: through the encoder


@pytest.mark.parametrize("failing", ["weights", "config"])
def test_a_crash_while_saving_leaves_the_last_good_adapter(tmp_path, monkeypatch, failing):
    import hf_softprompt.files.save as serialization

    model = trained("gpt2", "causal_lm")
    save_soft_prompt(model, tmp_path)
    good = {name: (tmp_path / name).read_bytes() for name in SAVED}
    perturb_trainable(model, seed=7)  # training went on: the next save differs

    def crash_half_way(*args, **kwargs):
        # save_file(tensors, path) or write_text(path, text): the path is the str argument
        path = next(a for a in args if isinstance(a, str))
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # a kill, not just an exception

    name = {"weights": "save_file", "config": "write_text"}[failing]
    monkeypatch.setattr(serialization, name, crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_soft_prompt(model, tmp_path)
    assert set(os.listdir(tmp_path)) == SAVED  # no temporary file left behind
    assert {name: (tmp_path / name).read_bytes() for name in SAVED} == good
    monkeypatch.undo()
    save_soft_prompt(model, tmp_path)  # the next save goes through
    assert (tmp_path / ADAPTER_WEIGHTS_NAME).read_bytes() != good[ADAPTER_WEIGHTS_NAME]


def test_tokenizer_saved_next_to_adapter(tmp_path, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    expected = {os.path.basename(p) for p in tokenizer.save_pretrained(tmp_path / "tok_only")}
    save_soft_prompt(trained("gpt2", "causal_lm"), tmp_path / "a", tokenizer=tokenizer)
    assert set(os.listdir(tmp_path / "a")) == SAVED | expected


def test_config_round_trip(tmp_path):
    model = trained("bert", "token_cls", encoder="lstm", encoder_hidden_size=16, encoder_num_layers=1,
                    placement="after_first_token", init="sample_vocab")
    save_soft_prompt(model, tmp_path)
    config, _ = read_adapter(tmp_path)
    assert config == get_injector(model).bank.configs["default"]
    assert config.placement.value == "after_first_token" and config.encoder_hidden_size == 16


# ------------------------------------------------------------------ load_soft_prompt
@pytest.mark.parametrize("family,task,encoder", [("gpt2", "causal_lm", "mlp"), ("bert", "seq_cls", None),
                                                 ("t5", "seq2seq_lm", "lstm")])
def test_round_trip_same_outputs_frozen(tmp_path, family, task, encoder):
    model = trained(family, task, encoder=encoder)
    save_soft_prompt(model, tmp_path)
    loaded = load_soft_prompt(make_model(family, task), tmp_path)
    torch.testing.assert_close(outputs(loaded, task), outputs(model, task), atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    # The exact training state came back too (P-tuning encoder weights, not only its output).
    ours, theirs = model.soft_prompts["default"].state_dict(), loaded.soft_prompts["default"].state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("encoder", [None, "mlp"])
def test_is_trainable_continues_training(tmp_path, encoder):
    save_soft_prompt(trained("bert", "seq_cls", encoder=encoder), tmp_path)
    model = load_soft_prompt(make_model("bert", "seq_cls"), tmp_path, is_trainable=True)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("soft_prompts.prompts.default.", "soft_prompts.heads.default.classifier."))
                         for n in names)
    assert any(n.startswith("soft_prompts.prompts.default.encoder.") for n in names) == bool(encoder)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = make_batch("seq_cls", [6, 5, 4, 6], seed=3)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        assert model.soft_prompts["default"].embedding.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_resume_weights_into_existing_prompt(tmp_path):
    source = trained("gpt2", "causal_lm", encoder="lstm")
    save_soft_prompt(source, tmp_path)
    target = trained("gpt2", "causal_lm", seed=5, encoder="lstm")
    load_soft_prompt_weights(target, tmp_path)
    torch.testing.assert_close(outputs(target, "causal_lm"), outputs(source, "causal_lm"), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ PEFT interop
def peft_config(peft_task, encoder):
    if encoder is None:
        return PromptTuningConfig(task_type=peft_task, num_virtual_tokens=P)
    return PromptEncoderConfig(task_type=peft_task, num_virtual_tokens=P, encoder_hidden_size=16,
                               encoder_reparameterization_type=encoder.upper())


def peft_logits(peft_model, task):
    logits = outputs(peft_model, task)
    return logits[:, P:] if task == "causal_lm" else logits  # PEFT keeps the virtual positions


@pytest.mark.parametrize("family,task,peft_task,encoder", INTEROP)
def test_ours_loads_in_peft(tmp_path, family, task, peft_task, encoder):
    model = trained(family, task, encoder=encoder)
    save_soft_prompt(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "missing/unexpected keys" from PEFT
        peft_model = PeftModel.from_pretrained(make_model(family, task), str(tmp_path))
    torch.testing.assert_close(peft_logits(peft_model, task), outputs(model, task), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,task", [("llama", "causal_lm"), ("bert", "seq_cls")])
def test_a_residual_prompt_loads_in_peft_as_its_output_and_in_ours_whole(tmp_path, family, task):
    model = trained(family, task, encoder="residual")
    save_soft_prompt(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        peft_model = PeftModel.from_pretrained(make_model(family, task), str(tmp_path))
    torch.testing.assert_close(peft_logits(peft_model, task), outputs(model, task), atol=1e-5, rtol=0)
    ours = load_soft_prompt(make_model(family, task), tmp_path)
    assert get_injector(ours).bank.configs["default"].encoder.value == "residual"
    for got, want in zip(ours.soft_prompts["default"].state_dict().values(),
                         model.soft_prompts["default"].state_dict().values(), strict=True):
        assert torch.equal(got, want)  # the table and the encoder: training resumes where it was


@pytest.mark.parametrize("family,task,peft_task,encoder", INTEROP)
def test_peft_loads_in_ours(tmp_path, family, task, peft_task, encoder):
    peft_model = get_peft_model(make_model(family, task), peft_config(peft_task, encoder))
    perturb_trainable(peft_model)  # a trained-looking prompt and head
    peft_model.save_pretrained(str(tmp_path))
    if task == "seq2seq_lm":  # PEFT's default for seq2seq: a 2P-row table
        with safe_open(tmp_path / ADAPTER_WEIGHTS_NAME, framework="pt") as f:
            assert f.get_tensor("prompt_embeddings").shape[0] == 2 * P
    reloaded = PeftModel.from_pretrained(make_model(family, task), str(tmp_path))
    ours = load_soft_prompt(make_model(family, task), tmp_path)
    torch.testing.assert_close(outputs(ours, task), peft_logits(reloaded, task), atol=1e-5, rtol=0)


def test_peft_bin_adapter_loads_with_weights_only(tmp_path):
    peft_model = get_peft_model(make_model("gpt2", "causal_lm"), peft_config("CAUSAL_LM", None))
    peft_model.save_pretrained(str(tmp_path), safe_serialization=False)
    assert "adapter_model.bin" in os.listdir(tmp_path)
    ours = load_soft_prompt(make_model("gpt2", "causal_lm"), tmp_path)
    expected = peft_model.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(ours.soft_prompts["default"](), expected)


# ------------------------------------------------------------------ errors, before touching the model
def saved(tmp_path, family="bert", task="seq_cls", name_or_path=None, **config):
    model = make_model(family, task)
    if name_or_path:
        model.config._name_or_path = name_or_path
    save_soft_prompt(trained_from(model, **config), tmp_path)
    return tmp_path


def trained_from(model, **config):
    return add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=P, **config))


def two_label_head():
    model = make_model("bert", "seq_cls")
    model.classifier = torch.nn.Linear(32, 2)
    return model


@pytest.mark.parametrize("target,match", [
    (lambda: make_model("bert", "seq_cls", hidden_size=48),
     r"token_dim=32, but BertForSequenceClassification has token_dim=48"),
    (lambda: make_model("bert", "token_cls"),
     r"task_type='SEQ_CLS', but BertForTokenClassification has task_type='TOKEN_CLS'"),
    (two_label_head, r"classifier.bias of shape \(3,\), but the model's is \(2,\)"),
])
def test_mismatch_errors_name_both_values(tmp_path, target, match):
    path = saved(tmp_path)
    model = target()
    before = model.state_dict()
    with pytest.raises(ValueError, match=match):
        load_soft_prompt(model, path)
    assert_untouched(model, before)


def test_other_weights_are_refused_whatever_their_name(tmp_path):
    path = saved(tmp_path, name_or_path="org/base-a")
    other = make_model("bert", "seq_cls", seed=1)  # other weights, under the same name
    other.config._name_or_path = "org/base-a"
    before = other.state_dict()
    with pytest.raises(ValueError, match=r"trained on other weights than 'org/base-a'.*fingerprint"
                                         r".*check_base_model=False"):
        load_soft_prompt(other, path)
    assert_untouched(other, before)
    load_soft_prompt(other, path, check_base_model=False)


def test_the_same_weights_load_from_any_path_and_dtype(tmp_path):
    path = saved(tmp_path, name_or_path="/old/venv/site-packages/base")
    moved = make_model("bert", "seq_cls")  # the same weights, loaded from elsewhere, in bfloat16
    moved.config._name_or_path = "/new/place/base"
    load_soft_prompt(moved.to(torch.bfloat16), path)
    resized = make_model("bert", "seq_cls")
    resized.resize_token_embeddings(resized.config.vocab_size + 8)  # tokens added after training
    load_soft_prompt(resized, path)


def test_without_a_saved_fingerprint_the_names_decide(tmp_path):
    path = saved(tmp_path, name_or_path="org/base-a")
    _drop_fingerprint(path)  # as saved by an older hf-softprompt
    other = make_model("bert", "seq_cls")
    other.config._name_or_path = "org/base-b"
    with pytest.raises(ValueError, match=r"base_model_name_or_path='org/base-a', but the base model is "
                                         r"'org/base-b'.*check_base_model=False"):
        load_soft_prompt(other, path)
    load_soft_prompt(other, path, check_base_model=False)
    load_soft_prompt(make_model("bert", "seq_cls"), path)  # unknown name (built from config): no check


@pytest.mark.parametrize("names", [["default"], ["a", "b"]])
def test_the_saved_cards_loading_code_runs_as_written(tmp_path, names):
    base_dir = tmp_path / "base"
    make_model("gpt2", "causal_lm").save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    for seed, name in enumerate(names):
        add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=P), name=name)
        perturb_trainable(model, seed=seed)
    save_soft_prompt(model, tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the card's own code, as a user would paste it
    loaded, ids = scope["model"], torch.tensor([[5, 6, 7]])
    for name in names:
        with torch.no_grad():
            want = model(ids, soft_prompt_names=[name]).logits
            got = loaded(ids, soft_prompt_names=[name]).logits
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def _drop_fingerprint(path):
    weights = path / ADAPTER_WEIGHTS_NAME
    with safe_open(weights, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(metadata[METADATA_CONFIG_KEY])
    config["base_model_fingerprint"] = None
    save_file(tensors, weights, metadata={**metadata, METADATA_CONFIG_KEY: json.dumps(config)})


@pytest.mark.parametrize("damage,match", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "not a readable safetensors file"),
    (lambda p: p.write_bytes(b"\x00garbage" * 40), "not a readable safetensors file"),
    (lambda p: p.with_name(ADAPTER_CONFIG_NAME).write_text("{not json"),
     "adapter_config.json' is not valid JSON"),
])
def test_corrupt_files_clear_error(tmp_path, damage, match):
    path = saved(tmp_path)
    damage(path / ADAPTER_WEIGHTS_NAME)
    model = make_model("bert", "seq_cls")
    before = model.state_dict()
    with pytest.raises(ValueError, match=match):
        load_soft_prompt(model, path)
    assert_untouched(model, before)


def test_pickle_bin_refused(tmp_path):
    # Any pickled object other than tensors and containers stands for code that would run on load.
    torch.save({"prompt_embeddings": torch.zeros(P, 32), "payload": argparse.Namespace(run="code")},
               tmp_path / "adapter_model.bin")
    (tmp_path / ADAPTER_CONFIG_NAME).write_text(json.dumps(
        {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": P, "task_type": "SEQ_CLS", "token_dim": 32}))
    with pytest.raises(ValueError, match=r"weights_only=True.*Pickled code is never run"):
        load_soft_prompt(make_model("bert", "seq_cls"), tmp_path)


def test_other_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local adapter directory nor a Hub repo id"):
        load_soft_prompt(make_model("bert", "seq_cls"), str(tmp_path / "no" / "such" / "dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No adapter_config.json in"):
        load_soft_prompt(make_model("bert", "seq_cls"), tmp_path / "empty")
    path = saved(tmp_path / "ok")
    with pytest.raises(ValueError, match="already carries a soft prompt"):
        load_soft_prompt(load_soft_prompt(make_model("bert", "seq_cls"), path), path)


def test_missing_head_weights_warn(tmp_path):
    path = saved(tmp_path)
    weights = path / ADAPTER_WEIGHTS_NAME
    with safe_open(weights, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("base_model.")}
    save_file(tensors, weights, metadata=metadata)
    with pytest.warns(UserWarning, match=r"no weights for the task head \['classifier'\]"):
        load_soft_prompt(make_model("bert", "seq_cls"), path)


def test_peft_refuses_our_placement_silently_documented(tmp_path):
    """PEFT always prepends: an after_first_token prompt loads there but gives other outputs."""
    model = trained("bert", "seq_cls", placement="after_first_token")
    save_soft_prompt(model, tmp_path)
    peft_model = PeftModel.from_pretrained(make_model("bert", "seq_cls"), str(tmp_path))
    assert not torch.allclose(outputs(peft_model, "seq_cls"), outputs(model, "seq_cls"), atol=1e-4)
    ours = load_soft_prompt(make_model("bert", "seq_cls"), tmp_path)
    torch.testing.assert_close(outputs(ours, "seq_cls"), outputs(model, "seq_cls"), atol=1e-6, rtol=0)
