"""The one family of errors fmct reports to its user, and the exit status each maps to.

Every error a user can act on (a bad path, labels file, config key, model folder, scan, checkpoint)
is an :class:`FmctError` whose ``str`` is one line naming the file and the reason. ``fmct``'s ``main``
prints it and exits with its ``exit_status``, once for every verb. Anything else that escapes a verb
is a bug in fmct and keeps its traceback.

A leaf module: it imports nothing of fmct, so every layer may raise these.
"""

from __future__ import annotations

import os
from pathlib import Path


class FmctError(Exception):
    """An error the user can act on; ``str(error)`` is one line. Exit status 2 (bad usage or input)."""

    exit_status = 2


class UsageError(FmctError):
    """A bad command line: a missing or conflicting option, a path that cannot be used."""


class InputError(FmctError):
    """An input file or folder that cannot be used: a labels file, predictions, embeddings, a store."""


class ConfigError(FmctError):
    """A config file or override that does not fit the config's fields."""


class CheckpointError(FmctError):
    """A model folder that cannot be loaded."""


class ScanError(FmctError):
    """A scan that cannot be used. Ingest writes the reason to the store's errors table and goes on; a
    job that meets one it cannot skip (a shard that cannot be read mid-run) fails with exit status 1."""

    exit_status = 1


class FileScanError(ScanError):
    """A scan that cannot be used because of one of its files.

    ``reason`` says why without naming the file; ``path`` is the file, which ingest names by pseudonym
    (file and folder names may hold patient names or MRNs). ``str(error)`` is ``"<file name>: <reason>"``
    for a user reading their own files.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path.name}: {reason}")


class TrainStateError(FmctError):
    """A pretraining checkpoint that cannot be resumed from."""

    exit_status = 1


class PretrainError(FmctError):
    """A run that had to stop (a non-finite loss); the message says why and what was kept."""

    exit_status = 1


def one_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when empty), cut to ``limit`` characters:
    what a third-party library's error may add to a one-line reason."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]
