"""Helpers for tests that stop a long-running command with a signal at a chosen point."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable


def signal_when(process: subprocess.Popen, ready: Callable[[], bool], signal_number: int, what: str,
                output: Callable[[], str], timeout_s: float = 300.0, exit_timeout_s: float = 120.0) -> int:
    """Waits until ``ready()`` holds while ``process`` runs, sends it ``signal_number`` and returns its exit
    status; the process is killed if anything fails on the way.

    Raises:
        AssertionError: when the process ends (or ``timeout_s`` passes) before it gets ``what``, with the
            tail of ``output()``.
    """
    try:
        deadline = time.monotonic() + timeout_s
        while not ready() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None and ready(), f"the command never got {what}:\n{output()[-3000:]}"
        process.send_signal(signal_number)
        return process.wait(timeout=exit_timeout_s)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
