"""ROS nodes run as child processes by the apps (``make demo``, ``make pipeline``), and the environment
that keeps their DDS traffic on this machine."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def local_ros_environment() -> dict[str, str]:
    """Returns the environment for DDS traffic kept on this machine, on a random domain unless one is set.

    Also sets both variables in this process (before rclpy creates its participant), and unbuffers the
    children's output so their logs are current.
    """
    env = dict(os.environ, RCUTILS_LOGGING_BUFFERED_STREAM="0", PYTHONUNBUFFERED="1")
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    if not env.get("ROS_DOMAIN_ID"):
        env["ROS_DOMAIN_ID"] = str(random.SystemRandom().randint(1, 100))
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = env["ROS_AUTOMATIC_DISCOVERY_RANGE"]
    os.environ["ROS_DOMAIN_ID"] = env["ROS_DOMAIN_ID"]
    return env


class ChildNode:
    """A node started as ``python -m module --ros-args ...``, its output going to ``log_dir/name.log``."""

    def __init__(self, name: str, module: str, ros_args: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", module, "--ros-args", *ros_args],
                                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15, indent: str = "") -> str:
        """Returns the last ``lines`` lines of the node's log ("" when it cannot be read)."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"{indent}{line}" for line in text[-lines:])

    def exit_report(self) -> str | None:
        """Returns "NAME exited with status N:" and the log's tail once the process has exited, else None."""
        if self.alive():
            return None
        return f"{self.name} exited with status {self.process.returncode}:\n{self.log_tail()}"

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """Asks the node to stop (SIGINT, as Ctrl-C would), kills it after ``timeout_s``; returns its status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        return self.process.returncode
