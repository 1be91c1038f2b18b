"""FSDP2 on two CPU processes (gloo, torchrun): a prompted model sharded per decoder layer and at
the root trains its prompt to the same adapter as one process on the whole batch, every rank ends
with the same prompt, rank 0 alone writes it, and a prompt added to an already sharded model is
initialised from the whole vocabulary table, not from the rank's shard."""

from __future__ import annotations

import os

import pytest
import torch
from fsdp_script import global_batches, initial_tables, prompted_logits, train
from models import make_model
from test_distributed import torchrun

from hf_softprompt import SoftPromptConfig, add_soft_prompt
from hf_softprompt.files.load import read_adapter

SCRIPT = os.path.join(os.path.dirname(__file__), "fsdp_script.py")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(SCRIPT, str(out), tokenizer_dir)
    return out, [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.slow
def test_sharded_training_equals_one_process_on_the_global_batch(fsdp_run):
    out, (rank0, rank1) = fsdp_run
    assert rank0["world_size"] == 2 and rank0["backend"] == "gloo"
    # Really sharded: the prompt and the vocabulary table are DTensors, 2 of the 4 rows on each rank.
    assert rank0["prompt_is_sharded"] and rank0["embeddings_are_sharded"] and rank0["local_rows"] == 2
    torch.testing.assert_close(rank0["prompt"], rank1["prompt"], atol=0, rtol=0)
    assert [os.path.relpath(p, out) for p in rank0["written"]] and rank1["written"] == []

    reference, figures = train()  # one process, no sharding, the 4 rows of each batch at once
    for rank in (rank0, rank1):  # prompt-health logs: of the whole prompt and vocabulary, not shards
        assert rank["health"].keys() == figures.keys()
        for key, value in figures.items():
            assert rank["health"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    expected = reference.soft_prompts["default"].embedding.weight.detach()
    assert not torch.allclose(expected, _initial_prompt(), atol=1e-3)  # training moved it
    torch.testing.assert_close(rank0["prompt"], expected, atol=1e-5, rtol=0)
    logits = prompted_logits(reference, global_batches()[0])
    for rank in (rank0, rank1):  # evaluation of the sharded prompted model
        torch.testing.assert_close(rank["eval_logits"], logits, atol=1e-4, rtol=1e-4)
    for folder in ("final", "trainer_style"):  # gathered by save_soft_prompt / given the Trainer's state dict
        _, tensors = read_adapter(out / folder)
        torch.testing.assert_close(tensors["prompt_embeddings"], rank0["prompt"], atol=0, rtol=0)
    for rank in (rank0, rank1):  # loaded back into the sharded prompt (resume, load_best_model_at_end)
        torch.testing.assert_close(rank["reloaded"], rank0["prompt"], atol=0, rtol=0)


@pytest.mark.slow
def test_the_dpo_reference_of_a_sharded_model_is_the_bare_base_model(fsdp_run):
    _, ranks = fsdp_run
    ids = global_batches()[0]
    bare = make_model("llama", "causal_lm", initializer_range=0.2)  # frozen in training: the base as it was
    with torch.no_grad():
        expected = torch.log_softmax(bare(input_ids=ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    for rank in ranks:
        assert set(rank["reference_logps"]) == ({"forward", "fused"} if _has_trl() else {"forward"})
        for path, logps in rank["reference_logps"].items():
            torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5, msg=path)


def _has_trl() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_fsdp1_with_orig_params_trains_and_saves_like_one_process(fsdp_run):
    out, (rank0, rank1) = fsdp_run
    expected = train()[0].soft_prompts["default"].embedding.weight.detach()
    for rank in (rank0, rank1):
        torch.testing.assert_close(rank["fsdp1_prompt"], expected, atol=1e-5, rtol=0)
    _, tensors = read_adapter(out / "fsdp1")  # saved from the Trainer-style gathered state dict
    torch.testing.assert_close(tensors["prompt_embeddings"], rank0["fsdp1_prompt"], atol=0, rtol=0)
    assert "FSDP1 keeps a flattened piece" in torch.load(out / "fsdp1_live_refusal.pt")  # never a wrong file
    assert not (out / "fsdp1_live").exists() or not any((out / "fsdp1_live").iterdir())


@pytest.mark.slow
def test_a_prompt_added_after_sharding_reads_the_whole_vocabulary(fsdp_run, tokenizer_dir):
    _, ranks = fsdp_run
    expected = initial_tables(tokenizer_dir, sharded=False)
    for rank in ranks:  # rank 1's shard holds rows 48-95: a shard read would give other rows
        for init in ("text", "sample_vocab"):
            torch.testing.assert_close(rank["inits"][init], expected[init], atol=0, rtol=0)


def _initial_prompt() -> torch.Tensor:
    model = add_soft_prompt(make_model("llama", "causal_lm", initializer_range=0.2),
                            SoftPromptConfig(num_virtual_tokens=4))
    return model.soft_prompts["default"].embedding.weight.detach()


def test_a_model_partitioned_by_deepspeed_zero3_is_refused_with_the_alternative():
    model = make_model("llama", "causal_lm")
    weight = model.get_input_embeddings().weight
    weight.ds_id, weight.ds_shape = 0, weight.shape  # what deepspeed.zero.Init leaves on a parameter
    with pytest.raises(ValueError, match="ZeRO-3.*fsdp_version"):
        add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=4))
    assert not hasattr(model, "soft_prompts")  # refused before anything was added


def test_a_model_already_wrapped_by_fsdp1_is_refused_with_the_order_to_use():
    model = make_model("llama", "causal_lm")
    with torch.no_grad():  # what FSDP1 (use_orig_params=True) leaves outside forward on a rank
        model.get_input_embeddings().weight.data = torch.zeros(0)
    with pytest.raises(ValueError, match="already wrapped by FSDP1.*before wrapping"):
        add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=4))
