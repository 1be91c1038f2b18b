"""Putting a prompted call's outputs back in line with the caller's `input_ids`.

Per-position outputs (logits, QA logits, hidden states) lose their virtual positions, so the
caller sees (B, L, ...) as without a prompt. Decoder-only sequence classifiers pool the last
position of the sequence: `roll_last_real_token_to_end` turns each row so its last real token is
last (and the pooled token a real one, as without a prompt), and `OutputAlignment` turns it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .layout import VirtualBlock, gather_rows


@dataclass
class OutputAlignment:
    """What one first call did to its inputs, so its outputs can be put back in line."""

    block: VirtualBlock
    num_real: int  # L: the caller's sequence length
    in_sequence: int  # virtual positions in the model's sequence: W, or 0 (prompt in the cache)
    output_keys: tuple[str, ...]  # the task's per-position outputs
    cache_key: str
    shift: torch.Tensor | None = None  # (B,) per-row right turn applied for last-token pooling
    as_tuple: bool = False  # the caller asked for return_dict=False
    drop_cache: bool = False  # the shared prompt cache was passed to a call made with use_cache=False

    def apply(self, output: Any) -> Any:
        """The call's output with the virtual positions cut out of every per-position field."""
        if self.drop_cache and output.get(self.cache_key) is not None:
            # Some models return a cache they were given even with use_cache=False; `generate`
            # would then continue from it. ModelOutput keys cannot be deleted: rebuild it.
            output = type(output)(**{k: v for k, v in output.items() if k != self.cache_key})
        for key in self.output_keys:
            value = output.get(key) if hasattr(output, "get") else None
            if value is None:
                continue
            output[key] = tuple(map(self._real_positions, value)) if isinstance(value, tuple) \
                else self._real_positions(value)
        return output.to_tuple() if self.as_tuple else output

    def _real_positions(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_sequence + L, *) -> (B, L, *) in the caller's order; other shapes pass."""
        length = self.num_real
        if x.shape[1] != self.in_sequence + length:
            return x
        if self.shift is not None:
            seq_len = x.shape[1]
            index = torch.arange(seq_len, device=x.device)
            x = gather_rows(x, (index.unsqueeze(0) + self.shift.unsqueeze(1).to(x.device)) % seq_len)
        return self.block.extract(x, length) if self.in_sequence else x


def roll_last_real_token_to_end(kwargs: dict, input_ids: torch.Tensor | None, block: VirtualBlock,
                                pad_token_id: int | None) -> torch.Tensor | None:
    """Turn each row right so its last real token is the last position; returns the (B,) shifts,
    or None when every row ends with a real token already.

    "Last real token" is what the base model pools: the rightmost token that is not
    `pad_token_id` (from `input_ids`), or else the rightmost attended position.
    """
    mask = kwargs["attention_mask"]
    batch, mask_len = mask.shape  # W+L (a cached prompt's columns included)
    seq_len = kwargs["inputs_embeds"].shape[1]  # W+L, or L with the shared prompt cache
    cached = mask_len - seq_len  # mask columns of a prompt in the cache: they stay in front
    if input_ids is not None and pad_token_id is not None:
        real = block.assemble((input_ids != pad_token_id).long(), block.mask)[:, cached:]
    else:
        real = mask[:, cached:].long()
    index = torch.arange(seq_len, device=mask.device)
    last_real = (index * real).argmax(-1)  # (B,)
    shift = seq_len - 1 - last_real
    if not bool(shift.any()):
        return None
    source = (index.unsqueeze(0) - shift.unsqueeze(1)) % seq_len  # (B, seq_len)
    kwargs["attention_mask"] = torch.cat([mask[:, :cached], gather_rows(mask[:, cached:], source)], 1)
    for key in ("inputs_embeds", "position_ids", "token_type_ids"):
        value = kwargs.get(key)
        if value is not None:
            kwargs[key] = gather_rows(value.expand(batch, *value.shape[1:]), source)
    return shift
