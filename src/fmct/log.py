"""fmct's diagnostics: one logger, ``fmct``, and the one progress bar, which follows it.

Results a verb was asked for (a summary, a table) go to stdout with ``print``; everything said along the
way (warnings, what a resumed run picked up, why a scan was skipped) goes through :data:`logger` (or a
child, ``logging.getLogger("fmct.ingest")``) to stderr. The logger shows info by default, so a Python
user sees progress bars and warnings; ``fmct --quiet`` (:func:`configure` with -1) keeps warnings and
errors only and hides every progress bar, ``--verbose`` (1) adds debug lines.
"""

from __future__ import annotations

import logging
import sys
from typing import Iterable

from tqdm import tqdm

logger = logging.getLogger("fmct")
logger.setLevel(logging.INFO)
# No tqdm monitor thread: a reader process forked while that thread held a lock would inherit it locked.
tqdm.monitor_interval = 0
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}


class _LineHandler(logging.Handler):
    """One line per record on the current stderr, written around any progress bar on screen."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # a logging handler never raises into the code that logs
            self.handleError(record)


def configure(verbosity: int = 0) -> None:
    """Show the ``fmct`` logger on stderr, one line per record, at verbosity -1 (warnings and errors, no
    progress bars), 0 (info) or 1 (debug). Called once per command by the CLI; idempotent."""
    logger.setLevel(LEVELS[max(-1, min(1, verbosity))])
    if not any(isinstance(handler, _LineHandler) for handler in logger.handlers):
        handler = _LineHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **tqdm_kwargs) -> tqdm:
    """A tqdm bar on stderr, shown when ``enabled`` and the ``fmct`` logger shows info (not ``--quiet``)."""
    shown = enabled and logger.isEnabledFor(logging.INFO)
    return tqdm(iterable, disable=not shown, dynamic_ncols=True, file=sys.stderr, **tqdm_kwargs)
