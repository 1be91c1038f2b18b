"""Prompt inits, encoders, freezing, removal, dtypes, checkpointing and early errors."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from models import enable_activation_checkpointing, is_activation_checkpointing, make_model
from reference import make_batch

from hf_softprompt import SoftPromptConfig, add_soft_prompt, remove_soft_prompt
from hf_softprompt.prompt import LSTMPromptEncoder, MLPPromptEncoder, ResidualPromptEncoder


# ------------------------------------------------------------------- inits
def test_random_init_shape_and_scale():
    model = add_soft_prompt(make_model("gpt2", "causal_lm"), SoftPromptConfig(num_virtual_tokens=6))
    table = model.soft_prompts["default"].embedding.weight
    assert table.shape == (6, 32) and table.dtype == torch.float32
    vocab_std = model.get_input_embeddings().weight.std().item()
    assert 0.5 * vocab_std < table.std().item() < 2 * vocab_std


def test_sample_vocab_rows_are_vocabulary_rows():
    model = make_model("llama", "causal_lm")
    vocab = model.get_input_embeddings().weight.detach().clone()
    add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=8, init="SAMPLE_VOCAB"))
    for row in model.soft_prompts["default"].embedding.weight.detach():
        assert (vocab == row).all(-1).any()


@pytest.mark.parametrize("num_virtual,expected_words", [
    (3, ["classify", "the", "sentiment"]),  # truncated
    (8, ["classify", "the", "sentiment", ":", "classify", "the", "sentiment", ":"]),  # repeated
])
def test_text_init_truncates_or_repeats(tokenizer_dir, num_virtual, expected_words):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = make_model("gpt2", "causal_lm")
    vocab = model.get_input_embeddings().weight.detach().clone()
    add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=num_virtual, init="text",
                                            init_text="classify the sentiment :",
                                            tokenizer_name_or_path=tokenizer_dir))
    expected_ids = tokenizer.convert_tokens_to_ids(expected_words)
    torch.testing.assert_close(model.soft_prompts["default"].embedding.weight.detach(), vocab[expected_ids])


def test_text_inits_load_their_tokenizer_once_and_again_when_it_is_saved_anew(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    def save_tokenizer(words: list[str]) -> None:
        tok = Tokenizer(models.WordLevel({"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path)

    loads = []
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: loads.append(a) or real(*a, **k))
    model = make_model("gpt2", "causal_lm")
    vocab = model.get_input_embeddings().weight.detach().clone()

    def text_prompt(name: str, text: str) -> torch.Tensor:
        config = SoftPromptConfig(num_virtual_tokens=2, init="text", init_text=text,
                                  tokenizer_name_or_path=str(tmp_path))
        return add_soft_prompt(model, config, name=name).soft_prompts[name].embedding.weight.detach()

    save_tokenizer(["alpha", "beta", "gamma"])
    torch.testing.assert_close(text_prompt("a", "alpha beta"), vocab[[1, 2]])
    torch.testing.assert_close(text_prompt("b", "gamma alpha"), vocab[[3, 1]])
    assert len(loads) == 1  # one tokenizer for both prompts
    save_tokenizer(["gamma", "beta", "alpha"])  # the same path, other ids: read again, not the stale one
    torch.testing.assert_close(text_prompt("c", "alpha beta"), vocab[[3, 2]])
    assert len(loads) == 2


def test_text_init_empty_text_error(tokenizer_dir):
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        add_soft_prompt(make_model("gpt2", "causal_lm"),
                        SoftPromptConfig(init="text", init_text="   ", tokenizer_name_or_path=tokenizer_dir))


# ---------------------------------------------------------------- encoders
def test_mlp_encoder_layout():
    model = add_soft_prompt(make_model("gpt2", "causal_lm"),
                            SoftPromptConfig(num_virtual_tokens=5, encoder="mlp", encoder_hidden_size=12))
    encoder = model.soft_prompts["default"].encoder
    assert isinstance(encoder, MLPPromptEncoder)
    assert [type(m).__name__ for m in encoder] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [m.weight.shape for m in encoder if hasattr(m, "weight")] == [(12, 32), (12, 12), (32, 12)]
    table = model.soft_prompts["default"].embedding.weight
    torch.testing.assert_close(model.soft_prompts["default"](), encoder(table))


def test_lstm_encoder_layout():
    model = add_soft_prompt(make_model("gpt2", "causal_lm"),
                            SoftPromptConfig(num_virtual_tokens=5, encoder="lstm", encoder_hidden_size=12,
                                             encoder_num_layers=2, encoder_dropout=0.1))
    encoder = model.soft_prompts["default"].encoder
    assert isinstance(encoder, LSTMPromptEncoder)
    assert encoder.lstm_head.bidirectional and encoder.lstm_head.num_layers == 2
    assert encoder.mlp_head[0].weight.shape == (24, 24) and encoder.mlp_head[2].weight.shape == (32, 24)
    assert model.soft_prompts["default"]().shape == (5, 32)


def test_residual_encoder_starts_at_the_init_and_trains_its_branch(tokenizer_dir):
    config = SoftPromptConfig(num_virtual_tokens=5, encoder="residual", encoder_hidden_size=6, init="text",
                              init_text="the movie was good", tokenizer_name_or_path=tokenizer_dir)
    model = add_soft_prompt(make_model("gpt2", "causal_lm"), config)
    prompt = model.soft_prompts["default"]
    encoder = prompt.encoder
    assert isinstance(encoder, ResidualPromptEncoder)
    assert (encoder.down.weight.shape, encoder.up.weight.shape) == ((6, 32), (32, 6))
    plain = add_soft_prompt(make_model("gpt2", "causal_lm"), dataclasses.replace(config, encoder=None))
    assert torch.equal(prompt(), plain.soft_prompts["default"]())  # exactly the text init
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for step in range(2):
        optimizer.zero_grad()
        model(**make_batch("causal_lm", [5, 3])).loss.backward()
        if step == 0:  # the branch's scale first, then the MLP behind it
            assert encoder.norm.weight.grad.abs().sum() > 0 and encoder.up.weight.grad.abs().sum() == 0
        optimizer.step()
    assert encoder.up.weight.grad.abs().sum() > 0 and encoder.down.weight.grad.abs().sum() > 0
    x = prompt.embedding.weight
    torch.testing.assert_close(prompt(), x + encoder.norm(encoder.up(torch.relu(encoder.down(x)))))


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_p_tuning_trains_encoder_and_table(encoder):
    model = add_soft_prompt(make_model("gpt2", "causal_lm"),
                            SoftPromptConfig(num_virtual_tokens=4, encoder=encoder, encoder_hidden_size=8))
    model(**make_batch("causal_lm", [5, 3])).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("soft_prompts.prompts.default.") for n in grads)
    assert any("encoder" in n for n in grads) and "soft_prompts.prompts.default.embedding.weight" in grads
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


# --------------------------------------------------- freezing and removal
HEADS = "soft_prompts.heads.default."


@pytest.mark.parametrize("family,task,heads", [
    ("gpt2", "causal_lm", set()),
    ("bert", "seq_cls", {HEADS + "classifier.weight", HEADS + "classifier.bias"}),
    ("gpt2", "seq_cls", {HEADS + "score.weight"}),
    ("bert", "qa", {HEADS + "qa_outputs.weight", HEADS + "qa_outputs.bias"}),
    ("t5", "seq2seq_lm", set()),
])
def test_only_prompt_and_head_train_and_base_is_bit_identical(family, task, heads):
    model = add_soft_prompt(make_model(family, task), SoftPromptConfig(num_virtual_tokens=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # The prompt owns a copy of the task head: the base model, its own head included, never changes.
    assert trainable == {"soft_prompts.prompts.default.embedding.weight"} | heads
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(**make_batch(task, [5, 4])).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (name in trainable), name
        if name not in trainable:
            assert param.grad is None, name


def test_explicit_trainable_modules():
    model = add_soft_prompt(make_model("bert", "seq_cls"),
                            SoftPromptConfig(num_virtual_tokens=4, trainable_modules=[]))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "soft_prompts.prompts.default.embedding.weight"}
    with pytest.raises(ValueError, match="trainable_modules names 'nope', but BertForSequenceClassification"):
        add_soft_prompt(make_model("bert", "seq_cls"), SoftPromptConfig(trainable_modules=["nope"]))


def test_remove_restores_model_exactly():
    base = make_model("llama", "causal_lm")
    base.model.layers[0].mlp.requires_grad_(False)  # a user's own freezing survives the round trip
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    batch = make_batch("causal_lm", [5, 3], "left")
    want = base(**batch).logits
    model = add_soft_prompt(base, SoftPromptConfig(num_virtual_tokens=4))
    assert model is base and type(model).__name__ == "LlamaForCausalLM"
    remove_soft_prompt(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not hasattr(model, "soft_prompts")
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__  # the class's own again
    torch.testing.assert_close(model(**batch).logits, want)


def test_add_twice_and_remove_twice_errors():
    model = add_soft_prompt(make_model("gpt2", "causal_lm"), SoftPromptConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="already carries a soft prompt named 'default'"):
        add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=2))
    remove_soft_prompt(model)
    with pytest.raises(ValueError, match="carries no soft prompt to remove"):
        remove_soft_prompt(model)


def test_model_keeps_its_signature_for_trainer_column_detection():
    import inspect

    base = make_model("bert", "seq_cls")
    before = inspect.signature(base.forward).parameters
    model = add_soft_prompt(base, SoftPromptConfig(num_virtual_tokens=2))
    after = inspect.signature(model.forward).parameters
    # The model's own arguments, in order, plus the per-row prompt choice (kept as dataset columns).
    assert [n for n in after if n not in ("soft_prompt_names", "soft_prompt_ids")] == list(before)
    assert all(after[n] == p for n, p in before.items())
    assert after["soft_prompt_ids"].kind is inspect.Parameter.KEYWORD_ONLY


# ------------------------------------------------------------------ errors
def test_too_long_input_fails_before_compute():
    model = add_soft_prompt(make_model("gpt2", "causal_lm"), SoftPromptConfig(num_virtual_tokens=10))
    ids = torch.randint(3, 96, (1, 120))
    with pytest.raises(ValueError, match=r"exceed the model's 128 positions. Truncate inputs to at most 118"):
        model(input_ids=ids)


def test_model_without_inputs_embeds_is_refused():
    class NoEmbeds(torch.nn.Module):
        config = make_model("gpt2", "causal_lm").config

        def get_input_embeddings(self):
            return torch.nn.Embedding(4, 4)

        def forward(self, input_ids):
            return input_ids

    with pytest.raises(ValueError, match="does not accept `inputs_embeds`"):
        add_soft_prompt(NoEmbeds(), SoftPromptConfig(task_type="CAUSAL_LM"))


def test_wrong_mask_length_is_an_error():
    model = add_soft_prompt(make_model("gpt2", "causal_lm"), SoftPromptConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="attention_mask has 3 positions for an input of 5 tokens"):
        model(input_ids=torch.ones(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 3, dtype=torch.long))


def test_causal_lm_refuses_after_first_token_placement():
    with pytest.raises(ValueError, match="placement='after_first_token' is for encoders"):
        add_soft_prompt(make_model("gpt2", "causal_lm"), SoftPromptConfig(placement="after_first_token"))


# ------------------------------------------- dtypes and activation checkpointing
def test_prompt_stays_float32_in_bf16_model():
    model = add_soft_prompt(make_model("llama", "causal_lm"), SoftPromptConfig(num_virtual_tokens=4))
    model.to(torch.bfloat16)
    assert model.soft_prompts["default"].embedding.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    out = model(**make_batch("causal_lm", [5, 3]))
    out.loss.backward()
    assert model.soft_prompts["default"].embedding.weight.grad.dtype == torch.float32
    assert torch.isfinite(model.soft_prompts["default"].embedding.weight.grad).all()


def test_bf16_autocast_training_step():
    model = add_soft_prompt(make_model("gpt2", "causal_lm"), SoftPromptConfig(num_virtual_tokens=4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**make_batch("causal_lm", [5, 3])).loss
    loss.backward()
    grad = model.soft_prompts["default"].embedding.weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_activation_checkpointing_gives_same_gradients(family):
    task = "seq_cls" if family == "bert" else "causal_lm"
    plain = add_soft_prompt(make_model(family, task), SoftPromptConfig(num_virtual_tokens=4))
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed, {"use_reentrant": True})
    assert is_activation_checkpointing(checkpointed)
    for model in (plain, checkpointed):
        model.train()
        model(**make_batch(task, [6, 4])).loss.backward()
    torch.testing.assert_close(checkpointed.soft_prompts["default"].embedding.weight.grad,
                               plain.soft_prompts["default"].embedding.weight.grad, atol=1e-6, rtol=1e-5)
