"""Serving soft prompts: vLLM `prompt_embeds` from saved prompts."""

from .vllm import PromptEmbedder, encode_prompt_embeds

__all__ = ["PromptEmbedder", "encode_prompt_embeds"]
