"""Saving every prompt of a model, in PEFT's multi-adapter layout, and pushing it.

The prompt named `"default"` goes at the root of the directory, every other one in `<dir>/<name>/`
(as `PeftModel.save_pretrained` lays out several adapters), each an adapter of its own
(adapter.py) with its own model card. Unless the model carries just one prompt named
`"default"` (then the directory is a plain PEFT adapter), `soft_prompts.json` at the root lists
the prompts in order (the ids of a `soft_prompt_ids` column) and the active one, so the set loads
back as it was; PEFT ignores it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import torch
from huggingface_hub import CommitInfo
from safetensors.torch import save_file
from torch import nn

from ..config import SoftPromptConfig
from ..distributed import is_fsdp_sharded, whole_state_dict
from ..model.bank import DEFAULT_NAME
from ..model.injector import require_bank
from .adapter import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    HEAD_PREFIX,
    PROMPT_KEY,
    STATE_PREFIX,
    config_json,
    weights_metadata,
    write_text,
)
from .commit import commit_files
from .hub import push_files
from .model_card import MODEL_CARD_NAME, build_model_card, build_prompt_set_card, is_our_card
from .prompt_set import INDEX_NAME, layout_files, prompt_folder


def adapter_state_dict(model: nn.Module, name: str | None = None,
                       full_state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor prompt `name`'s adapter files hold (default: the active prompt): export,
    training state and its own task heads. Under FSDP2 the whole tensors, from `full_state_dict`
    (the model's, gathered) where given, else gathered here (then every rank must call)."""
    bank = require_bank(model)
    name = bank.resolve(name)
    prompt, config = bank[name], bank.configs[name]
    paths = {id(module): path for path, module in model.named_modules()}
    state = whole_state_dict(prompt, paths[id(prompt)], full_state_dict)
    with torch.no_grad():  # the encoder runs on the whole weights, not on this rank's shard
        live = full_state_dict is None and not is_fsdp_sharded(prompt)
        exported = prompt() if live else torch.func.functional_call(prompt, state)
        tensors = {PROMPT_KEY: exported.detach().float().cpu().contiguous()}
    if tuple(exported.shape) != (config.num_virtual_tokens, config.token_dim):
        raise ValueError(
            f"Prompt {name!r} reads as a {tuple(exported.shape)} tensor, not ({config.num_virtual_tokens}, "
            f"{config.token_dim}): FSDP1 keeps a flattened piece of it on each rank. Save it from the gathered "
            "state dict: trainer.save_model(), or on rank 0 save_soft_prompt(model, dir, full_state_dict=sd) "
            "with sd from FullyShardedDataParallel.state_dict_type(..., FULL_STATE_DICT); or shard with FSDP2."
        )
    if config.is_reparameterized:  # the table and the encoder: what resuming training needs
        for key, value in state.items():
            tensors[STATE_PREFIX + key] = value.cpu().contiguous()
    for path, module in bank.head_modules(name).items():
        for key, value in whole_state_dict(module, paths[id(module)], full_state_dict).items():
            tensors[f"{HEAD_PREFIX}{path}.{key}"] = value.cpu().contiguous()
    return tensors


def save_soft_prompt(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    push_to_hub: bool = False,
    repo_id: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tokenizer: Any | None = None,
    full_state_dict: Mapping[str, torch.Tensor] | None = None,
) -> list[str]:
    """Write every prompt of a soft-prompted model into `save_directory`, and optionally push it.

    The `"default"` prompt's `adapter_config.json` and `adapter_model.safetensors` go at the root,
    each other prompt's in `save_directory/<name>/`, each with a model card (`README.md`, not
    overwritten when it is not one of ours); `soft_prompts.json` lists the prompts (when there is
    more than the `"default"` one). All files are
    written to temporary names and renamed into place only once all are complete, so a crash never
    leaves a half-written adapter where the last good one was.

    Args:
        model (`PreTrainedModel`): a model carrying one or more soft prompts.
        save_directory (`str` or `os.PathLike`): created if missing.
        push_to_hub (`bool`, defaults to `False`): also upload what was written (and the tokenizer
            files, if given) to `repo_id` in one commit. Nothing else in `save_directory` is
            uploaded, and never the base model's weights.
        repo_id (`str`, *optional*): the Hub repo; defaults to the name of `save_directory`.
            Created if missing (`private` applies then).
        token, private, commit_message, revision, create_pr: passed to the Hub upload.
        tokenizer (*optional*): a tokenizer saved next to the adapters (and pushed with them).
        full_state_dict (`dict`, *optional*): the model's whole state dict, gathered (as the
            Trainer's `save_model` does under FSDP). Without it a model sharded with FSDP2
            (`fully_shard`) has its prompts gathered here: call it on every rank then; rank 0 writes.

    Returns:
        The paths written locally (none on the other ranks of a sharded model).

    Raises:
        HubError: the push failed (the message names the repo, what to check and what was saved
            locally); calling again retries the push.

    Example:
        ```python
        save_soft_prompt(model, "out/adapter", push_to_hub=True, repo_id="me/sst2-prompt")
        ```
    """
    bank = require_bank(model)
    root = os.fspath(save_directory)
    repo_given = repo_id is not None
    repo_id = repo_id or os.path.basename(os.path.normpath(os.path.abspath(root)))
    # The cards' loading snippet names where the files are: the Hub repo when pushed, else this folder.
    card_source = repo_id if push_to_hub or repo_given else os.path.abspath(root)
    # Gathered on every rank (a collective when sharded) before any rank decides whether to write.
    tensors_by_name = {name: adapter_state_dict(model, name, full_state_dict) for name in bank.names()}
    if is_fsdp_sharded(bank) and full_state_dict is None and torch.distributed.get_rank() != 0:
        return []
    writers: dict[str, Any] = {}
    for name in bank.names():
        folder = os.path.join(root, prompt_folder(name))
        os.makedirs(folder, exist_ok=True)
        config, heads = bank.configs[name], list(bank.head_modules(name))
        text = config_json(config, model, heads)
        tensors, metadata = tensors_by_name[name], weights_metadata(config, text)
        writers[os.path.join(folder, ADAPTER_WEIGHTS_NAME)] = (
            lambda tmp, t=tensors, m=metadata: save_file(t, tmp, metadata=m))
        writers[os.path.join(folder, ADAPTER_CONFIG_NAME)] = lambda tmp, t=text: write_text(tmp, t)
        sub_repo = repo_id if name == DEFAULT_NAME else f"{repo_id}/{name}"
        card = build_model_card(config, repo_id=card_source, subfolder=prompt_folder(name) or None,
                                model_name=sub_repo.split("/")[-1] if name != DEFAULT_NAME else None,
                                other_prompts=_others(bank, name) if name == DEFAULT_NAME else None)
        _add_card(writers, os.path.join(folder, MODEL_CARD_NAME), str(card))
    if DEFAULT_NAME not in bank:
        card = build_prompt_set_card(bank.configs, repo_id=card_source)
        _add_card(writers, os.path.join(root, MODEL_CARD_NAME), str(card))
    index_path = os.path.join(root, INDEX_NAME)
    if bank.names() != [DEFAULT_NAME]:  # a lone "default" prompt is a plain PEFT adapter
        index = json.dumps({"prompts": bank.names(), "active": bank.active,
                            "hf_softprompt_version": _version()}, indent=2) + "\n"
        writers[index_path] = lambda tmp: write_text(tmp, index)
    # An earlier save's list of prompts no longer holds for a lone "default" prompt: removed in the commit.
    commit_files(root, writers, remove=() if index_path in writers else (index_path,))
    written = list(writers)
    if tokenizer is not None:
        written += [os.fspath(f) for f in tokenizer.save_pretrained(root)]
    if push_to_hub:
        files = {os.path.relpath(p, root).replace(os.sep, "/"): p for p in written if os.path.isfile(p)}
        push_files(files, repo_id, token=token, revision=revision, private=private, create_pr=create_pr,
                   commit_message=commit_message or "Upload soft prompt",
                   note=f"The adapter was saved locally to {root!r} ({len(files)} files, complete): "
                        "run save_soft_prompt(..., push_to_hub=True) again to retry the push.")
    return written


def _add_card(writers: dict[str, Any], path: str, text: str) -> None:
    # A README.md the user wrote stays; ours is refreshed.
    if not os.path.isfile(path) or is_our_card(path):
        writers[path] = lambda tmp: write_text(tmp, text)


def _others(bank: Any, name: str) -> dict[str, SoftPromptConfig]:
    return {other: bank.configs[other] for other in bank.names() if other != name}


def push_adapter_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    model_card: str | os.PathLike | None = None,
    extra_files: Sequence[str | os.PathLike] = (),
    checkpoint_path_in_repo: str | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    create_pr: bool = False,
    create_repo: bool = True,
    run_as_future: bool = False,
) -> CommitInfo | Future:
    """Upload the saved prompts of `folder` (index, adapters, their cards) to `repo_id` in one
    commit, nothing else.

    For `SoftPromptTrainer`: a Trainer's output directory also holds `training_args.bin`, logs,
    tokenizer and checkpoint folders, none of which are pushed.

    Args:
        folder: a directory `save_soft_prompt` wrote.
        repo_id (`str`): the Hub repo.
        model_card (*optional*): path of the root README.md to push instead of `folder/README.md`.
        extra_files (*optional*): more local files (e.g. the tokenizer's) pushed to the repo root
            under their own names.
        checkpoint_path_in_repo (`str`, *optional*): also put the adapter files under this folder of
            the repo (the Trainer's `last-checkpoint/` or `checkpoint-N/`).
        create_repo (`bool`, defaults to `True`): create the repo if missing.
        run_as_future (`bool`, defaults to `False`): push in a background thread; returns a `Future`.
        token, revision, commit_message, private, create_pr: passed to the Hub upload.

    Raises:
        FileNotFoundError: `folder` lacks an adapter file.
        HubError: the push failed (raised from the `Future` with `run_as_future=True`).
    """
    layout = layout_files(folder)
    files: dict[str, str | bytes] = dict(layout)
    if checkpoint_path_in_repo:
        prefix = checkpoint_path_in_repo.strip("/")
        files.update({f"{prefix}/{path}": local for path, local in layout.items()
                      if os.path.basename(path) != MODEL_CARD_NAME})
    files.update({os.path.basename(os.fspath(path)): os.fspath(path) for path in extra_files})
    if model_card is not None and os.path.isfile(model_card):
        files[MODEL_CARD_NAME] = os.fspath(model_card)
    return push_files(files, repo_id, token=token, revision=revision, private=private, create_pr=create_pr,
                      commit_message=commit_message, create_repo=create_repo, run_as_future=run_as_future)


def _version() -> str:
    from .. import __version__

    return __version__
