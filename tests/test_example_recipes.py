"""transformers' example recipes with the one-line edit, on tiny models.

Each test does what one of transformers' `examples/pytorch` scripts does (`run_glue.py`,
`run_ner.py`, `run_qa.py`, `run_clm.py`, `run_summarization.py`), written here from the recipe
and run with the installed Trainer classes: the same tokenization, collator, metrics and
post-processing, with `callbacks=[SoftPromptCallback(...)]` added to the stock `Trainer` (or
`SoftPromptSeq2SeqTrainer` in place of `Seq2SeqTrainer`). Each trains a few steps, saves, checks
that the output directory holds the adapter and no base weights, reloads the adapter onto a fresh
copy of the saved base model and checks that a fresh Trainer's `evaluate()` gives exactly the
trained Trainer's metrics, and that the bare base model's differ.
"""

from __future__ import annotations

import collections
import math
import os
import random
import re
import string

import numpy as np
import pytest
import torch
from datasets import Dataset
from models import make_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from hf_softprompt import SoftPromptCallback, SoftPromptConfig, SoftPromptSeq2SeqTrainer, load_soft_prompt
from hf_softprompt.model.injector import get_injector

P = 4
# What `trainer.save_model()` leaves in output_dir: the adapter and its model card (save_soft_prompt),
# the tokenizer (the Trainer saves its processing_class) and training_args.bin; no config.json and
# no model.safetensors.
ADAPTER = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
SAVED = ADAPTER | {"tokenizer.json", "tokenizer_config.json", "training_args.bin"}
TIMING = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_model_preparation_time")

# ------------------------------------------------------------------------------ a BERT-style tokenizer
# WordPiece, so that names and some adjectives split into sub-tokens (run_ner's label alignment),
# with [CLS]/[SEP] pairs and token_type_ids (run_qa's question/context pairs) and offsets.
PIECES = ("the a movie film was is it and but very great good bad awful terr ##ible wonder ##ful loved "
          "hated plot actors who directed where made in by what ? . , anna ##bel rob ##erto carl ##os "
          "smith jones ##son paris london rome berlin madrid").split()
FIRST = ("anna", "annabel", "rob", "roberto", "carl", "carlos")  # annabel = anna ##bel, ...
LAST = ("smith", "jones", "smithson", "jonesson")
CITIES = ("paris", "london", "rome", "berlin", "madrid")


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    """A BERT-style WordPiece tokenizer, its ids inside the tiny models' 96-token vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]", *PIECES])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                   unk_token="[UNK]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    path = tmp_path_factory.mktemp("bert_tokenizer")
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


# ------------------------------------------------------------------------------ shared steps
def args_for(output_dir, cls=TrainingArguments, **overrides):
    defaults = dict(output_dir=str(output_dir), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                    max_steps=12, learning_rate=0.1, save_strategy="no", report_to="none", use_cpu=True,
                    disable_tqdm=True, seed=0)
    return cls(**{**defaults, **overrides})


def saved_base(tmp_path, model) -> str:
    """Save the freshly built base model, as a Hub checkpoint would hold it; return its folder."""
    path = str(tmp_path / "base")
    model.save_pretrained(path)
    return path


def scores(metrics: dict) -> dict:
    """The metrics of an evaluation that must reproduce exactly (not timings, not the epoch)."""
    return {k: v for k, v in metrics.items() if k.startswith("eval_") and k not in TIMING}


def check_recipe(tmp_path, auto_class, base_dir, trainer, reload_with: dict, bare_with) -> tuple[dict, dict]:
    """Train `trainer`, save, reload the adapter onto a fresh base model and compare evaluations.

    `reload_with` maps a name to `make(model, output_dir)`, a Trainer a user would evaluate the
    reloaded model with; each must reproduce the trained Trainer's scores exactly. `bare_with`
    builds the one for the bare base model. Returns the scores of the trained and the bare model."""
    model = trainer.model
    before = get_injector(model).bank["default"]().detach().clone()
    trainer.train()
    trainer.save_model()
    trained = scores(trainer.evaluate())
    out = trainer.args.output_dir
    assert set(os.listdir(out)) == SAVED
    # The adapter file holds the prompt (and a classifier's head), not a copy of the base weights.
    adapter_bytes = os.path.getsize(os.path.join(out, "adapter_model.safetensors"))
    assert adapter_bytes < 0.1 * os.path.getsize(os.path.join(base_dir, "model.safetensors"))
    assert not torch.equal(get_injector(model).bank["default"]().detach(), before)  # the prompt moved

    reloaded = load_soft_prompt(auto_class.from_pretrained(base_dir), out)
    expected = model.state_dict()  # base weights, prompt and (classifiers) the trained head
    got = reloaded.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    for name, make in reload_with.items():
        again = scores(make(reloaded, tmp_path / "reloaded").evaluate())
        assert again == trained, f"evaluated with {name}"

    bare = scores(bare_with(auto_class.from_pretrained(base_dir), tmp_path / "bare").evaluate())
    assert bare.keys() == trained.keys()
    assert bare["eval_loss"] != trained["eval_loss"]
    return trained, bare


def one_line_edit() -> list:
    """The edit to a script's `Trainer(...)` call."""
    return [SoftPromptCallback(SoftPromptConfig(num_virtual_tokens=P))]


def reloaded_with(trainer_for) -> dict:
    """The stock Trainer, and the Trainer with `SoftPromptCallback()` (no config: the prompt the model
    carries), to evaluate a reloaded adapter with."""
    return {"the stock Trainer": trainer_for,
            "Trainer + SoftPromptCallback()": lambda m, out: trainer_for(m, out, callbacks=[SoftPromptCallback()])}


# ------------------------------------------------------------------------------ run_glue.py
def sentiment_data(n: int, seed: int) -> Dataset:
    """SST-style sentences with three labels: positive, negative, mixed."""
    rng = random.Random(seed)
    positive, negative = ("great", "good", "wonderful"), ("bad", "awful", "terrible")
    rows = {"sentence": [], "label": []}
    for _ in range(n):
        kind = rng.randrange(3)
        first = rng.choice(negative if kind == 1 else positive)
        text = f"the {rng.choice(('movie', 'film'))} was {'very ' * rng.randrange(2)}{first}"
        if kind == 2:
            text += f" but the plot was {rng.choice(negative)}"
        rows["sentence"].append(text + " .")
        rows["label"].append(kind)
    return Dataset.from_dict(rows)


def test_run_glue_sequence_classification(tmp_path, bert_tokenizer):
    tokenizer = bert_tokenizer
    base_dir = saved_base(tmp_path, make_model("bert", "seq_cls", initializer_range=0.2))

    def preprocess(batch):  # run_glue: no padding here, DataCollatorWithPadding pads each batch
        return tokenizer(batch["sentence"], truncation=True, max_length=64)

    train = sentiment_data(32, seed=0).map(preprocess, batched=True, remove_columns=["sentence"])
    dev = sentiment_data(12, seed=1).map(preprocess, batched=True, remove_columns=["sentence"])

    def compute_metrics(p):
        return {"accuracy": float((np.argmax(p.predictions, axis=-1) == p.label_ids).mean())}

    def trainer_for(model, output_dir, **kwargs):
        return Trainer(model=model, args=args_for(output_dir), train_dataset=train, eval_dataset=dev,
                       processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                       compute_metrics=compute_metrics, **kwargs)

    model = AutoModelForSequenceClassification.from_pretrained(base_dir)
    trained, bare = check_recipe(tmp_path, AutoModelForSequenceClassification, base_dir,
                                 trainer_for(model, tmp_path / "out", callbacks=one_line_edit()),
                                 reloaded_with(trainer_for), trainer_for)
    assert set(trained) == {"eval_loss", "eval_accuracy"}
    assert trained["eval_loss"] < bare["eval_loss"] and trained["eval_accuracy"] > bare["eval_accuracy"]


# ------------------------------------------------------------------------------ run_ner.py
NER_LABELS = ["O", "B-PER", "I-PER"]


def ner_data(n: int, seed: int) -> Dataset:
    """Pre-split words with word-level BIO tags, as in CoNLL-2003."""
    rng = random.Random(seed)
    rows = {"tokens": [], "ner_tags": []}
    for _ in range(n):
        name = [rng.choice(FIRST)] + ([rng.choice(LAST)] if rng.random() < 0.6 else [])
        tags = [1] + [2] * (len(name) - 1)
        if rng.random() < 0.5:
            words, labels = name + ["loved", "the", "film"], tags + [0, 0, 0]
        else:
            words, labels = ["the", "film", "was", "directed", "by"] + name, [0] * 5 + tags
        rows["tokens"].append(words)
        rows["ner_tags"].append(labels)
    return Dataset.from_dict(rows)


def align_labels(tokenizer):
    """run_ner's tokenize_and_align_labels: the word's label on its first sub-token, -100 on the
    other sub-tokens and on special tokens (label_all_tokens=False)."""
    def tokenize(batch):
        encoded = tokenizer(batch["tokens"], truncation=True, max_length=64, is_split_into_words=True)
        encoded["labels"] = []
        for i, tags in enumerate(batch["ner_tags"]):
            labels, previous = [], None
            for word in encoded.word_ids(batch_index=i):
                labels.append(-100 if word is None or word == previous else tags[word])
                previous = word
            encoded["labels"].append(labels)
        return encoded
    return tokenize


def entity_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) of each BIO entity (seqeval's default, non-strict reading: an I- tag
    without a B- starts an entity)."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        inside = tag.startswith("I-") and kind == tag[2:]
        if start is not None and not inside:
            spans.add((kind, start, i))
            start, kind = None, None
        if tag != "O" and not inside:
            start, kind = i, tag[2:]
    return spans


def test_entity_spans_reads_bio_tags():
    assert entity_spans(["B-PER", "I-PER", "O", "I-PER", "B-PER", "B-PER"]) == {
        ("PER", 0, 2), ("PER", 3, 4), ("PER", 4, 5), ("PER", 5, 6)}
    assert entity_spans(["O", "O"]) == set()


def ner_metrics(p) -> dict:
    """run_ner's compute_metrics: predictions where the label is not -100, then entity-level
    precision, recall and F1 (micro, as seqeval) and token accuracy."""
    predictions = np.argmax(p.predictions, axis=-1)
    true_tags, pred_tags = [], []
    for pred_row, label_row in zip(predictions, p.label_ids, strict=True):
        kept = label_row != -100
        true_tags.append([NER_LABELS[t] for t in label_row[kept]])
        pred_tags.append([NER_LABELS[t] for t in pred_row[kept]])
    true = {(i, *s) for i, tags in enumerate(true_tags) for s in entity_spans(tags)}
    pred = {(i, *s) for i, tags in enumerate(pred_tags) for s in entity_spans(tags)}
    hits = len(true & pred)
    precision = hits / len(pred) if pred else 0.0
    recall = hits / len(true) if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    flat_true = [t for row in true_tags for t in row]
    flat_pred = [t for row in pred_tags for t in row]
    accuracy = sum(a == b for a, b in zip(flat_true, flat_pred, strict=True)) / len(flat_true)
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": accuracy}


def test_run_ner_token_classification(tmp_path, bert_tokenizer):
    tokenizer = bert_tokenizer
    base = make_model("bert", "token_cls", initializer_range=0.2)
    base.config.id2label = dict(enumerate(NER_LABELS))  # as run_ner sets them from the dataset
    base.config.label2id = {label: i for i, label in enumerate(NER_LABELS)}
    base_dir = saved_base(tmp_path, base)
    columns = ["tokens", "ner_tags"]
    train = ner_data(32, seed=0).map(align_labels(tokenizer), batched=True, remove_columns=columns)
    dev = ner_data(12, seed=1).map(align_labels(tokenizer), batched=True, remove_columns=columns)
    # The alignment met sub-tokens (annabel = anna ##bel): their -100 labels are not counted.
    assert any(t.startswith("##") for row in dev["input_ids"] for t in tokenizer.convert_ids_to_tokens(row))

    def trainer_for(model, output_dir, **kwargs):
        return Trainer(model=model, args=args_for(output_dir), train_dataset=train, eval_dataset=dev,
                       processing_class=tokenizer, data_collator=DataCollatorForTokenClassification(tokenizer),
                       compute_metrics=ner_metrics, **kwargs)

    model = AutoModelForTokenClassification.from_pretrained(base_dir)
    trained, bare = check_recipe(tmp_path, AutoModelForTokenClassification, base_dir,
                                 trainer_for(model, tmp_path / "out", callbacks=one_line_edit()),
                                 reloaded_with(trainer_for), trainer_for)
    assert set(trained) == {"eval_loss", "eval_precision", "eval_recall", "eval_f1", "eval_accuracy"}
    assert trained["eval_loss"] < bare["eval_loss"]


# ------------------------------------------------------------------------------ run_qa.py
MAX_SEQ_LENGTH = 32


def qa_examples(n: int, seed: int) -> list[dict]:
    """SQuAD-style examples: a context, a question, the answer text and its character start."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        name, city = f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.choice(CITIES)
        context = f"the film was made in {city} , and it was directed by {name} ."
        question, answer = ("who directed the film ?", name) if i % 2 else ("where was the film made ?", city)
        examples.append({"id": str(i), "context": context, "question": question,
                         "answer": answer, "answer_start": context.index(answer)})
    return examples


def qa_features(tokenizer, examples: list[dict]) -> tuple[Dataset, list[dict]]:
    """run_qa's preprocessing, question first and the context truncated ("only_second"), with the
    answer's character span mapped to start/end token positions (the [CLS] index 0 when the
    answer is cut off). Returns the model inputs and, per feature, the example id and the offsets
    of its context tokens (None elsewhere), for the post-processing."""
    encoded = tokenizer([e["question"] for e in examples], [e["context"] for e in examples],
                        truncation="only_second", max_length=MAX_SEQ_LENGTH, stride=8,
                        return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
    starts, ends, kept = [], [], []
    for i, offsets in enumerate(encoded["offset_mapping"]):
        example = examples[encoded["overflow_to_sample_mapping"][i]]
        in_context = [s == 1 for s in encoded.sequence_ids(i)]
        first_char, last_char = example["answer_start"], example["answer_start"] + len(example["answer"])
        start = next((t for t, (a, b) in enumerate(offsets) if in_context[t] and a <= first_char < b), 0)
        end = next((t for t, (a, b) in enumerate(offsets) if in_context[t] and a < last_char <= b), 0)
        starts.append(start if end else 0)
        ends.append(end if start else 0)
        kept.append({"example_id": example["id"],
                     "offsets": [tuple(o) if in_context[t] else None for t, o in enumerate(offsets)]})
    data = Dataset.from_dict({key: encoded[key] for key in ("input_ids", "token_type_ids", "attention_mask")}
                             | {"start_positions": starts, "end_positions": ends})
    return data, kept


def qa_predictions(examples, features, start_logits, end_logits, n_best=5, max_answer_length=6) -> dict:
    """run_qa's postprocess_qa_predictions (no null answer): over each example's features, the
    n_best start and end logits, the valid spans inside the context, the best by start + end
    logit, as the context's text."""
    by_example = collections.defaultdict(list)
    for i, feature in enumerate(features):
        by_example[feature["example_id"]].append(i)
    answers = {}
    for example in examples:
        best = (-math.inf, "")
        for i in by_example[example["id"]]:
            offsets = features[i]["offsets"]
            for s in np.argsort(start_logits[i])[-n_best:]:
                for e in np.argsort(end_logits[i])[-n_best:]:
                    if offsets[s] is None or offsets[e] is None or not 0 <= e - s < max_answer_length:
                        continue
                    score = start_logits[i][s] + end_logits[i][e]
                    if score > best[0]:
                        best = (score, example["context"][offsets[s][0]:offsets[e][1]])
        answers[example["id"]] = best[1]
    return answers


def squad_scores(predicted: dict, examples: list[dict]) -> dict:
    """SQuAD v1 exact match and token F1 (lower case, no punctuation or articles), in percent."""
    def normal(text):
        text = "".join(c for c in text.lower() if c not in string.punctuation)
        return re.sub(r"\b(a|an|the)\b", " ", text).split()

    exact, f1 = [], []
    for example in examples:
        pred, true = normal(predicted[example["id"]]), normal(example["answer"])
        exact.append(float(pred == true))
        common = sum((collections.Counter(pred) & collections.Counter(true)).values())
        f1.append(0.0 if not common else 2 * common / (len(pred) + len(true)))
    return {"exact_match": 100 * float(np.mean(exact)), "f1": 100 * float(np.mean(f1))}


def test_qa_post_processing_recovers_the_answer_from_one_hot_logits(bert_tokenizer):
    examples = qa_examples(4, seed=3)
    data, features = qa_features(bert_tokenizer, examples)
    start = np.eye(MAX_SEQ_LENGTH)[data["start_positions"]]
    end = np.eye(MAX_SEQ_LENGTH)[data["end_positions"]]
    predicted = qa_predictions(examples, features, start, end)
    assert predicted == {e["id"]: e["answer"] for e in examples}
    assert squad_scores(predicted, examples) == {"exact_match": 100.0, "f1": 100.0}


def test_run_qa_extractive_question_answering(tmp_path, bert_tokenizer):
    tokenizer = bert_tokenizer
    base_dir = saved_base(tmp_path, make_model("bert", "qa", initializer_range=0.2))
    train, _ = qa_features(tokenizer, qa_examples(32, seed=0))
    dev_examples = qa_examples(12, seed=1)
    dev, dev_features = qa_features(tokenizer, dev_examples)
    seen = {}

    def compute_metrics(p):  # the post-processing of run_qa's QuestionAnsweringTrainer.evaluate
        start_logits, end_logits = p.predictions
        seen["answers"] = qa_predictions(dev_examples, dev_features, start_logits, end_logits)
        return squad_scores(seen["answers"], dev_examples)

    def trainer_for(model, output_dir, **kwargs):
        return Trainer(model=model, args=args_for(output_dir), train_dataset=train, eval_dataset=dev,
                       processing_class=tokenizer, data_collator=default_data_collator,
                       compute_metrics=compute_metrics, **kwargs)

    model = AutoModelForQuestionAnswering.from_pretrained(base_dir)
    trained, bare = check_recipe(tmp_path, AutoModelForQuestionAnswering, base_dir,
                                 trainer_for(model, tmp_path / "out", callbacks=one_line_edit()),
                                 reloaded_with(trainer_for), trainer_for)
    assert set(trained) == {"eval_loss", "eval_exact_match", "eval_f1"}
    assert trained["eval_loss"] < bare["eval_loss"] and trained["eval_exact_match"] > bare["eval_exact_match"]
    assert all(answer in e["context"] for answer, e in zip(seen["answers"].values(), dev_examples, strict=True))


# ------------------------------------------------------------------------------ run_clm.py
def clm_texts(n: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    return Dataset.from_dict({"text": [
        f"the {rng.choice(('movie', 'film'))} was {rng.choice(('great', 'good', 'bad', 'terrible'))} and "
        f"the actors {rng.choice(('loved', 'hated'))} it ." for _ in range(n)]})


def grouped(tokenizer, texts: Dataset, block_size: int) -> Dataset:
    """run_clm's tokenize_function and group_texts: every text tokenized whole, concatenated, cut
    into block_size chunks (the remainder dropped), labels = input_ids."""
    tokenized = texts.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])

    def group_texts(batch):
        joined = {k: sum(batch[k], []) for k in batch}
        total = len(joined["input_ids"]) // block_size * block_size
        result = {k: [t[i:i + block_size] for i in range(0, total, block_size)] for k, t in joined.items()}
        result["labels"] = [list(ids) for ids in result["input_ids"]]
        return result

    return tokenized.map(group_texts, batched=True, batch_size=len(tokenized))


def clm_accuracy(p) -> dict:
    """run_clm's compute_metrics: the argmax at each position against the next token."""
    predictions, labels = p.predictions[:, :-1].reshape(-1), p.label_ids[:, 1:].reshape(-1)
    return {"accuracy": float((predictions == labels).mean())}


def argmax_logits(logits, labels):
    """run_clm's preprocess_logits_for_metrics: keep only the argmax, not the full logits."""
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(dim=-1)


def clm_loss(model, dev: Dataset) -> float:
    """The mean next-token loss over the dev blocks, from the model's logits: the reference."""
    ids = torch.tensor(dev["input_ids"])
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1)).item()


def test_run_clm_causal_lm_perplexity(tmp_path, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    base_dir = saved_base(tmp_path, make_model("gpt2", "causal_lm", initializer_range=0.2))
    train = grouped(tokenizer, clm_texts(40, seed=0), block_size=16)
    dev = grouped(tokenizer, clm_texts(12, seed=1), block_size=16)
    assert len(dev) >= 4 and all(len(row) == 16 for row in dev["input_ids"])

    def trainer_for(model, output_dir, **kwargs):
        return Trainer(model=model, args=args_for(output_dir, **kwargs.pop("args", {})), train_dataset=train,
                       eval_dataset=dev, processing_class=tokenizer, data_collator=default_data_collator,
                       compute_metrics=clm_accuracy, preprocess_logits_for_metrics=argmax_logits, **kwargs)

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    # Only with the callback: GPT-2 declares no loss_type, so the stock Trainer's evaluate() counts
    # labels[:, 0] as a target and reports (L-1)/L of the mean loss (with or without a prompt);
    # the callback counts labels[:, 1:], as the loss does.
    with_callback = reloaded_with(trainer_for)["Trainer + SoftPromptCallback()"]
    trained, _ = check_recipe(tmp_path, AutoModelForCausalLM, base_dir,
                              trainer_for(model, tmp_path / "out", callbacks=one_line_edit()),
                              {"Trainer + SoftPromptCallback()": with_callback}, trainer_for)
    assert set(trained) == {"eval_loss", "eval_accuracy"}
    perplexity = math.exp(trained["eval_loss"])  # what run_clm reports after evaluate()
    assert perplexity == pytest.approx(math.exp(clm_loss(model, dev)), rel=1e-5)
    assert perplexity < math.exp(clm_loss(AutoModelForCausalLM.from_pretrained(base_dir), dev))


def test_run_clm_default_block_size_is_refused_with_the_block_size_advice(tmp_path, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    positions = 128  # GPT-2's n_positions in models.py: run_clm's default block_size
    texts = clm_texts(60, seed=0)
    base_dir = saved_base(tmp_path, make_model("gpt2", "causal_lm"))

    def trainer_with(block_size):
        return Trainer(model=AutoModelForCausalLM.from_pretrained(base_dir),
                       args=args_for(tmp_path / str(block_size), max_steps=1),
                       train_dataset=grouped(tokenizer, texts, block_size), processing_class=tokenizer,
                       data_collator=default_data_collator, callbacks=one_line_edit())

    trainer = trainer_with(positions)
    with pytest.raises(ValueError, match=rf"exceed the model's {positions} positions\..*"
                                         rf"run_clm\.py, --block_size {positions - P};.*"
                                         rf"SFTConfig\(max_length={positions - P}\)"):
        trainer.train()
    assert trainer.state.global_step == 0  # refused at the first step, before any update

    trainer = trainer_with(positions - P)
    trainer.train()
    assert trainer.state.global_step == 1


# ------------------------------------------------------------------------------ run_summarization.py
def summarization_data(n: int, seed: int) -> Dataset:
    """Reviews and their summary: the adjective each clause gives."""
    rng = random.Random(seed)
    rows = {"document": [], "summary": []}
    for _ in range(n):
        film, plot = rng.choice(("great", "good", "bad")), rng.choice(("great", "good", "bad"))
        rows["document"].append(f"the movie was {film} but the plot was {plot} .")
        rows["summary"].append(f"{film} {plot}")
    return Dataset.from_dict(rows)


def test_run_summarization_with_predict_with_generate(tmp_path, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    base_dir = saved_base(tmp_path, make_model("t5", "seq2seq_lm"))
    prefix = "classify : "  # run_summarization's --source_prefix (T5's "summarize: ")

    def preprocess(batch):
        inputs = tokenizer([prefix + doc for doc in batch["document"]], max_length=32, truncation=True)
        inputs["labels"] = tokenizer(text_target=batch["summary"], max_length=8, truncation=True)["input_ids"]
        return inputs

    columns = ["document", "summary"]
    train = summarization_data(32, seed=0).map(preprocess, batched=True, remove_columns=columns)
    dev = summarization_data(8, seed=1).map(preprocess, batched=True, remove_columns=columns)
    decoded_by_run = []

    def compute_metrics(p):  # run_summarization's, with token overlap in place of the Hub's rouge
        preds = np.where(p.predictions != -100, p.predictions, tokenizer.pad_token_id)
        labels = np.where(p.label_ids != -100, p.label_ids, tokenizer.pad_token_id)
        decoded = [t.strip() for t in tokenizer.batch_decode(preds, skip_special_tokens=True)]
        targets = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        decoded_by_run.append(decoded)
        overlap = []
        for pred, true in zip(decoded, targets, strict=True):
            common = sum((collections.Counter(pred.split()) & collections.Counter(true.split())).values())
            overlap.append(0.0 if not common else 2 * common / (len(pred.split()) + len(true.split())))
        return {"exact_match": float(np.mean([a == b for a, b in zip(decoded, targets, strict=True)])),
                "unigram_f1": float(np.mean(overlap)),
                "gen_len": float(np.mean([np.count_nonzero(row != tokenizer.pad_token_id) for row in preds]))}

    def trainer_for(model, output_dir, cls=Seq2SeqTrainer, **kwargs):
        args = args_for(output_dir, Seq2SeqTrainingArguments, predict_with_generate=True,
                        generation_max_length=6, generation_num_beams=2, max_steps=64,
                        learning_rate=0.5)
        return cls(model=model, args=args, train_dataset=train, eval_dataset=dev, processing_class=tokenizer,
                   data_collator=DataCollatorForSeq2Seq(tokenizer, model=model), compute_metrics=compute_metrics,
                   **kwargs)

    model = AutoModelForSeq2SeqLM.from_pretrained(base_dir)
    trainer = trainer_for(model, tmp_path / "out", cls=SoftPromptSeq2SeqTrainer,
                          soft_prompt_config=SoftPromptConfig(num_virtual_tokens=P))
    # A loaded adapter generates with the stock Seq2SeqTrainer too: generate() needs nothing of ours.
    reload_with = {"the stock Seq2SeqTrainer": trainer_for,
                   "SoftPromptSeq2SeqTrainer": lambda m, out: trainer_for(m, out, cls=SoftPromptSeq2SeqTrainer)}
    trained, bare = check_recipe(tmp_path, AutoModelForSeq2SeqLM, base_dir, trainer, reload_with, trainer_for)
    assert set(trained) == {"eval_loss", "eval_exact_match", "eval_unigram_f1", "eval_gen_len"}
    trained_texts, *reloaded_texts, bare_texts = decoded_by_run
    assert len(trained_texts) == len(dev) and reloaded_texts == [trained_texts] * len(reload_with)
    assert bare_texts != trained_texts  # the generations used the prompt
    assert trained["eval_loss"] < bare["eval_loss"] and trained["eval_unigram_f1"] > bare["eval_unigram_f1"]
