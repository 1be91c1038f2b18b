"""The classification example's mean-pooling readout (examples/mean_pooling.py) with a soft prompt."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from models import config_for, perturb_trainable
from transformers import BertModel

from hf_softprompt import SoftPromptConfig, add_soft_prompt, load_soft_prompt, save_soft_prompt

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from mean_pooling import MeanPooledBertForSequenceClassification  # noqa: E402
from run_classification import classifier_class  # noqa: E402


def _model(seed: int = 0) -> MeanPooledBertForSequenceClassification:
    torch.manual_seed(seed)
    return MeanPooledBertForSequenceClassification(config_for("bert", num_labels=3)).eval()


def test_logits_read_the_mean_of_the_attended_positions_only():
    model = _model()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    logits = model(input_ids=ids, attention_mask=mask).logits
    # Reference: each row alone, unpadded, through the bare encoder; a plain average of its outputs.
    for row, length in enumerate((4, 2)):
        hidden = model.bert(input_ids=ids[row:row + 1, :length]).last_hidden_state  # (1, L, D)
        torch.testing.assert_close(logits[row], model.classifier(hidden[0].mean(0)), atol=1e-5, rtol=1e-5)


def test_prompted_model_pools_over_prompt_and_real_tokens_and_reloads(tmp_path):
    model = _model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=3))
    perturb_trainable(model)
    assert model.soft_prompts.head("default", "classifier") is not None  # the new head is the prompt's
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    logits = model(input_ids=ids, attention_mask=mask).logits

    # Reference: the prompt concatenated by hand in front of an untouched encoder, mean over P + L.
    prompt = model.soft_prompts["default"]().detach()  # (3, D)
    head = model.soft_prompts.head("default", "classifier")
    reference_encoder = BertModel(model.config, add_pooling_layer=False).eval()
    reference_encoder.load_state_dict({k[len("bert."):]: v for k, v in base_state.items() if k.startswith("bert.")})
    for row, length in enumerate((3, 2)):
        tokens = reference_encoder.embeddings.word_embeddings(ids[row, :length])
        hidden = reference_encoder(inputs_embeds=torch.cat([prompt, tokens])[None]).last_hidden_state
        torch.testing.assert_close(logits[row], head(hidden[0].mean(0)), atol=1e-5, rtol=1e-5)

    save_soft_prompt(model, tmp_path)
    fresh = _model()
    load_soft_prompt(fresh, tmp_path)
    torch.testing.assert_close(fresh.eval()(input_ids=ids, attention_mask=mask).logits, logits, atol=0, rtol=0)


def test_mean_readout_is_refused_for_non_bert_models_with_the_fix():
    with pytest.raises(ValueError, match=r"got 'gpt2'.*--readout pooler"):
        classifier_class("mean", "gpt2")
    assert classifier_class("mean", "bert") is MeanPooledBertForSequenceClassification
