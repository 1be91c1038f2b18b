"""Tasks of the main job (`run_multitask.py`, `benchmarks/lora_multitask.py`): the three built in, or
your own from a task file (`--task_file tasks.json`).

A task file is a JSON list with one object per task:

    [{"name": "sentiment",
      "train": "data/sentiment/train.jsonl", "validation": "data/sentiment/validation.jsonl",
      "text_column": "sentence", "label_column": "label",
      "template": "Review: {text}\\nSentiment:",
      "instruction": "Is the sentiment of this review positive or negative?",
      "verbalizer": {"0": "negative", "1": "positive"}}]

`train` and `validation` are JSON-lines files, relative to the task file; `template` holds `{text}`;
`instruction` is the zero-shot text prompt and the soft prompt's initial text; the optional
`verbalizer` maps a label value (as JSON keys: a string) to its answer text, else the label itself
is the answer. `examples/tasks.json` describes the built-in tasks this way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils import DATA_DIR

REQUIRED = ("name", "train", "validation", "text_column", "label_column", "template", "instruction")
OPTIONAL = ("verbalizer",)


@dataclass(frozen=True)
class Task:
    """One task: where its data is, how a row reads, and the instruction a user would write."""

    name: str
    train: str  # JSON-lines file
    validation: str
    text_column: str
    label_column: str
    template: str  # `{text}` is replaced by the row's text
    instruction: str  # the zero-shot text prompt, and the soft prompt's initial text
    verbalizer: dict[Any, str] | None = None  # label value -> answer text (None: the label itself)

    def answer(self, label: Any) -> str:
        """The answer text of a label value."""
        if not self.verbalizer:
            return str(label)
        for key in (label, str(label)):  # a task file's JSON keys are strings
            if key in self.verbalizer:
                return self.verbalizer[key]
        raise ValueError(f"Task {self.name!r}: label {label!r} has no entry in its verbalizer "
                         f"({sorted(map(str, self.verbalizer))}). Add it, or remove the verbalizer.")


def _builtin(name: str, folder: str, *fields: Any) -> Task:
    return Task(name, str(DATA_DIR / folder / "train.jsonl"), str(DATA_DIR / folder / "validation.jsonl"), *fields)


BUILTIN_TASKS = {task.name: task for task in (
    _builtin("sentiment", "sentiment", "sentence", "label", "Review: {text}\nSentiment:",
             "Is the sentiment of this review positive or negative?", {0: "negative", 1: "positive"}),
    _builtin("topics", "topics", "text", "target", "Headline: {text}\nTopic:",
             "Is this headline about business, politics, science or sports?"),
    _builtin("complaints", "complaints", "text", "label", "Tweet: {text}\nLabel:",
             "Is this tweet a complaint or no complaint?"),
)}


def read_task_file(path: str | os.PathLike) -> list[Task]:
    """The tasks a task file describes, checked: an error names the task and the field to fix."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"Task file {str(path)!r} does not exist.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"Task file {str(path)!r} is not valid JSON: {err}.") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"Task file {str(path)!r} must hold a non-empty JSON list of task objects, got "
                         f"{type(data).__name__}.")
    tasks: list[Task] = []
    for i, entry in enumerate(data):
        label = repr(entry.get("name")) if isinstance(entry, dict) and "name" in entry else f"#{i}"
        where = f"Task {label} in {str(path)!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a JSON object with {', '.join(REQUIRED)}; got {type(entry).__name__}.")
        missing = [f for f in REQUIRED if f not in entry]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)} (each task needs {', '.join(REQUIRED)}).")
        unknown = sorted(set(entry) - set(REQUIRED) - set(OPTIONAL))
        if unknown:
            raise ValueError(f"{where} has unknown field(s) {unknown}; the fields are "
                             f"{', '.join(REQUIRED + OPTIONAL)}.")
        for field in REQUIRED:
            if not isinstance(entry[field], str) or not entry[field].strip():
                raise ValueError(f"{where}: {field} must be a non-empty string, got {entry[field]!r}.")
        if "{text}" not in entry["template"]:
            raise ValueError(f"{where}: template must contain {{text}} (where the row's text goes), got "
                             f"{entry['template']!r}.")
        verbalizer = entry.get("verbalizer")
        if verbalizer is not None and (not isinstance(verbalizer, dict) or not verbalizer or not all(
                isinstance(v, str) and v.strip() for v in verbalizer.values())):
            raise ValueError(f"{where}: verbalizer must map each label value to a non-empty answer text, got "
                             f"{verbalizer!r}.")
        files = {}
        for split in ("train", "validation"):
            file = (path.parent / entry[split]).resolve()
            if not file.is_file():
                raise ValueError(f"{where}: {split} file {entry[split]!r} does not exist (looked at {str(file)!r}; "
                                 "paths are relative to the task file).")
            files[split] = str(file)
        if entry["name"] in {t.name for t in tasks}:
            raise ValueError(f"{where}: the name is used by an earlier task; each task needs its own name.")
        tasks.append(Task(entry["name"], files["train"], files["validation"], entry["text_column"],
                          entry["label_column"], entry["template"], entry["instruction"], verbalizer))
    return tasks


def check_columns(task: Task, columns: dict[str, list[str]]) -> None:
    """Raise naming the task and the field when a split lacks the task's text or label column."""
    for split, names in columns.items():
        for field in ("text_column", "label_column"):
            if getattr(task, field) not in names:
                raise ValueError(f"Task {task.name!r}: {field}={getattr(task, field)!r} is not a column of its "
                                 f"{split} file ({getattr(task, split)!r}), which has {sorted(names)}.")
