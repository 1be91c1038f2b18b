"""The layout of a saved prompt set on disk (PEFT's multi-adapter layout).

The prompt named `"default"` sits at the root of the directory, every other one in `<dir>/<name>/`,
each an adapter of its own (adapter.py) with its own model card. Unless the set is one prompt named
`"default"` (then the directory is a plain PEFT adapter), `soft_prompts.json` at the root lists the
prompts in order (the ids of a `soft_prompt_ids` column) and the active one; PEFT ignores it.
"""

from __future__ import annotations

import json
import os

from ..model.bank import DEFAULT_NAME, check_prompt_name
from .adapter import ADAPTER_FILES, local_adapter_files
from .model_card import MODEL_CARD_NAME

INDEX_NAME = "soft_prompts.json"


def prompt_folder(name: str) -> str:
    """Where prompt `name` lives inside a saved directory or repo ("" for the root)."""
    return "" if name == DEFAULT_NAME else name


def saved_prompt_names(directory: str | os.PathLike) -> tuple[list[str], str | None]:
    """(prompt names in order, active name) of a directory `save_soft_prompt` (or PEFT) wrote:
    from `soft_prompts.json`, else the root adapter alone as `"default"`."""
    index_path = os.path.join(os.fspath(directory), INDEX_NAME)
    if not os.path.isfile(index_path):
        local_adapter_files(os.fspath(directory))  # FileNotFoundError naming what is missing
        return [DEFAULT_NAME], DEFAULT_NAME
    return read_index(index_path)


def read_index(index_path: str) -> tuple[list[str], str | None]:
    """(names, active) from a `soft_prompts.json`, checked."""
    try:
        with open(index_path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{index_path!r} is not valid JSON ({err}). Save the prompts again.") from err
    names = data.get("prompts") if isinstance(data, dict) else None
    if not isinstance(names, list) or not names:
        raise ValueError(f"{index_path!r} lists no prompts ({data!r}); save the prompts again.")
    for name in names:
        check_prompt_name(name, where=index_path)  # never a path outside the directory, e.g. '../x'
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{index_path!r} lists {twice} more than once, so the set it describes is damaged "
                         "(a hand edit, or two saves mixed): save the prompts again.")
    # An index without "active" (written by hand) uses the first prompt; `"active": null` is the bare
    # model for calls that name no prompt, as it was when saved.
    active = data.get("active", names[0])
    if active is not None and active not in names:
        raise ValueError(f"{index_path!r} names active={active!r}, which is not one of its prompts {names}; "
                         "save the prompts again.")
    return names, active


def has_saved_prompts(directory: str | os.PathLike | None) -> bool:
    """Whether `directory` holds a saved prompt set (the index, or a root adapter)."""
    if directory is None:
        return False
    directory = os.fspath(directory)
    return os.path.isfile(os.path.join(directory, INDEX_NAME)) or all(
        os.path.isfile(os.path.join(directory, f)) for f in ADAPTER_FILES)


def layout_files(folder: str | os.PathLike) -> dict[str, str]:
    """`{path in repo: local path}` of every file of a saved prompt set: index, adapters, cards."""
    folder = os.fspath(folder)
    names, _ = saved_prompt_names(folder)
    files: dict[str, str] = {}
    if os.path.isfile(os.path.join(folder, INDEX_NAME)):
        files[INDEX_NAME] = os.path.join(folder, INDEX_NAME)
    for name in names:
        sub = prompt_folder(name)
        for file in (*ADAPTER_FILES, MODEL_CARD_NAME):
            path = os.path.join(folder, sub, file)
            if os.path.isfile(path):
                files[f"{sub}/{file}" if sub else file] = path
            elif file != MODEL_CARD_NAME:
                raise FileNotFoundError(f"No {file} in {os.path.join(folder, sub)!r} to push: save the adapter "
                                        "there first (save_soft_prompt or trainer.save_model).")
    return files
