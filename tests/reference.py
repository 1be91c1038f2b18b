"""An independent reference: the prompt concatenated by hand in front of the embeddings, run
through an untouched copy of the base model. The library must agree with it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from models import PAD


def make_batch(task: str, lengths: list[int], padding_side: str = "right", seed: int = 0,
               vocab: int = 96, target_len: int = 5) -> dict[str, torch.Tensor]:
    """Random ids (never PAD) with the given real lengths, padded, plus labels for `task`."""
    g = torch.Generator().manual_seed(seed)
    batch, width = len(lengths), max(lengths)
    ids = torch.full((batch, width), PAD, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[row, cols] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, cols] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if task in ("causal_lm",):
        out["labels"] = ids.masked_fill(mask == 0, -100)
    elif task == "masked_lm":
        labels = torch.randint(3, vocab, ids.shape, generator=g)
        keep = (torch.rand(ids.shape, generator=g) < 0.5) & (mask == 1)
        keep[:, 0] |= mask[:, 0] == 1
        out["labels"] = labels.masked_fill(~keep, -100)
    elif task == "token_cls":
        out["labels"] = torch.randint(0, 3, ids.shape, generator=g).masked_fill(mask == 0, -100)
    elif task == "seq_cls":
        out["labels"] = torch.randint(0, 3, (batch,), generator=g)
    elif task == "qa":
        first = (mask.argmax(1) if padding_side == "left" else torch.zeros(batch, dtype=torch.long))
        n = torch.tensor(lengths)
        out["start_positions"] = first + torch.randint(0, 10**6, (batch,), generator=g) % n
        out["end_positions"] = first + torch.randint(0, 10**6, (batch,), generator=g) % n
    elif task == "seq2seq_lm":
        out["labels"] = torch.randint(3, vocab, (batch, target_len), generator=g)
    return out


def insert(x: torch.Tensor, block: torch.Tensor, at: int) -> torch.Tensor:
    return torch.cat([x[:, :at], block, x[:, at:]], dim=1)


def reference_outputs(base, prompt: torch.Tensor, batch: dict, task: str, at: int = 0) -> dict:
    """Outputs of `base` on [prompt; embeddings] by hand, at the caller's real positions."""
    P = prompt.shape[0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    B = ids.shape[0]
    emb = base.get_input_embeddings()(ids)
    full = insert(emb, prompt.unsqueeze(0).expand(B, -1, -1), at)
    full_mask = insert(mask, torch.ones(B, P, dtype=mask.dtype, device=mask.device), at)
    kwargs = {"inputs_embeds": full, "attention_mask": full_mask}
    decoder_only = not base.config.is_encoder_decoder and base.config.model_type != "bert"
    if decoder_only:
        kwargs["position_ids"] = (full_mask.cumsum(-1) - 1).clamp(min=0)
    keep = lambda t: torch.cat([t[:, :at], t[:, at + P:]], 1)  # noqa: E731
    if task in ("causal_lm", "masked_lm", "token_cls"):
        labels = batch["labels"]
        if task == "causal_lm":  # the caller's targets, labels[:, 1:], as without a prompt
            labels = torch.cat([torch.full_like(labels[:, :1], -100), labels[:, 1:]], 1)
        labels = insert(labels, torch.full((B, P), -100, device=mask.device), at)
        out = base(**kwargs, labels=labels)
        return {"loss": out.loss, "logits": keep(out.logits)}
    if task == "seq2seq_lm":
        out = base(**kwargs, labels=batch["labels"])
        return {"loss": out.loss, "logits": out.logits}
    if task == "qa":
        shift = lambda p: torch.where(p >= at, p + P, p)  # noqa: E731
        out = base(**kwargs, start_positions=shift(batch["start_positions"]),
                   end_positions=shift(batch["end_positions"]))
        return {"loss": out.loss, "start_logits": keep(out.start_logits), "end_logits": keep(out.end_logits)}
    if task == "seq_cls":
        if decoder_only:
            # Pool the last real token by hand (the base model would pool the last position).
            hidden = base.base_model(**kwargs).last_hidden_state
            index = torch.arange(full_mask.shape[1], device=mask.device)
            last = (index * full_mask).argmax(-1)
            logits = base.score(hidden[torch.arange(B, device=mask.device), last])
        else:
            logits = base(**kwargs).logits
        return {"loss": F.cross_entropy(logits, batch["labels"]), "logits": logits}
    raise ValueError(task)
