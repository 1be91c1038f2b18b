"""TRL's SFTTrainer with `SoftPromptMixin` (the recipe in the README): TRL's own loss, computed by its
fused LM head, equals the loss of the prompt concatenated by hand in front of an untouched copy of
the model, for plain text, prompt-completion and conversational data, on both prompt paths
(gradient checkpointing puts the prompt in every row; without it the CPU default shares it); packed
and padding-free batches are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from models import make_model
from transformers import AutoTokenizer

from hf_softprompt import SoftPromptCallback, SoftPromptConfig, SoftPromptMixin, remove_soft_prompt
from hf_softprompt.model.injector import get_injector

trl = pytest.importorskip("trl")  # in the test extra: always there in CI


class SoftPromptSFTTrainer(SoftPromptMixin, trl.SFTTrainer):
    """The README's recipe."""


WORDS = "the a movie film was great bad not good terrible plot actors loved hated it is".split()
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"


def dataset(kind: str, n: int = 8) -> Dataset:
    texts = [" ".join(WORDS[i:i + 4 + i % 4]) for i in range(n)]
    if kind == "text":
        return Dataset.from_dict({"text": texts})
    if kind == "prompt_completion":
        return Dataset.from_dict({"prompt": [" ".join(WORDS[i:i + 3]) for i in range(n)],
                                  "completion": [" ".join(WORDS[i + 3:i + 5 + i % 3]) for i in range(n)]})
    return Dataset.from_dict({"messages": [[{"role": "user", "content": t}, {"role": "assistant", "content": "good"}]
                                           for t in texts]})


def sft(tmp_path, tokenizer_dir, kind="text", **config):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    defaults = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, report_to="none",
                    use_cpu=True, save_strategy="no", disable_tqdm=True, max_length=32)
    model = make_model("llama", "causal_lm", initializer_range=0.2)
    base = copy.deepcopy(model)
    trainer = SoftPromptSFTTrainer(model=model, args=trl.SFTConfig(**{**defaults, **config}),
                                   train_dataset=dataset(kind), processing_class=tokenizer,
                                   soft_prompt_config=SoftPromptConfig(num_virtual_tokens=4))
    with torch.no_grad():  # a prompt far from the embedding table's scale, so a lost prompt shows
        get_injector(model).bank["default"].embedding.weight.normal_(0, 1.0)
    return trainer, base


def reference_loss(base, prompt, batch):
    """Mean next-token loss of `base` on [prompt; tokens], virtual positions and labels[:, 0] never targets."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    b, p = ids.shape[0], prompt.shape[0]
    embeds = torch.cat([prompt.unsqueeze(0).expand(b, -1, -1), base.get_input_embeddings()(ids)], 1)
    full_mask = torch.cat([mask.new_ones(b, p), mask], 1)
    full_labels = torch.cat([labels.new_full((b, p + 1), -100), labels[:, 1:]], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    return base(inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions, labels=full_labels).loss


@pytest.mark.parametrize("kind", ["text", "prompt_completion", "conversational"])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_trl_loss_equals_the_prompt_concatenated_by_hand(tmp_path, tokenizer_dir, kind, checkpointing):
    trainer, base = sft(tmp_path, tokenizer_dir, kind, gradient_checkpointing=checkpointing)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" in batch
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))  # TRL's fused LM head
    prompt = get_injector(trainer.model).bank["default"]().detach()
    with torch.no_grad():
        expected = reference_loss(base.train(), prompt, batch)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    loss.backward()
    grad = get_injector(trainer.model).bank["default"].embedding.weight.grad
    assert grad is not None and grad.norm() > 0  # the prompt is what trains


def test_trl_trains_the_prompt_only(tmp_path, tokenizer_dir):
    # bf16=False: SFTConfig's default bf16 wraps forward in autocast, which the bare comparison below would see.
    trainer, base = sft(tmp_path, tokenizer_dir, max_steps=3, learning_rate=0.1, logging_steps=1, bf16=False)
    before = get_injector(trainer.model).bank["default"]().detach().clone()
    trainer.train()
    after = get_injector(trainer.model).bank["default"]().detach()
    assert not torch.equal(before, after)
    base_state = base.state_dict()
    assert all(torch.equal(base_state[k], v) for k, v in trainer.model.state_dict().items() if k in base_state)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and logs[0]["soft_prompt/default/grad_norm"] > 0

    # Removing the prompt leaves TRL's forward in place, over the bare model's.
    remove_soft_prompt(trainer.model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(trainer.model(input_ids=ids).logits, base(input_ids=ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("config", [dict(packing=True), dict(padding_free=True, max_length=None)])
def test_packed_batches_are_refused(tmp_path, tokenizer_dir, config):
    trainer, _ = sft(tmp_path, tokenizer_dir, **config)
    with pytest.raises(ValueError, match=r"packs several sequences into one row .* SFTConfig\(packing=False"):
        trainer.train()


def test_the_callback_with_sft_trainer_trains_the_prompt(tmp_path, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = make_model("llama", "causal_lm", initializer_range=0.2)
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                         report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, max_length=32,
                         logging_steps=1, learning_rate=0.1)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset("text"), processing_class=tokenizer,
                             callbacks=[SoftPromptCallback(SoftPromptConfig(num_virtual_tokens=4))])
    before = get_injector(model).bank["default"]().detach().clone()
    trainer.train()
    assert not torch.equal(before, get_injector(model).bank["default"]().detach())
    assert all(entry["soft_prompt/default/grad_norm"] > 0 for entry in trainer.state.log_history if "loss" in entry)


def test_several_prompts_through_sft_refuse_a_collator_that_drops_the_column(tmp_path, tokenizer_dir):
    """TRL's collator drops soft_prompt_ids: rows would silently train the active prompt."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = make_model("llama", "causal_lm", initializer_range=0.2)
    data = dataset("text").add_column("soft_prompt_ids", [i % 2 for i in range(8)])
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4,
                         report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, max_length=32)
    configs = {"a": SoftPromptConfig(num_virtual_tokens=2), "b": SoftPromptConfig(num_virtual_tokens=3)}
    trainer = SoftPromptSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                   soft_prompt_config=configs)
    before = {k: v.clone() for k, v in model.soft_prompts.state_dict().items()}
    with pytest.raises(ValueError, match=r"has a 'soft_prompt_ids' column, but this training batch has none: .* "
                                         r"every row would train the active prompt\. TRL's SFTTrainer collator"):
        trainer.train()
    assert all(torch.equal(v, before[k]) for k, v in model.soft_prompts.state_dict().items())
    model.eval()  # outside training the active prompt serves calls that choose none, as always
    model(input_ids=torch.tensor([[5, 6, 7]]))


def test_a_column_of_prompt_names_that_the_default_collator_drops_is_refused(tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_softprompt import SoftPromptCallback as Callback

    ids = torch.randint(3, 90, (4, 5)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids, "soft_prompt_names": ["a", "b", "a", "b"]})
    model = make_model("llama", "causal_lm")
    configs = {"a": SoftPromptConfig(num_virtual_tokens=2), "b": SoftPromptConfig(num_virtual_tokens=3)}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True,
                             per_device_train_batch_size=4)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Callback(configs)])
    with pytest.raises(ValueError, match=r"has a 'soft_prompt_names' column, but this training batch has none"):
        trainer.train()
