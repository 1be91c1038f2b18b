"""The Trainer side: callback, trainer mixin, checkpoint hooks, reference model, health, metrics."""
