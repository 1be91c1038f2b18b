"""The one injection mechanism, installed by `add_soft_prompt` (attach.py) and used by every call.

Forward hooks on the user's own model (no wrapper class) rewrite each call: the prompt is
inserted into the input embeddings, the attention mask, token types, positions and per-position
labels are extended to match, and per-position outputs are cut back so they line up with the
caller's `input_ids`. The same hooks serve training, evaluation, the Trainer and `generate()`.

Decoder-only models: the first call of a sequence carries the prompt; later calls that continue
a cache (`generate` decode steps) find the prompt already in the key/value cache and only shift
their mask and positions. Where `prompt_cache` allows, the first call does not repeat the prompt
in every row: its keys/values, computed once, come in as the call's cache (the shared prompt
cache), and the sequence carries at most the last virtual token. The cache argument is
`past_key_values` before transformers 5.24 and `cache` from then on: `self.cache_key`.

Encoder-decoder models: the prompt goes on the encoder input (a hook on the encoder, since
`generate` calls it directly); the top-level call widens the attention mask the decoder uses for
cross-attention.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import Placement, SoftPromptConfig, TaskType
from .prompt import SoftPrompt
from .prompt_cache import SharedPromptCache
from .tasks import TASK_SPECS, TaskSpec, cache_argument, is_decoder_only

logger = logging.getLogger(__name__)

PROMPT_MODULE_NAME = "soft_prompt"
_INJECTOR_ATTR = "_soft_prompt_injector"


@dataclass
class _CallState:
    """What one top-level call did to its inputs, so its outputs can be put back in line."""

    insert_at: int  # index of the first virtual token in the model's sequence
    num_real: int  # L: the caller's sequence length
    num_virtual: int  # virtual tokens in the sequence: P, or 0/1 with the shared prompt cache
    roll: torch.Tensor | None = None  # (B,) per-row right shift applied for last-token pooling
    as_tuple: bool = False
    drop_cache: bool = False  # the shared prompt cache was passed to a call made with use_cache=False


class SoftPromptInjector:
    """Owns the hooks that put a `SoftPrompt` into every forward of one model."""

    def __init__(self, model: nn.Module, config: SoftPromptConfig, prompt: SoftPrompt) -> None:
        self.model = model
        self.config = config
        self.prompt = prompt
        self.spec: TaskSpec = TASK_SPECS[config.task_type]
        self.num_virtual = config.num_virtual_tokens
        self.insert_at = 1 if config.placement is Placement.AFTER_FIRST_TOKEN else 0
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.decoder_only = is_decoder_only(model)
        # Decoder-only sequence classifiers pool the last position of `inputs_embeds`; we move
        # each row's last real token there so the pooled token is a real one, as without a prompt.
        self.pools_last_token = self.decoder_only and config.task_type is TaskType.SEQ_CLS
        self.max_positions = _max_positions(model.config)
        self.shared = SharedPromptCache(model, self.spec, setting=config.shared_prompt_cache,
                                        front=self.insert_at == 0)
        self._state: _CallState | None = None
        self._handles: list[Any] = []

        target = model.get_encoder() if self.encoder_decoder else model
        self._target_params = _positional_names(target)
        self._target_accepts = set(inspect.signature(target.forward).parameters)
        self.cache_key = cache_argument(target)  # `cache` or (before transformers 5.24) `past_key_values`
        self._top_params = _positional_names(model)
        if self.encoder_decoder:
            self._handles.append(target.register_forward_pre_hook(self._encoder_pre_hook, with_kwargs=True))
            self._handles.append(model.register_forward_pre_hook(self._seq2seq_pre_hook, with_kwargs=True))
        else:
            self._handles.append(model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._post_hook, with_kwargs=True))

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = _as_kwargs(args, kwargs, self._top_params)
        kwargs, self._state = self.prepare_inputs(kwargs)
        return (), kwargs

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state, self._state = self._state, None
        if state is None:
            return output
        output = self.align_outputs(output, state)
        return output.to_tuple() if state.as_tuple else output

    def _encoder_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = _as_kwargs(args, kwargs, self._target_params)
        kwargs, _ = self.prepare_inputs(kwargs)
        return (), kwargs

    def _seq2seq_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # The decoder cross-attends to P + L encoder positions: widen the mask it gets. The
        # encoder hook sees the widened mask and does not widen it again.
        kwargs = _as_kwargs(args, kwargs, self._top_params)
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            return (), kwargs
        encoder_outputs = kwargs.get("encoder_outputs")
        if encoder_outputs is not None:
            encoded_len = encoder_outputs[0].shape[1]
        else:
            source = kwargs.get("input_ids")
            if source is None:
                source = kwargs.get("inputs_embeds")
            if source is None:
                return (), kwargs
            encoded_len = source.shape[1] + self.num_virtual
        if mask.shape[1] + self.num_virtual == encoded_len:
            kwargs["attention_mask"] = self._insert(mask, mask.new_ones(()))
        return (), kwargs

    # ------------------------------------------------------------------ inputs
    def prepare_inputs(self, kwargs: dict) -> tuple[dict, _CallState | None]:
        """Rewrite one call's keyword arguments to carry the prompt. Returns them and the state
        `align_outputs` needs; the state is None when the prompt is already in the cache."""
        input_ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            if input_ids is None:
                raise ValueError("A soft-prompted model needs input_ids or inputs_embeds, got neither.")
            embeds = self.model.get_input_embeddings()(input_ids)
        batch, length = embeds.shape[:2]
        num_virtual = self.num_virtual
        if "past_key_values" in kwargs and self.cache_key not in kwargs:
            # The old name, which transformers >= 5.24 still accepts: read one name only.
            kwargs[self.cache_key] = kwargs.pop("past_key_values")
        cache = kwargs.get(self.cache_key)
        past = _cache_length(cache)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(
                f"A soft-prompted model needs a 2-D (batch, length) attention_mask, got shape "
                f"{tuple(mask.shape)}. Pass the tokenizer's attention_mask instead of a 4-D mask."
            )
        # After the first call `past` already counts the prompt.
        total = past + length + (0 if past else num_virtual)
        if self.max_positions is not None and total > self.max_positions:
            raise ValueError(
                f"The prompt ({num_virtual} virtual tokens) plus the input ({total - num_virtual} tokens)"
                f" exceed the model's {self.max_positions} positions. Truncate inputs to at most "
                f"{self.max_positions - num_virtual} tokens (e.g. tokenizer(..., truncation=True, "
                f"max_length={self.max_positions - num_virtual}))."
            )

        if past > 0:
            # The prompt went into the cache with the first call: only shift mask and positions.
            kwargs["inputs_embeds"] = embeds
            if mask is not None and mask.shape[1] + num_virtual == past + length:
                mask = self._insert(mask, mask.new_ones(()))
                kwargs["attention_mask"] = mask
            self._set_positions(kwargs, mask, batch, length, past, continuing=True)
            return kwargs, None

        prompt = self.prompt().to(dtype=embeds.dtype, device=embeds.device)  # (P, D)
        carried = self._virtual_in_sequence(kwargs, embeds.device)
        if carried < num_virtual:
            # The other virtual tokens come in as keys/values computed once for the whole batch.
            kwargs[self.cache_key] = self.shared.build(prompt[: num_virtual - carried], batch, cache)
        embeds = self._insert(embeds, prompt[num_virtual - carried:])  # (B, carried+L, D)
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        if mask.shape[1] == length:
            mask = self._insert(mask, mask.new_ones(()))  # (B, P+L), the cached prompt included
        elif mask.shape[1] != length + num_virtual:  # P+L: widened already by the seq2seq hook
            raise ValueError(
                f"attention_mask has {mask.shape[1]} positions for an input of {length} tokens; "
                "pass the tokenizer's mask for the same input_ids."
            )
        kwargs["inputs_embeds"] = embeds
        kwargs["attention_mask"] = mask
        if kwargs.get("token_type_ids") is not None:
            # Virtual tokens belong to the first segment.
            token_type_ids = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = self._insert(token_type_ids, token_type_ids.new_zeros(()))
        labelled = self._keep_logits(kwargs, carried, length)
        for key in self.spec.per_position_labels:
            if kwargs.get(key) is not None:
                # -100 so virtual positions never count in the loss
                kwargs[key] = self._insert(kwargs[key], kwargs[key].new_full((), -100), labelled)
        for key in self.spec.position_labels:
            if kwargs.get(key) is not None:
                positions = kwargs[key]
                kwargs[key] = torch.where(positions >= self.insert_at, positions + carried, positions)
        self._set_positions(kwargs, mask, batch, length, past, continuing=False, carried=carried)

        state = _CallState(insert_at=self.insert_at, num_real=length, num_virtual=carried)
        if carried < num_virtual and cache is None:
            use_cache = kwargs.get("use_cache")
            state.drop_cache = not (self.model.config.use_cache if use_cache is None else use_cache)
        if kwargs.get("return_dict") is False:
            kwargs["return_dict"], state.as_tuple = True, True
        if self.pools_last_token:
            state.roll = self._roll_last_real_token_to_end(kwargs, input_ids)
        return kwargs, state

    def _virtual_in_sequence(self, kwargs: dict, device: torch.device) -> int:
        """How many virtual tokens the first call runs in its sequence: all P, or with the shared
        prompt cache none, or the last one when shifted labels need its prediction of labels[:, 0]."""
        if self.shared.reason_against(kwargs, device) is not None:
            return self.num_virtual
        has_labels = any(kwargs.get(key) is not None for key in self.spec.per_position_labels)
        return min(int(self.spec.shifts_labels and has_labels), self.num_virtual)

    def _keep_logits(self, kwargs: dict, carried: int, length: int) -> int:
        """Causal LMs: ask for logits at the real positions only, plus the last virtual one when
        labels need its prediction of labels[:, 0], so no LM head or loss runs over the other
        virtual positions. Returns how many virtual positions the per-position labels cover."""
        keep = kwargs.get("logits_to_keep")
        if (not self.spec.shifts_labels or "logits_to_keep" not in self._target_accepts
                or not (keep is None or (isinstance(keep, int) and keep == 0))):  # the caller's choice
            return carried
        has_labels = any(kwargs.get(key) is not None for key in self.spec.per_position_labels)
        kept = min(carried, int(has_labels))
        kwargs["logits_to_keep"] = length + kept
        return kept

    def _insert(self, x: torch.Tensor, fill: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """Insert `count` (default P) copies of a scalar `fill`, or the rows of a (n, D) `fill`, at
        the prompt's place, dim 1."""
        batch = x.shape[0]
        if fill.dim() == 0:
            block = fill.to(x.dtype).expand(batch, self.num_virtual if count is None else count, *x.shape[2:])
        else:
            block = fill.unsqueeze(0).expand(batch, *fill.shape)
        if block.shape[1] == 0:
            return x
        i = self.insert_at
        return torch.cat([x[:, :i], block, x[:, i:]], dim=1)

    def _set_positions(self, kwargs: dict, mask: torch.Tensor | None, batch: int, length: int,
                       past: int, continuing: bool, carried: int | None = None) -> None:
        num_virtual = self.num_virtual
        cached = 0 if carried is None else num_virtual - carried  # positions already in the cache
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            if continuing:
                kwargs["position_ids"] = position_ids + num_virtual
            else:
                # The prompt takes the positions it sits at; real tokens after it move by P.
                position_ids = position_ids.expand(batch, -1)
                i = self.insert_at
                start = position_ids[:, :i] + 1 if i else position_ids.new_zeros(batch, 1)
                block = start[:, -1:] + torch.arange(num_virtual, device=position_ids.device)
                positions = torch.cat([position_ids[:, :i], block, position_ids[:, i:] + num_virtual], 1)
                kwargs["position_ids"] = positions[:, cached:]
        elif self.decoder_only and "position_ids" in self._target_accepts and mask is not None:
            # What `generate` does: positions count real tokens, so padding side does not matter.
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            kwargs["position_ids"] = positions[:, -length:] if continuing else positions[:, cached:]
        cache_position = kwargs.get("cache_position")
        if cache_position is not None:
            kwargs["cache_position"] = (
                cache_position + num_virtual if continuing
                else torch.arange(past + cached, past + length + num_virtual, device=cache_position.device)
            )

    def _roll_last_real_token_to_end(
        self, kwargs: dict, input_ids: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Rotate each row right so its last real token is the last position; returns the shifts.

        "Last real token" is what the base model pools: the rightmost token that is not
        `pad_token_id` (from `input_ids`), or else the rightmost attended position.
        """
        mask = kwargs["attention_mask"]
        batch, total = mask.shape  # P+L
        width = kwargs["inputs_embeds"].shape[1]  # P+L, or fewer after the shared prompt cache
        pad_id = getattr(self.model.config, "pad_token_id", None)
        if input_ids is not None and pad_id is not None:
            real = self._insert((input_ids != pad_id).long(), mask.new_ones(()))[:, total - width:]
        else:
            real = mask[:, total - width:].long()
        index = torch.arange(width, device=mask.device)
        last_real = (index * real).argmax(-1)  # (B,)
        shift = width - 1 - last_real
        if not bool(shift.any()):
            return None
        source = (index.unsqueeze(0) - shift.unsqueeze(1)) % width  # (B, width)
        # The mask columns of a cached prompt stay in front; the rest turn with the sequence.
        turned = _gather_rows(mask[:, total - width:], source)
        kwargs["attention_mask"] = torch.cat([mask[:, :total - width], turned], 1)
        for key in ("inputs_embeds", "position_ids", "token_type_ids"):
            value = kwargs.get(key)
            if value is not None:
                kwargs[key] = _gather_rows(value.expand(batch, *value.shape[1:]), source)
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
        return output

    def _drop_virtual(self, x: torch.Tensor, state: _CallState) -> torch.Tensor:
        num_virtual, length, i = state.num_virtual, state.num_real, state.insert_at
        if state.roll is not None and x.shape[1] == num_virtual + length:
            total = x.shape[1]
            index = torch.arange(total, device=x.device)
            x = _gather_rows(x, (index.unsqueeze(0) + state.roll.unsqueeze(1).to(x.device)) % total)
        n = x.shape[1]
        if n == num_virtual + length and i > 0:
            return torch.cat([x[:, :i], x[:, i + num_virtual:]], dim=1)
        if n > length:  # virtual tokens in front (or `logits_to_keep` kept some): a view, as a
            return x[:, n - length:]  # copy of (B, L, V) logits costs time and peak memory
        return x

    def remove(self) -> None:
        """Detach every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# ----------------------------------------------------------- the model's injector
def install_injector(model: nn.Module, config: SoftPromptConfig, prompt: SoftPrompt) -> SoftPromptInjector:
    """Register `prompt` as `model.soft_prompt` and hook the model; the one place a prompt goes on."""
    prompt.to(model.get_input_embeddings().weight.device)
    model.add_module(PROMPT_MODULE_NAME, prompt)
    injector = SoftPromptInjector(model, config, prompt)
    setattr(model, _INJECTOR_ATTR, injector)
    return injector


def uninstall_injector(model: nn.Module) -> SoftPromptInjector:
    """Detach the hooks and the prompt module of `model`; returns the removed injector."""
    injector = get_injector(model)
    if injector is None:
        raise ValueError(f"{type(model).__name__} carries no soft prompt to remove.")
    injector.remove()
    delattr(model, PROMPT_MODULE_NAME)
    delattr(model, _INJECTOR_ATTR)
    return injector


def get_injector(model: nn.Module) -> SoftPromptInjector | None:
    """The injector of a soft-prompted model, or None."""
    return getattr(model, _INJECTOR_ATTR, None)


# -------------------------------------------------------------------- helpers
def _positional_names(module: nn.Module) -> list[str]:
    params = inspect.signature(module.forward).parameters.values()
    return [p.name for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]


def _as_kwargs(args: tuple, kwargs: dict, names: list[str]) -> dict:
    """Positional arguments by name, so hooks see `model(input_ids)` like `model(input_ids=...)`."""
    if len(args) > len(names):
        raise TypeError(f"Too many positional arguments ({len(args)}) for forward({', '.join(names)}).")
    return {**dict(zip(names, args, strict=False)), **kwargs}


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # legacy tuple of (key, value) pairs


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, j], ...] for every row b: per-row reordering along dim 1."""
    index = index.to(x.device).view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return torch.gather(x, 1, index)


def _max_positions(model_config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
