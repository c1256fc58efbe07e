"""Projection head of DINO and iBOT: an MLP to a bottleneck, then cosine similarity to learned prototypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fmct.models.vit3d import grouped_parameters


class DINOHead(nn.Module):
    """MLP (``n_layers`` linear layers, GELU between) to a ``bottleneck`` vector, L2-normalised, then
    ``out_dim`` logits: the cosine similarity to each of ``out_dim`` prototypes.

    The last layer is weight-normalised as in DINOv2: logit k = ``prototype_norms[k] * cos(z, prototype k)``,
    each prototype's direction (``prototypes``, divided by its own L2 norm at every forward) and its
    norm (starting at 1, trainable) learned apart. A trainable norm lets the head sharpen its own
    outputs; with the norm fixed at 1 (DINO's ``norm_last_layer``) logits stay in [-1, 1].
    Input (..., in_dim) -> logits (..., out_dim).

    During the first epoch DINO keeps the last layer (directions and norms) fixed: call
    :meth:`cancel_last_layer_gradients` after ``backward()`` and before ``optimizer.step()``. They stay
    trainable parameters, so DDP and the optimizer see the same parameter set throughout.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden: int = 2048, bottleneck: int = 256, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"a DINO head needs at least 1 layer, got n_layers={n_layers}")
        widths = [in_dim] + [hidden] * (n_layers - 1) + [bottleneck]
        layers: list[nn.Module] = []
        for i, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(width_in, width_out))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck))
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)
        self.prototype_norms = nn.Parameter(torch.ones(out_dim))

    @property
    def out_dim(self) -> int:
        return self.prototypes.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # eps keeps a zero bottleneck vector (e.g. a dead batch) at zero logits instead of NaN.
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return F.linear(z, F.normalize(self.prototypes, dim=-1, eps=1e-6) * self.prototype_norms[:, None])

    def cancel_last_layer_gradients(self) -> None:
        """Drop the last layer's gradients so the optimizer step leaves it (and its weight decay) untouched."""
        self.prototypes.grad = None
        self.prototype_norms.grad = None

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups in the format of :meth:`fmct.models.ViT3D.param_groups`, with ``lr_scale`` 1.

        Biases and the prototypes' norms (gains) are not decayed; the prototypes' directions are (their
        length is divided out, as in DINO).
        """
        return grouped_parameters(self.named_parameters(), lambda name: 1.0, weight_decay)
