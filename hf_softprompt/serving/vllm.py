"""Serving saved soft prompts with an inference engine that takes per-request embeddings (vLLM).

vLLM dropped prompt adapters and takes `prompt_embeds` instead: one (N, D) tensor per request, the
sequence the model's first layer receives. `PromptEmbedder` builds that tensor from the base
model's input-embedding table (one tensor read from its safetensors, no model load) and saved
prompts: the same sequence our injector feeds the model in `generate()`, so one deployment of a
base model serves every task's prompt, mixed in one continuous batch. vLLM is never imported here.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch

from ..config import Placement, SoftPromptConfig, TaskType, config_enum
from ..files.adapter import PROMPT_KEY, read_adapter_files
from ..files.commit import reading
from ..files.sources import AdapterSource, check_same_base, choose_prompts
from ..model.fingerprint import embedding_fingerprint
from ..model.tasks import max_positions
from .base_model import CONFIG_FILE, base_file, config_dtype, read_embedding_table, read_json, text_config


@dataclass(frozen=True)
class ServedPrompt:
    """One saved prompt ready to serve: its (P, D) rows in the base model's dtype, and where it was read."""

    rows: torch.Tensor
    source: str


class PromptEmbedder:
    """Turns token ids (or text) and a saved prompt's name into one request's `prompt_embeds`.

    Args:
        embedding (`torch.Tensor`): the base model's (V, D) input-embedding table.
        prompts (`dict[str, ServedPrompt]`): the prompts, by name.
        max_positions (`int`, *optional*): the model's maximum length; longer requests are refused.
        tokenizer (*optional*): a tokenizer, or a path/repo id to load one from when text comes in.

    Build it with `PromptEmbedder.from_pretrained`.

    Example:
        ```python
        embedder = PromptEmbedder.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct",
                                                  prompts={"sst2": "me/sst2-prompt"})
        llm = vllm.LLM("HuggingFaceTB/SmolLM2-135M-Instruct", enable_prompt_embeds=True)
        out = llm.generate([{"prompt_embeds": embedder("Review: great film", prompt="sst2")}])
        ```
    """

    def __init__(self, embedding: torch.Tensor, prompts: Mapping[str, ServedPrompt], *,
                 max_positions: int | None = None, tokenizer: Any = None) -> None:
        self.embedding = embedding
        self.prompts = dict(prompts)
        self.max_positions = max_positions
        self._tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls,
        base_model: str | os.PathLike,
        prompts: Mapping[str, str | os.PathLike] | str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        *,
        dtype: torch.dtype | None = None,
        max_length: int | None = None,
        check_base_model: bool = True,
        tokenizer: Any = None,
        revision: str | None = None,
        token: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> PromptEmbedder:
        """Read the base model's embedding table and the saved prompts (local dirs or Hub repo ids).

        Args:
            base_model (`str` or `os.PathLike`): a local model directory or a Hub repo id (safetensors).
            prompts (*optional*): `{"name": path_or_repo_id}` (from a multi-prompt save, the prompt of
                that name, or its only prompt), or one save (or a list of saves) whose every prompt is
                served under its saved name.
            dtype (`torch.dtype`, *optional*): of the returned tensors; defaults to the base model's
                (its config's `dtype`, else the stored table's).
            max_length (`int`, *optional*): the engine's maximum length (vLLM's `max_model_len`) when it
                is below the model's own.
            check_base_model (`bool`, defaults to `True`): refuse a prompt saved for other base weights:
                by the fingerprint of the embedding table saved with it, else by name (when known).
            tokenizer (*optional*): a tokenizer or where to load one; defaults to `base_model`'s.
            revision, token, cache_dir, local_files_only: for Hub downloads (base model and prompts).

        Raises:
            ValueError: a prompt does not fit the base model (name, token dimension, task type) or
                the checkpoint holds no recognisable embedding table.
            FileNotFoundError, HubError: a file could not be found or downloaded.
        """
        hub = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
        source = os.fspath(base_model)
        model_config = text_config(read_json(base_file(source, CONFIG_FILE, hub)))
        table = read_embedding_table(source, model_config, **hub)
        dtype = dtype or config_dtype(model_config) or table.dtype
        table = table.to(dtype)
        limit = max_positions(model_config)
        if max_length is not None:
            limit = max_length if limit is None else min(limit, max_length)
        fingerprint = embedding_fingerprint(table)
        served: dict[str, ServedPrompt] = {}
        for name, where in _prompt_sources(prompts):
            for served_name, prompt in _read_prompts(where, name, hub).items():
                if served_name in served:
                    raise ValueError(f"Two saved prompts are named {served_name!r} ({served[served_name].source!r} "
                                     f"and {prompt.source!r}). Pass prompts={{'new_name': path, ...}} to rename one.")
                _check_fits(prompt, table.shape[1], fingerprint, source, check_base_model)
                served[served_name] = ServedPrompt(prompt.rows.to(dtype), prompt.source)
        return cls(table, served, max_positions=limit, tokenizer=tokenizer if tokenizer is not None else source)

    # ------------------------------------------------------------------ requests
    @property
    def dtype(self) -> torch.dtype:
        """The dtype of every tensor this embedder returns."""
        return self.embedding.dtype

    def prompt_names(self) -> list[str]:
        """The names of the prompts this embedder serves."""
        return list(self.prompts)

    def num_virtual_tokens(self, prompt: str | None) -> int:
        """P, the number of rows prompt `prompt` adds (0 for `None`)."""
        return 0 if prompt is None else self._prompt(prompt).rows.shape[0]

    def encode(self, text: str | Sequence[Mapping[str, str]], *, chat: bool = False) -> list[int]:
        """Token ids of `text` with the base model's tokenizer: special tokens as the tokenizer adds
        them, or the chat template with a generation prompt (`chat=True`, or a list of messages)."""
        tokenizer = self.tokenizer
        if chat or not isinstance(text, str):
            messages = [{"role": "user", "content": text}] if isinstance(text, str) else list(text)
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
        return list(tokenizer(text)["input_ids"])

    @property
    def tokenizer(self) -> Any:
        """The base model's tokenizer, loaded on first use (only text inputs need it)."""
        if isinstance(self._tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer)
        return self._tokenizer

    def __call__(self, token_ids: Sequence[int] | torch.Tensor | str | Sequence[Mapping[str, str]],
                 prompt: str | None = None, *,
                 chat: bool = False, max_new_tokens: int = 0) -> torch.Tensor:
        """One request's `prompt_embeds`: the (P + L, D) sequence our injector feeds the model.

        Args:
            token_ids: the request's L token ids (a list or a 1-D tensor), or its text (or chat messages).
            prompt (`str`, *optional*): the saved prompt's name; `None` gives the plain embeddings.
            chat (`bool`, defaults to `False`): text goes through the tokenizer's chat template.
            max_new_tokens (`int`, defaults to 0): tokens the request will generate, counted in the
                length check.

        Returns:
            A (P + L, D) tensor in the base model's dtype: the prompt's rows, then the tokens'
            embeddings.
        """
        if isinstance(token_ids, str) or _is_messages(token_ids):
            token_ids = self.encode(token_ids, chat=chat)
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        vocab = self.embedding.shape[0]
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"token_ids must be a non-empty 1-D sequence of ids (one request), got shape "
                             f"{tuple(ids.shape)}. Embed each request on its own.")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"token_ids must lie in [0, {vocab}) (the base model's vocabulary), got ids from "
                             f"{int(ids.min())} to {int(ids.max())}. Tokenize with the base model's tokenizer.")
        tokens = self.embedding[ids]  # (L, D)
        rows = tokens[:0] if prompt is None else self._prompt(prompt).rows  # (P, D)
        total = rows.shape[0] + ids.numel() + max_new_tokens
        if self.max_positions is not None and total > self.max_positions:
            room = self.max_positions - rows.shape[0] - max_new_tokens
            fix = (f"Truncate the input to at most {room} tokens." if room > 0 else
                   f"The prompt and max_new_tokens alone leave no room for an input: lower max_new_tokens "
                   f"below {self.max_positions - rows.shape[0]} and truncate the input to fit.")
            raise ValueError(
                f"The request is {total} positions long (prompt {prompt!r}: {rows.shape[0]} virtual tokens, "
                f"{ids.numel()} tokens, {max_new_tokens} new tokens), beyond the model's {self.max_positions}. "
                + fix)
        return torch.cat([rows, tokens])  # (P + L, D), as the injector lays out a causal LM's input

    def _prompt(self, name: str) -> ServedPrompt:
        if name not in self.prompts:
            raise KeyError(f"No prompt named {name!r}; this embedder serves {self.prompt_names()}. Pass one of "
                           "them, or prompt=None for none, or add it in from_pretrained(prompts=...).")
        return self.prompts[name]


def _is_messages(token_ids: object) -> TypeGuard[Sequence[Mapping[str, str]]]:
    """Whether a request came as chat messages (a non-empty list of mappings) rather than ids."""
    return isinstance(token_ids, Sequence) and bool(token_ids) and isinstance(token_ids[0], Mapping)


def encode_prompt_embeds(embeds: torch.Tensor) -> str:
    """`embeds` as the `prompt_embeds` field of a request to vLLM's OpenAI-compatible server (started
    with `--enable-prompt-embeds`): base64 of the `torch.save` bytes, which the server reads back with
    `torch.load(weights_only=True)`."""
    if not isinstance(embeds, torch.Tensor) or embeds.dim() != 2:
        raise ValueError(f"prompt_embeds must be one request's 2-D (N, D) tensor, got "
                         f"{getattr(embeds, 'shape', type(embeds).__name__)}.")
    buffer = io.BytesIO()
    # clone(): torch.save writes a view's whole storage, e.g. all of a batch for one row sliced from it.
    torch.save(embeds.detach().cpu().clone(memory_format=torch.contiguous_format), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class _SavedPrompt:
    rows: torch.Tensor
    config: SoftPromptConfig
    source: str


def _prompt_sources(prompts: Any) -> list[tuple[str | None, str]]:
    """[(name or None for every saved prompt, where)]."""
    if prompts is None:
        return []
    if isinstance(prompts, Mapping):
        return [(str(name), os.fspath(where)) for name, where in prompts.items()]
    if isinstance(prompts, (str, os.PathLike)):
        return [(None, os.fspath(prompts))]
    return [(None, os.fspath(where)) for where in prompts]


def _read_prompts(where: str, name: str | None, hub: dict[str, Any]) -> dict[str, _SavedPrompt]:
    """The prompts of one save: `{name: prompt}` (all of them when `name` is None)."""
    fetch = AdapterSource(where, revision=hub["revision"], token=hub["token"], cache_dir=hub["cache_dir"],
                    force_download=False, local_files_only=hub["local_files_only"])
    out = {}
    with reading(where) if fetch.local else contextlib.nullcontext():  # one save's set, never a mix
        for served_name, folder in choose_prompts(fetch, name, None):
            config, tensors, _ = read_adapter_files(*fetch.adapter(folder))
            # P-tuning adapters store the encoder's output: the rows are the prompt as it is served.
            rows = tensors[PROMPT_KEY][: config.num_virtual_tokens]
            out[served_name] = _SavedPrompt(rows, config, f"{where}/{folder}" if folder else where)
    return out


def _check_fits(prompt: _SavedPrompt, width: int, fingerprint: str, base_model: str, check_base_model: bool) -> None:
    config, where = prompt.config, prompt.source
    if config.task_type not in (None, TaskType.CAUSAL_LM):
        task_type = config_enum(TaskType, config.task_type, "task_type")
        raise ValueError(f"The prompt in {where!r} has task_type={task_type.value!r}; serving needs "
                         "'CAUSAL_LM' (a prompt trained on a causal language model's generation).")
    if config.placement is not Placement.FRONT:
        # add_soft_prompt refuses it for causal LMs too: generation continues after the prompt.
        placement = config_enum(Placement, config.placement, "placement")
        raise ValueError(f"The prompt in {where!r} has placement={placement.value!r}; a causal LM's prompt "
                         "goes in front (placement='front'). Train it with placement='front'.")
    if prompt.rows.shape[1] != width:
        raise ValueError(f"The prompt in {where!r} has token_dim={prompt.rows.shape[1]}, but {base_model!r} has "
                         f"token_dim={width} (its embedding width). Serve it with the base model it was trained on.")
    if check_base_model:
        check_same_base(config, fingerprint, base_model, where)
