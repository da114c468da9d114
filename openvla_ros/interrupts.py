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
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
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

    Python runs a signal handler wherever the main thread is, also inside code whose exceptions it
    ignores (a weakref callback of the import machinery, a ``__del__``): an interrupt raised there is
    reported as "Exception ignored" and lost, and the job would run on. Such a lost interrupt (this
    one, or a Ctrl-C) is sent again, so it lands in the job's own code.
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

    previous_hook = sys.unraisablehook

    def lost(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            number = getattr(unraisable.exc_value, "signal_number", signal.SIGINT)
            raised.clear()
            # From another thread, a moment later: sent from here, the handler would run (and be lost) here.
            threading.Timer(0.01, os.kill, (os.getpid(), number)).start()
            return
        previous_hook(unraisable)

    previous = {number: signal.signal(number, handle) for number in TERMINATION_SIGNALS}
    sys.unraisablehook = lost
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for number, handler in previous.items():
            signal.signal(number, handler)


def run_to_the_end(jobs: Sequence[Callable[[], None]], stop: threading.Event, name: str = "job") -> None:
    """Runs each job on a thread of its own and returns once every one has returned.

    An interrupt (Ctrl-C, or :class:`Terminated`) while they run sets ``stop``, waits until every job
    has returned (each is expected to watch ``stop`` and clean up, a child process stopped for
    instance), and then goes on up. Later interrupts during that wait are logged and do not cut it
    short. The wait is on an event each job sets when it returns, not on ``Thread.join``: Python 3.11
    marks a thread as finished when an interrupt lands inside its ``join``, so a later ``join``
    returns at once while the thread still runs, and a daemon thread then dies mid clean-up at exit.
    Exceptions of the jobs are theirs to hand on (through ``stop`` and a shared record, say).
    """
    finished = [threading.Event() for _ in jobs]

    def run(job: Callable[[], None], done: threading.Event) -> None:
        try:
            job()
        finally:
            done.set()

    threads = [threading.Thread(target=run, args=(job, done), name=f"{name}-{number}", daemon=True)
               for number, (job, done) in enumerate(zip(jobs, finished, strict=True))]
    try:
        for thread in threads:
            thread.start()
        for done in finished:
            while not done.wait(0.2):
                pass
    finally:
        stop.set()
        pending = [done for thread, done in zip(threads, finished, strict=True) if thread.ident is not None]
        while pending:
            try:
                pending[0].wait(0.2)
                pending = [done for done in pending if not done.is_set()]
            except KeyboardInterrupt:
                logger.warning("interrupted again: waiting for the %s threads to clean up", name)


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

