"""SoftPromptConfig: defaults, PEFT spellings, validation messages, JSON round trip."""

from __future__ import annotations

import json
import warnings

import pytest

from hf_softprompt import SoftPromptConfig
from hf_softprompt.config import EncoderType, Placement, PromptInit, TaskType


def test_defaults():
    config = SoftPromptConfig()
    assert config.num_virtual_tokens == 20
    assert config.init is PromptInit.RANDOM
    assert config.encoder is None and not config.is_p_tuning
    assert config.placement is Placement.FRONT


@pytest.mark.parametrize("spelling", ["TEXT", "text", "Text", PromptInit.TEXT])
def test_peft_spellings_accepted(spelling):
    config = SoftPromptConfig(init=spelling, init_text="hi", tokenizer_name_or_path="tok")
    assert config.init is PromptInit.TEXT


def test_enum_spellings():
    assert SoftPromptConfig(init="SAMPLE_VOCAB").init is PromptInit.SAMPLE_VOCAB
    assert SoftPromptConfig(encoder="MLP").encoder is EncoderType.MLP
    assert SoftPromptConfig(task_type="seq_cls").task_type is TaskType.SEQ_CLS


@pytest.mark.parametrize("kwargs,match", [
    ({"num_virtual_tokens": 0}, r"num_virtual_tokens must be >= 1, got 0"),
    ({"num_virtual_tokens": 2.5}, r"num_virtual_tokens must be an int, got float 2.5"),
    ({"init": "zeros"},
     r"init must be one of 'random', 'sample_vocab', 'text' \(case-insensitive\), got 'zeros'"),
    ({"encoder": "gru"}, r"encoder must be one of 'mlp', 'lstm'.*got 'gru'"),
    ({"init": "text"}, r"init='text' needs both init_text and tokenizer_name_or_path; missing init_text and"),
    ({"init": "text", "init_text": "x"}, r"missing tokenizer_name_or_path"),
    ({"tokenizer_kwargs": {"use_fast": True}}, r"tokenizer_kwargs is only used with init='text'"),
    ({"encoder_dropout": 1.5}, r"encoder_dropout must be a number in \[0, 1\), got 1.5"),
    ({"placement": "end"}, r"placement must be one of 'front', 'after_first_token'"),
    ({"trainable_modules": "score"}, r"trainable_modules must be a list of module names"),
])
def test_validation_messages(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SoftPromptConfig(**kwargs)


def test_trust_remote_code_removed_with_warning():
    with pytest.warns(UserWarning, match="trust_remote_code"):
        config = SoftPromptConfig(init="text", init_text="hi", tokenizer_name_or_path="tok",
                                  tokenizer_kwargs={"trust_remote_code": True, "use_fast": True})
    assert config.tokenizer_kwargs == {"use_fast": True}


def test_mlp_layer_count_warning():
    with pytest.warns(UserWarning, match="encoder_num_layers=3 is ignored for the MLP encoder"):
        SoftPromptConfig(encoder="mlp", encoder_num_layers=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SoftPromptConfig(encoder="lstm", encoder_num_layers=3)


def test_json_round_trip(tmp_path):
    config = SoftPromptConfig(num_virtual_tokens=7, init="text", init_text="Classify:",
                              tokenizer_name_or_path="t", encoder="lstm", encoder_hidden_size=16,
                              task_type="CAUSAL_LM")
    assert SoftPromptConfig.from_dict(config.to_dict()) == config
    config.save_pretrained(tmp_path)
    assert SoftPromptConfig.from_pretrained(tmp_path) == config
    data = json.loads(config.to_json_string())
    assert list(data) == sorted(data) and "hf_softprompt_version" in data


def test_unknown_keys_warn_not_crash():
    data = {**SoftPromptConfig().to_dict(), "future_option": 1}
    with pytest.warns(UserWarning, match=r"(?i)unknown soft-prompt config keys \['future_option'\].*upgrade"):
        config = SoftPromptConfig.from_dict(data)
    assert config == SoftPromptConfig()


def test_from_pretrained_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="No soft-prompt config"):
        SoftPromptConfig.from_pretrained(tmp_path)
