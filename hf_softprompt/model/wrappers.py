"""The model's own methods, wrapped on the instance: `forward` (and a seq2seq encoder's) and `generate`.

Each wrapper reads the call's per-row prompt choice (`soft_prompt_names=[...]` or
`soft_prompt_ids=...`, popped so the model never sees them), asks the injector (inject.py) to
rewrite the inputs, runs the wrapped method with that choice current (`routing.rows_in_use`, read
by the seq2seq encoder and by task heads a prompt owns), and puts the outputs back in line. All
per-call state is local to the call.
"""

from __future__ import annotations

import contextvars
import inspect
from typing import TYPE_CHECKING, Any

import torch

from .rows import RowPrompts, VirtualBlock, rows_in_use

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
        if not self.active or _RUNNING.get() is self.injector:
            return self.inner(*args, **{k: v for k, v in kwargs.items() if k not in CHOICE_ARGUMENTS})
        kwargs = self.as_kwargs(args, kwargs)
        found = _batch_and_device(kwargs)
        if found is None:
            raise ValueError("A soft-prompted model needs input_ids, inputs_embeds (or, for seq2seq, "
                             "encoder_outputs), got none.")
        token = _RUNNING.set(self.injector)
        try:
            return self.run(kwargs, self.injector.rows_for_call(*found, kwargs))
        finally:
            _RUNNING.reset(token)

    def run(self, kwargs: dict, rows: RowPrompts) -> Any:
        kwargs, state = self.injector.prepare_inputs(kwargs, rows)
        with rows_in_use(rows):  # for the task heads the rows' prompts own
            output = self.inner(**kwargs)
        return output if state is None else self.injector.align_outputs(output, state)


class Seq2SeqForward(PromptedForward):
    """`forward` of an encoder-decoder model: the encoder call inside carries the prompt; the
    decoder's cross-attention mask is widened to the prompted encoder output."""

    def run(self, kwargs: dict, rows: RowPrompts) -> Any:
        injector = self.injector
        block = VirtualBlock(rows, injector.layout, injector.insert_at)
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
                mask_block = block.block([mask.new_ones(n) for n in rows.lengths], mask.new_zeros(()))
                kwargs["attention_mask"] = block.assemble(mask, mask_block)
        with rows_in_use(rows):  # the encoder inside and the task heads read it
            return self.inner(**kwargs)


class EncoderForward(MethodWrapper):
    """`forward` of a seq2seq model's encoder, which `generate` calls directly."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return self.inner(*args, **kwargs)
        kwargs = self.as_kwargs(args, kwargs)
        injector = self.injector
        found = _batch_and_device(kwargs)
        if found is None:
            return self.inner(**kwargs)
        rows = injector.rows_for_call(*found, kwargs)
        kwargs, _ = injector.prepare_inputs(kwargs, rows)
        return self.inner(**kwargs)


class PromptedGenerate(MethodWrapper):
    """`generate` that takes one prompt per input row (`soft_prompt_names` / `soft_prompt_ids`) and
    keeps that choice for every step, beams and returned sequences included."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        names, ids = (kwargs.get(key) for key in CHOICE_ARGUMENTS)
        if not self.active or (names is None and ids is None):
            return self.inner(*args, **{k: v for k, v in kwargs.items() if k not in CHOICE_ARGUMENTS})
        inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if not isinstance(inputs, torch.Tensor):
            raise ValueError("generate(soft_prompt_names=...) needs input_ids or inputs_embeds to know the "
                             "batch size.")
        choice = {key: kwargs.pop(key) for key in CHOICE_ARGUMENTS if key in kwargs}
        rows = self.injector.rows_for_call(inputs.shape[0], inputs.device, choice)
        with rows_in_use(rows):
            return self.inner(*args, **kwargs)
