"""Paths in what fmct writes: an artefact (a detector, a model folder, a run.json, an embeddings table, a
report) records no absolute path, since a folder name can carry a patient's name and the artefact may be
shared. A file it needs again (the store a probe reads, the backbone a detector names) is recorded relative
to the artefact's own folder (:func:`relative_to`) and found again from it (:func:`located`); anything
else names a folder by its bare name or a fingerprint.
"""

from __future__ import annotations

import os
from pathlib import Path


def relative_to(path: str | os.PathLike, folder: str | os.PathLike) -> str:
    """``path`` as written in an artefact of ``folder``: relative to it (``../store``)."""
    return os.path.relpath(Path(path).resolve(), Path(folder).resolve())


def located(recorded: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """The file an artefact of ``folder`` recorded with :func:`relative_to` (an absolute path, as older
    artefacts hold, stays as it is)."""
    return Path(folder) / recorded


def without_machine_paths(value):
    """``value`` (JSON-like) with every absolute path string replaced by its last component."""
    if isinstance(value, dict):
        return {key: without_machine_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_machine_paths(item) for item in value]
    if isinstance(value, str) and Path(value).is_absolute():
        return Path(value).name
    return value
