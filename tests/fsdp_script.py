"""Run by test_fsdp.py under torchrun: two CPU processes (gloo) shard a tiny Llama with FSDP2
(`fully_shard`, per decoder layer and the root) and train its soft prompt on their halves of each
global batch; `train()` is also the test's single-process reference on the whole batch. Each rank
writes what it ended with to `<out>/rank<N>.pt`, and rank 0 the adapter to `<out>/final`.

accelerate does not apply FSDP on CPU (`TrainingArguments(fsdp=..., use_cpu=True)` trains with DDP),
so the sharding here is torch's own, in the order the Trainer uses: prompt first, then shard."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from models import make_model  # noqa: E402

from hf_softprompt import SoftPromptConfig, add_soft_prompt, save_soft_prompt  # noqa: E402
from hf_softprompt.files.load import load_soft_prompt_weights  # noqa: E402
from hf_softprompt.training.health import PromptHealth  # noqa: E402

STEPS, GLOBAL_BATCH, LENGTH, LR = 3, 4, 6, 0.5
INIT_TEXT = "the movie was great"


def global_batches() -> list[torch.Tensor]:
    """The same STEPS batches of GLOBAL_BATCH rows on every rank and in the reference."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 96, (GLOBAL_BATCH, LENGTH), generator=g) for _ in range(STEPS)]


def shard(model: torch.nn.Module) -> None:
    """FSDP2 as accelerate applies it to a Llama: each decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def train(rank: int = 0, world_size: int = 1, fsdp_version: int = 2) -> tuple[torch.nn.Module, dict[str, float]]:
    """A prompted tiny Llama trained STEPS SGD steps, and its prompt-health figures at the end (as
    the Trainer logs them); with world_size > 1 sharded (FSDP2, or FSDP1 with use_orig_params=True,
    the only FSDP1 that takes a trainable prompt next to frozen weights), each rank on its rows of
    every global batch (all rows have LENGTH - 1 targets, so the mean of the ranks' mean losses is
    the mean loss of the global batch). Returns the FSDP1 wrapper, else the model."""
    model = make_model("llama", "causal_lm", initializer_range=0.2)
    add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=4))  # same seed: same init on every rank
    runner = model
    if world_size > 1 and fsdp_version == 2:
        shard(model)
    elif world_size > 1:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        runner = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({type(model.model.layers[0])}),
                                          use_orig_params=True, device_id=torch.device("cpu"))
    optimizer = torch.optim.SGD([p for p in runner.parameters() if p.requires_grad], lr=LR)
    health = PromptHealth()  # FSDP1 keeps flattened pieces: no health figures there
    if runner is model:
        health.start(model.soft_prompts)
    model.train()
    rows = GLOBAL_BATCH // world_size
    for ids in global_batches():
        mine = ids[rank * rows:(rank + 1) * rows]
        runner(input_ids=mine, attention_mask=torch.ones_like(mine), labels=mine).loss.backward()
        if runner is model:
            health.record_gradients(model.soft_prompts)
        optimizer.step()
        optimizer.zero_grad()
    if runner is not model:
        return runner, {}
    return model, health.metrics(model.soft_prompts, model.get_input_embeddings())


def fsdp1(rank: int, world_size: int, out: str) -> torch.Tensor:
    """Train under FSDP1 and save as the Trainer does (full state dict on rank 0, rank 0 saves with
    it); returns the whole trained prompt."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    wrapped, _ = train(rank, world_size, fsdp_version=1)
    model = wrapped.module
    # offload_to_cpu=True crashes FSDP1 on a CPU-only model (the gathered storage is freed twice)
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
        gathered = wrapped.state_dict()
    if rank == 0:
        save_soft_prompt(model, os.path.join(out, "fsdp1"), full_state_dict=gathered)
        try:  # the live parameter is a flattened piece (here: empty) on rank 0
            save_soft_prompt(model, os.path.join(out, "fsdp1_live"))
        except ValueError as err:
            torch.save(str(err), os.path.join(out, "fsdp1_live_refusal.pt"))
    with FSDP.summon_full_params(wrapped):
        return model.soft_prompts["default"].embedding.weight.detach().clone()


def initial_tables(tokenizer_dir: str, sharded: bool) -> dict[str, torch.Tensor]:
    """The text and sample_vocab inits of a prompt added to a (sharded) model."""
    tables = {}
    for init in ("text", "sample_vocab"):
        model = make_model("llama", "causal_lm", initializer_range=0.2)
        if sharded:
            shard(model)
        torch.manual_seed(5)  # the vocabulary sample
        config = SoftPromptConfig(num_virtual_tokens=6, init=init, init_text=INIT_TEXT,
                                  tokenizer_name_or_path=tokenizer_dir)
        add_soft_prompt(model, config)
        tables[init] = model.soft_prompts["default"].embedding.weight.detach().clone()
    return tables


def prompted_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The trained prompted model's logits in evaluation (where the shared prompt cache may apply)."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def bare_logps(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token log-probs of `ids` under `BaseModelReference(model)` (the DPO reference): its own
    forward, and TRL's fused LM head on it (when TRL is installed)."""
    from hf_softprompt import BaseModelReference

    reference = BaseModelReference(model)
    with torch.no_grad():
        logits = reference(input_ids=ids).logits[:, :-1]
        found = {"forward": torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)}
        try:
            from trl.trainer.utils import add_fused_lm_head
        except ImportError:
            return found
        add_fused_lm_head(reference)
        found["fused"] = reference(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
    return found


def main(out: str, tokenizer_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    from torch.distributed.tensor import DTensor

    model, figures = train(rank, world_size)
    weight = model.soft_prompts["default"].embedding.weight
    sharding = {  # as training left them (an evaluation forward leaves the root group gathered)
        "prompt_is_sharded": isinstance(weight, DTensor),
        "local_rows": weight.to_local().shape[0],
        "embeddings_are_sharded": isinstance(model.get_input_embeddings().weight, DTensor),
    }
    written = save_soft_prompt(model, os.path.join(out, "final"))  # every rank: the prompt is gathered
    # What the Trainer's save_model does under FSDP: gather the model's state dict on every rank
    # (accelerator.get_state_dict), then rank 0 alone saves with it.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_soft_prompt(model, os.path.join(out, "trainer_style"), full_state_dict=gathered)
    dist.barrier()
    # Resume / load_best_model_at_end: load a saved adapter into the sharded prompt on every rank.
    trained = weight.full_tensor().detach().clone()
    with torch.no_grad():
        weight.zero_()
    load_soft_prompt_weights(model, os.path.join(out, "final"))
    reloaded = weight.full_tensor().detach().clone()
    torch.save({
        "prompt": trained,
        "reloaded": reloaded,
        "health": figures,
        "fsdp1_prompt": fsdp1(rank, world_size, out),
        "reference_logps": bare_logps(model, global_batches()[0]),
        "eval_logits": prompted_logits(model, global_batches()[0]),
        **sharding,
        "written": written,
        "world_size": world_size,
        "backend": dist.get_backend(),
        "inits": initial_tables(tokenizer_dir, sharded=True),
    }, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()  # neither rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
