"""Test side of the policy server: a server process on a free (or given) localhost port."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Server:
    """A server process; ``url`` once it says where it listens."""

    def __init__(self, model: Path, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "openvla_ros.serve", "--model", str(model), "--device", "cpu", "--port", "0",
             "--log-level", "warning", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        self.lines: list[str] = []
        self.url = ""
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if line.startswith("serving "):
                self.url = line.rsplit(" on ", 1)[1].strip()
                break
        assert self.url, f"the server did not start: {''.join(self.lines)}"
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code
