"""The teacher of context distillation: the frozen model reading a text in front of each row.

A teacher prompt is a text, or chat messages rendered by the tokenizer's chat template, that
stands in front of every row. Its tokens are the same for every row of a batch, so the teacher
runs them once per batch (one row of T tokens, `use_cache=True`) and every row continues from a
copy of those keys/values: a batch costs T + B·L tokens instead of B·(T + L), the way
transformers' prefix-cache reuse does for generation.

The teacher is the model the student trains on, inside `without_soft_prompt`: no second copy.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..model.positions import positions_from_mask
from ..model.scoped import without_soft_prompt
from ..model.tasks import cache_argument

Messages = Sequence[Mapping[str, str]]
TeacherText = str | Messages  # a text, or chat messages (e.g. one system message)


@dataclass(frozen=True)
class TeacherPrompt:
    """One teacher text, tokenized: what the teacher reads in front of each row of its prompt."""

    name: str  # the soft prompt trained to stand in for it
    prefix_ids: tuple[int, ...]  # the text's tokens, as the teacher reads them in front of a row
    init_text: str  # the text a prompt initialised from it starts from (message contents for chat)
    messages: tuple[Mapping[str, str], ...] | None = None  # chat messages, None for a plain text

    def row_ids(self, tokenizer: Any, row: Mapping[str, Any], column: str) -> list[int]:
        """The tokens of `row` that follow the teacher text (and that the student reads after its
        virtual tokens): the `text` as it is, or for a chat teacher the row's turns (`messages`, or
        `text` as one user message) as the chat template renders them after the teacher's messages,
        with the assistant's turn opened."""
        value = row[column]
        if self.messages is None:
            if not isinstance(value, str):
                raise ValueError(f"A plain-text teacher prompt reads a `text` column of strings, got {value!r}. "
                                 "Give the teacher prompt as chat messages to distill over `messages` rows.")
            return list(tokenizer(value, add_special_tokens=False)["input_ids"])
        turns = [{"role": "user", "content": value}] if isinstance(value, str) else list(value)
        return list(tokenizer(chat_after_prompt(tokenizer, self.messages, turns),
                              add_special_tokens=False)["input_ids"])


def chat_after_prompt(tokenizer: Any, prompt_messages: Messages, messages: Messages) -> str:
    """The chat template's rendering of `prompt_messages + messages` (assistant turn opened), cut
    after the part that renders `prompt_messages`: what a student distilled from those messages
    reads after its virtual tokens. Serve the student with this text.

    Example:
        ```python
        text = chat_after_prompt(tokenizer, [{"role": "system", "content": rules}],
                                 [{"role": "user", "content": "Hi"}])
        model.generate(**tokenizer(text, return_tensors="pt", add_special_tokens=False))
        ```
    """
    head = tokenizer.apply_chat_template(list(prompt_messages), tokenize=False)
    whole = tokenizer.apply_chat_template([*prompt_messages, *messages], tokenize=False,
                                          add_generation_prompt=True)
    if not whole.startswith(head):
        raise ValueError(
            f"The chat template renders the teacher's messages differently alone ({head[-60:]!r}) than in "
            f"front of a conversation ({whole[:len(head)][-60:]!r}), so they cannot be cut off and replaced "
            "by virtual tokens. Give the teacher prompt as a plain text instead."
        )
    return str(whole[len(head):])


def read_teacher_prompts(teacher_prompt: TeacherText | Mapping[str, TeacherText], tokenizer: Any,
                         default_name: str) -> dict[str, TeacherPrompt]:
    """`teacher_prompt` (a text, chat messages, or `{prompt name: text or messages}`) tokenized,
    by the name of the prompt each trains; checked for what cannot work."""
    if tokenizer is None:
        raise ValueError("Distillation needs the tokenizer: pass processing_class=tokenizer.")
    many = isinstance(teacher_prompt, Mapping)
    items = dict(teacher_prompt) if isinstance(teacher_prompt, Mapping) else {default_name: teacher_prompt}
    if not items:
        raise ValueError("teacher_prompt={} names no prompt: give a text, chat messages, or {name: text}.")
    return {name: _read_one(name if many else None, name, text, tokenizer) for name, text in items.items()}


def _read_one(label: str | None, name: str, text: Any, tokenizer: Any) -> TeacherPrompt:
    where = "teacher_prompt" if label is None else f"teacher_prompt[{label!r}]"
    if isinstance(text, str):
        if not text.strip():
            raise ValueError(f"{where} is empty ({text!r}): give the text the prompt should stand in for.")
        ids = tokenizer(text)["input_ids"]  # with the tokenizer's special tokens (e.g. BOS), as a text in front
        return TeacherPrompt(name, tuple(ids), text)
    messages = list(text) if isinstance(text, Sequence) else None
    if not messages or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in messages):
        raise ValueError(f"{where} must be a non-empty text or a non-empty list of chat messages "
                         f"({{'role': ..., 'content': ...}}), got {text!r}.")
    if not any(str(m["content"]).strip() for m in messages):
        raise ValueError(f"{where}'s messages are all empty: give the text the prompt should stand in for.")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{where} is a list of chat messages, but the tokenizer has no chat_template. Set "
                         "tokenizer.chat_template, or give the teacher prompt as a plain text.")
    head = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(head, add_special_tokens=False)["input_ids"]  # the template writes its own specials
    return TeacherPrompt(name, tuple(ids), "\n".join(str(m["content"]) for m in messages), tuple(messages))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode inside the block (the teacher's targets carry no dropout noise),
    each put back as it was."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def as_teacher(model: nn.Module) -> Iterator[None]:
    """Inside the block `model` computes as the teacher: the bare base model (`without_soft_prompt`),
    in eval mode, recording no graph."""
    with torch.no_grad(), without_soft_prompt(model), eval_mode(model):
        yield


def prefix_cache(model: nn.Module, prefix_ids: torch.Tensor) -> Any:
    """The bare `model`'s key/value cache of the (T,) `prefix_ids` as one row: what every row of the
    teacher continues from. The teacher is frozen, so one computation serves a whole run."""
    with as_teacher(model):
        return model(input_ids=prefix_ids.unsqueeze(0), use_cache=True).past_key_values


def rows_after(cache: Any, batch: int) -> Any:
    """A copy of the one-row `cache` for each of `batch` rows (the rows' calls extend their copy)."""
    copied = copy.deepcopy(cache)
    copied.batch_repeat_interleave(batch)
    return copied


def teacher_logits(model: nn.Module, prefix_ids: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, *, cache: Any = None, share_prefix: bool = True,
                   logits_to_keep: int = 0) -> torch.Tensor:
    """(B, L, V) logits of the bare `model` at the rows' positions (the last `logits_to_keep` of
    them when > 0), each row read after the (T,) `prefix_ids`: every row continuing from a copy of
    the text's keys/values (`cache`, from `prefix_cache`, computed here when None), or with
    `share_prefix=False` the text concatenated in front of every row (the reference, and the path
    for models without a cache). Rows may be padded on either side."""
    batch = input_ids.shape[0]
    prefix = prefix_ids.to(input_ids.device)
    mask = torch.cat([attention_mask.new_ones(batch, prefix.numel()), attention_mask], dim=1)
    keep = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
    if not share_prefix:
        with as_teacher(model):
            ids = torch.cat([prefix.expand(batch, -1), input_ids], dim=1)
            positions = positions_from_mask(mask)  # the text first, then each row's real tokens
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **keep).logits
        return logits if logits_to_keep else logits[:, prefix.numel():]
    shared = rows_after(cache if cache is not None else prefix_cache(model, prefix), batch)
    with as_teacher(model):
        positions = prefix.numel() + positions_from_mask(attention_mask)
        return model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                     **{cache_argument(model): shared}, **keep).logits


def generate_continuations(model: nn.Module, tokenizer: Any, prefix_ids: Sequence[int],
                           rows: Sequence[Sequence[int]], *, batch_size: int, max_new_tokens: int,
                           generation_kwargs: Mapping[str, Any] | None = None,
                           desc: str = "teacher continuations", progress: bool = True) -> list[list[int]]:
    """The bare `model`'s continuation of each row read after `prefix_ids` (generation settings of
    `generation_kwargs`, greedy by default), up to and including its first end-of-sequence token.

    A batch lays out each row as `[text][padding][row]`: the text's keys/values are computed once and
    copied to every row, and positions follow the attention mask, so each row continues exactly as it
    would after the text alone (tested against one row at a time)."""
    from tqdm.auto import tqdm

    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0)
    device = next(model.parameters()).device
    prefix = torch.tensor(list(prefix_ids), dtype=torch.long, device=device)
    settings = {"do_sample": False, **(generation_kwargs or {}), "max_new_tokens": max_new_tokens,
                "pad_token_id": pad}
    text_cache = prefix_cache(model, prefix)
    continuations: list[list[int]] = []
    key = cache_argument(model)
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress or len(rows) <= batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), prefix.numel() + width), pad, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        ids[:, :prefix.numel()], mask[:, :prefix.numel()] = prefix, 1
        for i, row in enumerate(chunk):
            if row:
                ids[i, -len(row):] = torch.tensor(list(row), device=device)
                mask[i, -len(row):] = 1
        with as_teacher(model):
            out = cast(Any, model).generate(input_ids=ids, attention_mask=mask,
                                            **{key: rows_after(text_cache, len(chunk))}, **settings)
        for generated in out[:, ids.shape[1]:].tolist():
            ends = [i for i, token in enumerate(generated) if token in eos]
            continuations.append(generated[:ends[0] + 1] if ends else generated)
    return continuations


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """The ids that end a generation: the model's generation config's, else the tokenizer's."""
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = config_eos if config_eos is not None else tokenizer.eos_token_id
    return set(ids) if isinstance(ids, list) else ({ids} if ids is not None else set())
