"""FSDP helpers shared by every layer: shards, whole tensors gathered from them, and back.

Under FSDP2 (`fully_shard`) every parameter is a DTensor holding one shard per rank; FSDP1 keeps
flattened pieces. A prompt's init must read the whole vocabulary table, a save must write whole
tensors, a load must cut them back into this rank's shard. Gathering is a collective: every rank
calls, as every rank sharded the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, TypeGuard

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

_DTensor: type[DTensor] | None
try:  # FSDP2's sharded parameters
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed support
    _DTensor = None


def is_shard(tensor: object) -> TypeGuard[DTensor]:
    """Whether `tensor` is one rank's shard of an FSDP2 (`fully_shard`) parameter: a DTensor."""
    return _DTensor is not None and isinstance(tensor, _DTensor)


def is_fsdp_sharded(module: nn.Module) -> bool:
    """Whether FSDP shards any part of `module`: a tensor of it is an FSDP2 shard, or a submodule
    is an FSDP2 (`fully_shard`) or FSDP1 unit."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    # parameters(), not state_dict(): FSDP's state-dict hooks reshard, which must not happen mid-forward.
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in module.modules()) or any(
        is_shard(t) for t in (*module.parameters(), *module.buffers()))


def full_table(weight: torch.Tensor) -> torch.Tensor:
    """The whole embedding table: under FSDP2 (`fully_shard`) a parameter is a DTensor holding one
    shard per rank, and an init must read the rows of the full vocabulary, not this rank's shard.
    Gathering is a collective: every rank adds the prompt, as every rank sharded the model."""
    return weight.full_tensor() if is_shard(weight) else weight


def whole_state_dict(module: nn.Module, path: str,
                     full_state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """`module.state_dict()` (detached) with the whole tensors: from `full_state_dict` (keyed from the
    model's root; `module` sits at `path`) where it holds them (FSDP1 keeps only a piece of a
    flattened parameter on each rank), else each FSDP2 shard gathered with `DTensor.full_tensor()`,
    a collective every rank must join."""
    out = {}
    for key, value in module.state_dict().items():
        if full_state_dict is not None and f"{path}.{key}" in full_state_dict:
            value = full_state_dict[f"{path}.{key}"]
        elif is_shard(value):
            if full_state_dict is None:
                value = value.full_tensor()
            else:  # gathering here now would wait for ranks that are not saving
                raise ValueError(
                    f"The gathered state dict given to save the adapter has no {path}.{key!r}, and that "
                    "parameter is sharded (FSDP2). Pass the model's full state dict (e.g. "
                    "accelerator.get_state_dict(model)), or call save_soft_prompt(model, dir) on every rank."
                )
        out[key] = value.detach()
    return out


def load_whole_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """`module.load_state_dict(state)` of whole tensors, cut to this rank's shard where the
    module's tensor is an FSDP2 shard (a collective then: every rank loads, as every rank trains)."""
    if is_fsdp_sharded(module):
        from torch.distributed.tensor import distribute_tensor

        current = module.state_dict()
        state = {key: distribute_tensor(value.to(current[key].device, current[key].dtype),
                                        current[key].device_mesh, current[key].placements)
                 if is_shard(current.get(key)) else value for key, value in state.items()}
    module.load_state_dict(state)
