"""ROS nodes run as child processes by the apps (``make demo``, ``make pipeline``), and the environment
that keeps their DDS traffic on this machine."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Domains this package picks for itself: 1-100 (higher ids can collide with Linux's ephemeral ports).
DOMAIN_IDS = range(1, 101)
_DOMAIN_LOCKS = Path(tempfile.gettempdir()) / "openvla_ros_domains"
_held: dict[int, int] = {}  # domain id -> lock file descriptor, for the domains this process holds


class DomainsTakenError(RuntimeError):
    """Every ROS domain id this package picks from is held by another of its processes."""


def reserve_domain_id(exclude: tuple[int, ...] = ()) -> int:
    """Returns a ROS domain id in 1-100 that no other process of this package on this machine holds.

    The reservation is an exclusive lock on a file per id, held until :func:`release_domain_id` or
    the end of this process, so apps and test runs side by side never share a domain.

    Raises:
        DomainsTakenError: when every id is held (or excluded).
    """
    _DOMAIN_LOCKS.mkdir(exist_ok=True)
    candidates = [domain_id for domain_id in DOMAIN_IDS if domain_id not in exclude and domain_id not in _held]
    random.SystemRandom().shuffle(candidates)
    for domain_id in candidates:
        descriptor = os.open(_DOMAIN_LOCKS / f"{domain_id}.lock", os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            continue
        _held[domain_id] = descriptor
        return domain_id
    raise DomainsTakenError(f"every ROS domain id in {DOMAIN_IDS.start}-{DOMAIN_IDS.stop - 1} is held by another "
                            f"process of this package ({_DOMAIN_LOCKS}); set ROS_DOMAIN_ID, or stop some of them")


def release_domain_id(domain_id: int) -> None:
    """Gives back a domain id this process reserved (nothing when it holds none of that id)."""
    descriptor = _held.pop(domain_id, None)
    if descriptor is not None:
        os.close(descriptor)


@contextlib.contextmanager
def reserved_domain_ids(count: int, exclude: tuple[int, ...] = ()) -> Iterator[list[int]]:
    """Reserves ``count`` domain ids (none of ``exclude``) for the ``with`` block."""
    domain_ids: list[int] = []
    try:
        for _ in range(count):
            domain_ids.append(reserve_domain_id(exclude))
        yield domain_ids
    finally:
        for domain_id in domain_ids:
            release_domain_id(domain_id)


def local_ros_environment() -> dict[str, str]:
    """Returns the environment for DDS traffic kept on this machine, on a reserved domain unless one is set.

    Also sets both variables in this process (before rclpy creates its participant), and unbuffers the
    children's output so their logs are current.
    """
    env = dict(os.environ, RCUTILS_LOGGING_BUFFERED_STREAM="0", PYTHONUNBUFFERED="1")
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    if not env.get("ROS_DOMAIN_ID"):
        env["ROS_DOMAIN_ID"] = str(reserve_domain_id())
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
