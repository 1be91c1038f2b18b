"""The one injection mechanism, installed by `add_soft_prompt` (attach.py) and used by every call.

The model's own `forward` (and a seq2seq encoder's, and `generate`) is wrapped on the instance
(wrappers.py; no wrapper class: `isinstance`, the class's `forward` signature, `config` and
`generate()` stay the user's). Each call chooses a prompt per row (`soft_prompt_names=[...]` /
`soft_prompt_ids=...`, else the active prompt, fixed for the whole of a `generate()`), and
`SoftPromptInjector.prepare` hands it to the one function of its kind (inputs.py): no prompt, a
first call with the prompt concatenated or taken from the shared prompt cache, a `generate()`
decode step, or a hand-written loop's step continuing a cache. Everything one call needs lives in
that call's local variables, so threads calling one model never mix.

Encoder-decoder models: the prompt goes on the encoder input (the encoder's `forward` is wrapped
too, since `generate` calls it directly); the top-level call widens the attention mask the decoder
uses for cross-attention.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..accessors import encoder_of, input_embeddings
from ..config import Placement, SoftPromptConfig, TaskType, config_enum
from .alignment import OutputAlignment
from .bank import BANK_MODULE_NAME, SoftPromptBank
from .inputs import (
    Call,
    ModelFacts,
    concatenated_first_call,
    decode_step,
    generate_step,
    no_prompt_call,
    read_call,
    refuse_packed_rows,
    shared_first_call,
)
from .labels import check_label_shapes
from .layout import Layout, VirtualBlock
from .prompt_cache import SHARED, SharedPromptCache
from .rows import RowPrompts, choose_rows, current_rows, scoped_prompt
from .tasks import TASK_SPECS, cache_argument, is_decoder_only, max_positions
from .wrappers import (
    CHOICE_ARGUMENTS,
    AdapterSavePretrained,
    EncoderForward,
    MethodWrapper,
    PromptedForward,
    PromptedGenerate,
    Seq2SeqForward,
)

_INJECTOR_ATTR = "_soft_prompt_injector"


class SoftPromptInjector:
    """Rewrites every call of one model to carry the prompts of its `SoftPromptBank`.

    Model-level settings (task head, placement, shared prompt cache) come from the first prompt's
    config; every other prompt on the model must agree on them (attach.py checks).

    `client_advice` holds what a client layer adds to an error about the inputs it built, by kind:
    `"too_long"` (a format string with `{fits}`, the most input tokens that fit) and `"packed"`.
    The training layer fills it (its Trainer recipes and TRL flags); the core names none.
    """

    def __init__(self, model: nn.Module, bank: SoftPromptBank, config: SoftPromptConfig) -> None:
        self.model = model
        self.bank = bank
        self.task_type: TaskType = config_enum(TaskType, config.task_type, "task_type")
        self.placement: Placement = config_enum(Placement, config.placement, "placement")
        self.spec = TASK_SPECS[self.task_type]
        self.insert_at = 1 if config.placement is Placement.AFTER_FIRST_TOKEN else 0
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        decoder_only = is_decoder_only(model)
        self.layout = Layout.FRONT if decoder_only else Layout.END
        self.target = encoder_of(model) if self.encoder_decoder else model
        self.facts = ModelFacts(
            spec=self.spec, decoder_only=decoder_only,
            accepts=frozenset(inspect.signature(self.target.forward).parameters),
            cache_key=cache_argument(self.target), max_positions=max_positions(model.config),
            # Decoder-only sequence classifiers pool the last position of `inputs_embeds`.
            pools_last_token=decoder_only and config.task_type is TaskType.SEQ_CLS, config=model.config)
        self.frozen_flags: dict[str, bool] = {}  # requires_grad of base parameters before the first prompt
        self.client_advice: dict[str, str] = {}
        # The prompt-choice column of the data being trained on (set by the training layer): training
        # calls must then carry it.
        self.training_column: str | None = None
        self.shared = SharedPromptCache(model, self.spec, setting=config.shared_prompt_cache,
                                        front=self.insert_at == 0)
        self._patched: list[tuple[nn.Module, str, Any]] = []  # (module, attribute, what it replaced)
        self.installed = True  # False once removed: wrappers left in place then pass calls through
        try:
            if self.encoder_decoder:
                self._patch(model, "forward", Seq2SeqForward)
                self._patch(self.target, "forward", EncoderForward)
            else:
                self._patch(model, "forward", PromptedForward)
            if hasattr(type(model), "generate"):
                self._patch(model, "generate", PromptedGenerate)
            if hasattr(type(model), "save_pretrained"):
                self._patch(model, "save_pretrained", AdapterSavePretrained)
        except BaseException:
            self.remove()
            raise

    @property
    def decoder_only(self) -> bool:
        return self.facts.decoder_only

    # --------------------------------------------------------------- the choice
    def rows_for_call(self, batch: int, device: torch.device, kwargs: dict) -> RowPrompts:
        """This call's prompt per row: its own `soft_prompt_names`/`soft_prompt_ids` (popped), else
        the choice of the `generate()` in progress, else the prompt of the `using_soft_prompt` block
        in progress, else the active prompt, for every row."""
        names, ids = (kwargs.pop(key, None) for key in CHOICE_ARGUMENTS)
        if names is None and ids is None and (outer := current_rows()) is not None:
            return outer.for_batch(batch).to(device)
        if names is None and ids is None and self.training_column and self.model.training:
            # Rows whose data chose a prompt must never silently train the active one instead.
            advice = self.client_advice.get("dropped", "")
            raise ValueError(
                f"The training data has a {self.training_column!r} column, but this training batch has none: "
                "something between the dataset and the model dropped it (a data collator that keeps only "
                f"the columns it knows), so every row would train the active prompt.{advice}"
            )
        active = scoped_prompt(self.model, self.bank.active)  # a using_soft_prompt block's, else the model's
        if active is not None and active not in self.bank:
            raise ValueError(f"This call runs inside using_soft_prompt(model, {active!r}), but {active!r} was removed "
                             f"from the model meanwhile; its prompts are {self.bank.names()}.")
        rows = choose_rows(self.bank.names(), self.bank.lengths(), active, batch, names, ids, device=device)
        if (self.layout is Layout.FRONT and not rows.uniform and rows.width
                and "position_ids" not in self.facts.accepts):
            raise ValueError(
                f"{type(self.target).__name__}.forward takes no position_ids, so rows whose prompts differ "
                f"in length ({dict(zip(rows.slots, rows.lengths, strict=True))}, or rows without a prompt) "
                "cannot share a batch. Call the model once per prompt."
            )
        return rows

    def block(self, rows: RowPrompts) -> VirtualBlock:
        """Where the rows' prompts go in this model's sequences."""
        return VirtualBlock(rows, self.layout, self.insert_at)

    # ------------------------------------------------------------------ inputs
    def prepare(self, kwargs: dict, rows: RowPrompts, counted: bool = False) -> tuple[dict, OutputAlignment | None]:
        """Rewrite one call's keyword arguments to carry each row's prompt, by the kind of call.
        Returns them and how to align the outputs (None: nothing to cut). `counted`: inside a
        `generate()` whose mask and positions already cover the prompt."""
        call = read_call(kwargs, self.facts.cache_key)
        if call.past and counted:  # a generate() decode step: its inputs are in line already
            return generate_step(kwargs, call, rows.width), None
        block = self.block(rows.for_batch(call.batch).to(call.device))
        check_label_shapes(kwargs, self.spec, call.batch, call.length)
        self._check_fits(call, block)
        if block.width == 0:
            return no_prompt_call(kwargs, call), None
        if call.past:
            return decode_step(kwargs, call, block, self.facts), None
        if self.decoder_only:
            refuse_packed_rows(kwargs, call.mask, self.client_advice.get("packed", ""))
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = input_embeddings(self.model)(call.input_ids)
        prompts = [self.bank[name]().to(dtype=embeds.dtype, device=call.device) for name in block.rows.slots]
        if self.shared.reason_against(kwargs, call.device, block.rows) is SHARED:
            # Each distinct prompt runs once; its keys/values come in as this call's cache.
            caller_cache = kwargs.get(self.facts.cache_key)
            cache = self.shared.build(prompts, block.rows, caller_cache)
            return shared_first_call(kwargs, call, block, embeds, cache, caller_cache, counted, self.facts)
        return concatenated_first_call(kwargs, call, block, embeds, prompts, counted, self.facts)

    def _check_fits(self, call: Call, block: VirtualBlock) -> None:
        """Refuse a call that needs more positions than the model has, naming the most that fit.

        Decoder-only models take positions from the mask (positions.py): a row needs its own prompt
        plus its own attended tokens, however wide the padded batch is. Other models count positions
        by index in the (W+L) sequence."""
        limit = self.facts.max_positions
        width = block.width
        total = call.past + call.length + (0 if call.past else width)
        if limit is None or total <= limit:
            return
        row = None
        if not call.past and self.layout is Layout.FRONT and self.facts.positions_from_mask:
            prompt = block.rows.row_lengths()  # (B,)
            attended = call.mask.sum(1) if call.mask is not None else torch.full_like(prompt, call.length)
            needed = attended + prompt if call.mask is None or call.mask.shape[1] == call.length else attended
            row = int(needed.argmax())
            width, total = int(prompt[row]), int(needed[row])
            if total <= limit:
                return
        fits = limit - width
        advice = self.client_advice.get("too_long", "").format(fits=fits)
        which = "" if row is None or call.batch == 1 else f" in row {row}"
        raise ValueError(
            f"The prompt ({width} virtual tokens) plus the input ({total - width} tokens){which} exceed the "
            f"model's {limit} positions. Truncate inputs to at most {fits} tokens: "
            f"tokenizer(..., truncation=True, max_length={fits}).{advice}"
        )

    # ------------------------------------------------------------ install/remove
    def ensure_outermost(self) -> None:
        """Wrap the model's `forward` again if another library replaced it after us.

        TRL's trainers replace `model.forward` with a fused-LM-head forward that, for its loss, calls
        the backbone directly, so a prompt injected by the `forward` it replaced would never be seen.
        Wrapped again, our `forward` rewrites the inputs first; the older wrapper inside passes the
        prepared call through (one injection per call).
        """
        current = self.model.__dict__.get("forward")
        if not self.installed or (isinstance(current, MethodWrapper) and current.injector is self):
            return
        self._patch(self.model, "forward", Seq2SeqForward if self.encoder_decoder else PromptedForward)

    def _patch(self, module: nn.Module, attribute: str, wrapper_cls: type) -> None:
        previous = module.__dict__.get(attribute)  # e.g. accelerate's wrapped forward
        inner = previous if previous is not None else getattr(type(module), attribute).__get__(module)
        setattr(module, attribute, wrapper_cls(self, inner))
        self._patched.append((module, attribute, previous))

    def remove(self) -> None:
        """Put back every `forward`/`generate` this injector replaced. A wrapper that something else
        has wrapped since (e.g. accelerate's autocast) stays in place and passes calls through."""
        self.installed = False
        for module, attribute, previous in reversed(self._patched):
            current = module.__dict__.get(attribute)
            if isinstance(current, MethodWrapper) and current.injector is self:
                if previous is None:
                    delattr(module, attribute)
                else:
                    setattr(module, attribute, previous)
        self._patched.clear()


def install_injector(model: nn.Module, bank: SoftPromptBank, config: SoftPromptConfig) -> SoftPromptInjector:
    """Register `bank` as `model.soft_prompts` and wrap the model; the one place prompts go on."""
    model.add_module(BANK_MODULE_NAME, bank)
    try:
        injector = SoftPromptInjector(model, bank, config)
    except BaseException:
        delattr(model, BANK_MODULE_NAME)
        raise
    setattr(model, _INJECTOR_ATTR, injector)
    return injector


def uninstall_injector(model: nn.Module) -> SoftPromptInjector:
    """Unwrap `model` and detach its prompt bank; returns the removed injector."""
    injector = get_injector(model)
    if injector is None:
        raise ValueError(f"{type(model).__name__} carries no soft prompt to remove.")
    injector.remove()
    delattr(model, BANK_MODULE_NAME)
    delattr(model, _INJECTOR_ATTR)
    return injector


def get_injector(model: nn.Module) -> SoftPromptInjector | None:
    """The injector of a soft-prompted model, or None."""
    return getattr(model, _INJECTOR_ATTR, None)


def require_injector(model: nn.Module) -> SoftPromptInjector:
    """The injector of a soft-prompted model; a clear error for a model without prompts."""
    injector = get_injector(model)
    if injector is None:
        raise ValueError(f"{type(model).__name__} carries no soft prompt; call add_soft_prompt first.")
    return injector


def require_bank(model: nn.Module) -> SoftPromptBank:
    """The prompt bank of a soft-prompted model; a clear error for a model without prompts."""
    return require_injector(model).bank
