"""Your own tasks in the main job: `--task_file tasks.json` (examples/tasks.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
from tasks import BUILTIN_TASKS, read_task_file  # noqa: E402
from test_examples import run_example  # noqa: E402


def write_task_file(directory: Path, tasks: list, rows: int = 12) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        with open(directory / f"{split}.jsonl", "w") as f:
            for i in range(rows):
                f.write(json.dumps({"review": f"the movie {'was good' if i % 2 else 'was bad'} {i}",
                                    "stars": i % 2}) + "\n")
    path = directory / "tasks.json"
    path.write_text(json.dumps(tasks))
    return path


GOOD = {"name": "stars", "train": "train.jsonl", "validation": "validation.jsonl", "text_column": "review",
        "label_column": "stars", "template": "Review: {text}\nStars:", "instruction": "One star or two?",
        "verbalizer": {"0": "one", "1": "two"}}


def test_the_example_task_file_describes_the_built_in_tasks():
    from_file = read_task_file(EXAMPLES / "tasks.json")
    assert [t.name for t in from_file] == list(BUILTIN_TASKS)
    for task in from_file:
        builtin = BUILTIN_TASKS[task.name]
        assert (task.train, task.validation) == (str(Path(builtin.train).resolve()),
                                                 str(Path(builtin.validation).resolve()))
        assert (task.text_column, task.label_column, task.template, task.instruction) == (
            builtin.text_column, builtin.label_column, builtin.template, builtin.instruction)
        for label in (0, 1, "business", "complaint"):  # the same answers, whatever the label's JSON type
            try:
                want = builtin.answer(label)
            except ValueError:
                continue
            assert task.answer(label) == want


@pytest.mark.parametrize("change,match", [
    ({"template": "Review:"}, r"Task 'stars' in .*: template must contain \{text\}"),
    ({"train": "missing.jsonl"}, r"Task 'stars' .*: train file 'missing.jsonl' does not exist"),
    ({"instruction": ""}, r"Task 'stars' .*: instruction must be a non-empty string"),
    ({"verbalizer": {"0": ""}}, r"Task 'stars' .*: verbalizer must map each label value"),
    ({"colour": "red"}, r"Task 'stars' .* has unknown field\(s\) \['colour'\]"),
    ({"label_column": None}, r"Task 'stars' .*: label_column must be a non-empty string"),
])
def test_a_bad_task_names_the_task_and_the_field(tmp_path, change, match):
    path = write_task_file(tmp_path, [{**GOOD, **change}])
    with pytest.raises(ValueError, match=match):
        read_task_file(path)


def test_bad_task_files(tmp_path):
    path = write_task_file(tmp_path, [{k: v for k, v in GOOD.items() if k != "template"}])
    with pytest.raises(ValueError, match=r"Task 'stars' .* lacks template"):
        read_task_file(path)
    path.write_text(json.dumps([GOOD, GOOD]))
    with pytest.raises(ValueError, match=r"the name is used by an earlier task"):
        read_task_file(path)
    path.write_text(json.dumps({"name": "stars"}))
    with pytest.raises(ValueError, match=r"must hold a non-empty JSON list"):
        read_task_file(path)
    path.write_text("[{")
    with pytest.raises(ValueError, match=r"is not valid JSON"):
        read_task_file(path)
    (task,) = read_task_file(write_task_file(tmp_path, [{**GOOD, "verbalizer": {"0": "one"}}]))
    with pytest.raises(ValueError, match=r"Task 'stars': label 1 has no entry in its verbalizer"):
        task.answer(1)


@pytest.mark.slow
def test_run_multitask_trains_and_scores_the_tasks_of_a_task_file(tmp_path):
    other = {**GOOD, "name": "length", "verbalizer": None, "template": "Text: {text}\nEven:"}
    del other["verbalizer"]
    path = write_task_file(tmp_path / "mytasks", [GOOD, other])
    result = run_example("run_multitask.py", tmp_path / "out", "--tiny", "--task_file", str(path),
                         "--text_baselines", "false")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["tasks"] == ["stars", "length"]
    assert set(results["exact_match"]) == {"prompt before", "prompt after"}  # no text baselines asked
    assert set(results["exact_match"]["prompt after"]) == {"stars", "length", "all"}
    assert json.loads((tmp_path / "out" / "soft_prompts.json").read_text())["prompts"] == ["stars", "length"]
    assert "| task | prompt before | prompt after |" in result.stdout
    bad = write_task_file(tmp_path / "bad", [{**GOOD, "text_column": "text"}])
    failed = run_example("run_multitask.py", tmp_path / "out2", "--tiny", "--task_file", str(bad), check=False)
    assert failed.returncode != 0
    assert "Task 'stars': text_column='text' is not a column of its train file" in failed.stderr


def test_a_text_prefix_as_a_prompt_reads_as_the_text_in_front(tokenizer_dir):
    """The k-shot baseline's shared text, computed once per batch, gives what the text in front gives."""
    import torch
    from models import make_model
    from transformers import AutoTokenizer
    from utils import generate_answers, text_prefixes_as_prompts

    from hf_softprompt import soft_prompt_names

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = make_model("llama", "causal_lm", initializer_range=0.2)
    prefixes = {"a": "the movie was good . ", "b": "a bad film the plot "}
    inputs = ["actors loved it", "the plot is bad", "good", "it is a film", "bad bad"]
    keys = ["a", "b", "a", "a", "b"]
    want = generate_answers(model, tokenizer, [prefixes[k] + x for k, x in zip(keys, inputs, strict=True)],
                            max_length=64, max_new_tokens=4, batch_size=5)
    with text_prefixes_as_prompts(model, tokenizer, prefixes) as names:
        assert not any(p.requires_grad for n in names.values() for p in model.soft_prompts[n].parameters())
        got = generate_answers(model, tokenizer, inputs, max_length=64, max_new_tokens=4, batch_size=5,
                               soft_prompt_names=[names[k] for k in keys])
        ids = tokenizer(inputs[0], return_tensors="pt", add_special_tokens=False)["input_ids"]
        full = tokenizer(prefixes["a"] + inputs[0], return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(model(ids, soft_prompt_names=[names["a"]]).logits[0],
                                       model(full, soft_prompt_names=[None]).logits[0, -ids.shape[1]:],
                                       atol=1e-5, rtol=0)
    assert got == want
    assert soft_prompt_names(model) == []  # removed after the block
