"""SIGTERM and SIGHUP handled like Ctrl-C by the long jobs that write files, and their leftovers.

A job run under :func:`termination_as_interrupt` gets :class:`Terminated` (a ``KeyboardInterrupt``)
when SIGTERM or SIGHUP arrives, so the clean-up that already runs on Ctrl-C (staging removed, the last
complete checkpoint kept, the message that says what was kept) runs for them too; later termination
signals are ignored until that clean-up is over. :func:`interrupt_exit_status` gives the conventional
status (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP).

A job killed outright (SIGKILL, power loss) cannot clean up: :func:`remove_stale_staging` lets the
next run into the same output remove what it left, and say so.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TERMINATION_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
# Written into a staging directory by the process that owns it: "<pid>".
OWNER_FILE = ".owner-pid"


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM or SIGHUP arrives: handled exactly like Ctrl-C."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = int(signal_number)


def interrupt_exit_status(interrupt: BaseException) -> int:
    """Returns 128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + int(getattr(interrupt, "signal_number", signal.SIGINT))


def interrupt_name(interrupt: BaseException) -> str:
    """Returns how the job was stopped, for its message: ``Ctrl-C``, ``SIGTERM`` or ``SIGHUP``."""
    number = getattr(interrupt, "signal_number", None)
    return signal.Signals(number).name if number is not None else "Ctrl-C"


@contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """Turns the first SIGTERM or SIGHUP inside the block into :class:`Terminated`; ignores later ones.

    Does nothing outside the main thread (Python delivers signals there only). The previous handlers
    are restored on leaving the block.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = threading.Event()

    def handle(signal_number: int, _frame: Any) -> None:
        if raised.is_set():
            logger.warning("%s again: already stopping, clean-up goes on", signal.Signals(signal_number).name)
            return
        raised.set()
        raise Terminated(signal_number)

    previous = {number: signal.signal(number, handle) for number in TERMINATION_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def mark_owner(staging: Path) -> None:
    """Records this process as the owner of ``staging``, so another run leaves it alone while it lives."""
    (staging / OWNER_FILE).write_text(str(os.getpid()))


def staging_in_use(staging: Path) -> bool:
    """True when the process that :func:`mark_owner` recorded in ``staging`` is still running."""
    try:
        pid = int((staging / OWNER_FILE).read_text().strip())
    except (OSError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(directory: Path, pattern: str) -> list[Path]:
    """Removes the entries of ``directory`` matching ``pattern`` that a killed run left behind.

    A directory whose :data:`OWNER_FILE` names a running process is kept (another run is writing it);
    every other match is removed and logged as a warning. Returns what was removed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.glob(pattern)):
        if path.is_dir() and staging_in_use(path):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
        logger.warning("removed %s, left by an earlier run that was killed before it could clean up", path)
    return removed

