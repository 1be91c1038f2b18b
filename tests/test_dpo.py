"""TRL's DPOTrainer with `SoftPromptMixin` (the README's recipe), which gives it `BaseModelReference`: the
reference is the base model without the prompt, sharing the policy's weights (no second copy), and TRL's
loss equals the DPO loss of log-probs computed by hand: the prompt concatenated in front of an
untouched copy of the model for the policy, that copy alone for the reference. Both prompt paths
(gradient checkpointing puts the prompt in every row; without it the CPU default shares it), and
`precompute_ref_log_probs=True`."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import WORDS
from datasets import Dataset
from models import make_model
from transformers import AutoTokenizer

from hf_softprompt import BaseModelReference, SoftPromptCallback, SoftPromptConfig, SoftPromptMixin
from hf_softprompt.model.injector import get_injector

trl = pytest.importorskip("trl")  # in the test extra: always there in CI


class SoftPromptDPOTrainer(SoftPromptMixin, trl.DPOTrainer):
    """The README's recipe: given no ref_model, the mixin passes BaseModelReference(model)."""


def preferences(n: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": [" ".join(WORDS[i:i + 3]) for i in range(n)],
                              "chosen": [" " + " ".join(WORDS[i + 3:i + 5 + i % 2]) for i in range(n)],
                              "rejected": [" " + " ".join(WORDS[i + 6:i + 9]) for i in range(n)]})


def dpo(tmp_path, tokenizer_dir, **config):
    defaults = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, report_to="none",
                    use_cpu=True, save_strategy="no", disable_tqdm=True, max_length=32,
                    bf16=False)  # TRL's default bf16 autocast reaches the (prepared) reference: fp32 to compare
    model = make_model("llama", "causal_lm", initializer_range=0.2)
    base = copy.deepcopy(model)  # the untouched base model, for the hand-made log-probs
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    trainer = SoftPromptDPOTrainer(model=model, args=trl.DPOConfig(**{**defaults, **config}),
                                   train_dataset=preferences(), processing_class=tokenizer,
                                   soft_prompt_config=SoftPromptConfig(num_virtual_tokens=4))
    with torch.no_grad():  # a prompt far from the embedding table's scale, so a lost prompt shows
        get_injector(model).bank["default"].embedding.weight.normal_(0, 1.0)
    return trainer, base


def completion_logps(base, batch, prompt=None) -> torch.Tensor:
    """Per row: the sum of log p(token) over the completion tokens, under `base` with `prompt`
    ((P, D), concatenated by hand in front of every row) or without one."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    embeds = base.get_input_embeddings()(ids)
    if prompt is not None:
        b, p = ids.shape[0], prompt.shape[0]
        embeds = torch.cat([prompt.unsqueeze(0).expand(b, -1, -1), embeds], 1)
        mask = torch.cat([mask.new_ones(b, p), mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = base(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, -ids.shape[1]:]
    per_token = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (per_token * batch["completion_mask"][:, 1:]).sum(1)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's sigmoid loss from per-row completion log-probs of a [chosen; rejected] batch."""
    (pc, pr), (rc, rr) = policy.chunk(2), reference.chunk(2)
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


@pytest.mark.parametrize("checkpointing", [True, False])
def test_dpo_loss_equals_the_hand_made_loss_with_the_bare_model_as_reference(tmp_path, tokenizer_dir, checkpointing):
    trainer, base = dpo(tmp_path, tokenizer_dir, gradient_checkpointing=checkpointing)
    batch = next(iter(trainer.get_train_dataloader()))
    seen = []  # what TRL's reference forward returned inside the loss
    trainer.ref_model.register_forward_hook(lambda module, args, output: seen.append(output.log_probs))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    prompt = get_injector(trainer.model).bank["default"]().detach()
    with torch.no_grad():
        policy = completion_logps(base.train(), batch, prompt)
        reference = completion_logps(base, batch)
    width = batch["input_ids"].shape[1] - 1
    torch.testing.assert_close(seen[0][:, -width:].sum(1), reference, atol=1e-4, rtol=1e-5)
    expected = dpo_loss(policy, reference, trainer.beta)
    assert abs(float(policy.sum() - reference.sum())) > 1.0  # the prompt matters: a lost one would show
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    loss.backward()


def test_the_callback_with_stock_dpo_trainer_and_a_base_model_reference(tmp_path, tokenizer_dir):
    model = make_model("llama", "causal_lm", initializer_range=0.2)
    base = copy.deepcopy(model)
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, logging_steps=1,
                         use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = trl.DPOTrainer(model=model, ref_model=BaseModelReference(model), args=args,
                             train_dataset=preferences(), processing_class=AutoTokenizer.from_pretrained(tokenizer_dir),
                             callbacks=[SoftPromptCallback(SoftPromptConfig(num_virtual_tokens=4))])
    with torch.no_grad():
        get_injector(model).bank["default"].embedding.weight.normal_(0, 1.0)
    prompt = get_injector(model).bank["default"]().detach().clone()
    batch = next(iter(trainer.get_train_dataloader()))  # every pair: the mean loss is the step's, in any order
    trainer.train()
    with torch.no_grad():
        expected = dpo_loss(completion_logps(base, batch, prompt), completion_logps(base, batch), trainer.beta)
    logged = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    assert logged == pytest.approx(float(expected), rel=1e-5)


def test_the_reference_holds_no_copy_and_training_moves_only_the_prompt(tmp_path, tokenizer_dir):
    trainer, base = dpo(tmp_path, tokenizer_dir, max_steps=3, learning_rate=0.05)
    model = trainer.model
    assert isinstance(trainer.ref_model, BaseModelReference)
    assert list(trainer.ref_model.parameters()) == []  # nothing for a trainer to move, wrap or copy
    shared = {p.data_ptr() for p in model.parameters()}
    assert {t.data_ptr() for t in trainer.ref_model.state_dict().values()} <= shared
    assert trainer.ref_model.get_output_embeddings().weight is model.get_output_embeddings().weight
    before = get_injector(model).bank["default"].embedding.weight.detach().clone()
    trainer.train()
    assert not torch.allclose(get_injector(model).bank["default"].embedding.weight, before, atol=1e-4)
    trained = {n: p for n, p in model.named_parameters() if not n.startswith("soft_prompts.")}
    for name, param in base.named_parameters():
        torch.testing.assert_close(trained[name], param, atol=0, rtol=0, msg=name)


def assert_bare_reference_columns(trainer, base, data) -> None:
    model_columns = [c for c in data.column_names if not c.startswith("ref_")]
    batch = trainer.data_collator([{c: data[i][c] for c in model_columns} for i in range(len(data))])
    with torch.no_grad():
        chosen, rejected = completion_logps(base, batch).chunk(2)
    torch.testing.assert_close(torch.tensor(data["ref_chosen_logps"]), chosen, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(data["ref_rejected_logps"]), rejected, atol=1e-4, rtol=1e-5)


def test_precomputed_reference_log_probs_are_the_bare_models(tmp_path, tokenizer_dir):
    trainer, base = dpo(tmp_path, tokenizer_dir, precompute_ref_log_probs=True, learning_rate=0.5)
    assert_bare_reference_columns(trainer, base, trainer.train_dataset)  # computed in __init__
    trainer.train()
    # evaluate(new_dataset) precomputes again, after training: without BaseModelReference TRL would
    # score with the trained prompted model then (measured: 6.6 nats off), with it still the base.
    later = trainer._prepare_dataset(preferences(6).map(lambda row: {"prompt": row["prompt"] + " the"}),
                                     trainer.processing_class, trainer.args, "eval")
    assert_bare_reference_columns(trainer, base, trainer._precompute_ref_logps(later, "eval", 2))


def test_a_reference_of_ones_own_is_kept_and_sync_ref_model_is_refused(tmp_path, tokenizer_dir):
    own = make_model("llama", "causal_lm", seed=3)
    args = trl.DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    trainer = SoftPromptDPOTrainer(model=make_model("llama", "causal_lm"), ref_model=own, args=args,
                                   train_dataset=preferences(), processing_class=tokenizer)
    assert trainer.ref_model is own
    with pytest.raises(ValueError, match="sync_ref_model=True.*frozen base model"):
        dpo(tmp_path, tokenizer_dir, sync_ref_model=True)


def test_reference_needs_a_model_instance():
    with pytest.raises(TypeError, match="model instance"):
        BaseModelReference("HuggingFaceTB/SmolLM2-135M")
