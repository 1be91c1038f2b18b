"""The base model under a soft-prompted model, as a reference model that holds no weights of its own.

Preference trainers (TRL's `DPOTrainer` and its kin) score completions under a frozen reference
model. For a soft prompt the reference is the base model without the prompt, and the base
weights are frozen: they are the reference already. Given no `ref_model`, TRL 1.16 loads a second
copy of the model from `config._name_or_path` unless the model is a PEFT model, and with
`precompute_ref_log_probs=True` it scores with the training model itself. `BaseModelReference`
is that `ref_model` without a copy: it calls the prompted model's own modules, never its prompt.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..model.bank import BANK_MODULE_NAME
from ..model.injector import get_injector


class BaseModelReference(nn.Module):
    """The bare base model of `model`, sharing its weights: pass it as a trainer's `ref_model`.

    A call runs the model class's own `forward` on `model` (the injection sits on the instance, so
    no prompt goes in), and TRL's fused LM head, which calls `base_model` and reads
    `get_output_embeddings()`, reaches `model`'s backbone and LM head, which carry no prompt
    either. The reference owns no parameters, so a trainer that moves, wraps or freezes its
    reference leaves `model` alone; its `state_dict()` is the base model's (what TRL hashes to key
    its cache of precomputed reference log-probs).

    Args:
        model (`PreTrainedModel`): a causal LM carrying soft prompts (or about to: the reference
            reads `model` at each call).

    `SoftPromptMixin` passes it to a trainer that takes a `ref_model` and was given none.

    Example:
        ```python
        trainer = DPOTrainer(model=model, ref_model=BaseModelReference(model), args=args, ...)
        ```
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(
                f"BaseModelReference needs the transformers model instance, got {type(model).__name__}. "
                "Load the model first and pass the object, e.g. AutoModelForCausalLM.from_pretrained(...)."
            )
        super().__init__()
        object.__setattr__(self, "prompted_model", model)  # not a submodule: no parameters of ours

    @property
    def config(self) -> Any:
        return self.prompted_model.config

    @property
    def base_model(self) -> Any:
        """The backbone (no prompt is injected there, only at the model's own `forward`)."""
        return _with_root_unsharded(self.prompted_model, self.prompted_model.base_model)

    @property
    def device(self) -> Any:
        return self.prompted_model.device

    @property
    def dtype(self) -> Any:
        return self.prompted_model.dtype

    def get_input_embeddings(self) -> nn.Module:
        return self.prompted_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.prompted_model.get_output_embeddings()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward on these inputs (no prompt, the same weights)."""
        model = self.prompted_model
        if get_injector(model) is not None and ("soft_prompt_names" in kwargs or "soft_prompt_ids" in kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in ("soft_prompt_names", "soft_prompt_ids")}
        return _with_root_unsharded(model, type(model).forward)(model, *args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:
        """The base model's tensors, without the prompts (nor their own task heads)."""
        full = self.prompted_model.state_dict(*args, **kwargs)
        return {k: v for k, v in full.items() if not k.startswith(BANK_MODULE_NAME + ".")}


def _with_root_unsharded(model: nn.Module, function: Any) -> Any:
    """`function`, run with the weights of `model`'s own FSDP2 group (embeddings, final norm, LM head)
    gathered when `model` is sharded: a call that bypasses `model.__call__` also bypasses the hook
    that would gather them. Sharded submodules (decoder layers) gather their own as they run."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed support
        return function
    if not isinstance(model, FSDPModule):
        return function

    def run(*args: Any, **kwargs: Any) -> Any:
        model.unshard()
        try:
            return function(*args, **kwargs)
        finally:
            model.reshard()

    return run
