"""Collapse indicators of DINO's teacher, computed every step and judged at every log line.

DINO's two collapses. One prototype holding more than ``COLLAPSE_TOP_MASS`` of the teacher's probability
over a batch of at least ``COLLAPSE_MIN_ROWS`` crops: every scan gets the same target. Teacher rows with
more than ``UNIFORM_ENTROPY`` of the maximal entropy ln K once the teacher temperature is warm: the
teacher does not tell scans apart (expected at the start, when the backbone's CLS barely depends on its
input). And the one Sinkhorn-Knopp hides: a head whose outputs for different scans have a mean cosine
above ``COLLAPSE_COSINE`` maps every scan alike.
"""

from __future__ import annotations

import math

import torch

COLLAPSE_TOP_MASS = 0.5
COLLAPSE_MIN_ROWS = 16
UNIFORM_ENTROPY = 0.99
COLLAPSE_COSINE = 0.95


def row_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats, at most ln K) of the rows of probabilities (rows, K); 0-d, NaN for no rows."""
    probs = probs.detach().float()
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean()


def output_cosine(logits: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between the logit rows (rows, K) of different volumes: near 1 when the head
    maps every scan to the same output (the collapse Sinkhorn-Knopp hides, as it spreads any batch over
    all prototypes), near 0 for a head that tells scans apart."""
    unit = torch.nn.functional.normalize(logits.detach().float(), dim=-1)
    n = unit.shape[0]
    if n < 2:
        return unit.new_full((), float("nan"))
    similarity = unit @ unit.T
    return (similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1))


def teacher_statistics(teacher_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse indicators of the teacher's DINO (CLS) probabilities (rows, K), as 0-d tensors (no device sync).

    ``teacher_entropy``: mean entropy of a row's distribution over prototypes (nats, at most ln K).
    ``teacher_top_mass``: the largest share of the batch's total probability held by one prototype.
    ``teacher_rows``: the number of rows (crops) these statistics come from.
    """
    probs = teacher_probs.detach().float()
    return {
        "teacher_entropy": row_entropy(probs),
        "teacher_top_mass": probs.mean(dim=0).max(),
        "teacher_rows": probs.new_full((), float(probs.shape[0])),
    }  # a fill kernel: no host-to-device copy


def collapse_reason(metrics: dict[str, float], n_prototypes: int, teacher_warm: bool) -> str | None:
    """Why logged teacher statistics look collapsed (one sentence), or None when they look healthy.

    ``n_prototypes`` is K of the DINO head; ``teacher_warm`` says the teacher temperature warm-up is over.
    """
    top_mass, entropy = metrics.get("teacher_top_mass"), metrics.get("teacher_entropy")
    if top_mass is None:  # MAE: no teacher
        return None
    if metrics.get("teacher_rows", 0) >= COLLAPSE_MIN_ROWS and top_mass > COLLAPSE_TOP_MASS:
        return (
            f"one prototype holds {top_mass:.0%} of the teacher's mass (teacher entropy {entropy:.3f} nats): "
            f"every scan gets the same target, the representation is collapsing; try "
            f"dino.centering=sinkhorn_knopp, a lower optim.base_lr or a longer warm-up"
        )
    cosine = metrics.get("teacher_cosine", 0.0)
    if teacher_warm and cosine > COLLAPSE_COSINE:
        return (
            f"the teacher's DINO head gives every scan nearly the same output (mean cosine {cosine:.3f} between "
            f"scans): its targets carry no information about the scan; try dino.start_epochs > 0 (iBOT and "
            f"KoLeo first), model.layerscale_init=null or a higher optim.base_lr"
        )
    max_entropy = math.log(n_prototypes)
    if teacher_warm and entropy > UNIFORM_ENTROPY * max_entropy:
        return (
            f"the teacher's targets are nearly uniform (entropy {entropy:.3f} of at most {max_entropy:.3f} nats) "
            f"after the temperature warm-up: the teacher does not tell scans apart and the DINO term cannot "
            f"fall below ln K; try a lower dino.teacher_temp, a lower optim.teacher_momentum or more varied data"
        )
    return None
