"""hf-softprompt: soft-prompt tuning (prompt tuning and P-tuning) for the transformers Trainer."""

from __future__ import annotations

__version__ = "0.2.0"

from .config import SoftPromptConfig  # noqa: E402
from .files.hub import HubError  # noqa: E402
from .files.load import load_soft_prompt  # noqa: E402
from .files.save import save_soft_prompt  # noqa: E402
from .model.attach import (  # noqa: E402
    add_soft_prompt,
    get_active_soft_prompt,
    get_soft_prompt_config,
    remove_soft_prompt,
    set_active_soft_prompt,
    soft_prompt_names,
)
from .model.describe import describe_soft_prompt, format_nearest_tokens  # noqa: E402
from .model.scoped import using_soft_prompt, without_soft_prompt  # noqa: E402
from .serving import PromptedPipeline, prompted_pipeline  # noqa: E402
from .training.callback import SoftPromptCallback  # noqa: E402
from .training.distill import SoftPromptDistillationTrainer, distillation_loss  # noqa: E402
from .training.metrics import PerPromptMetrics  # noqa: E402
from .training.reference import BaseModelReference  # noqa: E402
from .training.teacher import chat_after_prompt  # noqa: E402
from .training.trainer import SoftPromptMixin, SoftPromptSeq2SeqTrainer, SoftPromptTrainer  # noqa: E402

__all__ = [
    "BaseModelReference",
    "HubError",
    "PerPromptMetrics",
    "PromptedPipeline",
    "SoftPromptCallback",
    "SoftPromptConfig",
    "SoftPromptDistillationTrainer",
    "SoftPromptMixin",
    "SoftPromptSeq2SeqTrainer",
    "SoftPromptTrainer",
    "__version__",
    "add_soft_prompt",
    "chat_after_prompt",
    "describe_soft_prompt",
    "distillation_loss",
    "format_nearest_tokens",
    "get_active_soft_prompt",
    "get_soft_prompt_config",
    "load_soft_prompt",
    "prompted_pipeline",
    "remove_soft_prompt",
    "save_soft_prompt",
    "set_active_soft_prompt",
    "soft_prompt_names",
    "using_soft_prompt",
    "without_soft_prompt",
]
