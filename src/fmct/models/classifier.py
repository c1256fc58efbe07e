"""A backbone with a classification head, one logit per finding: what ``fmct finetune`` trains.

``linear``: a linear layer on the CLS token (FM-CT's classifier); ``pooled``: a linear layer on the CLS
token beside the mean and the max of the patch tokens (a small finding moves the max of a few tokens
more than the CLS); ``attentive``: one learned query cross-attending to the patch tokens, then a linear
layer. Either way the features pass a BatchNorm without affine parameters first (as in MAE's linear
probe), so a new head learns at the same pace whatever the scale of the backbone's features.
"""

from __future__ import annotations

import torch
from torch import nn

from fmct.models.vit3d import ViT3D

HEADS = ("linear", "pooled", "attentive")


def pooled_features(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole-scan features of a backbone's output tokens, each (B, C): ``cls``, and the ``mean`` and
    ``max`` over the patch tokens."""
    return {"cls": tokens["cls"], "mean": tokens["patch"].mean(dim=1), "max": tokens["patch"].amax(dim=1)}


class AttentivePooling(nn.Module):
    """One learned query cross-attending to tokens: (B, N, C) -> (B, C)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attention = nn.MultiheadAttention(dim, n_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        query = self.query.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        pooled, _ = self.attention(query, tokens, tokens, need_weights=False)
        return self.norm(pooled[:, 0])


class Classifier(nn.Module):
    """Backbone + head: windowed volumes (B, C, D, H, W) in [0, 1] -> logits (B, n_findings)."""

    def __init__(self, backbone: ViT3D, n_findings: int, head: str = "linear"):
        super().__init__()
        self.backbone = backbone
        dim = backbone.embed_dim
        self.head = head
        self.pool = AttentivePooling(dim, backbone.config.n_heads) if head == "attentive" else None
        features = 3 * dim if head == "pooled" else dim
        self.norm = nn.BatchNorm1d(features, affine=False)
        self.linear = nn.Linear(features, n_findings)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, n_findings); ``masks`` (B, N) bool hides those patches behind the mask token (saliency)."""
        tokens = self.backbone.forward_features(x, masks=masks)
        if self.head == "pooled":
            features = torch.cat(list(pooled_features(tokens).values()), dim=1)
        elif self.pool is not None:
            features = self.pool(tokens["patch"])
        else:
            features = tokens["cls"]
        return self.linear(self.norm(features))

    def head_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.named_parameters() if not name.startswith("backbone.")]

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The state that training changes: trainable parameters, the head's buffers, and the buffers
        (batch-norm statistics) of every backbone module whose parameters train. Weights restored without
        their own statistics would be normalised by those of another step."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        training_modules = {name.rpartition(".")[0] for name in trainable}
        return {
            name: value
            for name, value in self.state_dict().items()
            if name in trainable or not name.startswith("backbone.") or name.rpartition(".")[0] in training_modules
        }

    def freeze(self, trainable_blocks: int) -> None:
        """Train only the last ``trainable_blocks`` blocks and the final norm (-1: the whole backbone)."""
        if trainable_blocks < 0:
            return
        depth = self.backbone.config.depth
        for name, param in self.backbone.named_parameters():
            layer = self.backbone.layer_id(name)  # 0 embeddings, i + 1 block i, depth + 1 final norm
            param.requires_grad_(trainable_blocks > 0 and layer >= depth + 1 - trainable_blocks)

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        # Frozen blocks stay in eval mode: stochastic depth must not perturb features nobody trains.
        for block in self.backbone.blocks:
            if not any(p.requires_grad for p in block.parameters()):
                block.eval()
        # A frozen batch norm (the stem's) keeps its statistics: in train mode it would normalise by the
        # batch and drift its running statistics away from the backbone that the detector folder names.
        for module in self.backbone.modules():
            if getattr(module, "track_running_stats", False) and not any(
                p.requires_grad for p in module.parameters(recurse=False)
            ):
                module.eval()
        return self
