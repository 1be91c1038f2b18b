"""`SoftPromptBank`: the named prompts of one model, the task heads they own, and the active one.

Registered on the model as `model.soft_prompts`, so its parameters are the model's (optimizers,
`.to()`, DDP and `state_dict` see them): `soft_prompts.prompts.<name>.*` and, for prompts that
own a copy of a task head, `soft_prompts.heads.<name>.<module>.*`. A single prompt is the bank
with one entry, `"default"`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import torch
from torch import nn

from ..config import SoftPromptConfig
from ..prompt import SoftPrompt

DEFAULT_NAME = "default"
BANK_MODULE_NAME = "soft_prompts"


MAX_NAME_LENGTH = 128  # characters, and at most 255 bytes as UTF-8: a saved prompt's folder has its name
# Names a ModuleDict cannot hold as keys: its own attributes (`train`, `to`, `type`, `forward`, ...).
_MODULE_ATTRIBUTES = frozenset(dir(nn.ModuleDict()))
NAME_RULE = (
    f"a prompt name is a non-empty string of at most {MAX_NAME_LENGTH} characters (255 bytes as UTF-8), "
    "without '.', '/', '\\', control characters (such as NUL) or surrounding spaces, and not the name of an "
    "nn.Module attribute (such as 'train', 'to', 'type' or 'forward'): each prompt is a submodule, and "
    "saved in a folder of its name"
)


def check_prompt_name(name: object, where: str = "") -> str:
    """`name` if it follows the one rule for prompt names (`NAME_RULE`), else a ValueError that states
    the rule. Checked wherever a name enters: `add_soft_prompt`, loading, a saved `soft_prompts.json`."""
    if isinstance(name, str) and name and name.strip() == name and len(name) <= MAX_NAME_LENGTH \
            and len(name.encode("utf-8", "surrogatepass")) <= 255 and not any(c in name for c in "./\\") \
            and not any(ord(c) < 32 or ord(c) == 127 for c in name) and name not in _MODULE_ATTRIBUTES:
        return name
    place = f" in {where}" if where else ""
    shown = name if not isinstance(name, str) or len(name) <= 60 else name[:60] + "..."
    raise ValueError(f"Invalid soft prompt name {shown!r}{place}: {NAME_RULE}. E.g. 'sentiment'.")


def head_key(module_name: str) -> str:
    """A module path as a `ModuleDict` key (which cannot hold dots): `a.b` -> `a__b`."""
    return module_name.replace(".", "__")


class SoftPromptBank(nn.Module):
    """The prompts on one model, by name, in the order they were added.

    `bank[name]` is the `SoftPrompt`; `bank.configs[name]` its complete config;
    `bank.heads[name][head_key(path)]` the prompt's own copy of the base module at `path`;
    `bank.active` the prompt of calls that choose none (None: the bare model).
    """

    def __init__(self) -> None:
        super().__init__()
        self.prompts = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        self.configs: dict[str, SoftPromptConfig] = {}
        self.owned: dict[str, list[str]] = {}  # prompt name -> paths of the base modules it owns
        self.active: str | None = None

    def __getitem__(self, name: str) -> SoftPrompt:
        if name not in self.prompts:
            raise KeyError(f"No soft prompt named {name!r}; the model carries {self.names()}.")
        return cast(SoftPrompt, self.prompts[name])  # `add` puts only SoftPrompts there

    def __contains__(self, name: object) -> bool:
        return name in self.prompts.keys()  # ModuleDict.__contains__ is typed for str keys only

    def __iter__(self) -> Iterator[str]:
        return iter(self.prompts.keys())

    def __len__(self) -> int:
        return len(self.prompts)

    def names(self) -> list[str]:
        """Prompt names in order; `soft_prompt_ids` index this list."""
        return list(self.prompts.keys())

    def resolve(self, name: str | None) -> str:
        """`name`, or when None the active prompt, else the first; a clear error for an unknown one."""
        name = name if name is not None else self.active or self.names()[0]
        if name not in self.prompts:
            raise ValueError(f"No soft prompt named {name!r}; the model carries {self.names()}.")
        return name

    def lengths(self) -> dict[str, int]:
        return {name: self.configs[name].num_virtual_tokens for name in self.prompts}

    def add(self, name: str, config: SoftPromptConfig, prompt: SoftPrompt,
            heads: dict[str, nn.Module]) -> None:
        """Register a prompt and its own task-head copies (`{module path: copy}`)."""
        self.prompts[name] = prompt
        self.configs[name] = config
        self.owned[name] = list(heads)
        if heads:
            self.heads[name] = nn.ModuleDict({head_key(path): module for path, module in heads.items()})
        if self.active is None and len(self.prompts) == 1:
            self.active = name

    def remove(self, name: str) -> None:
        del self.prompts[name]
        if name in self.heads:
            del self.heads[name]
        del self.configs[name]
        del self.owned[name]
        if self.active == name:
            self.active = next(iter(self.prompts), None)

    def head(self, name: str, path: str) -> nn.Module | None:
        """Prompt `name`'s own copy of the base module at `path`, or None when it owns none."""
        if path not in self.owned.get(name, ()):
            return None
        return self._heads_of(name)[head_key(path)]

    def head_modules(self, name: str) -> dict[str, nn.Module]:
        """`{module path: copy}` of the task heads prompt `name` owns."""
        return {path: self._heads_of(name)[head_key(path)] for path in self.owned.get(name, ())}

    def _heads_of(self, name: str) -> nn.ModuleDict:
        """`heads[name]`: the `ModuleDict` of prompt `name`'s head copies, by `head_key(path)`."""
        return cast(nn.ModuleDict, self.heads[name])  # `add` puts only ModuleDicts there

    def trainable_parameters(self, name: str) -> Iterator[torch.nn.Parameter]:
        yield from self.prompts[name].parameters()
        if name in self.heads:
            yield from self.heads[name].parameters()
