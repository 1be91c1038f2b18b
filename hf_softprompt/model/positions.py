"""Positions of a prompted call's tokens: `position_ids` and (transformers < 5.24) `cache_position`.

The rule: a token's position counts the tokens before it that are attended, its row's own prompt
included, as `generate` computes positions from the attention mask. Filler slots and padding move
no position, so each row sees exactly the positions it has alone.

`counted=True` says the positions given to a first call already count the prompt: `generate()` put
the prompt into its attention mask before its first step (wrappers.py), so its positions, and
every decode step's (inputs.generate_step), are right as they come.
"""

from __future__ import annotations

import torch

from .layout import Layout, VirtualBlock


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting the attended tokens before each one, as `generate` computes them
    (0 at padding before the first attended token)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def first_call_positions(kwargs: dict, block: VirtualBlock, mask: torch.Tensor, length: int, *,
                         shared: bool, counted: bool, from_mask: bool) -> None:
    """Positions for the first call of a sequence, whose `mask` (B, W+L) covers the prompt.

    With `shared=True` the prompt sits in the cache, so only the L real tokens get positions;
    else the W virtual slots do too, in sequence order. `from_mask`: the model takes
    `position_ids` and they are derived from the mask when the caller gave none (decoder-only).
    """
    width = block.width
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        position_ids = position_ids.expand(block.rows.batch_size, -1)
        row_lengths = block.rows.row_lengths().unsqueeze(1).to(position_ids.device)  # (B, 1)
        i = block.insert_at
        # Real tokens after the prompt move by the row's own prompt length.
        real = position_ids if counted else torch.cat([position_ids[:, :i], position_ids[:, i:] + row_lengths], 1)
        if shared:
            kwargs["position_ids"] = real
        else:
            # The prompt takes the positions after the tokens before it.
            start = position_ids[:, i - 1:i] + 1 if i else position_ids.new_zeros(position_ids.shape[0], 1)
            slot = torch.arange(width, device=position_ids.device).unsqueeze(0)  # (1, W)
            offset = slot - (width - row_lengths) if block.layout is Layout.FRONT else slot
            virtual = start + offset.clamp(min=0).clamp(max=(row_lengths - 1).clamp(min=0))  # (B, W)
            kwargs["position_ids"] = block.assemble(real, virtual)
    elif from_mask:
        positions = positions_from_mask(mask)  # (B, W+L)
        kwargs["position_ids"] = positions[:, -length:] if shared else positions
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:
        kwargs["cache_position"] = torch.arange(width if shared else 0, length + width, device=cache_position.device)


def decode_step_positions(kwargs: dict, block: VirtualBlock, mask: torch.Tensor | None, length: int, *,
                          from_mask: bool) -> None:
    """Positions for a hand-written decoding loop's call continuing a cache that holds the prompt:
    the caller's positions (or the mask's count, covering the prompt) move past each row's prompt."""
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        row_lengths = block.rows.row_lengths().unsqueeze(1).to(position_ids.device)
        kwargs["position_ids"] = position_ids.expand(block.rows.batch_size, -1) + row_lengths
    elif from_mask and mask is not None:
        kwargs["position_ids"] = positions_from_mask(mask)[:, -length:]
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:  # the caller's count of cached tokens does not include the prompt
        kwargs["cache_position"] = cache_position + block.width
