"""Adapter files, saving, loading, the Hub and model cards."""
