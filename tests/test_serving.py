"""PromptEmbedder: each request's `prompt_embeds` is the sequence our injector feeds the model."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil

import pytest
import torch
from models import make_model, perturb_trainable
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_softprompt import SoftPromptConfig, add_soft_prompt, load_soft_prompt, save_soft_prompt
from hf_softprompt.serving import PromptEmbedder, encode_prompt_embeds

IDS = [1, 7, 12, 5, 30, 9]


def _saved_base(tmp_path, family="llama", dtype=torch.float32, **save_kwargs):
    """A tiny causal LM saved with save_pretrained, and the same weights loaded back."""
    path = str(tmp_path / f"base-{family}")
    make_model(family, "causal_lm").to(dtype).save_pretrained(path, **save_kwargs)
    return path


def _load(base: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(base).eval()


def _prompts(model, specs, seed=1):
    """Add `{name: SoftPromptConfig kwargs}` to `model` and move them far from their init."""
    for name, kwargs in specs.items():
        add_soft_prompt(model, SoftPromptConfig(shared_prompt_cache=False, **kwargs), name=name)
    return perturb_trainable(model, seed=seed)


def _injected_embeds(model, ids, name):
    """What the prompted model's decoder receives as inputs_embeds for `ids` under prompt `name`."""
    seen = []
    handle = model.model.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), soft_prompt_names=[name])
    finally:
        handle.remove()
    return seen[0][0]


SPECS = {
    "default": dict(num_virtual_tokens=4),
    "long": dict(num_virtual_tokens=9),
    "mlp": dict(num_virtual_tokens=5, encoder="mlp"),
    "lstm": dict(num_virtual_tokens=3, encoder="lstm"),
    "residual": dict(num_virtual_tokens=4, encoder="residual", encoder_hidden_size=6),
}


def test_embeds_equal_the_injected_inputs_for_every_saved_prompt(tmp_path):
    base = _saved_base(tmp_path)
    model = _prompts(_load(base), SPECS)
    save_soft_prompt(model, tmp_path / "prompts")
    embedder = PromptEmbedder.from_pretrained(base, prompts=tmp_path / "prompts")
    assert embedder.prompt_names() == list(SPECS)
    for name in SPECS:
        expected = _injected_embeds(model, IDS, name)
        got = embedder(IDS, prompt=name)
        assert got.shape == (SPECS[name]["num_virtual_tokens"] + len(IDS), 32)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    plain = model.get_input_embeddings()(torch.tensor(IDS))
    torch.testing.assert_close(embedder(IDS, prompt=None), plain, rtol=0, atol=0)


def test_loaded_prompts_and_named_folders(tmp_path):
    """`{"name": save}` picks that prompt of a multi-prompt save; a loaded copy agrees."""
    base = _saved_base(tmp_path)
    model = _prompts(_load(base), SPECS)
    save_soft_prompt(model, tmp_path / "prompts")
    reloaded = load_soft_prompt(_load(base), tmp_path / "prompts")
    embedder = PromptEmbedder.from_pretrained(base, prompts={"mlp": tmp_path / "prompts",
                                                             "single": tmp_path / "prompts" / "long"})
    assert embedder.prompt_names() == ["mlp", "single"]
    torch.testing.assert_close(embedder(IDS, prompt="mlp"), _injected_embeds(reloaded, IDS, "mlp"))
    torch.testing.assert_close(embedder(IDS, prompt="single"), _injected_embeds(reloaded, IDS, "long"))
    with pytest.raises(ValueError, match="none named 'nope'"):
        PromptEmbedder.from_pretrained(base, prompts={"nope": tmp_path / "prompts"})
    with pytest.raises(KeyError, match="No prompt named 'lstm'; this embedder serves"):
        embedder(IDS, prompt="lstm")
    with pytest.raises(ValueError, match=r"Two saved prompts are named 'default'.*to rename one"):
        PromptEmbedder.from_pretrained(base, prompts=[tmp_path / "prompts", tmp_path / "prompts"])


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_other_families_and_tied_or_sharded_tables(tmp_path, family):
    base = _saved_base(tmp_path, family, max_shard_size="20KB")
    assert os.path.isfile(os.path.join(base, "model.safetensors.index.json"))  # sharded
    model = _prompts(_load(base), {"default": dict(num_virtual_tokens=4)})
    save_soft_prompt(model, tmp_path / "p")
    embedder = PromptEmbedder.from_pretrained(base, prompts=tmp_path / "p")
    inner = model.transformer if family == "gpt2" else model.model
    seen = []
    handle = inner.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.tensor([IDS]))
    handle.remove()
    torch.testing.assert_close(embedder(IDS, prompt="default"), seen[0][0], rtol=0, atol=0)


def test_refuses_after_first_token_placement(tmp_path):
    """add_soft_prompt refuses this placement on a causal LM; an adapter that says so anyway (edited,
    or from an encoder's training) is refused too, not served in front."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    base = _saved_base(tmp_path)
    save_soft_prompt(_prompts(_load(base), {"default": dict(num_virtual_tokens=3)}), tmp_path / "p")
    weights = str(tmp_path / "p" / "adapter_model.safetensors")
    with safe_open(weights, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(metadata["hf_softprompt_config"])
    metadata["hf_softprompt_config"] = json.dumps({**config, "placement": "after_first_token"})
    save_file(tensors, weights, metadata=metadata)
    with pytest.raises(ValueError, match=r"placement='after_first_token'; a causal LM's prompt goes in front"):
        PromptEmbedder.from_pretrained(base, prompts=tmp_path / "p")


def test_greedy_generation_from_the_embeds_equals_prompted_generate(tmp_path):
    """The bare model fed the embedder's tensor generates what the prompted model generates (with its
    shared prompt cache, the default: a different computation of the same thing)."""
    base = _saved_base(tmp_path)
    prompted = _load(base)
    add_soft_prompt(prompted, SoftPromptConfig(num_virtual_tokens=6))
    perturb_trainable(prompted, std=2.0)
    save_soft_prompt(prompted, tmp_path / "p")
    embedder = PromptEmbedder.from_pretrained(base, prompts=tmp_path / "p")
    bare = _load(base)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = prompted.generate(input_ids=torch.tensor([IDS]), **kwargs)[0, len(IDS):]
        got = bare.generate(inputs_embeds=embedder(IDS, prompt="default")[None],
                            attention_mask=torch.ones(1, 6 + len(IDS), dtype=torch.long), **kwargs)[0]
        without = bare.generate(input_ids=torch.tensor([IDS]), **kwargs)[0, len(IDS):]
    assert got.tolist() == expected.tolist()
    assert without.tolist() != expected.tolist()  # the prompt matters, so the comparison can fail


def test_dtype_is_the_base_models(tmp_path):
    base = _saved_base(tmp_path, dtype=torch.bfloat16)
    model = _prompts(_load(base), {"default": dict(num_virtual_tokens=3)})
    save_soft_prompt(model, tmp_path / "p")
    embedder = PromptEmbedder.from_pretrained(base, prompts=tmp_path / "p")
    got = embedder(IDS, prompt="default")
    assert embedder.dtype == got.dtype == torch.bfloat16
    torch.testing.assert_close(got[:3], _saved_rows(tmp_path / "p").to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(got[3:], model.get_input_embeddings().weight[IDS], rtol=0, atol=0)
    assert PromptEmbedder.from_pretrained(base, dtype=torch.float32)(IDS).dtype == torch.float32


def _saved_rows(folder) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))["prompt_embeddings"]


def test_text_in_with_the_models_tokenizer(tmp_path, tokenizer_dir):
    base = _saved_base(tmp_path)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), base)
    model = _prompts(_load(base), {"default": dict(num_virtual_tokens=4)})
    save_soft_prompt(model, tmp_path / "p")
    embedder = PromptEmbedder.from_pretrained(base, prompts=tmp_path / "p")
    ids = AutoTokenizer.from_pretrained(tokenizer_dir)("the movie was great")["input_ids"]
    assert embedder.encode("the movie was great") == ids
    torch.testing.assert_close(embedder("the movie was great", prompt="default"), embedder(ids, prompt="default"))
    # A chat template (set here: the test tokenizer has none): the user turn, then the generation prompt.
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = ("{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
                               "{% if add_generation_prompt %}<s> {% endif %}")
    chatty = PromptEmbedder.from_pretrained(base, prompts=tmp_path / "p", tokenizer=tokenizer)
    turn = AutoTokenizer.from_pretrained(tokenizer_dir)("<s> the movie </s> <s>", add_special_tokens=False)
    assert chatty.encode("the movie", chat=True) == turn["input_ids"]
    assert chatty.encode([{"role": "user", "content": "the movie"}]) == turn["input_ids"]
    torch.testing.assert_close(chatty("the movie", prompt="default", chat=True),
                               embedder(turn["input_ids"], prompt="default"))


def test_encode_prompt_embeds_is_what_the_server_decodes():
    embeds = torch.randn(7, 32, dtype=torch.bfloat16)
    data = base64.b64decode(encode_prompt_embeds(embeds), validate=True)
    # vLLM's renderers/embed_utils.safe_load_prompt_embeds reads it so.
    decoded = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    assert decoded.dtype == torch.bfloat16 and torch.equal(decoded, embeds)
    with pytest.raises(ValueError, match=r"one request's 2-D \(N, D\) tensor, got torch.Size\(\[1, 7, 32\]\)"):
        encode_prompt_embeds(embeds[None])


# ------------------------------------------------------------------ refusals
def test_serves_the_same_weights_from_any_path_and_refuses_other_weights_at_the_saved_path(tmp_path):
    base = _saved_base(tmp_path)
    save_soft_prompt(_prompts(_load(base), {"default": dict(num_virtual_tokens=3)}), tmp_path / "p")
    moved = str(tmp_path / "moved")  # e.g. another virtual environment, or a Hub id instead of the folder
    shutil.move(base, moved)
    assert PromptEmbedder.from_pretrained(moved, prompts=tmp_path / "p")(IDS, prompt="default").shape == (
        3 + len(IDS), 32)
    make_model("llama", "causal_lm", seed=7).save_pretrained(base)  # other weights where the base was
    with pytest.raises(ValueError, match=r"trained on other weights than .*base-llama.*fingerprint"
                                         r".*check_base_model=False"):
        PromptEmbedder.from_pretrained(base, prompts=tmp_path / "p")
    assert PromptEmbedder.from_pretrained(base, prompts=tmp_path / "p", check_base_model=False)(
        IDS, prompt="default").shape == (3 + len(IDS), 32)


def test_refuses_another_token_dimension(tmp_path):
    base = _saved_base(tmp_path)
    wide = str(tmp_path / "wide")
    make_model("llama", "causal_lm", hidden_size=64, head_dim=16).save_pretrained(wide)
    save_soft_prompt(_prompts(_load(base), {"default": dict(num_virtual_tokens=3)}), tmp_path / "p")
    with pytest.raises(ValueError, match=r"has token_dim=32, but .*wide' has token_dim=64"):
        PromptEmbedder.from_pretrained(wide, prompts=tmp_path / "p", check_base_model=False)


def test_refuses_a_task_type_that_is_not_causal_lm(tmp_path):
    base = _saved_base(tmp_path)
    classifier = make_model("llama", "seq_cls")
    add_soft_prompt(classifier, SoftPromptConfig(num_virtual_tokens=3))
    save_soft_prompt(classifier, tmp_path / "p")
    with pytest.raises(ValueError, match=r"task_type='SEQ_CLS'; serving needs 'CAUSAL_LM'"):
        PromptEmbedder.from_pretrained(base, prompts=tmp_path / "p", check_base_model=False)


def test_refuses_a_request_longer_than_the_model(tmp_path):
    base = _saved_base(tmp_path)  # 128 positions
    save_soft_prompt(_prompts(_load(base), {"default": dict(num_virtual_tokens=8)}), tmp_path / "p")
    embedder = PromptEmbedder.from_pretrained(base, prompts=tmp_path / "p")
    assert embedder.max_positions == 128
    assert embedder([5] * 120, prompt="default").shape[0] == 128
    with pytest.raises(ValueError, match=r"121 tokens, 0 new tokens\), beyond the model's 128.*at most 120 tokens"):
        embedder([5] * 121, prompt="default")
    with pytest.raises(ValueError, match=r"beyond the model's 128. Truncate the input to at most 110"):
        embedder([5] * 120, prompt="default", max_new_tokens=10)
    short = PromptEmbedder.from_pretrained(base, prompts=tmp_path / "p", max_length=16)
    with pytest.raises(ValueError, match=r"beyond the model's 16"):
        short([5] * 9, prompt="default")


def test_refuses_bad_token_ids_and_unknown_checkpoints(tmp_path):
    base = _saved_base(tmp_path)
    embedder = PromptEmbedder.from_pretrained(base)
    with pytest.raises(ValueError, match=r"must lie in \[0, 96\).*got ids from 1 to 96"):
        embedder([1, 96])
    with pytest.raises(ValueError, match=r"non-empty 1-D sequence"):
        embedder([[1, 2]])
    gemma = str(tmp_path / "gemma")
    shutil.copytree(base, gemma)
    with open(os.path.join(gemma, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(gemma, "config.json"), "w") as f:
        json.dump({**config, "model_type": "gemma2"}, f)
    with pytest.raises(ValueError, match=r"'gemma2' model, which transforms its embeddings"):
        PromptEmbedder.from_pretrained(gemma)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(base, "config.json"), no_weights)
    with pytest.raises(FileNotFoundError, match=r"No model.safetensors.index.json or model.safetensors in"):
        PromptEmbedder.from_pretrained(no_weights)


def test_base_model_and_prompts_from_the_hub_read_one_shard(hub_server, tmp_path):
    """Repo ids for the base model and the prompts; of a sharded base model only the shard holding the
    embedding table is downloaded."""
    from huggingface_hub import HfApi

    base = _saved_base(tmp_path, max_shard_size="20KB")
    with open(os.path.join(base, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    shards = set(weight_map.values())
    assert len(shards) > 2
    HfApi().create_repo("test-user/base")
    HfApi().upload_folder(folder_path=base, repo_id="test-user/base")
    model = _prompts(AutoModelForCausalLM.from_pretrained("test-user/base").eval(), SPECS)
    save_soft_prompt(model, tmp_path / "prompts", push_to_hub=True, repo_id="test-user/prompts")
    cache = os.path.join(os.environ["HF_HOME"], "hub")
    shutil.rmtree(cache)  # what from_pretrained above downloaded

    embedder = PromptEmbedder.from_pretrained("test-user/base", prompts={"mlp": "test-user/prompts",
                                                                         "default": "test-user/prompts"})
    torch.testing.assert_close(embedder(IDS, prompt="mlp"), _injected_embeds(model, IDS, "mlp"), rtol=0, atol=0)
    torch.testing.assert_close(embedder(IDS, prompt="default"), _injected_embeds(model, IDS, "default"),
                               rtol=0, atol=0)
    downloaded = {name for _, _, files in os.walk(cache) for name in files if name.endswith(".safetensors")}
    assert downloaded & shards == {weight_map["model.embed_tokens.weight"]}
