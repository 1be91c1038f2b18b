"""`load_soft_prompt`: saved prompts from a local directory or a Hub repo, checked against the model
before the model is touched, then attached under their names.

Interop with PEFT (`PeftModel.save_pretrained` / `PeftModel.from_pretrained`), both ways:
- Prompt tuning and P-tuning adapters load either way and give the same outputs for the same
  inputs, the task head of classifiers included (PEFT's `modules_to_save` keys,
  `base_model.classifier.weight`). PEFT returns causal-LM logits with the P virtual positions in
  front; ours are cut to the caller's length. Each folder of a multi-prompt save is one adapter
  PEFT loads (`subfolder=` or the folder's path).
- P-tuning: PEFT stores only the encoder's output, so a P-tuning adapter saved by PEFT loads here
  as a plain prompt table (same outputs; `is_trainable=True` then trains that table). PEFT reads
  our P-tuning adapters the same way and ignores our extra `hf_softprompt.*` tensors.
- Seq2seq: we write `num_transformer_submodules=1` (one P-row table, for the encoder). PEFT's own
  seq2seq adapters default to 2 and hold 2P rows, but for PROMPT_TUNING and P_TUNING its forward
  and `generate` put only the first P rows on the encoder input and never use the others: we load
  those first P rows, which gives PEFT's outputs.
- What PEFT does not know: `placement="after_first_token"` (PEFT always prepends, so such a prompt
  gives other outputs there), and decoder-only sequence classification, where we pool the last
  real token and PEFT the last position (the two agree when no row is right-padded).
- PEFT refuses `is_trainable=True` for prompt adapters; here it continues training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import Any

import torch
from torch import nn

from ..accessors import input_embeddings, weight_of
from ..config import SoftPromptConfig, TaskType, config_enum
from ..distributed import is_shard, load_whole_state_dict
from ..model.attach import attach_soft_prompt, remove_soft_prompt, resolve_trainable_modules
from ..model.bank import check_prompt_name
from ..model.fingerprint import embedding_fingerprint
from ..model.injector import get_injector, require_bank
from ..model.tasks import known_task_type
from .adapter import (
    PROMPT_KEY,
    head_tensors_by_path,
    local_adapter_files,
    prompt_state_dict,
    read_adapter_files,
)
from .commit import reading
from .prompt_set import prompt_folder, saved_prompt_names
from .sources import AdapterSource, check_same_base, choose_prompts


def load_soft_prompt(
    model: nn.Module,
    repo_id_or_path: str | os.PathLike,
    revision: str | None = None,
    is_trainable: bool = False,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    *,
    name: str | None = None,
    local_files_only: bool = False,
    subfolder: str | None = None,
    check_base_model: bool = True,
) -> nn.Module:
    """Put saved soft prompts (a local directory or a Hub repo) onto `model`, in place.

    Reads what `save_soft_prompt`, `SoftPromptTrainer` or PEFT wrote (prompt tuning and P-tuning):
    `adapter_config.json` with `adapter_model.safetensors` (or an old `adapter_model.bin`, read
    with `torch.load(weights_only=True)`), one such pair per prompt of a multi-prompt save. Prompts
    the model already carries stay as they are. Before the model is touched, each adapter's token
    dimension, task type, base model name and task-head shapes are checked; if any does not fit,
    nothing is attached.

    Args:
        model (`PreTrainedModel`): the base model (it may carry other prompts).
        repo_id_or_path (`str` or `os.PathLike`): a local directory, or a Hub repo id.
        revision (`str`, *optional*): branch, tag or commit of the Hub repo.
        is_trainable (`bool`, defaults to `False`): keep the prompts (and their task heads) trainable
            to continue training; by default they are frozen.
        token, cache_dir, force_download (*optional*): as in `hf_hub_download`.
        name (`str`, *optional*): load one prompt under this name: the saved prompt of that name in
            a multi-prompt save, else the single adapter found there. Without it, every saved prompt
            loads under its own name (a single adapter as `"default"`) and the saved active prompt
            becomes active when the model carried none.
        local_files_only (`bool`, defaults to `False`): only the local Hub cache (as `HF_HUB_OFFLINE=1`).
        subfolder (`str`, *optional*): load the one adapter in this folder of the repo or directory.
        check_base_model (`bool`, defaults to `True`): refuse an adapter trained on other base weights:
            by the fingerprint of the input-embedding table saved with it (any path, any dtype of
            the same weights passes), else by name (when both names are known). `False` skips it.

    Returns:
        The same model, carrying the prompts.

    Raises:
        ValueError: an adapter does not fit the model, a name is taken, or a file is corrupt.
        FileNotFoundError: neither a local adapter directory nor a Hub repo id.
        HubError: the download failed (missing repo, refused token, unreachable Hub, ...).

    Example:
        ```python
        model = AutoModelForSequenceClassification.from_pretrained("bert-base-uncased")
        model = load_soft_prompt(model, "me/sst2-prompt", revision="main")
        model = load_soft_prompt(model, "me/topics-prompt", name="topics")
        ```
    """
    source = os.fspath(repo_id_or_path)
    if name is not None:
        check_prompt_name(name)
    if subfolder is not None and (os.path.isabs(subfolder) or ".." in subfolder.replace("\\", "/").split("/")):
        raise ValueError(f"subfolder must be a relative path inside the repo or directory, got {subfolder!r}.")
    fetch = AdapterSource(source, revision=revision, token=token, cache_dir=cache_dir, force_download=force_download,
                    local_files_only=local_files_only)
    prepared = []
    with reading(source) if fetch.local else contextlib.nullcontext():  # one save's set, never a mix
        wanted = choose_prompts(fetch, name, subfolder)
        injector = get_injector(model)
        taken = set(injector.bank.names()) if injector is not None else set()
        clash = sorted(taken & {attach_as for attach_as, _ in wanted})
        if clash:
            raise ValueError(f"{type(model).__name__} already carries a soft prompt named {clash[0]!r}. Pass "
                             "name='...' to load it under another name, or remove_soft_prompt(model, "
                             f"{clash[0]!r}) first.")
        for attach_as, folder in wanted:  # read and check everything before the model is touched
            where = source if not folder else f"{source}/{folder}"
            config, tensors, peft_json = read_adapter_files(*fetch.adapter(folder))
            heads = check_adapter_fits(model, config, tensors, peft_json, where=where,
                                       check_base_model=check_base_model)
            prepared.append((attach_as, config, tensors, heads, where))
    loaded: list[str] = []
    had_prompts = bool(taken)
    try:
        for attach_as, config, tensors, heads, where in prepared:
            try:
                attach_soft_prompt(model, config, prompt_state_dict(config, tensors), trainable=is_trainable,
                                   name=attach_as, head_tensors=heads)
            except RuntimeError as err:  # load_state_dict: encoder tensors that do not match the config
                raise ValueError(f"The adapter in {where!r} is inconsistent: its tensors do not match its "
                                 f"config ({err}). Save it again.") from err
            loaded.append(attach_as)
    except BaseException:
        for done in reversed(loaded):
            remove_soft_prompt(model, done)
        raise
    if name is None and subfolder is None and not had_prompts:
        require_bank(model).active = fetch.active if fetch.indexed else loaded[0]
    return model


def check_adapter_fits(model: nn.Module, config: SoftPromptConfig, tensors: dict[str, torch.Tensor],
                       peft_json: dict[str, Any], where: str,
                       check_base_model: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Raise a `ValueError` naming both values when the adapter does not fit `model`; returns the
    adapter's task-head tensors by module path."""
    if not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"load_soft_prompt needs a transformers PreTrainedModel, got {type(model).__name__}.")
    prompt = tensors[PROMPT_KEY]
    width = weight_of(input_embeddings(model)).shape[1]
    if prompt.shape[1] != width:
        raise ValueError(
            f"The adapter in {where!r} has token_dim={prompt.shape[1]}, but {type(model).__name__} has "
            f"token_dim={width} (its input embedding width). Load the base model it was trained on."
        )
    task = known_task_type(model)
    if task is not None and config.task_type not in (None, task):
        saved_task = config_enum(TaskType, config.task_type, "task_type")
        raise ValueError(
            f"The adapter in {where!r} has task_type={saved_task.value!r}, but "
            f"{type(model).__name__} has task_type={task.value!r}. Load the base model with the "
            "matching head (the AutoModelFor... class of that task)."
        )
    if check_base_model:
        table = weight_of(input_embeddings(model))
        # A sharded table would need a collective that a load on one rank never joins: names decide then.
        check_same_base(config, None if is_shard(table) else embedding_fingerprint(table),
                        getattr(getattr(model, "config", None), "_name_or_path", None) or None, where)
    task_type = config.task_type or task
    heads = {} if task_type is None else dict(
        resolve_trainable_modules(model, dataclasses.replace(config, task_type=task_type)))
    by_path = head_tensors_by_path(tensors, heads, where)
    untrained = sorted(set(heads) - set(by_path))
    if untrained:
        warnings.warn(
            f"The adapter in {where!r} holds no weights for the task head {untrained}: it keeps the base "
            "model's weights (freshly initialised ones give arbitrary predictions).",
            stacklevel=3,  # the caller of load_soft_prompt
        )
    return by_path


def load_soft_prompt_weights(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load saved weights into the prompts (and their heads) already on `model`, for resume: every
    prompt of the model from its folder of `directory`. The saved set must be the model's."""
    bank = require_bank(model)
    directory = os.fspath(directory)
    with reading(directory):  # the set as one save wrote it, never half of a later one
        names, active = saved_prompt_names(directory)
        if names != bank.names():
            raise ValueError(f"{directory!r} holds the prompts {names}, but the model carries {bank.names()}; "
                             "resume needs the same prompts, in the same order.")
        loaded = []
        for name in names:
            where = os.path.join(directory, prompt_folder(name))
            config, tensors, _ = read_adapter_files(*local_adapter_files(where))
            _check_compatible(bank.configs[name], config, where)
            heads = head_tensors_by_path(tensors, bank.head_modules(name), where)
            loaded.append((name, prompt_state_dict(config, tensors), heads))
    for name, state, heads in loaded:  # every folder checked before any weight changes
        load_whole_state_dict(bank[name], state)
        for path, head_state in heads.items():
            load_whole_state_dict(bank.head_modules(name)[path], head_state)
    bank.active = active
    return model


def read_adapter(directory: str | os.PathLike) -> tuple[SoftPromptConfig, dict[str, torch.Tensor]]:
    """Read and check the adapter files in a local directory: (config, tensors)."""
    config, tensors, _ = read_adapter_files(*local_adapter_files(os.fspath(directory)))
    return config, tensors


# -------------------------------------------------------------------- helpers
def _check_compatible(expected: SoftPromptConfig, saved: SoftPromptConfig, where: Any) -> None:
    for field in ("num_virtual_tokens", "token_dim", "task_type", "encoder"):
        a, b = getattr(expected, field), getattr(saved, field)
        if b is not None and a != b:
            raise ValueError(
                f"The adapter in {os.fspath(where)!r} has {field}={getattr(b, 'value', b)!r}, but the "
                f"model's prompt has {field}={getattr(a, 'value', a)!r}."
            )
