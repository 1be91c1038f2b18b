"""The dataset column that chooses each row's prompt: found, and checked once before the first step.

A bad entry in a `soft_prompt_ids` column would otherwise surface at the step whose batch holds it,
as an error about a batch row; checked up front, the error names the dataset row.
"""

from __future__ import annotations

from typing import Any

from ..model.rows import NO_PROMPT, id_rule
from ..model.wrappers import CHOICE_ARGUMENTS

ID_COLUMN = "soft_prompt_ids"


def choice_column(dataset: Any) -> str | None:
    """The column of `dataset` that chooses each row's prompt (`soft_prompt_ids` or
    `soft_prompt_names`), or None."""
    columns = getattr(dataset, "column_names", None) or ()
    return next((c for c in CHOICE_ARGUMENTS if c in columns), None)


def check_prompt_id_column(dataset: Any, names: list[str], what: str = "training dataset") -> None:
    """Refuse a `soft_prompt_ids` column holding anything but an id of one of `names` (or -1),
    naming the first bad row. Datasets without the column (or without `column_names`) pass."""
    if ID_COLUMN not in (getattr(dataset, "column_names", None) or ()):
        return
    for row, value in enumerate(dataset[ID_COLUMN]):
        if isinstance(value, list) and len(value) == 1:  # a column of one-element lists, collated as (B, 1)
            value = value[0]
        if isinstance(value, str):
            raise ValueError(
                f"Row {row} of the {what} has {ID_COLUMN}={value!r}, a prompt name; the column holds ids, "
                f"positions in soft_prompt_names(model) = {names}. Map names to ids before training, e.g. "
                f"dataset.map(lambda r: {{'{ID_COLUMN}': {names}.index(r['{ID_COLUMN}'])}})."
            )
        if isinstance(value, bool) or not isinstance(value, int) or not NO_PROMPT <= value < len(names):
            raise ValueError(
                f"Row {row} of the {what} has {ID_COLUMN}={value!r}, but the model carries {len(names)} "
                f"prompts {names}: {id_rule(len(names))}."
            )
