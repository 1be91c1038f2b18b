"""TRL's online trainers (GRPO, RLOO), which collate lists of row dicts, train the prompt alone."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from models import make_model
from transformers import AutoTokenizer

from hf_softprompt import SoftPromptCallback, SoftPromptConfig, SoftPromptMixin

trl = pytest.importorskip("trl")  # in the test extra: always there in CI

TRAINERS = {"grpo": (trl.GRPOTrainer, trl.GRPOConfig), "rloo": (trl.RLOOTrainer, trl.RLOOConfig)}


def reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize("name", list(TRAINERS))
@pytest.mark.parametrize("path", ["mixin", "callback"])
def test_online_trainers_train_the_prompt_and_leave_the_base(tmp_path, tokenizer_dir, name, path):
    trainer_cls, config_cls = TRAINERS[name]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = Dataset.from_dict({"prompt": ["the movie was", "a film is", "the plot", "actors loved"]})
    args = config_cls(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=4, report_to="none", use_cpu=True, learning_rate=0.1, beta=0.0,
                      bf16=False, save_strategy="no")
    model = make_model("llama", "causal_lm", initializer_range=0.2)
    base = copy.deepcopy(model)
    config = SoftPromptConfig(num_virtual_tokens=3)
    if path == "mixin":
        trainer = type("Trainer", (SoftPromptMixin, trainer_cls), {})(
            model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer,
            soft_prompt_config=config)
    else:
        trainer = trainer_cls(model=model, reward_funcs=reward, args=args, train_dataset=data,
                              processing_class=tokenizer, callbacks=[SoftPromptCallback(config)])
    before = model.soft_prompts["default"]().detach().clone()
    trainer.train()
    assert trainer.state.global_step == 2
    assert not torch.equal(model.soft_prompts["default"]().detach(), before)
    base_state = base.state_dict()
    assert all(torch.equal(base_state[k], v) for k, v in model.state_dict().items() if k in base_state)


def test_use_vllm_is_refused_with_what_to_do(tmp_path, tokenizer_dir):
    args = trl.GRPOConfig(output_dir=str(tmp_path), use_vllm=True, report_to="none", use_cpu=True, bf16=False,
                          per_device_train_batch_size=2, num_generations=2)
    data = Dataset.from_dict({"prompt": ["the movie was", "a film is"]})
    with pytest.raises(ValueError, match=r"use_vllm=True\) is not supported with a soft prompt: .* use_vllm=False"):
        type("Trainer", (SoftPromptMixin, trl.GRPOTrainer), {})(
            model=make_model("llama", "causal_lm"), reward_funcs=reward, args=args, train_dataset=data,
            processing_class=AutoTokenizer.from_pretrained(tokenizer_dir),
            soft_prompt_config=SoftPromptConfig(num_virtual_tokens=2))


# ------------------------------------------------------------------ hand references
def hand_log_probs(bare, prompt, prompt_ids, prompt_mask, completion_ids):
    """Per-token log-probs of each completion under `bare` with `prompt`'s rows fed by hand in
    front of the row's real tokens (no padding), or with no prompt when `prompt` is None."""
    table = bare.get_input_embeddings().weight
    out = []
    for b in range(prompt_ids.shape[0]):
        ids = torch.cat([prompt_ids[b][prompt_mask[b].bool()], completion_ids[b]])
        embeds = table[ids] if prompt is None else torch.cat([prompt, table[ids]])
        logits = bare(inputs_embeds=embeds[None]).logits[0]
        start = embeds.shape[0] - completion_ids.shape[1] - 1  # the position that predicts completion token 0
        log_probs = logits[start:start + completion_ids.shape[1]].float().log_softmax(-1)
        out.append(log_probs.gather(-1, completion_ids[b][:, None])[:, 0])
    return torch.stack(out)


def online_trainer(name, tmp_path, tokenizer_dir, model, beta, **overrides):
    trainer_cls, config_cls = TRAINERS[name]
    data = Dataset.from_dict({"prompt": ["the movie was", "a film is", "the plot", "actors loved"]})
    args = config_cls(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=4, report_to="none", use_cpu=True, learning_rate=0.1, beta=beta,
                      bf16=False, save_strategy="no", **overrides)
    return type("Trainer", (SoftPromptMixin, trainer_cls), {})(
        model=model, reward_funcs=reward, args=args, train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(tokenizer_dir),
        soft_prompt_config=SoftPromptConfig(num_virtual_tokens=3, init="random"))


def test_grpo_log_probs_reference_and_prompt_gradient_equal_a_hand_reference(tmp_path, tokenizer_dir):
    """GRPO with a KL term (beta=0.1): TRL's per-token log-probs, its reference log-probs (the base model
    under the prompt, no copy loaded) and the prompt's gradient equal those of the GRPO loss written
    out by hand on a separate copy of the base model, with the prompt's rows fed as input embeddings."""
    model = make_model("llama", "causal_lm", initializer_range=0.2)
    bare = copy.deepcopy(model)
    beta, eps = 0.1, 0.2
    trainer = online_trainer("grpo", tmp_path, tokenizer_dir, model, beta, loss_type="grpo", epsilon=eps)
    assert type(trainer.ref_model).__name__ == "BaseModelReference" and trainer.beta == beta
    assert trainer.args.beta == beta
    seen = {}
    original = trainer._compute_loss

    def compute_loss(model_, inputs):
        seen["inputs"] = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in inputs.items()}
        seen["prompt"] = model.soft_prompts["default"]().detach().clone()
        return original(model_, inputs)

    trainer._compute_loss = compute_loss
    weight = model.soft_prompts["default"].embedding.weight
    grads = []
    weight.register_hook(lambda g: grads.append(g.detach().clone()))
    trainer.train()

    inputs, start = seen["inputs"], seen["prompt"]
    ids = inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"]
    mask = inputs["completion_mask"].float()
    with torch.no_grad():
        ref = hand_log_probs(bare, None, *ids)
    torch.testing.assert_close(inputs["ref_per_token_logps"] * mask, ref * mask, atol=2e-5, rtol=0)

    prompt = start.clone().requires_grad_(True)
    log_probs = hand_log_probs(bare, prompt, *ids)
    advantages = inputs["advantages"][:, None]
    coef_1 = torch.exp(log_probs - log_probs.detach())
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
    per_token = -torch.min(coef_1 * advantages, coef_2 * advantages)
    kl = torch.exp(ref - log_probs) - (ref - log_probs) - 1
    if trainer.args.use_bias_correction_kl:  # TRL's default: the KL term weighted by the importance ratio
        kl = kl * coef_1
    per_token = per_token + beta * kl
    loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    loss.backward()
    assert len(grads) == 1 and prompt.grad.abs().sum() > 0
    torch.testing.assert_close(grads[0], prompt.grad, atol=1e-6, rtol=1e-4)
    base_state = bare.state_dict()
    assert all(torch.equal(base_state[k], v) for k, v in model.state_dict().items() if k in base_state)


def test_rloo_with_a_kl_term_scores_the_reference_on_the_base_model_without_a_copy(tmp_path, tokenizer_dir):
    model = make_model("llama", "causal_lm", initializer_range=0.2)
    bare = copy.deepcopy(model)
    trainer = online_trainer("rloo", tmp_path, tokenizer_dir, model, 0.05)
    assert type(trainer.ref_model).__name__ == "BaseModelReference" and trainer.beta == 0.05
    assert not list(trainer.ref_model.parameters())  # no weights of its own: no second copy
    before = model.soft_prompts["default"]().detach().clone()
    trainer.train()
    assert not torch.equal(model.soft_prompts["default"]().detach(), before)
    prompt_ids, prompt_mask = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    completion_ids = torch.tensor([[12, 13, 14], [15, 16, 17]])
    with torch.no_grad():
        got, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.ref_model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, torch.ones_like(completion_ids)], 1), completion_ids.shape[1], batch_size=2)
        want = hand_log_probs(bare, None, prompt_ids, prompt_mask, completion_ids)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_sync_ref_model_is_refused_for_online_trainers(tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match=r"sync_ref_model=True .* Use sync_ref_model=False"):
        online_trainer("grpo", tmp_path, tokenizer_dir, make_model("llama", "causal_lm"), 0.1, sync_ref_model=True)
