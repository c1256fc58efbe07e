"""Training schedules as pure functions of the step (so a resumed run picks each one up exactly).

Conventions: ``step`` counts optimiser steps from 0; ``total_steps`` is the run length. A warm-up
starts at its start value at step 0; a cosine runs from its start value at its first step to exactly
its end value at ``total_steps`` (and stays there).
"""

from __future__ import annotations

import math


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total_steps`` and after)."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, end: float, start: float = 0.0) -> float:
    """Linear warm-up from ``start`` to ``peak`` over ``warmup_steps``, then a cosine from ``peak`` to ``end``."""
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, end)


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear from ``start`` (step 0) to ``end`` (step ``warmup_steps``), then constant."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps
