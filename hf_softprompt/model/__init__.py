"""Putting prompts on a model and running its calls."""
