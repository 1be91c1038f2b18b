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
from linear_probe import fit_head_by_probe, logistic_regression  # noqa: E402
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
        pooled = torch.nn.functional.normalize(hidden[0].mean(0), dim=-1)
        torch.testing.assert_close(logits[row], model.classifier(pooled), atol=1e-5, rtol=1e-5)


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
        pooled = torch.nn.functional.normalize(hidden[0].mean(0), dim=-1)
        torch.testing.assert_close(logits[row], head(pooled), atol=1e-5, rtol=1e-5)

    save_soft_prompt(model, tmp_path)
    fresh = _model()
    load_soft_prompt(fresh, tmp_path)
    torch.testing.assert_close(fresh.eval()(input_ids=ids, attention_mask=mask).logits, logits, atol=0, rtol=0)


def test_mean_readout_is_refused_for_non_bert_models_with_the_fix():
    with pytest.raises(ValueError, match=r"got 'gpt2'.*--readout pooler"):
        classifier_class("mean", "gpt2")
    assert classifier_class("mean", "bert") is MeanPooledBertForSequenceClassification


def test_logistic_regression_reaches_the_optimum_of_sklearns_objective():
    torch.manual_seed(0)
    x = torch.randn(40, 3)
    y = (x[:, 0] + 0.3 * torch.randn(40) > 0).long()
    weight, bias = logistic_regression(x, y, num_classes=2, c=1.0)
    z = (x @ (weight[1] - weight[0]) + (bias[1] - bias[0])).double()  # the binary logit

    # At the optimum of 0.5 |w|^2 + C sum log-loss, the gradient vanishes: w = C X^T (y - p), sum(y - p) = 0.
    residual = y.double() - torch.sigmoid(z)
    torch.testing.assert_close((weight[1] - weight[0]).double(), x.double().T @ residual, atol=1e-4, rtol=1e-4)
    assert abs(residual.sum().item()) < 1e-4
    # Three classes: the multinomial optimum, gradient zero too.
    y3 = torch.randint(0, 3, (40,))
    weight3, bias3 = logistic_regression(x, y3, num_classes=3)
    logits = (x @ weight3.T + bias3).double()
    residual3 = torch.nn.functional.one_hot(y3, 3).double() - logits.softmax(-1)
    torch.testing.assert_close(weight3.double(), residual3.T @ x.double(), atol=1e-4, rtol=1e-4)


def test_probe_fits_the_prompts_head_on_the_prompted_features():
    model = _model()
    add_soft_prompt(model, SoftPromptConfig(num_virtual_tokens=3))
    head = model.soft_prompts.head("default", "classifier")
    torch.manual_seed(1)
    batches = [{"input_ids": torch.randint(3, 90, (6, 5)), "attention_mask": torch.ones(6, 5, dtype=torch.long),
                "labels": torch.randint(0, 3, (6,))} for _ in range(2)]
    base_head = model.classifier.weight.clone()
    model.train()
    fit_head_by_probe(model, head, batches)
    assert model.training  # left as it was

    # Reference: the prompted model's own pooled features (the head's input), regressed independently.
    features = []
    hook = head.register_forward_pre_hook(lambda module, args: features.append(args[0]))
    with torch.no_grad():
        model.eval()
        logits = torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                            for b in batches])
    hook.remove()
    weight, bias = logistic_regression(torch.cat(features), torch.cat([b["labels"] for b in batches]), 3)
    torch.testing.assert_close(logits, torch.cat(features) @ weight.T + bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.classifier.weight, base_head, atol=0, rtol=0)  # the base head untouched
