"""One function per kind of prompted call, each rewriting the call's keyword arguments.

- `no_prompt_call`: no row of the call has a prompt: the bare model's call, untouched.
- `concatenated_first_call`: the first call of a sequence, the prompt put into every row's
  input embeddings (B, W+L, D).
- `shared_first_call`: the first call of a decoder-only sequence, each distinct prompt computed
  once and handed to the call as its key/value cache (prompt_cache.py).
- `generate_step`: a decode step of `generate()`, which keeps a mask and positions that cover the
  prompt from its start: the step goes in as it came.
- `decode_step`: a call that continues a cache holding the prompt in a hand-written loop: the mask
  and positions are made to cover the cached prompt.

`read_call` reads what every kind needs once; `injector.py` chooses the kind. Positions, labels
and output alignment each live in their own module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .alignment import OutputAlignment, roll_last_real_token_to_end
from .labels import rewrite_labels
from .layout import VirtualBlock
from .positions import decode_step_positions, first_call_positions
from .tasks import TaskSpec

# Inputs that describe several sequences packed into one row (flash-attention varlen, TRL padding-free).
PACKED_SEQUENCE_ARGUMENTS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


@dataclass(frozen=True)
class ModelFacts:
    """What rewriting a call needs to know of the model, read once when the prompt goes on."""

    spec: TaskSpec
    decoder_only: bool
    accepts: frozenset[str]  # parameter names of the prompted forward (the encoder's for seq2seq)
    cache_key: str  # `cache`, or `past_key_values` before transformers 5.24
    max_positions: int | None
    pools_last_token: bool  # a decoder-only sequence classifier: pools the last position
    config: Any  # the model's config (pad_token_id and use_cache are read at call time)

    @property
    def positions_from_mask(self) -> bool:
        """Whether positions follow the attention mask, as `generate` computes them."""
        return self.decoder_only and "position_ids" in self.accepts


@dataclass(frozen=True)
class Call:
    """The parts of one call every kind reads: the input, its shape, its cache."""

    input_ids: torch.Tensor | None  # popped from the keyword arguments
    batch: int
    length: int  # L
    device: torch.device
    past: int  # tokens already in the cache (the prompt's included)
    mask: torch.Tensor | None  # (B, *) 2-D attention mask as given


def read_call(kwargs: dict, cache_key: str) -> Call:
    """Check and read one call's input; pops `input_ids` (the prompted call passes embeddings)."""
    input_ids = kwargs.pop("input_ids", None)
    embeds = kwargs.get("inputs_embeds")
    if input_ids is not None and embeds is not None:
        raise ValueError("Pass input_ids or inputs_embeds, not both (the model would use one and ignore "
                         "the other).")
    if embeds is None and input_ids is None:
        raise ValueError("A soft-prompted model needs input_ids or inputs_embeds, got neither.")
    source = embeds if embeds is not None else input_ids
    if "past_key_values" in kwargs and cache_key not in kwargs:
        # The old name, which transformers >= 5.24 still accepts: read one name only.
        kwargs[cache_key] = kwargs.pop("past_key_values")
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError(
            f"A soft-prompted model needs a 2-D (batch, length) attention_mask, got shape "
            f"{tuple(mask.shape)}. Pass the tokenizer's attention_mask instead of a 4-D mask."
        )
    batch, length = source.shape[:2]
    return Call(input_ids, batch, length, source.device, cache_length(kwargs.get(cache_key)), mask)


def no_prompt_call(kwargs: dict, call: Call) -> dict:
    """No row has a prompt: the call as it came."""
    if call.input_ids is not None:
        kwargs["input_ids"] = call.input_ids
    return kwargs


def generate_step(kwargs: dict, call: Call, width: int) -> dict:
    """A decode step of a `generate()` that put the prompt into its attention mask before its first
    step (wrappers.py): mask and positions cover the prompt already, so the step goes in as it came.
    Only a `cache_position` (transformers < 5.24, whose `generate` never counts the prompt) moves."""
    if call.input_ids is not None:
        kwargs["input_ids"] = call.input_ids
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:
        kwargs["cache_position"] = cache_position + width
    return kwargs


def decode_step(kwargs: dict, call: Call, block: VirtualBlock, facts: ModelFacts) -> dict:
    """A call continuing a cache that holds the prompt, outside such a `generate()` (a hand-written
    decoding loop): a mask of the caller's tokens gets the prompt's slots, positions move past it."""
    if call.input_ids is not None:
        kwargs["input_ids"] = call.input_ids  # the prompt is in the cache: tokens go in as they are
    mask = call.mask
    if mask is not None and mask.shape[1] + block.width == call.past + call.length:
        mask = block.widen_mask(mask)  # a caller's mask without the prompt
        kwargs["attention_mask"] = mask
    decode_step_positions(kwargs, block, mask, call.length, from_mask=facts.positions_from_mask)
    return kwargs


def concatenated_first_call(kwargs: dict, call: Call, block: VirtualBlock, embeds: torch.Tensor,
                            prompts: Sequence[torch.Tensor], counted: bool,
                            facts: ModelFacts) -> tuple[dict, OutputAlignment]:
    """The first call, each row's prompt put into its input embeddings: (B, W+L, D)."""
    filler = torch.zeros(embeds.shape[-1], dtype=embeds.dtype, device=call.device)
    kwargs["inputs_embeds"] = block.assemble(embeds, block.block(prompts, filler))  # (B, W+L, D)
    if kwargs.get("token_type_ids") is not None:  # virtual tokens belong to the first segment
        token_type_ids = kwargs["token_type_ids"].expand(call.batch, -1)
        kwargs["token_type_ids"] = block.assemble(token_type_ids, token_type_ids.new_zeros(call.batch, block.width))
    return _first_call(kwargs, call, block, block.width, counted, facts)


def shared_first_call(kwargs: dict, call: Call, block: VirtualBlock, embeds: torch.Tensor, cache: Any,
                      caller_cache: Any, counted: bool, facts: ModelFacts) -> tuple[dict, OutputAlignment]:
    """The first call of a decoder-only sequence, the prompts' keys/values (computed once per
    prompt) coming in as its cache `cache` (the caller's empty `caller_cache` filled, or a new one);
    the input embeddings stay (B, L, D)."""
    kwargs["inputs_embeds"] = embeds
    kwargs[facts.cache_key] = cache
    kwargs, alignment = _first_call(kwargs, call, block, 0, counted, facts)
    if caller_cache is None:
        use_cache = kwargs.get("use_cache")
        alignment.drop_cache = not (facts.config.use_cache if use_cache is None else use_cache)
    return kwargs, alignment


def _first_call(kwargs: dict, call: Call, block: VirtualBlock, in_sequence: int, counted: bool,
                facts: ModelFacts) -> tuple[dict, OutputAlignment]:
    """What both first-call kinds do once the prompt is in: mask, labels, positions, pooling."""
    mask = call.mask if call.mask is not None else \
        torch.ones(call.batch, call.length, dtype=torch.long, device=call.device)
    if mask.shape[1] == call.length:
        mask = block.widen_mask(mask)  # (B, W+L), a cached prompt included
    elif mask.shape[1] != call.length + block.width:  # W+L: widened already (generate, the seq2seq call)
        raise ValueError(
            f"attention_mask has {mask.shape[1]} positions for an input of {call.length} tokens; "
            "pass the tokenizer's attention_mask for the same input_ids."
        )
    kwargs["attention_mask"] = mask
    rewrite_labels(kwargs, facts.spec, block, in_sequence, call.length, "logits_to_keep" in facts.accepts)
    first_call_positions(kwargs, block, mask, call.length, shared=not in_sequence, counted=counted,
                         from_mask=facts.positions_from_mask)
    alignment = OutputAlignment(block, call.length, in_sequence, facts.spec.per_position_outputs, facts.cache_key)
    if kwargs.get("return_dict") is False:
        kwargs["return_dict"], alignment.as_tuple = True, True
    if facts.pools_last_token:
        alignment.shift = roll_last_real_token_to_end(kwargs, call.input_ids, block,
                                                      getattr(facts.config, "pad_token_id", None))
    return kwargs, alignment


def refuse_packed_rows(kwargs: dict, mask: torch.Tensor | None, advice: str = "") -> None:
    """Refuse a batch of packed sequences: one prompt in front of a row would be seen by every
    sequence packed into it, and each sequence needs its own (PEFT has the same limit). `advice`:
    how the client that built the batch turns packing off."""
    packed = [key for key in PACKED_SEQUENCE_ARGUMENTS if kwargs.get(key) is not None]
    positions = kwargs.get("position_ids")
    if not packed and mask is None and isinstance(positions, torch.Tensor) and positions.shape[-1] > 1:
        if bool((positions[..., 1:] < positions[..., :-1]).any()):  # positions restart inside a row
            packed = ["position_ids restarting inside a row"]
    if packed:
        raise ValueError(
            f"This batch packs several sequences into one row ({', '.join(packed)}), which a soft prompt "
            f"cannot serve: one prompt in front of the row would be shared by every sequence in it. Train "
            f"without packing; padded batches give each sequence its own prompt.{advice}"
        )


def cache_length(cache: Any) -> int:
    """Tokens held by a key/value cache (0 for None)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # legacy tuple of (key, value) pairs
