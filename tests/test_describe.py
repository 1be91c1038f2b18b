"""`describe_soft_prompt`: nearest vocabulary tokens of each virtual token (Lester et al. §7)."""

from __future__ import annotations

import pytest
import torch
from models import make_model
from transformers import AutoTokenizer

from hf_softprompt import SoftPromptConfig, add_soft_prompt, describe_soft_prompt, format_nearest_tokens

P = 4


@pytest.fixture
def prompted_llama():
    return add_soft_prompt(make_model("llama", "causal_lm"), SoftPromptConfig(num_virtual_tokens=P))


def test_virtual_token_equal_to_a_vocabulary_row_names_that_token(prompted_llama, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = ["great", "terrible", "plot", "review"]
    vocab = tokenizer.get_vocab()  # word -> id, read independently of the function under test
    table = prompted_llama.get_input_embeddings().weight
    with torch.no_grad():
        for row, word in enumerate(words):
            prompted_llama.soft_prompts["default"].embedding.weight[row] = table[vocab[word]]

    neighbours = describe_soft_prompt(prompted_llama, tokenizer, k=3)

    assert len(neighbours) == P
    for row, word in enumerate(words):
        token, similarity = neighbours[row][0]
        assert token == word
        assert similarity == pytest.approx(1.0, abs=1e-5)
        assert len(neighbours[row]) == 3
        sims = [s for _, s in neighbours[row]]
        assert sims == sorted(sims, reverse=True)
        assert sims[1] < 1.0 - 1e-4  # random rows are not parallel to the copied one


def test_matches_a_brute_force_cosine_search(prompted_llama, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    table = prompted_llama.get_input_embeddings().weight.detach()
    prompt = prompted_llama.soft_prompts["default"]().detach()
    neighbours = describe_soft_prompt(prompted_llama, tokenizer, k=2)
    id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
    for row in range(P):
        # The tiny model's table (96 rows) is larger than the tokenizer: only known ids count.
        sims = [float(torch.nn.functional.cosine_similarity(prompt[row], table[i], dim=0))
                for i in range(len(tokenizer))]
        best = max(range(len(sims)), key=sims.__getitem__)
        assert neighbours[row][0][0] == id_to_token[best]
        assert neighbours[row][0][1] == pytest.approx(sims[best], abs=1e-5)


def test_k_larger_than_the_vocabulary_returns_every_token(prompted_llama, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    neighbours = describe_soft_prompt(prompted_llama, tokenizer, k=10_000)
    assert all(len(row) == len(tokenizer) for row in neighbours)


def test_p_tuning_describes_the_encoder_output(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = SoftPromptConfig(num_virtual_tokens=P, encoder="mlp")
    model = add_soft_prompt(make_model("bert", "seq_cls"), config)
    vocab = tokenizer.get_vocab()
    table = model.get_input_embeddings().weight
    last = model.soft_prompts["default"].encoder[-1]
    with torch.no_grad():  # make the encoder output every row equal to the embedding of "good"
        for layer in model.soft_prompts["default"].encoder:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
        last.bias.copy_(table[vocab["good"]])
    assert [row[0][0] for row in describe_soft_prompt(model, tokenizer)] == ["good"] * P


def test_model_without_prompt_is_refused(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(ValueError, match="carries no soft prompt to describe"):
        describe_soft_prompt(make_model("llama", "causal_lm"), tokenizer)


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_bad_k_is_refused(prompted_llama, tokenizer_dir, k):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        describe_soft_prompt(prompted_llama, tokenizer, k=k)


def test_format_nearest_tokens_one_line_per_virtual_token():
    text = format_nearest_tokens([[("Ġgreat", 0.91234), ("good", 0.5)], [("plot", 0.25), ("a", -0.1)]])
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[1].split() == ["0", "'Ġgreat'", "0.912", "'good'", "0.500"]
    assert lines[2].split() == ["1", "'plot'", "0.250", "'a'", "-0.100"]
