"""Push only the adapter (and its card), load it by repo id, and clear errors when the Hub fails."""

from __future__ import annotations

import logging
import os
import socket
import time

import huggingface_hub
import pytest
import torch
from datasets import Dataset
from hub_server import TEST_TOKEN, TEST_USER, patch_hf_client
from huggingface_hub import ModelCard
from models import make_model, perturb_trainable
from reference import make_batch
from transformers import AutoTokenizer, TrainingArguments

from hf_softprompt import (
    HubError,
    SoftPromptConfig,
    SoftPromptTrainer,
    add_soft_prompt,
    load_soft_prompt,
    save_soft_prompt,
)
from hf_softprompt.files.model_card import build_model_card

REPO = "me/sst2-prompt"
BASE = "test-org/tiny-bert"
ADAPTER = {"adapter_config.json", "adapter_model.safetensors"}
CARD = "README.md"


def prompted(seed=0, **config):
    """A tiny BERT classifier with a trained-looking prompt and head, named after a Hub base model."""
    model = add_soft_prompt(base(), SoftPromptConfig(num_virtual_tokens=4, **config))
    return perturb_trainable(model, seed + 1)


def base():
    model = make_model("bert", "seq_cls")
    model.config._name_or_path = BASE
    return model


def logits(model):
    batch = make_batch("seq_cls", [6, 4])
    batch.pop("labels")
    with torch.no_grad():
        return model.eval()(**batch).logits


def snapshot(directory):
    return {name: (directory / name).read_bytes() for name in os.listdir(directory)}


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# ------------------------------------------------------------------ save_soft_prompt(push_to_hub=True)
def test_push_uploads_adapter_card_tokenizer_only_and_loads_back(hub_server, tmp_path, tokenizer_dir):
    model = prompted(encoder="mlp")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    local = tmp_path / "adapter"
    local.mkdir()
    (local / "training_args.bin").write_bytes(b"not for the Hub")  # unrelated files stay local
    written = save_soft_prompt(model, local, push_to_hub=True, repo_id=REPO, tokenizer=tokenizer,
                               commit_message="Add prompt")

    tokenizer_files = {os.path.basename(p) for p in written} - ADAPTER
    assert tokenizer_files and "tokenizer.json" in tokenizer_files
    assert set(hub_server.files(REPO)) == ADAPTER | {CARD} | tokenizer_files
    assert [c["message"] for c in hub_server.commits(REPO)] == ["initial commit", "Add prompt"]
    for name in ADAPTER:
        assert hub_server.files(REPO)[name] == (local / name).read_bytes()

    card = ModelCard(hub_server.files(REPO)[CARD].decode())
    assert card.data.library_name == "hf-softprompt" and card.data.base_model == BASE
    assert {"soft-prompt", "p-tuning"} <= set(card.data.tags)
    snippet = (f'base = AutoModelForSequenceClassification.from_pretrained("{BASE}")\n'
               f'model = load_soft_prompt(base, "{REPO}")')
    assert snippet in card.text

    loaded = load_soft_prompt(base(), REPO, revision="main")
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_push_default_repo_name_and_revisions(hub_server, tmp_path):
    first, second = prompted(seed=1), prompted(seed=2)
    save_soft_prompt(first, tmp_path / "my-prompt", push_to_hub=True)
    repo = f"{TEST_USER}/my-prompt"  # the folder's name in the token's namespace
    assert set(hub_server.files(repo)) == ADAPTER | {CARD}
    first_commit = hub_server.head(repo)
    save_soft_prompt(second, tmp_path / "my-prompt", push_to_hub=True, repo_id=repo)

    torch.testing.assert_close(logits(load_soft_prompt(base(), repo)), logits(second), atol=1e-6, rtol=0)
    old = load_soft_prompt(base(), repo, revision=first_commit)
    torch.testing.assert_close(logits(old), logits(first), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ Hub failures
@pytest.mark.parametrize("path_contains", [None, "/commit/"])
def test_500_once_then_retry_succeeds(hub_server, tmp_path, path_contains):
    model = prompted()
    hub_server.fail_next(1, 500, path_contains=path_contains)
    with pytest.raises(HubError, match=r"Could not push to 'me/sst2-prompt' \(HTTP 500\): the Hub had a "
                                       r"server error: retry in a moment. The adapter was saved locally to "
                                       r".* \(3 files, complete\): run save_soft_prompt\(..., push_to_hub=True\) "
                                       r"again") as info:
        save_soft_prompt(model, tmp_path, push_to_hub=True, repo_id=REPO)
    assert info.value.status == 500 and info.value.__cause__ is not None
    assert not hub_server.repo_exists(REPO) or hub_server.files(REPO) == {}
    local = snapshot(tmp_path)
    assert set(local) == ADAPTER | {CARD}  # what the message says was saved
    load_soft_prompt(base(), tmp_path)  # the local copy is complete

    assert snapshot(tmp_path) == local  # loading did not touch it either

    save_soft_prompt(model, tmp_path, push_to_hub=True, repo_id=REPO)  # the retry
    assert set(hub_server.files(REPO)) == ADAPTER | {CARD}
    assert all(hub_server.files(REPO)[n] == (tmp_path / n).read_bytes() for n in ADAPTER | {CARD})


def test_401_wrong_token(hub_server, tmp_path):
    hub_server.require_token = TEST_TOKEN
    with pytest.raises(HubError, match=r"Could not push to 'me/sst2-prompt' \(HTTP 401\): the token was "
                                       r"refused: check token=, HF_TOKEN"):
        save_soft_prompt(prompted(), tmp_path, push_to_hub=True, repo_id=REPO, token="hf_wrong")
    save_soft_prompt(prompted(), tmp_path, push_to_hub=True, repo_id=REPO)  # the env token is accepted
    with pytest.raises(HubError, match=r"\(HTTP 401\): the token was refused") as info:
        load_soft_prompt(base(), REPO, token="hf_wrong")
    assert info.value.status == 401


def test_404_missing_repo_revision_and_files(hub_server):
    model = base()
    with pytest.raises(HubError, match=r"'me/missing'.*\(HTTP 404\): no such repo: check the repo id, or "
                                       r"pass token=") as info:
        load_soft_prompt(model, "me/missing")
    assert info.value.status == 404
    hub_server.add_commit("me/not-an-adapter", {"config.json": "{}"})
    with pytest.raises(HubError, match=r"holds none of \['adapter_config.json'\]"):
        load_soft_prompt(model, "me/not-an-adapter")
    with pytest.raises(HubError, match=r"at revision 'nope'.*\(HTTP 404\): no such revision"):
        load_soft_prompt(model, "me/not-an-adapter", revision="nope")
    assert not hasattr(model, "soft_prompt")


def test_unreachable_hub_fails_fast_and_cache_still_loads(hub_server, tmp_path, monkeypatch):
    model = prompted()
    save_soft_prompt(model, tmp_path / "a", push_to_hub=True, repo_id=REPO)
    load_soft_prompt(base(), REPO)  # now in the local cache
    patch_hf_client(monkeypatch, closed_port_url(), tmp_path / "hf_home")  # same cache, dead endpoint

    start = time.monotonic()
    with pytest.raises(HubError, match=r"Could not push to 'me/other': could not reach the Hub at "
                                       r"http://127.0.0.1:\d+: check the network, HF_ENDPOINT"):
        save_soft_prompt(model, tmp_path / "b", push_to_hub=True, repo_id="me/other")
    with pytest.raises(HubError, match=r"could not reach the Hub.*not in the local cache either.*no local "
                                       r"directory 'me/uncached' either"):
        load_soft_prompt(base(), "me/uncached")
    cached = load_soft_prompt(base(), REPO)
    assert time.monotonic() - start < 10  # no retries with back-off
    torch.testing.assert_close(logits(cached), logits(model), atol=1e-6, rtol=0)


def test_offline_reads_the_cache_only(hub_server, tmp_path, monkeypatch):
    model = prompted()
    save_soft_prompt(model, tmp_path, push_to_hub=True, repo_id=REPO)
    load_soft_prompt(base(), REPO)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    requests = len(hub_server.requests)
    torch.testing.assert_close(logits(load_soft_prompt(base(), REPO)), logits(model), atol=1e-6, rtol=0)
    with pytest.raises(HubError, match=r"not in the local cache and Hub access is off \(HF_HUB_OFFLINE=1"):
        load_soft_prompt(base(), "me/never-downloaded")
    assert len(hub_server.requests) == requests


# ------------------------------------------------------------------ SoftPromptTrainer
def make_trainer(tmp_path, tokenizer_dir, **overrides):
    batch = make_batch("seq_cls", [6] * 16, seed=1)
    dataset = Dataset.from_dict({k: v.tolist() for k, v in batch.items()})
    settings = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                    learning_rate=0.05, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                    disable_tqdm=True, push_to_hub=True, hub_model_id=REPO)
    settings.update(overrides)
    return SoftPromptTrainer(model=base(), args=TrainingArguments(**settings), train_dataset=dataset,
                             processing_class=AutoTokenizer.from_pretrained(tokenizer_dir),
                             soft_prompt_config=SoftPromptConfig(num_virtual_tokens=4))


def test_trainer_push_to_hub_uploads_adapter_and_card_only(hub_server, tmp_path, tokenizer_dir):
    trainer = make_trainer(tmp_path, tokenizer_dir)
    assert hub_server.repo_exists(REPO)  # created by the Trainer's __init__
    trainer.train()
    commit = trainer.push_to_hub()

    out = tmp_path / "out"
    assert {"training_args.bin", "tokenizer.json"} <= set(os.listdir(out))  # written, not pushed
    assert set(hub_server.files(REPO)) == ADAPTER | {CARD}
    assert commit.oid == hub_server.head(REPO)
    assert hub_server.commits(REPO)[-1]["message"] == "End of training"
    card = ModelCard(hub_server.files(REPO)[CARD].decode())
    assert card.data.library_name == "hf-softprompt" and card.data.base_model == BASE
    assert "## Training results" in card.text and "train_loss" in card.text

    loaded = load_soft_prompt(base(), REPO)
    torch.testing.assert_close(logits(loaded), logits(trainer.model), atol=1e-6, rtol=0)


def test_trainer_push_tokenizer_on_request(hub_server, tmp_path, tokenizer_dir):
    trainer = make_trainer(tmp_path, tokenizer_dir)
    trainer.train()
    trainer.push_to_hub(push_tokenizer=True)
    pushed = set(hub_server.files(REPO))
    assert {"tokenizer.json", "tokenizer_config.json"} <= pushed
    assert pushed - ADAPTER - {CARD} <= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    downloaded = AutoTokenizer.from_pretrained(REPO, revision="main")  # from the test Hub
    assert downloaded("the movie was great")["input_ids"] == trainer.processing_class(
        "the movie was great")["input_ids"]

    trainer.processing_class = None
    with pytest.raises(ValueError, match=r"push_tokenizer=True, but the Trainer has no processing_class"):
        trainer.push_to_hub(push_tokenizer=True)


@pytest.mark.parametrize("strategy,extra", [
    ("every_save", set()),
    ("checkpoint", {f"last-checkpoint/{n}" for n in ADAPTER}),
    ("all_checkpoints", {f"checkpoint-{s}/{n}" for s in (2, 4) for n in ADAPTER}),
    ("end", None),
])
def test_trainer_hub_strategies_push_adapter_only(hub_server, tmp_path, tokenizer_dir, strategy, extra):
    trainer = make_trainer(tmp_path, tokenizer_dir, save_strategy="steps", save_steps=2,
                           hub_strategy=strategy, hub_always_push=True)
    trainer.train()
    trainer._finish_current_push()
    messages = [c["message"] for c in hub_server.commits(REPO)]
    if extra is None:  # hub_strategy="end": nothing during training
        assert messages == ["initial commit"]
        trainer.push_to_hub()
        extra = set()
    else:
        assert messages == ["initial commit", "Training in progress, step 2", "Training in progress, step 4"]
    assert set(hub_server.files(REPO)) == ADAPTER | {CARD} | extra
    loaded = load_soft_prompt(base(), REPO)
    torch.testing.assert_close(logits(loaded), logits(trainer.model), atol=1e-6, rtol=0)


def test_trainer_background_push_failure_is_logged_not_fatal(hub_server, tmp_path, tokenizer_dir, caplog):
    trainer = make_trainer(tmp_path, tokenizer_dir, save_strategy="steps", save_steps=2,
                           hub_strategy="every_save", hub_always_push=True)
    hub_server.fail_next(1, 500, path_contains="/commit/")
    with caplog.at_level(logging.WARNING, logger="hf_softprompt.files.hub"):
        trainer.train()
        trainer._finish_current_push()
    assert "Background push failed: Could not push to 'me/sst2-prompt' (HTTP 500)" in caplog.text
    messages = [c["message"] for c in hub_server.commits(REPO)]
    assert messages == ["initial commit", "Training in progress, step 4"]


# ------------------------------------------------------------------ model card
def test_model_card_contents():
    config = SoftPromptConfig(num_virtual_tokens=8, encoder="lstm", task_type="CAUSAL_LM", token_dim=32,
                              base_model_name_or_path="/local/path/to/model", base_model_gguf_file="m.Q4_1.gguf")
    history = [{"loss": 2.0, "step": 1, "epoch": 0.5}, {"eval_loss": 1.5, "eval_accuracy": 0.6, "step": 2,
                "epoch": 1.0, "eval_runtime": 0.1}, {"eval_loss": 1.2, "eval_accuracy": 0.7, "step": 4,
                "epoch": 2.0}, {"train_runtime": 3.0, "train_loss": 1.7, "step": 4, "epoch": 2.0}]
    card = build_model_card(config, repo_id="me/x", training_results=history, tags=["sst2"])
    assert card.data.library_name == "hf-softprompt" and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model is None  # a local path is no Hub base_model
    assert card.data.tags == ["hf-softprompt", "soft-prompt", "p-tuning", "sst2"]
    snippet = ('base = AutoModelForCausalLM.from_pretrained("/local/path/to/model", gguf_file="m.Q4_1.gguf")\n'
               'model = load_soft_prompt(base, "me/x")')
    assert snippet in card.text and "fingerprint" in card.text  # a local path: a moved copy loads too
    assert "| encoder | lstm |" in card.text and "| num_virtual_tokens | 8 |" in card.text
    assert "| eval_accuracy | 0.7 |" in card.text and "| train_loss | 1.7 |" in card.text
    evals = "| epoch | step | eval_accuracy | eval_loss |\n|---|---|---|---|\n| 1 | 2 | 0.6 | 1.5 |\n"
    assert evals in card.text
    assert "runtime" not in card.text and "P-tuning with an LSTM encoder" in card.text
    plain = build_model_card(SoftPromptConfig(task_type="SEQ_CLS"), training_results={"eval_f1": 0.5})
    assert "prompt-tuning" in plain.data.tags and "| eval_f1 | 0.5 |" in plain.text
