"""Where saved prompts come from: a local directory or a Hub repo, and which of its prompts to read."""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..config import SoftPromptConfig
from ..model.bank import DEFAULT_NAME
from ..model.fingerprint import same_weights
from .adapter import ADAPTER_BIN_NAME, ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, local_adapter_files
from .hub import download_files
from .prompt_set import INDEX_NAME, prompt_folder, read_index


class AdapterSource:
    """Files of a local directory or a Hub repo, by path inside it."""

    def __init__(self, source: str, **hub: Any) -> None:
        self.source = source
        self.hub = hub
        self.local = os.path.isdir(source)
        self.active: str | None = None
        self.indexed = False  # whether the source holds a soft_prompts.json (then `active` is its choice)
        if not self.local:
            try:
                validate_repo_id(source)
            except HFValidationError as err:
                raise FileNotFoundError(
                    f"{source!r} is neither a local adapter directory nor a Hub repo id ('namespace/name')."
                ) from err

    def index(self) -> tuple[list[str], str | None] | None:
        """The saved prompt names and active one, when the source is a multi-prompt save."""
        if self.local:
            path = os.path.join(self.source, INDEX_NAME)
            found = [path] if os.path.isfile(path) else []
        else:
            found = download_files(self.source, [[INDEX_NAME]], optional=True, **self.hub)
        if not found:
            return None
        names, self.active = read_index(found[0])
        self.indexed = True
        return names, self.active

    def adapter(self, folder: str) -> tuple[str, str]:
        """(config path, weights path) of the adapter in `folder` ("" for the root)."""
        if self.local:
            local = os.path.join(self.source, folder) if folder else self.source
            if not os.path.isdir(local):
                raise FileNotFoundError(f"No folder {folder!r} in {self.source!r}.")
            return local_adapter_files(local)
        paths = download_files(
            self.source, [[ADAPTER_CONFIG_NAME], [ADAPTER_WEIGHTS_NAME, ADAPTER_BIN_NAME]],
            subfolder=folder or None, note=f"There is no local directory {self.source!r} either.", **self.hub)
        return paths[0], paths[1]


def choose_prompts(fetch: AdapterSource, name: str | None, subfolder: str | None) -> list[tuple[str, str]]:
    """[(name to attach as, folder in the source)] of the prompts to load."""
    if subfolder is not None:
        return [(name or DEFAULT_NAME, subfolder.strip("/"))]
    index = fetch.index()
    if index is None:
        return [(name or DEFAULT_NAME, "")]
    names, _ = index
    if name is None:
        return [(each, prompt_folder(each)) for each in names]
    if name in names:
        return [(name, prompt_folder(name))]
    if len(names) == 1:
        return [(name, prompt_folder(names[0]))]
    raise ValueError(f"{fetch.source!r} holds the prompts {names}, none named {name!r}. Pass one of them as "
                     "name=..., or subfolder=... for one folder, or no name to load them all.")


def same_base_name(a: str, b: str) -> bool:
    """Whether two base-model names (Hub ids or paths) name the same model: equal, or the same folder."""
    a, b = a.rstrip("/\\"), b.rstrip("/\\")
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b))


def check_same_base(config: SoftPromptConfig, fingerprint: str | None, base_name: str | None, where: str) -> None:
    """Raise a `ValueError` unless the prompt saved in `where` (with `config`) was trained on the base
    model whose embedding table has `fingerprint` (called `base_name`): by the fingerprints where both
    exist (a path that moved still matches; other weights never do), else by name."""
    saved_name, saved_fingerprint = config.base_model_name_or_path, config.base_model_fingerprint
    same = same_weights(saved_fingerprint, fingerprint) if saved_fingerprint and fingerprint else None
    if same is True:
        return
    if same is False:
        raise ValueError(
            f"The prompt in {where!r} was trained on other weights than {base_name or 'this model'!r}: its base "
            f"model's input embeddings (fingerprint {saved_fingerprint}, saved from "
            f"base_model_name_or_path={saved_name!r}) differ from these ({fingerprint}). Use the base model it "
            "was trained on, or pass check_base_model=False to use it anyway."
        )
    if saved_name and base_name and not same_base_name(saved_name, base_name):
        raise ValueError(
            f"The prompt in {where!r} was trained on base_model_name_or_path={saved_name!r}, but the base model "
            f"is {base_name!r}. Use that base model, or pass check_base_model=False if both names are the same "
            "weights (the prompt was saved without a fingerprint of its base model's embeddings)."
        )
