"""The policy node in remote mode (``model:=http://host:port``) over real DDS, against a real policy server process
that is killed and restarted while the node drives."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import rclpy  # noqa: E402  (imported after the DDS isolation variables are set)
from policy_helpers import (  # noqa: E402
    Driver,
    NodeProcess,
    assert_holds_rate,
    drive,
    is_zero,
    latest_status,
    start_node,
    status_values,
    typical_rate_over,
    wait_active,
    zero_delta_then_silence,
)
from ros_helpers import wait_until  # noqa: E402  (sets up DDS isolation first)
from serve_helpers import Server  # noqa: E402

NODE = "policy_remote"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, port: int) -> Iterator[list[Server]]:
    """The running server (a list, so a test can replace it after a restart)."""
    running = [Server(tiny_checkpoint, "--port", str(port), "--batch-window-ms", "1")]
    yield running
    if running[0].process.poll() is None:
        running[0].stop()


@pytest.fixture(scope="module")
def node(server: list[Server], port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    process = start_node(NODE, tmp_path_factory.mktemp("remote_logs"), f"model:=http://127.0.0.1:{port}",
                         "image_topic:=/remote_camera/image", "instruction_topic:=/remote_instruction",
                         "max_image_age_s:=2.0", "remote_jpeg_quality:=95")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def driver(node: NodeProcess, ros_node: rclpy.node.Node) -> Driver:
    driver = Driver(ros_node, NODE, "/remote_camera/image", "/remote_instruction", compressed=False)
    wait_active(driver, node)
    return driver


def test_remote_mode_drives_at_its_rate_and_survives_a_server_restart(
        server: list[Server], driver: Driver, diagnostics, tiny_checkpoint: Path, port: int) -> None:
    assert driver.get("model") == [f"http://127.0.0.1:{port}"]
    drive(driver, rate_hz=1.0, count=3, timeout_s=60)
    # the rate is chosen from what the server's round trip measured here: 3x headroom over its p95
    values = status_values(latest_status(diagnostics, NODE))
    p95_s = float(values["remote_latency_ms_p95"]) / 1e3
    assert int(values["remote_requests"]) >= 3 and values["remote_server"] == f"http://127.0.0.1:{port}"
    rate_hz = max(1.0, min(4.0, 1.0 / (3 * p95_s)))  # 1 Hz is the lowest rate a token model takes
    assert all(result.successful for result in driver.set(rate_hz=rate_hz))
    time.sleep(1.5 / rate_hz)
    start = time.monotonic()
    window_s = max(4.0, 6.0 / rate_hz)
    time.sleep(window_s)
    if 3 * p95_s <= 1.0 / rate_hz:
        assert_holds_rate(driver.twists, start, window_s, rate_hz)
    else:  # a loaded machine: the round trip leaves no headroom even at 1 Hz; one step per round trip at least
        assert typical_rate_over(driver.twists, start, window_s) >= 0.5 / max(1.0 / rate_hz, 2 * p95_s)

    killed = time.monotonic()
    server[0].process.send_signal(signal.SIGKILL)
    server[0].process.wait(timeout=30)
    wait_until(lambda: len(driver.twists.since(killed)) >= 1, 30, "the zero delta after the server died")
    time.sleep(3.0 / rate_hz)  # a few failed steps: still only the one zero delta
    zero_delta_then_silence(driver, killed, quiet_s=2.0)
    failing = status_values(latest_status(diagnostics, NODE))
    assert int(failing["remote_failures"]) >= 1 and "unreachable" in failing["remote_last_failure"]

    server[0] = Server(tiny_checkpoint, "--port", str(port), "--batch-window-ms", "1")
    resumed = driver.wait_for_actions(count=3, timeout_s=60)
    assert resumed > killed
    assert driver.state() == "active"

    # a server that hangs (stopped, its socket still open) is a stale step once max_image_age_s (2 s) has passed
    hung = time.monotonic()
    server[0].process.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: any(is_zero(twist) for _, twist in driver.twists.since(hung)), 30,
                   "the zero delta after the server stopped answering")
        zero_delta_then_silence(driver, hung, quiet_s=3.0)
        timed_out = status_values(latest_status(diagnostics, NODE))
        assert "no answer within 2 s" in timed_out["remote_last_failure"], timed_out
    finally:
        server[0].process.send_signal(signal.SIGCONT)
    assert driver.wait_for_actions(count=3, timeout_s=60) > hung
