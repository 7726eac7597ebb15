"""The learning-rate schedule shared by DisTaC distillation and the reproduce suites' fine-tuning."""

from __future__ import annotations

import math

__all__ = ["lr_factor"]


def lr_factor(step: int, *, warmup: int, steps: int) -> float:
    """LR multiplier at 0-based ``step``: linear warm-up ``(step+1)/warmup``, then cosine decay to 0 at ``steps``.

    Args:
        step: the 0-based optimiser step.
        warmup: warm-up length (0: the cosine starts at step 0).
        steps: total number of steps; the factor reaches 0 there.

    Returns:
        The factor in (0, 1] by which the base learning rate is multiplied.

    Example:
        >>> lr_factor(0, warmup=50, steps=500), lr_factor(50, warmup=50, steps=500)
        (0.02, 1.0)
    """
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))
