"""The base model under a soft-prompted model, as a reference model that holds no weights of its own.

Preference trainers (TRL's `DPOTrainer` and its kin) score completions under a frozen reference
model. For a soft prompt the reference is the base model without the prompt, and the base
weights are frozen: they are the reference already. Given no `ref_model`, TRL 1.16 loads a second
copy of the model from `config._name_or_path` unless the model is a PEFT model, and with
`precompute_ref_log_probs=True` it scores with the training model itself. `BaseModelReference`
is that `ref_model` without a copy: it calls the prompted model's own modules, never its prompt.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar, cast, overload

from torch import nn

from ..accessors import input_embeddings
from ..model.bank import BANK_MODULE_NAME
from ..model.injector import get_injector
from ..model.scoped import without_soft_prompt

_Destination = TypeVar("_Destination", bound=dict[str, Any])  # as torch's `Module.state_dict`


class BaseModelReference(nn.Module):
    """The bare base model of `model`, sharing its weights: pass it as a trainer's `ref_model`.

    A call runs `model` inside `without_soft_prompt(model)`, so no prompt goes in, and TRL's fused
    LM head, which calls `base_model` and reads `get_output_embeddings()`, reaches `model`'s
    backbone and LM head, which carry no prompt either. The reference owns no parameters, so a
    trainer that moves, wraps or freezes its reference leaves `model` alone; its `state_dict()` is
    the base model's (what TRL hashes to key its cache of precomputed reference log-probs).

    Args:
        model (`PreTrainedModel`): a causal LM carrying soft prompts (or about to: the reference
            reads `model` at each call).

    `SoftPromptMixin` passes it to a trainer that takes a `ref_model` and was given none.

    Example:
        ```python
        trainer = DPOTrainer(model=model, ref_model=BaseModelReference(model), args=args, ...)
        ```
    """

    prompted_model: nn.Module  # set in __init__, outside nn.Module's registry of submodules

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
        return input_embeddings(self.prompted_model)

    def get_output_embeddings(self) -> nn.Module:
        return cast(Callable[[], nn.Module], self.prompted_model.get_output_embeddings)()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward on these inputs (no prompt, the same weights), through the
        model's own `__call__`, so its module hooks (FSDP's gathering) run as for any call."""
        model = self.prompted_model
        if get_injector(model) is None:
            return model(*args, **kwargs)
        with without_soft_prompt(model):
            return model(*args, **kwargs)

    @overload
    def state_dict(self, *, destination: _Destination, prefix: str = ..., keep_vars: bool = ...) -> _Destination: ...

    @overload
    def state_dict(self, *, prefix: str = ..., keep_vars: bool = ...) -> dict[str, Any]: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's tensors, without the prompts (nor their own task heads)."""
        full = self.prompted_model.state_dict(*args, **kwargs)
        return {k: v for k, v in full.items() if not k.startswith(BANK_MODULE_NAME + ".")}


def _with_root_unsharded(model: nn.Module, function: Any) -> Any:
    """`function`, run with the weights of `model`'s own FSDP2 group (embeddings, final norm, LM head)
    gathered when `model` is sharded. For `base_model` only: TRL's fused LM head calls the backbone
    directly, past `model.__call__` and so past the hook that would gather them. Sharded submodules
    (decoder layers) gather their own as they run."""
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


def with_base_model_reference(init: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The arguments for `init` of a preference trainer (one with a `ref_model`, e.g. TRL's
    `DPOTrainer`) given no reference: `ref_model=BaseModelReference(model)`, the base model under
    the prompt, sharing its weights. Else TRL 1.16 loads a second copy of the model from its
    `_name_or_path` or, with `precompute_ref_log_probs=True`, scores with the training model itself
    (once training has begun, with its prompt: a later `evaluate()` precompute is then wrong)."""
    try:
        signature = inspect.signature(init)
    except (TypeError, ValueError):  # a builtin or C-level init: no reference to fill in
        return args, kwargs
    if "ref_model" not in signature.parameters:
        return args, kwargs
    bound = signature.bind_partial(*args, **kwargs)
    model = bound.arguments.get("model")
    if bound.arguments.get("ref_model") is not None or not isinstance(model, nn.Module):
        return args, kwargs  # the caller's own reference, or a model TRL loads from a name
    if hasattr(model, "peft_config"):
        return args, kwargs  # a PEFT model: TRL takes its reference by disabling the adapters
    if getattr(bound.arguments.get("args"), "sync_ref_model", False):
        raise ValueError(
            "sync_ref_model=True moves the reference model towards the policy, but with a soft prompt the "
            "reference is the frozen base model itself (no copy to move). Use sync_ref_model=False, or pass "
            "your own ref_model=... to sync."
        )
    bound.arguments["ref_model"] = BaseModelReference(model)
    return bound.args, bound.kwargs


class DeferredReference:
    """An online trainer's KL reference, set aside during its `__init__` (`defer_online_reference`)."""

    def __init__(self, training_args: Any, beta: float) -> None:
        self.training_args, self.beta = training_args, beta

    def restore(self) -> None:
        """Give the training arguments their `beta` back (also when `__init__` failed)."""
        self.training_args.beta = self.beta

    def attach(self, trainer: Any) -> None:
        """Restore `beta` and make the trainer's reference the base model under the prompt
        (`BaseModelReference`), with TRL's fused LM head as TRL gives its own reference."""
        from trl.trainer.utils import add_fused_lm_head

        self.restore()
        if getattr(trainer, "ref_model", None) is not None or getattr(trainer, "beta", None) != 0.0:
            raise RuntimeError(f"{type(trainer).__name__} did not build as TRL 1.16's online trainers do (a `beta` "
                               "and no reference for beta=0); pass beta=0.0, or use a TRL version in the "
                               "supported range.")
        trainer.beta = self.beta
        trainer.ref_model = BaseModelReference(trainer.model)
        options: dict[str, Any] = {"temperature": getattr(trainer, "temperature", 1.0)}
        if "cast_lm_head_to_fp32" in inspect.signature(add_fused_lm_head).parameters:
            options["cast_lm_head_to_fp32"] = getattr(trainer.args, "cast_lm_head_to_fp32", False)
        add_fused_lm_head(trainer.ref_model, **options)


def defer_online_reference(init: Any, args: tuple, kwargs: dict) -> DeferredReference | None:
    """For an online trainer with a KL term to a reference but no `ref_model` argument (TRL's
    `GRPOTrainer`, `RLOOTrainer`): TRL 1.16 then loads a second copy of the model from its
    `_name_or_path` (a model built in memory has none). This sets the training arguments' `beta`
    to 0 for `init`, so no copy is made; the returned `DeferredReference` attaches the base model
    under the prompt as the reference after it. None where nothing is deferred."""
    try:
        signature = inspect.signature(init)
    except (TypeError, ValueError):
        return None
    if "ref_model" in signature.parameters or "reward_funcs" not in signature.parameters:
        return None  # a preference trainer (with_base_model_reference), or no online trainer
    bound = signature.bind_partial(*args, **kwargs)
    model, training_args = bound.arguments.get("model"), bound.arguments.get("args")
    beta = getattr(training_args, "beta", 0.0)
    if training_args is None or not isinstance(model, nn.Module) or hasattr(model, "peft_config") or not beta:
        return None  # default args, a model TRL loads from a name, a PEFT model (TRL disables its adapter), no KL
    if getattr(training_args, "sync_ref_model", False):
        raise ValueError(
            "sync_ref_model=True moves the reference model towards the policy, but with a soft prompt the "
            "reference is the frozen base model itself (no copy to move). Use sync_ref_model=False."
        )
    deferred = DeferredReference(training_args, float(beta))
    training_args.beta = 0.0
    return deferred
