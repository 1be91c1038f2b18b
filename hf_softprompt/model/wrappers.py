"""The model's own methods, wrapped on the instance: `forward` (and a seq2seq encoder's), `generate`
and `save_pretrained`.

Each call wrapper reads the call's per-row prompt choice (`soft_prompt_names=[...]` or
`soft_prompt_ids=...`, popped so the model never sees them), asks the injector (injector.py) to
rewrite the inputs, runs the wrapped method with that choice current (`rows.rows_in_use`, read
by the seq2seq encoder and by task heads a prompt owns), and puts the outputs back in line. All
per-call state is local to the call. Inside `without_soft_prompt(model)` (scoped.py) every wrapper
passes the call through untouched.
"""

from __future__ import annotations

import contextvars
import inspect
import os
from typing import TYPE_CHECKING, Any

import torch

from .inputs import cache_length
from .rows import RowPrompts, current_choice, is_bare, rows_in_use

if TYPE_CHECKING:
    from .injector import SoftPromptInjector

CHOICE_ARGUMENTS = ("soft_prompt_names", "soft_prompt_ids")  # per-row prompt choice, popped by us
# The injector whose `forward` call is running in this thread/task: a `forward` wrapper of the same
# injector reached inside it (another library's forward sits between two of ours) passes the
# already prepared call through.
_RUNNING: contextvars.ContextVar[Any] = contextvars.ContextVar("soft_prompt_forward_running", default=None)


class MethodWrapper:
    """A method of the user's model, wrapped on the instance. An object rather than a closure, so the
    model still pickles and deep-copies; its signature is the wrapped method's."""

    def __init__(self, injector: SoftPromptInjector, inner: Any) -> None:
        self.injector = injector
        self.inner = inner
        self.__signature__ = inspect.signature(inner)
        self._names = [p.name for p in self.__signature__.parameters.values()
                       if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]

    @property
    def active(self) -> bool:
        """False once the prompt is removed (a wrapper another library wrapped cannot be taken out)."""
        return self.injector.installed

    def as_kwargs(self, args: tuple, kwargs: dict) -> dict:
        """Positional arguments by name, so `model(input_ids)` is handled like `model(input_ids=...)`."""
        if len(args) > len(self._names):
            raise TypeError(f"Too many positional arguments ({len(args)}) for forward({', '.join(self._names)}).")
        return {**dict(zip(self._names, args, strict=False)), **kwargs}


def _with_choice_arguments(signature: inspect.Signature) -> inspect.Signature:
    """`signature` plus the keyword-only per-row prompt choice, so clients that read it (the Trainer
    keeping dataset columns, `generate` validating model kwargs) know the arguments."""
    params = list(signature.parameters.values())
    cut = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
             for name in CHOICE_ARGUMENTS if name not in signature.parameters]
    return signature.replace(parameters=params[:cut] + extra + params[cut:])


def _batch_and_device(kwargs: dict) -> tuple[int, torch.device] | None:
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0], value.device
    encoder_outputs = kwargs.get("encoder_outputs")
    if encoder_outputs is not None:
        return encoder_outputs[0].shape[0], encoder_outputs[0].device
    return None


class PromptedForward(MethodWrapper):
    """`forward` of a decoder-only or encoder-only model: each row with its prompt."""

    def __init__(self, injector: SoftPromptInjector, inner: Any) -> None:
        super().__init__(injector, inner)
        self.__signature__ = _with_choice_arguments(self.__signature__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.active or is_bare(self.injector.model) or _RUNNING.get() is self.injector:
            return self.inner(*args, **_without_choice(kwargs))
        kwargs = self.as_kwargs(args, kwargs)
        found = _batch_and_device(kwargs)
        if found is None:
            raise ValueError("A soft-prompted model needs input_ids, inputs_embeds (or, for seq2seq, "
                             "encoder_outputs), got none.")
        choice = current_choice()
        token = _RUNNING.set(self.injector)
        try:
            return self.run(kwargs, self.injector.rows_for_call(*found, kwargs), choice is not None and choice.widened)
        finally:
            _RUNNING.reset(token)

    def run(self, kwargs: dict, rows: RowPrompts, counted: bool) -> Any:
        kwargs, alignment = self.injector.prepare(kwargs, rows, counted)
        with rows_in_use(rows, counted):  # for the task heads the rows' prompts own
            output = self.inner(**kwargs)
        return output if alignment is None else alignment.apply(output)


class Seq2SeqForward(PromptedForward):
    """`forward` of an encoder-decoder model: the encoder call inside carries the prompt; the
    decoder's cross-attention mask is widened to the prompted encoder output."""

    def run(self, kwargs: dict, rows: RowPrompts, counted: bool) -> Any:
        block = self.injector.block(rows)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and block.width:
            encoder_outputs = kwargs.get("encoder_outputs")
            source = kwargs.get("input_ids")
            source = kwargs.get("inputs_embeds") if source is None else source
            if encoder_outputs is not None:
                encoded = encoder_outputs[0].shape[1]
            else:
                encoded = None if source is None else source.shape[1] + block.width
            if encoded is not None and mask.shape[1] + block.width == encoded:
                kwargs["attention_mask"] = block.widen_mask(mask)
        with rows_in_use(rows):  # the encoder inside and the task heads read it
            return self.inner(**kwargs)


class EncoderForward(MethodWrapper):
    """`forward` of a seq2seq model's encoder, which `generate` calls directly."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.active or is_bare(self.injector.model):
            return self.inner(*args, **_without_choice(kwargs))
        kwargs = self.as_kwargs(args, kwargs)
        found = _batch_and_device(kwargs)
        if found is None:
            return self.inner(**kwargs)
        kwargs, _ = self.injector.prepare(kwargs, self.injector.rows_for_call(*found, kwargs))
        return self.inner(**kwargs)


class PromptedGenerate(MethodWrapper):
    """`generate` that takes one prompt per input row (`soft_prompt_names` / `soft_prompt_ids`, else
    the active prompt), fixed at its start for every step, beams and returned sequences included.

    Decoder-only models: the prompt's slots go into the attention mask before generation starts
    (`generate` then keeps mask and positions for every step itself), so a decode step costs what
    the bare model's does: it finds the prompt in the cache and its inputs already in line.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.active or is_bare(self.injector.model):
            return self.inner(*args, **_without_choice(kwargs))
        inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if not isinstance(inputs, torch.Tensor):
            if any(kwargs.get(key) is not None for key in CHOICE_ARGUMENTS):
                raise ValueError("generate(soft_prompt_names=...) needs input_ids or inputs_embeds to know the "
                                 "batch size.")
            return self.inner(*args, **kwargs)  # e.g. generation from BOS alone: each forward chooses
        choice = {key: kwargs.pop(key) for key in CHOICE_ARGUMENTS if key in kwargs}
        rows = self.injector.rows_for_call(inputs.shape[0], inputs.device, choice)
        if rows.width and not _cache_is_empty(kwargs):
            # transformers counts the cached tokens to find the new ones; the cached prompt would
            # make it drop that many of the caller's tokens.
            raise ValueError(
                "generate() was given a cache from an earlier call (past_key_values/cache), which a soft-"
                "prompted model cannot continue: the cache holds the prompt's virtual tokens, which "
                "transformers would count as input tokens. Call generate() on the whole sequence without "
                "the cache, or continue it with your own loop of model(...) calls (each passes the cache back)."
            )
        widened = self.injector.decoder_only and rows.width > 0
        if widened:
            kwargs = self._widen(inputs, rows, kwargs)
        with rows_in_use(rows, widened):
            return self.inner(*args, **kwargs)

    def _widen(self, inputs: torch.Tensor, rows: RowPrompts, kwargs: dict) -> dict:
        """`generate` keyword arguments whose attention mask (B, W+L) and positions cover the prompt."""
        block = self.injector.block(rows)
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = _inferred_attention_mask(self.injector.model, inputs, kwargs)
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:  # the caller's positions of real tokens, moved past each row's prompt
            kwargs["position_ids"] = position_ids + rows.row_lengths().unsqueeze(1).to(position_ids.device)
        return {**kwargs, "attention_mask": block.widen_mask(mask)}


def _without_choice(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in CHOICE_ARGUMENTS}


def _cache_is_empty(kwargs: dict) -> bool:
    """Whether `generate` starts a new sequence (no cache passed, or an empty one)."""
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is not None and cache_length(cache) > 0:
            return False
    return True


def _inferred_attention_mask(model: Any, inputs: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The attention mask `generate` infers when given none: 0 at `pad_token_id` in `input_ids`
    (unless pad is also an EOS token), else all ones."""
    ones = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
    if inputs.dim() != 2 or inputs.dtype not in (torch.int, torch.long):
        return ones
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    pad = kwargs.get("pad_token_id", getattr(config, "pad_token_id", None))
    eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    if pad is None or pad in eos or not bool((inputs == pad).any()):
        return ones
    return inputs.ne(pad).long()


class AdapterSavePretrained(MethodWrapper):
    """`save_pretrained` of a soft-prompted model: the adapter files, never the base weights.

    Installed with the first prompt, whichever way it got there (`add_soft_prompt`,
    `load_soft_prompt`, a Trainer), and taken off with the last. The Trainer's `_save` calls it for
    `save_model` and every checkpoint, with `is_main_process=False` on all ranks but the first and,
    under FSDP, the gathered `state_dict`. Sharding arguments do not apply to an adapter and are
    ignored. Inside `without_soft_prompt(model)` it saves the bare base model.
    """

    def __call__(self, save_directory: str | os.PathLike, is_main_process: bool = True,
                 state_dict: dict | None = None, push_to_hub: bool = False, **kwargs: Any) -> Any:
        if not self.active or is_bare(self.injector.model):
            return self.inner(save_directory, is_main_process=is_main_process, state_dict=state_dict,
                              push_to_hub=push_to_hub, **kwargs)
        if push_to_hub:
            raise ValueError(
                "save_pretrained(push_to_hub=True) is not supported for a soft-prompted model. Use "
                "save_soft_prompt(model, dir, push_to_hub=True, repo_id=...), which uploads the "
                "adapter and its model card."
            )
        if is_main_process:
            # The one call from this layer up into files/ (which builds on it): imported when called.
            from ..files.save import save_soft_prompt

            save_soft_prompt(self.injector.model, save_directory, full_state_dict=state_dict)
        return None
