"""Crash-isolated worker processes: a worker that dies costs only the job it was running.

A decoder written in C or Rust can abort the process it runs in (an allocation it cannot make, a
corrupt stream), and no ``try`` catches that. Each job therefore runs in a worker process, one job at a
time, and the pool watches each worker's pipe and its process sentinel together: a result arrives, or
the worker is gone, its job is reported through ``on_death`` and a fresh worker takes the next job.
``concurrent.futures.ProcessPoolExecutor`` instead breaks the whole pool on one death. Ingest and
predict read their scans through this one pool.

It is also their read-ahead: a worker is handed its next job before its result goes to the caller, so
every worker prepares a scan while the caller stores or scores the last one.

Workers end with the main process: on Linux the kernel sends them SIGKILL when it dies
(``PR_SET_PDEATHSIG``), elsewhere they poll their parent's pid; an idle worker also ends when its pipe
closes. Ctrl-C is left to the main process, which then stops every worker.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterator

from fmct.devices import setup_volume_worker
from fmct.log import progress_bar

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass
class _Worker:
    process: Any  # multiprocessing.Process
    connection: Connection
    job: Any = None


class WorkerPool:
    """``workers`` processes, each running ``work(job)`` for one job at a time (``work`` must not raise).

    Use as a context manager; :meth:`run` yields results as they come. Workers are forked where the
    platform can (milliseconds, everything already imported), spawned elsewhere. A worker that replaces a
    dead one is forked mid-run, from whatever the caller holds by then (a CUDA context, say): it only
    runs ``work``, which must not touch the device.
    """

    def __init__(self, work: Callable[[Any], Any], workers: int):
        self.work = work
        self.workers = max(1, workers)
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self._context = multiprocessing.get_context(method)
        self._pool: list[_Worker] = []

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """Stop the workers: politely after a finished run, at once after an error or Ctrl-C."""
        for worker in self._pool:
            if kind is None:
                _send(worker.connection, None)
        deadline = time.monotonic() + (10.0 if kind is None else 0.0)
        for worker in self._pool:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.connection.close()
        self._pool = []

    def start(self, jobs: int) -> None:
        """Start the workers that ``jobs`` jobs need (at most ``workers``) now: before the caller makes
        what a fork should not copy (a CUDA context). :meth:`run` starts any that are still missing."""
        while len(self._pool) < min(self.workers, jobs):
            self._pool.append(self._start())

    def run(
        self, jobs: list, on_death: Callable[[Any, str], Any], desc: str, progress: bool = True
    ) -> Iterator[tuple[Any, Any]]:
        """Yield ``(job, work(job))`` for every job, in the order they finish; for a job whose worker died,
        ``(job, on_death(job, what happened))``. The worker has its next job before the caller gets the
        result. The workers start before the progress bar (``desc`` names it)."""
        pending = deque(jobs)
        self.start(len(jobs))
        with progress_bar(total=len(jobs), unit="scan", desc=desc, enabled=progress and bool(jobs)) as bar:
            for worker in self._pool:
                self._give(worker, pending)
            while any(worker.job is not None for worker in self._pool):
                busy = [worker for worker in self._pool if worker.job is not None]
                ready = set(wait([w.connection for w in busy] + [w.process.sentinel for w in busy]))
                for worker in busy:
                    if worker.connection in ready or worker.process.sentinel in ready:
                        finished = self._collect(worker, on_death)
                        self._give(worker, pending)
                        bar.update()
                        yield finished

    def _start(self) -> _Worker:
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(target=_serve, args=(child_end, self.work, os.getpid()), daemon=True)
        process.start()
        child_end.close()
        return _Worker(process=process, connection=parent_end)

    def _give(self, worker: _Worker, pending: deque) -> None:
        if pending:
            worker.job = pending.popleft()
            _send(worker.connection, worker.job)

    def _collect(self, worker: _Worker, on_death: Callable[[Any, str], Any]) -> tuple[Any, Any]:
        """(job, result) of the worker's job, or, when the worker died, (job, ``on_death``'s result); a
        dead worker is replaced."""
        job, worker.job = worker.job, None
        try:
            if worker.connection.poll():
                return job, worker.connection.recv()
        except (EOFError, OSError):
            pass  # the pipe closed: the worker died before it could answer
        worker.process.join(timeout=5)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        what = _death(worker.process.exitcode)
        worker.connection.close()
        replacement = self._start()
        worker.process, worker.connection = replacement.process, replacement.connection
        return job, on_death(job, what)


def _send(connection: Connection, message) -> None:
    try:
        connection.send(message)
    except (BrokenPipeError, OSError):
        pass  # a dead worker: its sentinel tells the pool


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


# ----------------------------------------------------------------------------------- in the worker
def _serve(connection: Connection, work: Callable[[Any], Any], parent_pid: int) -> None:
    """A worker's life: answer one job at a time until told to stop or the pipe closes."""
    _end_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the main process decides
    setup_volume_worker()
    while True:
        try:
            job = connection.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        connection.send(work(job))


def _end_with_parent(parent_pid: int) -> None:
    """Die with the main process, even if it is killed with SIGKILL."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)
