"""The one injection mechanism, installed by `add_soft_prompt` (attach.py) and used by every call.

The model's own `forward` is wrapped on the instance (methods.py; no wrapper class: `isinstance`, the class's
`forward` signature, `config` and `generate()` are the user's): each call chooses a prompt per row
(`soft_prompt_names=[...]` / `soft_prompt_ids=...`, else the active prompt), its prompts are
inserted into the input embeddings (routing.py lays out rows whose prompts differ in length), the
attention mask, token types, positions and per-position labels are extended to match, and
per-position outputs are cut back so they line up with the caller's `input_ids`. Everything one
call needs lives in that call's local variables, so threads calling one model never mix.

Decoder-only models: the first call of a sequence carries the prompt; later calls that continue
a cache (`generate` decode steps) find the prompt already in the key/value cache and only extend
their mask and positions. Where `prompt_cache` allows, the first call does not repeat the prompt
in every row: each distinct prompt's keys/values, computed once, come in as the call's cache (the
shared prompt cache). The cache argument is `past_key_values` before transformers 5.24 and
`cache` from then on: `self.cache_key`.

Encoder-decoder models: the prompt goes on the encoder input (the encoder's `forward` is wrapped
too, since `generate` calls it directly); the top-level call widens the attention mask the decoder
uses for cross-attention.

Labels: the prompt changes the context, never the set of predicted tokens. A causal LM predicts
`labels[:, 1:]` as without a prompt (the last virtual position predicts nothing), so the
Trainer's count of target tokens, and losses before and after adding a prompt, compare as they are.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import Placement, SoftPromptConfig, TaskType
from .bank import BANK_MODULE_NAME, SoftPromptBank
from .prompt_cache import SHARED, SharedPromptCache
from .rows import Layout, RowPrompts, VirtualBlock, choose_rows, current_rows, gather_rows
from .tasks import TASK_SPECS, TaskSpec, cache_argument, is_decoder_only
from .wrappers import (
    CHOICE_ARGUMENTS,
    EncoderForward,
    MethodWrapper,
    PromptedForward,
    PromptedGenerate,
    Seq2SeqForward,
)

_INJECTOR_ATTR = "_soft_prompt_injector"


@dataclass
class _CallState:
    """What one top-level call did to its inputs, so its outputs can be put back in line."""

    block: VirtualBlock
    num_real: int  # L: the caller's sequence length
    in_sequence: int  # virtual positions in the model's sequence: the block width, or 0 (shared cache)
    roll: torch.Tensor | None = None  # (B,) per-row right shift applied for last-token pooling
    as_tuple: bool = False
    drop_cache: bool = False  # the shared prompt cache was passed to a call made with use_cache=False


class SoftPromptInjector:
    """Rewrites every call of one model to carry the prompts of its `SoftPromptBank`.

    Model-level settings (task head, placement, shared prompt cache) come from the first prompt's
    config; every other prompt on the model must agree on them (attach.py checks).
    """

    def __init__(self, model: nn.Module, bank: SoftPromptBank, config: SoftPromptConfig) -> None:
        self.model = model
        self.bank = bank
        self.task_type: TaskType = config.task_type
        self.placement: Placement = config.placement
        self.shared_setting: bool | None = config.shared_prompt_cache
        self.spec: TaskSpec = TASK_SPECS[config.task_type]
        self.insert_at = 1 if config.placement is Placement.AFTER_FIRST_TOKEN else 0
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.decoder_only = is_decoder_only(model)
        self.layout = Layout.FRONT if self.decoder_only else Layout.END
        # Decoder-only sequence classifiers pool the last position of `inputs_embeds`; we move
        # each row's last real token there so the pooled token is a real one, as without a prompt.
        self.pools_last_token = self.decoder_only and config.task_type is TaskType.SEQ_CLS
        self.max_positions = max_positions(model.config)
        self.frozen_flags: dict[str, bool] = {}  # requires_grad of base parameters before the first prompt
        self.target = model.get_encoder() if self.encoder_decoder else model
        self._target_accepts = set(inspect.signature(self.target.forward).parameters)
        self.cache_key = cache_argument(self.target)  # `cache` or (before transformers 5.24) `past_key_values`
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
        except BaseException:
            self.remove()
            raise

    # --------------------------------------------------------------- the choice
    def rows_for_call(self, batch: int, device: torch.device, kwargs: dict) -> RowPrompts:
        """This call's prompt per row: its own `soft_prompt_names`/`soft_prompt_ids`, else the
        choice of the `generate()` in progress, else the active prompt for every row."""
        names, ids = (kwargs.pop(key, None) for key in CHOICE_ARGUMENTS)
        if names is None and ids is None and (outer := current_rows()) is not None:
            return outer.for_batch(batch).to(device)
        rows = choose_rows(self.bank.names(), self.bank.lengths(), self.bank.active, batch,
                           names, ids, device=device)
        if (self.layout is Layout.FRONT and not rows.uniform and rows.width
                and "position_ids" not in self._target_accepts):
            raise ValueError(
                f"{type(self.target).__name__}.forward takes no position_ids, so rows whose prompts differ "
                f"in length ({dict(zip(rows.slots, rows.lengths, strict=True))}, or rows without a prompt) "
                "cannot share a batch. Call the model once per prompt."
            )
        return rows

    # ------------------------------------------------------------------ inputs
    def prepare_inputs(self, kwargs: dict, rows: RowPrompts) -> tuple[dict, _CallState | None]:
        """Rewrite one call's keyword arguments to carry each row's prompt. Returns them and the state
        `align_outputs` needs; the state is None when nothing is to be cut from the outputs."""
        input_ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if input_ids is not None and embeds is not None:
            raise ValueError("Pass input_ids or inputs_embeds, not both (the model would use one and ignore "
                             "the other).")
        if embeds is None and input_ids is None:
            raise ValueError("A soft-prompted model needs input_ids or inputs_embeds, got neither.")
        batch, length = (embeds if embeds is not None else input_ids).shape[:2]
        device = (embeds if embeds is not None else input_ids).device
        rows = rows.for_batch(batch).to(device)
        block = VirtualBlock(rows, self.layout, self.insert_at)
        width = block.width
        if "past_key_values" in kwargs and self.cache_key not in kwargs:
            # The old name, which transformers >= 5.24 still accepts: read one name only.
            kwargs[self.cache_key] = kwargs.pop("past_key_values")
        cache = kwargs.get(self.cache_key)
        past = _cache_length(cache)
        mask = kwargs.get("attention_mask")
        if self.decoder_only and width and not past:
            _refuse_packed_rows(kwargs, mask)
        if mask is not None and mask.dim() != 2:
            raise ValueError(
                f"A soft-prompted model needs a 2-D (batch, length) attention_mask, got shape "
                f"{tuple(mask.shape)}. Pass the tokenizer's attention_mask instead of a 4-D mask."
            )
        # After the first call `past` already counts the prompt.
        total = past + length + (0 if past else width)
        if self.max_positions is not None and total > self.max_positions:
            fits = self.max_positions - width
            # Name each client's own knob: scripts that group texts never call the tokenizer with max_length.
            raise ValueError(
                f"The prompt ({width} virtual tokens) plus the input ({total - width} tokens) exceed the "
                f"model's {self.max_positions} positions. Truncate inputs to at most {fits} tokens: "
                f"tokenizer(..., truncation=True, max_length={fits}); in transformers' run_glue.py, "
                f"run_ner.py or run_qa.py --max_seq_length {fits}; with texts grouped into blocks as in "
                f"run_clm.py, --block_size {fits}; with TRL, SFTConfig(max_length={fits})."
            )
        for key in self.spec.per_position_labels:
            labels = kwargs.get(key)
            if labels is not None and (labels.dim() < 2 or labels.shape[:2] != (batch, length)):
                raise ValueError(
                    f"{key} has shape {tuple(labels.shape)} for an input of shape {(batch, length)}; give one "
                    "label per input token (-100 where none), e.g. the tokenizer's padding for labels too."
                )
        if width == 0:  # no row has a prompt: the bare model's call, untouched
            if input_ids is not None:
                kwargs["input_ids"] = input_ids
            return kwargs, None
        if embeds is None:
            embeds = self.model.get_input_embeddings()(input_ids)
        mask_block = block.block([torch.ones(n, dtype=torch.long, device=device) for n in rows.lengths],
                                 torch.zeros((), dtype=torch.long, device=device))  # (B, width)

        if past > 0:
            # The prompt went into the cache with the first call: only extend mask and positions.
            kwargs["inputs_embeds"] = embeds
            if mask is not None and mask.shape[1] + width == past + length:
                mask = block.assemble(mask, mask_block)
                kwargs["attention_mask"] = mask
            self._set_positions(kwargs, block, mask_block, mask, length, past, continuing=True)
            return kwargs, None

        prompts = [self.bank[name]().to(dtype=embeds.dtype, device=device) for name in rows.slots]  # (P_k, D)
        shared = self.shared.reason_against(kwargs, device) is SHARED
        if shared:
            # Each distinct prompt runs once; its keys/values come in as this call's cache.
            kwargs[self.cache_key] = self.shared.build(prompts, rows, cache)
        else:
            filler = torch.zeros(embeds.shape[-1], dtype=embeds.dtype, device=device)
            embeds = block.assemble(embeds, block.block(prompts, filler))  # (B, width+L, D)
        in_sequence = 0 if shared else width
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=device)
        if mask.shape[1] == length:
            mask = block.assemble(mask, mask_block.to(mask.dtype))  # (B, width+L), a cached prompt included
        elif mask.shape[1] != length + width:  # width+L: widened already by the seq2seq call
            raise ValueError(
                f"attention_mask has {mask.shape[1]} positions for an input of {length} tokens; "
                "pass the tokenizer's attention_mask for the same input_ids."
            )
        kwargs["inputs_embeds"] = embeds
        kwargs["attention_mask"] = mask
        if in_sequence and kwargs.get("token_type_ids") is not None:
            # Virtual tokens belong to the first segment.
            token_type_ids = kwargs["token_type_ids"].expand(batch, -1)
            kwargs["token_type_ids"] = block.assemble(token_type_ids, token_type_ids.new_zeros(batch, width))
        self._rewrite_labels(kwargs, block, in_sequence, length)
        self._set_positions(kwargs, block, mask_block, mask, length, past, continuing=False, shared=shared)

        state = _CallState(block=block, num_real=length, in_sequence=in_sequence)
        if shared and cache is None:
            use_cache = kwargs.get("use_cache")
            state.drop_cache = not (self.model.config.use_cache if use_cache is None else use_cache)
        if kwargs.get("return_dict") is False:
            kwargs["return_dict"], state.as_tuple = True, True
        if self.pools_last_token:
            state.roll = self._roll_last_real_token_to_end(kwargs, input_ids, block, mask_block)
        return kwargs, state

    def _rewrite_labels(self, kwargs: dict, block: VirtualBlock, in_sequence: int, length: int) -> None:
        """Per-position labels: -100 at every virtual position in the sequence, and a causal LM's
        targets stay `labels[:, 1:]`; QA spans move to where their tokens are."""
        keep = kwargs.get("logits_to_keep")
        keeps_real_only = (  # a causal LM asked for logits at the L real positions only
            self.spec.shifts_labels and in_sequence and "logits_to_keep" in self._target_accepts
            and (keep is None or (isinstance(keep, int) and keep == 0))
            and not any(kwargs.get(flag) for flag in FULL_SEQUENCE_LOSS_FLAGS))
        if keeps_real_only:
            kwargs["logits_to_keep"] = length  # no LM head over virtual positions; labels stay (B, L)
        for key in self.spec.per_position_labels:
            labels = kwargs.get(key)
            if labels is None or not in_sequence or keeps_real_only:
                continue
            if self.spec.shifts_labels:  # the last virtual position would predict labels[:, 0]
                labels = torch.cat([labels.new_full((labels.shape[0], 1), -100), labels[:, 1:]], 1)
            kwargs[key] = block.assemble(labels, labels.new_full((labels.shape[0], block.width), -100))
        for key in self.spec.position_labels:
            if kwargs.get(key) is not None and in_sequence:
                kwargs[key] = block.shift_positions(kwargs[key])

    def _set_positions(self, kwargs: dict, block: VirtualBlock, mask_block: torch.Tensor,
                       mask: torch.Tensor | None, length: int, past: int, continuing: bool,
                       shared: bool = False) -> None:
        width = block.width
        row_lengths = block.rows.row_lengths().unsqueeze(1)  # (B, 1)
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            position_ids = position_ids.expand(mask_block.shape[0], -1)
            if continuing:
                kwargs["position_ids"] = position_ids + row_lengths.to(position_ids.device)
            else:
                # The prompt takes the positions after the tokens before it; real tokens after it move
                # by the row's own prompt length.
                i = self.insert_at
                start = position_ids[:, i - 1:i] + 1 if i else position_ids.new_zeros(position_ids.shape[0], 1)
                slot = torch.arange(width, device=position_ids.device).unsqueeze(0)
                offset = slot - (width - row_lengths) if block.layout is Layout.FRONT else slot
                virtual = start + offset.clamp(min=0).clamp(max=(row_lengths - 1).clamp(min=0))
                real = torch.cat([position_ids[:, :i], position_ids[:, i:] + row_lengths], 1)
                kwargs["position_ids"] = real if shared else block.assemble(real, virtual)
        elif self.decoder_only and "position_ids" in self._target_accepts and mask is not None:
            # What `generate` does: positions count attended tokens, so padding side and filler slots
            # do not matter.
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            kwargs["position_ids"] = positions[:, -length:] if continuing or shared else positions
        cache_position = kwargs.get("cache_position")
        if cache_position is not None:
            kwargs["cache_position"] = (
                cache_position + width if continuing
                else torch.arange(past + (width if shared else 0), past + length + width,
                                  device=cache_position.device)
            )

    def _roll_last_real_token_to_end(self, kwargs: dict, input_ids: torch.Tensor | None,
                                     block: VirtualBlock, mask_block: torch.Tensor) -> torch.Tensor | None:
        """Rotate each row right so its last real token is the last position; returns the shifts.

        "Last real token" is what the base model pools: the rightmost token that is not
        `pad_token_id` (from `input_ids`), or else the rightmost attended position.
        """
        mask = kwargs["attention_mask"]
        batch, total = mask.shape  # width+L
        width = kwargs["inputs_embeds"].shape[1]  # width+L, or L with the shared prompt cache
        pad_id = getattr(self.model.config, "pad_token_id", None)
        if input_ids is not None and pad_id is not None:
            real = block.assemble((input_ids != pad_id).long(), mask_block)[:, total - width:]
        else:
            real = mask[:, total - width:].long()
        index = torch.arange(width, device=mask.device)
        last_real = (index * real).argmax(-1)  # (B,)
        shift = width - 1 - last_real
        if not bool(shift.any()):
            return None
        source = (index.unsqueeze(0) - shift.unsqueeze(1)) % width  # (B, width)
        # The mask columns of a cached prompt stay in front; the rest turn with the sequence.
        turned = gather_rows(mask[:, total - width:], source)
        kwargs["attention_mask"] = torch.cat([mask[:, :total - width], turned], 1)
        for key in ("inputs_embeds", "position_ids", "token_type_ids"):
            value = kwargs.get(key)
            if value is not None:
                kwargs[key] = gather_rows(value.expand(batch, *value.shape[1:]), source)
        return shift

    # ----------------------------------------------------------------- outputs
    def align_outputs(self, output: Any, state: _CallState) -> Any:
        """Cut the virtual positions out of per-position outputs (logits, QA logits, hidden states)."""
        if state.drop_cache and output.get(self.cache_key) is not None:
            # Some models return a cache they were given even with use_cache=False; `generate`
            # would then continue from it. ModelOutput keys cannot be deleted: rebuild it.
            output = type(output)(**{k: v for k, v in output.items() if k != self.cache_key})
        for key in self.spec.per_position_outputs:
            value = output.get(key) if hasattr(output, "get") else None
            if value is None:
                continue
            if isinstance(value, tuple):
                output[key] = tuple(self._drop_virtual(v, state) for v in value)
            else:
                output[key] = self._drop_virtual(value, state)
        return output.to_tuple() if state.as_tuple else output

    def _drop_virtual(self, x: torch.Tensor, state: _CallState) -> torch.Tensor:
        length = state.num_real
        if state.roll is not None and x.shape[1] == state.in_sequence + length:
            total = x.shape[1]
            index = torch.arange(total, device=x.device)
            x = gather_rows(x, (index.unsqueeze(0) + state.roll.unsqueeze(1).to(x.device)) % total)
        if state.in_sequence and x.shape[1] == state.in_sequence + length:
            return state.block.extract(x, length)
        return x

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


# ----------------------------------------------------------- the model's injector
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


# -------------------------------------------------------------------- helpers
# Forward flags of other libraries under which the loss reads the hidden state of every position
# and ignores `logits_to_keep` (TRL's fused LM head): labels must then cover the virtual positions.
FULL_SEQUENCE_LOSS_FLAGS = ("fused_lm_head",)
# Inputs that describe several sequences packed into one row (flash-attention varlen, TRL padding-free).
PACKED_SEQUENCE_ARGUMENTS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def _refuse_packed_rows(kwargs: dict, mask: torch.Tensor | None) -> None:
    """Refuse a batch of packed sequences: one prompt in front of a row would be seen by every
    sequence packed into it, and each sequence needs its own (PEFT has the same limit)."""
    packed = [key for key in PACKED_SEQUENCE_ARGUMENTS if kwargs.get(key) is not None]
    positions = kwargs.get("position_ids")
    if not packed and mask is None and isinstance(positions, torch.Tensor) and positions.shape[-1] > 1:
        if bool((positions[..., 1:] < positions[..., :-1]).any()):  # positions restart inside a row
            packed = ["position_ids restarting inside a row"]
    if packed:
        raise ValueError(
            f"This batch packs several sequences into one row ({', '.join(packed)}), which a soft prompt "
            "cannot serve: one prompt in front of the row would be shared by every sequence in it. Train "
            "without packing (TRL: SFTConfig(packing=False, padding_free=False)); padded batches give each "
            "sequence its own prompt."
        )


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # legacy tuple of (key, value) pairs


def max_positions(model_config: Any) -> int | None:
    """The model's maximum number of positions, when its config says."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
