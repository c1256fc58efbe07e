"""The resumable training state of a pretraining run: ``RUN/checkpoint.pt``.

One file holds the student, the teacher (DINO), the AdamW state, the teacher centres (EMA centering)
and the number of completed steps. That is all a run needs to continue exactly: the schedules are
functions of the step, the loader's batches are addressed by step (:class:`fmct.data.StepBatchSampler`),
and every random draw of step s comes from generators seeded by (seed, s) and (seed, s, rank), so the step counter
also stands for the random state.

The file is written by the user's own run, so it is a ``torch.save`` archive; it is read back with
``torch.load(weights_only=True)``, which rebuilds tensors and plain containers and never runs code.
It is written to a temporary name and renamed, so a killed run leaves the previous checkpoint whole.
Model and optimizer states are full (unsharded, keyed by parameter name) whatever the wrapping
(plain, DDP, FSDP2), so a run may resume on a different number of processes.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import nn

from fmct.atomic import atomic_write_bytes
from fmct.errors import TrainStateError

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "fmct-pretrain"


def save_checkpoint(
    path: str | os.PathLike,
    *,
    step: int,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    teacher: nn.Module | None,
    centers: dict[str, nn.Module],
    meta: dict,
    is_main: bool,
) -> dict | None:
    """Write the training state after ``step`` completed steps to ``path`` atomically (rank 0 writes).

    Every rank must call this (FSDP2 gathers shards collectively). Returns the full teacher state dict
    on rank 0 (the student's for a run without teacher), for exporting the backbone, and None elsewhere.
    ``meta`` is JSON-like data stored beside the state (config hash, world size, method).
    """
    # Imported here: torch.distributed.checkpoint takes over a second to import, a cost every CLI start would pay.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    # Full tensors gathered on rank 0, in CPU memory.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {
        "format": FORMAT,
        "step": int(step),
        "meta": dict(meta),
        "student": get_model_state_dict(student, options=options),
        "optimizer": get_optimizer_state_dict(student, optimizer, options=options),
        "teacher": get_model_state_dict(teacher, options=options) if teacher is not None else None,
        "centers": {name: center.state_dict() for name, center in centers.items()},
    }
    if not is_main:
        return None
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getbuffer())
    return state["teacher"] if teacher is not None else state["student"]


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The saved training state as a dict (tensors on the CPU). Raises :class:`TrainStateError`."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainStateError(f"{path}: missing") from None
    except Exception as error:  # a truncated or foreign file: torch raises many kinds
        raise TrainStateError(f"{path}: unreadable training state: {str(error).strip().splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainStateError(f"{path}: not an fmct pretraining checkpoint (expected format {FORMAT!r})")
    return state


def load_checkpoint(
    path: str | os.PathLike,
    *,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    teacher: nn.Module | None,
    centers: dict[str, nn.Module],
) -> int:
    """Restore the state of :func:`save_checkpoint` into the (possibly wrapped) modules; return the step.

    Every rank reads the file and keeps its own shard. Raises :class:`TrainStateError` when the file
    does not fit these modules (another model size or method).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    full = StateDictOptions(full_state_dict=True)  # every rank reads full tensors and keeps its shard
    # A parameter not stepped yet (DINO's prototypes in the first epoch) has no AdamW state to load.
    full_not_strict = StateDictOptions(full_state_dict=True, strict=False)
    state = read_checkpoint(path)
    try:
        set_model_state_dict(student, state["student"], options=full)
        set_optimizer_state_dict(student, optimizer, state["optimizer"], options=full_not_strict)
        _drop_unsaved_optimizer_state(optimizer, set(state["optimizer"]["state"]))
        if teacher is not None:
            set_model_state_dict(teacher, state["teacher"], options=full)
        for name, center in centers.items():
            center.load_state_dict(state["centers"][name])
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        reason = " ".join(line.strip() for line in str(error).strip().splitlines()[:2])
        raise TrainStateError(f"{path}: does not fit this run's model and optimizer: {reason}") from None
    return int(state["step"])


def _drop_unsaved_optimizer_state(optimizer: torch.optim.Optimizer, saved_names: set[str]) -> None:
    # Loading first runs a zero-gradient step that gives every parameter an AdamW state at step 1; a
    # parameter not stepped before the checkpoint must start from no state at its first real step, as it
    # would have without the interruption (else its bias correction is off by one step).
    for group in optimizer.param_groups:
        for name, param in zip(group["names"], group["params"]):
            if name not in saved_names:
                optimizer.state.pop(param, None)
