"""Fingerprints: sha256 digests of what decides a result (files, weights, settings), so that a run can
tell whether its saved work was made from the same inputs."""

from __future__ import annotations

import hashlib
import json
import os

import torch


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (checkpoints, labels, embeddings), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """Hex sha256 of a model's parameters and buffers (names and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def settings_sha256(settings: dict) -> str:
    """Hex sha256 of JSON-able settings, independent of key order (values JSON cannot hold as ``str``)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
