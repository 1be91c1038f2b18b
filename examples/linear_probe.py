"""Logistic regression on frozen features: the linear-probe baseline, and the classification
example's head initialisation (linear probing before tuning, "LP-FT", Kumar et al. 2022).

A new head initialised at random makes the prompt chase a moving target on a few hundred rows, and
the result varies with the seed; fitted first by a probe on the features the prompted model gives
at initialisation, the head starts where a linear probe ends, and the prompt moves from there.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        c: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression, scikit-learn's objective `0.5 |w|^2 + C * sum(log-loss)`.

    Binary (`num_classes == 2`) is fitted in the binary form (one weight vector, as scikit-learn does)
    and returned as the equivalent two-class softmax layer. Solved by L-BFGS in float64.

    Args:
        features (`torch.Tensor` of shape `(N, D)`): one row per example.
        labels (`torch.Tensor` of shape `(N,)`): class indices in `[0, num_classes)`.
        num_classes (`int`): number of classes, >= 2.
        c (`float`, defaults to 1.0): inverse regularisation strength.

    Returns:
        `(weight, bias)` of shapes `(num_classes, D)` and `(num_classes,)`: logits = features @ weight.T + bias.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
    x, y = features.detach().double(), labels.detach().long()
    outputs = 1 if num_classes == 2 else num_classes
    w = torch.zeros(x.shape[1], outputs, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(outputs, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=1000, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ w + b
        if num_classes == 2:
            loss = nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.double(), reduction="sum")
        else:
            loss = nn.functional.cross_entropy(logits, y, reduction="sum")
        loss = c * loss + 0.5 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weight, bias = w.detach().T, b.detach()
    if num_classes == 2:  # sigmoid(z) = softmax([-z/2, z/2])[1]
        weight, bias = torch.cat([-weight / 2, weight / 2]), torch.cat([-bias / 2, bias / 2])
    return weight.float(), bias.float()


@torch.no_grad()
def fit_head_by_probe(model: nn.Module, head: nn.Linear, batches: Iterable[dict[str, torch.Tensor]],
                      c: float = 1.0) -> None:
    """Set `head` (a linear classifier inside `model`) to the logistic regression of its own inputs.

    Runs `model` in eval mode over `batches` (each with `labels`), records what `head` receives,
    fits `logistic_regression` on it and copies the result into `head`.
    """
    features, labels = [], []
    hook = head.register_forward_pre_hook(lambda module, args: features.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            labels.append(batch["labels"])
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        hook.remove()
        model.train(was_training)
    weight, bias = logistic_regression(torch.cat(features), torch.cat(labels), head.out_features, c)
    head.weight.copy_(weight.to(head.weight))
    head.bias.copy_(bias.to(head.bias))
