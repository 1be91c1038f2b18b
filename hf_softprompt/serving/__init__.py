"""Serving soft prompts: vLLM `prompt_embeds` from saved prompts, and transformers pipelines."""

from .pipelines import PromptedPipeline, prompted_pipeline
from .vllm import PromptEmbedder, encode_prompt_embeds

__all__ = ["PromptEmbedder", "PromptedPipeline", "encode_prompt_embeds", "prompted_pipeline"]
