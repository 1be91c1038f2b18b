"""`SoftPromptConfig`: every knob of a soft prompt, its validation and its JSON form."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, TypeVar

CONFIG_NAME = "soft_prompt_config.json"


class PromptInit(str, enum.Enum):
    """How the virtual-token embeddings start (seed 000/002 semantics)."""

    RANDOM = "random"
    SAMPLE_VOCAB = "sample_vocab"
    TEXT = "text"


class EncoderType(str, enum.Enum):
    """Reparameterisation of the prompt: none (plain prompt tuning), P-tuning's MLP or LSTM, or a
    residual bottleneck MLP (Razdaibiedina et al., 2023)."""

    MLP = "mlp"
    LSTM = "lstm"
    RESIDUAL = "residual"


class Placement(str, enum.Enum):
    """Where the virtual tokens go: in front of everything, or right after the first token ([CLS])."""

    FRONT = "front"
    AFTER_FIRST_TOKEN = "after_first_token"


class TaskType(str, enum.Enum):
    """Task heads, spelled as PEFT spells them (plus MASKED_LM, which PEFT lacks)."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    SEQ_CLS = "SEQ_CLS"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    MASKED_LM = "MASKED_LM"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


# MLP encoders always have exactly two hidden layers (as in PEFT); any other count is ignored.
MLP_NUM_LAYERS = 2

_E = TypeVar("_E", bound=enum.Enum)


def _parse_enum(enum_cls: type[enum.Enum], value: Any, name: str, upper: bool = False) -> Any:
    """Accept an enum member or its value in any case (PEFT writes `TEXT`, we write `text`)."""
    if value is None or isinstance(value, enum_cls):
        return value
    if isinstance(value, str):
        key = value.upper() if upper else value.lower()
        for member in enum_cls:
            if member.value == key:
                return member
    allowed = ", ".join(repr(m.value) for m in enum_cls)
    raise ValueError(f"{name} must be one of {allowed} (case-insensitive), got {value!r}.")


def config_enum(enum_cls: type[_E], value: object, name: str) -> _E:
    """The enum field `name` of a built `SoftPromptConfig`, as the member it holds.

    The fields are typed `Member | str` because the constructor takes either; `__post_init__` (run by
    `dataclasses.replace` too) stores the member. A clear error for a field that holds none: None
    (no `task_type` or `encoder`), or a string assigned after the config was built."""
    if isinstance(value, enum_cls):
        return value
    raise ValueError(
        f"SoftPromptConfig.{name} is {value!r}, not a {enum_cls.__name__}. Set it when building the config "
        f"(SoftPromptConfig({name}=...) or dataclasses.replace(config, {name}=...)), which parses it."
    )


@dataclass
class SoftPromptConfig:
    """Configuration of a soft prompt (prompt tuning, or P-tuning with an MLP/LSTM encoder).

    Args:
        num_virtual_tokens (`int`, defaults to 20): length P of the learned prompt.
        init (`str`, defaults to `"random"`): `"random"`, `"sample_vocab"` or `"text"` (PEFT's
            `RANDOM`/`SAMPLE_VOCAB`/`TEXT` are accepted too).
        init_text (`str`, *optional*): text whose token embeddings start the prompt (`init="text"`).
        tokenizer_name_or_path (`str`, *optional*): tokenizer used to tokenize `init_text`.
        tokenizer_kwargs (`dict`, *optional*): extra arguments for `AutoTokenizer.from_pretrained`.
        encoder (`str`, *optional*): `None` for prompt tuning, `"mlp"` or `"lstm"` for P-tuning,
            `"residual"` for residual prompt tuning: each row plus a LayerNorm'd bottleneck MLP of
            it, the MLP shared by the rows, its output scale starting at 0 so the prompt starts
            at its init. Every encoder is folded into the (P, D) table it outputs for inference.
        encoder_hidden_size (`int`, *optional*): encoder width; defaults to the model's `token_dim`
            (for `"residual"` the bottleneck; defaults to `token_dim // 8`).
        encoder_num_layers (`int`, defaults to 2): LSTM layers (an MLP always has 2 hidden layers).
        encoder_dropout (`float`, defaults to 0.0): LSTM dropout between layers.
        placement (`str`, defaults to `"front"`): `"front"` or `"after_first_token"` (after [CLS]).
        task_type (`str`, *optional*): inferred from the model class when not given.
        token_dim (`int`, *optional*): inferred from the model's input embeddings when not given.
        trainable_modules (`list[str]`, *optional*): base-model submodules trained with the prompt.
            `None` picks the task head of classification and QA models (`classifier`, `score`, ...);
            `[]` trains the prompt alone.
        base_model_name_or_path (`str`, *optional*): filled from the model when the prompt is added.
        base_model_gguf_file (`str`, *optional*): the GGUF file the base model was loaded from
            (`from_pretrained(path, gguf_file=...)`), filled when the prompt is added.
        base_model_fingerprint (`str`, *optional*): a fingerprint of the base model's input-embedding
            table, filled when the prompt is added; loads compare it with the model's own, so the
            same weights load from any path and other weights are refused at any path.
        shared_prompt_cache (`bool`, *optional*): decoder-only models compute the prompt once per
            call and let every row attend to its keys/values (same results, less compute; a
            `generate()` computes them once, at its first step). `None` (default): wherever that
            is faster, i.e. always except training on an accelerator (measured slower there) and
            calls with one row per prompt (nothing to share); `True`: wherever the model can;
            `False`: never. Models and calls that cannot (sliding-window caches, activation
            checkpointing in training, encoders) concatenate it to every row.

    Example:
        ```python
        config = SoftPromptConfig(num_virtual_tokens=8, init="text", init_text="Classify:",
                                  tokenizer_name_or_path="gpt2")
        ```
    """

    num_virtual_tokens: int = field(default=20, metadata={"help": "Number of virtual tokens P."})
    init: PromptInit | str = field(
        default=PromptInit.RANDOM, metadata={"help": "Prompt init: random, sample_vocab or text."}
    )
    init_text: str | None = field(default=None, metadata={"help": "Text for init=text."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer used for init=text."}
    )
    tokenizer_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "Extra kwargs for AutoTokenizer.from_pretrained (text init)."}
    )
    encoder: EncoderType | str | None = field(
        default=None, metadata={"help": "Prompt encoder: mlp or lstm (P-tuning), residual (default: none)."}
    )
    encoder_hidden_size: int | None = field(
        default=None, metadata={"help": "P-tuning encoder width (default: the model's token_dim)."}
    )
    encoder_num_layers: int = field(default=2, metadata={"help": "LSTM layers of the encoder."})
    encoder_dropout: float = field(default=0.0, metadata={"help": "LSTM dropout of the encoder."})
    placement: Placement | str = field(
        default=Placement.FRONT,
        metadata={"help": "front (PEFT-compatible) or after_first_token (after [CLS])."},
    )
    task_type: TaskType | str | None = field(
        default=None, metadata={"help": "Task head; inferred from the model class when not given."}
    )
    token_dim: int | None = field(
        default=None, metadata={"help": "Embedding width; inferred from the model when not given."}
    )
    trainable_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Base submodules trained too (default: the task head of classifiers)."},
    )
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model id, filled in when the prompt is added."}
    )
    base_model_gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file of the base model, filled in when the prompt is added."}
    )
    base_model_fingerprint: str | None = field(
        default=None, metadata={"help": "Fingerprint of the base model's embedding table, filled in when "
                                        "the prompt is added."}
    )
    shared_prompt_cache: bool | None = field(
        default=None,
        metadata={"help": "Decoder-only models: run the prompt once per batch and share its "
                          "keys/values across rows (once per call, once per generate()). Unset: where it is faster "
                          "(not in training on a GPU); true: wherever possible; false: never."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.num_virtual_tokens, bool) or not isinstance(self.num_virtual_tokens, int):
            raise TypeError(
                f"num_virtual_tokens must be an int, got {type(self.num_virtual_tokens).__name__} "
                f"{self.num_virtual_tokens!r}."
            )
        if self.num_virtual_tokens < 1:
            raise ValueError(
                f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}. "
                "Typical values are 8 to 32."
            )
        self.init = _parse_enum(PromptInit, self.init, "init")
        self.encoder = _parse_enum(EncoderType, self.encoder, "encoder")
        self.placement = _parse_enum(Placement, self.placement, "placement")
        self.task_type = _parse_enum(TaskType, self.task_type, "task_type", upper=True)

        if self.init is PromptInit.TEXT:
            missing = [n for n in ("init_text", "tokenizer_name_or_path") if not getattr(self, n)]
            if missing:
                raise ValueError(
                    f"init='text' needs both init_text and tokenizer_name_or_path; missing "
                    f"{' and '.join(missing)}. Pass them, or use init='random' or 'sample_vocab'."
                )
        elif self.tokenizer_kwargs:
            init = getattr(self.init, "value", self.init)
            raise ValueError(
                f"tokenizer_kwargs is only used with init='text', got init={init!r} and "
                f"tokenizer_kwargs={self.tokenizer_kwargs!r}. Remove tokenizer_kwargs."
            )
        if self.tokenizer_kwargs and "trust_remote_code" in self.tokenizer_kwargs:
            warnings.warn(
                "tokenizer_kwargs['trust_remote_code'] was removed: hf-softprompt never runs code "
                "from the Hub to build a prompt.",
                stacklevel=3,
            )
            self.tokenizer_kwargs = {
                k: v for k, v in self.tokenizer_kwargs.items() if k != "trust_remote_code"
            }

        for name in ("encoder_hidden_size", "token_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}.")
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers < 1:
            raise ValueError(f"encoder_num_layers must be >= 1, got {self.encoder_num_layers!r}.")
        if isinstance(self.encoder_dropout, bool) or not isinstance(self.encoder_dropout, (int, float)) or not (
                0.0 <= self.encoder_dropout < 1.0):
            raise ValueError(f"encoder_dropout must be a number in [0, 1), got {self.encoder_dropout!r}.")
        self.encoder_dropout = float(self.encoder_dropout)
        if self.encoder_dropout and not (self.encoder is EncoderType.LSTM and self.encoder_num_layers > 1):
            where = {EncoderType.MLP: "an MLP encoder", EncoderType.RESIDUAL: "the residual encoder",
                     None: "no encoder"}.get(self.encoder, "a 1-layer LSTM")  # type: ignore[arg-type]
            warnings.warn(
                f"encoder_dropout={self.encoder_dropout} has no effect with {where}: it is the dropout between "
                "LSTM layers. Use encoder='lstm' with encoder_num_layers >= 2, or leave encoder_dropout=0.",
                stacklevel=3,
            )
        if self.encoder is EncoderType.MLP and self.encoder_num_layers != MLP_NUM_LAYERS:
            warnings.warn(
                f"encoder_num_layers={self.encoder_num_layers} is ignored for the MLP encoder: it "
                f"always has exactly {MLP_NUM_LAYERS} hidden layers. Use encoder='lstm' to set a "
                "layer count.",
                stacklevel=3,
            )
        if self.trainable_modules is not None:
            if isinstance(self.trainable_modules, str) or not all(
                isinstance(m, str) for m in self.trainable_modules
            ):
                raise TypeError(
                    f"trainable_modules must be a list of module names, got {self.trainable_modules!r}."
                )
            self.trainable_modules = list(self.trainable_modules)
        if self.shared_prompt_cache is not None and not isinstance(self.shared_prompt_cache, bool):
            raise TypeError(
                "shared_prompt_cache must be None (where faster), True or False, got "
                f"{type(self.shared_prompt_cache).__name__} {self.shared_prompt_cache!r}."
            )

    @property
    def is_p_tuning(self) -> bool:
        """Whether the prompt goes through P-tuning's MLP/LSTM encoder (PEFT's P_TUNING)."""
        return self.encoder in (EncoderType.MLP, EncoderType.LSTM)

    @property
    def is_reparameterized(self) -> bool:
        """Whether the prompt is the output of an encoder (P-tuning or residual) rather than its table."""
        return self.encoder is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; enums become their string values."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, enum.Enum) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SoftPromptConfig:
        """Build a config from `to_dict()` output; unknown keys warn instead of failing."""
        if not isinstance(data, dict):
            raise TypeError(f"SoftPromptConfig.from_dict takes a dict, got {type(data).__name__}.")
        if "peft_type" in data:
            raise ValueError(
                f"This is a PEFT adapter_config.json (peft_type={data['peft_type']!r}), not a SoftPromptConfig. "
                "Load the adapter with load_soft_prompt(model, directory) instead."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        if data and not any(k in known for k in data):
            raise ValueError(f"None of the keys {sorted(data)} is a SoftPromptConfig field; is this a soft-prompt "
                             "config? Fields: " + ", ".join(sorted(known)) + ".")
        unknown = sorted(k for k in data if k not in known and k != "hf_softprompt_version")
        if unknown:
            warnings.warn(
                f"Ignoring unknown soft-prompt config keys {unknown}: saved by a newer "
                "hf-softprompt? Upgrade with `pip install -U hf-softprompt`.",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json_string(self) -> str:
        """JSON with sorted keys and the library version that wrote it."""
        from . import __version__

        return json.dumps({**self.to_dict(), "hf_softprompt_version": __version__},
                          indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write `soft_prompt_config.json` into `save_directory`; returns the file path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> SoftPromptConfig:
        """Read a config written by `save_pretrained` (a directory or the JSON file itself)."""
        path = os.fspath(directory)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No soft-prompt config at {path!r}. Expected a directory written by "
                "SoftPromptConfig.save_pretrained (it holds soft_prompt_config.json)."
            )
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path!r} is not valid JSON: {err}") from err
        return cls.from_dict(data)
