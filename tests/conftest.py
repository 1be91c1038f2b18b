"""Shared fixtures: offline Hub, private caches, a local tokenizer, tiny models."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `from models import make_model` in tests

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail at once instead of retrying for 40 s
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hub_server import hub_server  # noqa: E402,F401  (fixture)

WORDS = ("the a movie film was great bad not good terrible plot actors loved hated it is "
         "classify sentiment of this review positive negative : . , ! ? and but very").split()


@pytest.fixture(autouse=True)
def _offline_private_caches(tmp_path, monkeypatch):
    """Every test is offline and writes caches under its own tmp_path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer saved to disk, ids matching the tiny models' 96-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return str(path)
