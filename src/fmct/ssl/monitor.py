"""What a pretraining run shows while it runs: log.jsonl lines, TensorBoard scalars, the progress bar and
the collapse warning."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fmct.atomic import atomic_write_text
from fmct.distributed import DistEnv, all_reduce_mean
from fmct.log import logger, progress_bar
from fmct.ssl.collapse import collapse_reason
from fmct.ssl.config import EngineConfig
from fmct.ssl.run_folder import LOG_FILE
from fmct.ssl.schedules import StepValues
from fmct.tables import read_jsonl


class Monitor:
    """log.jsonl lines, TensorBoard scalars (when installed), the progress bar and the collapse warning (rank 0).

    Metrics are kept as device tensors and averaged over the steps since the last line, so that only a
    logging step waits for the device; they are averaged over ranks too.
    """

    def __init__(
        self,
        run_dir: Path,
        env: DistEnv,
        engine: EngineConfig,
        start_step: int,
        total_steps: int,
        global_batch: int,
        steps_per_epoch: int,
        n_prototypes: int,
        teacher_warm_step: int,
    ):
        self.env, self.global_batch, self.steps_per_epoch = env, global_batch, steps_per_epoch
        self.n_prototypes, self.teacher_warm_step = n_prototypes, teacher_warm_step
        self.path = run_dir / LOG_FILE
        self.sums: dict[str, torch.Tensor] = {}
        self.n_steps = 0
        self.last: dict[str, float] = {}
        self.logged_any = False
        self.warned_collapse = False
        self.clock = time.perf_counter()
        self.writer = None
        self.bar = None
        if env.is_main:
            self._drop_lines_after(start_step)
            self.bar = progress_bar(
                total=total_steps,
                initial=start_step,
                desc="pretrain",
                unit="step",
                enabled=engine.progress and start_step < total_steps,
            )
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step)
            except ImportError:  # TensorBoard is optional
                self.writer = None

    def _drop_lines_after(self, step: int) -> None:
        # A killed run may have logged steps after its last checkpoint, and a line cut short by the kill;
        # the resumed run logs those steps again.
        if not self.path.exists():
            return
        records = read_jsonl(self.path)
        kept = [record for record in records if isinstance(record.get("step"), int) and record["step"] <= step]
        if len(kept) != len(self.path.read_text().splitlines()):
            atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        """Accumulate one step's metrics (0-d device tensors)."""
        for name, value in metrics.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.n_steps += 1

    def log(self, step: int, values: StepValues, online: dict[str, float] | None = None) -> None:
        """Write the line of ``step``: metrics averaged since the last line, the step's scheduled ``values``
        and the ``online`` evaluation's figures (rank 0 only) when there are any."""
        names = sorted(self.sums)
        means = all_reduce_mean(torch.stack([self.sums[name] for name in names]) / self.n_steps).tolist()
        now = time.perf_counter()
        record = {"step": step, "epoch": round(step / self.steps_per_epoch, 4), **dict(zip(names, means))}
        record.update(
            lr=values.lr,
            weight_decay=values.weight_decay,
            teacher_momentum=values.teacher_momentum,
            teacher_temp=values.teacher_temp,
            volumes_per_s=self.n_steps * self.global_batch / (now - self.clock),
        )
        if "teacher_entropy" not in record:  # MAE has no teacher
            for key in ("teacher_momentum", "teacher_temp"):
                record.pop(key)
        record.update(online or {})
        self.sums, self.n_steps, self.clock = {}, 0, now
        self.last, self.logged_any = record, True
        if not self.env.is_main:
            return
        self.write(record)
        reason = collapse_reason(record, self.n_prototypes, teacher_warm=step >= self.teacher_warm_step)
        if reason and not self.warned_collapse:
            self.warned_collapse = True
            logger.warning(f"WARNING: pretrain step {step}: {reason}")
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def write(self, record: dict) -> None:
        """Append ``record`` (with its ``step``) to log.jsonl and TensorBoard (rank 0 only)."""
        if not self.env.is_main:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in record.items():
                if name not in ("step", "epoch"):
                    self.writer.add_scalar(name, value, record["step"])

    def close(self) -> None:
        """Close the progress bar and the TensorBoard writer."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
