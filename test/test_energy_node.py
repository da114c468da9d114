"""The policy node with energy refinement over real DDS: tiny OFT checkpoints with an energy file beside the head.

Rates are judged against the set rate and against what the node's own chunk latency allows in the same
run, never against a fixed latency (these machines are noisy); the cost of refinement is measured by
benchmarks/energy.py.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rclpy
import torch
from policy_helpers import (
    Driver,
    NodeProcess,
    Received,
    drive,
    latest_status,
    rate_over,
    start_node,
    status_values,
    wait_active,
)
from ros_helpers import wait_until  # sets up DDS isolation first

from openvla_ros.model.energy import EnergyModel, EnergySpec
from openvla_ros.model.oft_loading import save_energy_model
from openvla_ros.model.tiny_oft import make_tiny_oft_checkpoint

RATE_HZ = 20.0
CHUNK = 8


def _energy(broken: bool = False) -> EnergyModel:
    torch.manual_seed(0)
    model = EnergyModel(EnergySpec(context_dim=64, action_dim=7, chunk=CHUNK))
    with torch.no_grad():
        model.action_encoder.fc1.weight.mul_(20.0)  # steep enough that a step visibly lowers the energy
        if broken:
            model.energy_head.fc2.weight.fill_(float("nan"))
    return model


def _topics(name: str) -> tuple[str, str]:
    return f"/{name}/camera", f"/{name}/instruction"


def _start(name: str, model: Path, log_dir: Path, *overrides: str) -> NodeProcess:
    image_topic, instruction_topic = _topics(name)
    return start_node(name, log_dir, f"model:={model}", f"image_topic:={image_topic}",
                      f"instruction_topic:={instruction_topic}", "device:=cpu", *overrides)



@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProcess]]:
    root = tmp_path_factory.mktemp("energy_node")
    plain = make_tiny_oft_checkpoint(root / "plain", seed=0, chunk=CHUNK, official=False)
    with_energy = shutil.copytree(plain, root / "with_energy")
    save_energy_model(_energy(), with_energy)
    broken = shutil.copytree(plain, root / "broken")
    save_energy_model(_energy(broken=True), broken)
    started = {
        "energy_on": _start("energy_on", with_energy, root, f"rate_hz:={RATE_HZ}", "energy_steps:=3",
                            "energy_step_size:=50.0"),
        "energy_nan": _start("energy_nan", broken, root, "rate_hz:=10.0", "energy_steps:=1"),
        "energy_missing": _start("energy_missing", plain, root, "energy_steps:=2"),
    }
    yield started
    for process in started.values():
        process.stop()


def _driver(ros_node: rclpy.node.Node, nodes: dict[str, NodeProcess], name: str) -> Driver:
    driver = Driver(ros_node, name, *_topics(name), compressed=False)
    wait_active(driver, nodes[name])
    return driver


def test_with_energy_on_the_node_holds_its_chunk_rate_and_reports_the_energies(
    ros_node: rclpy.node.Node, nodes: dict[str, NodeProcess], diagnostics: Received
) -> None:
    driver = _driver(ros_node, nodes, "energy_on")
    try:
        first = drive(driver)
        time.sleep(4.0)
        rate_on = rate_over(driver.twists, first + 1.0, 3.0)
        values = status_values(latest_status(diagnostics, "energy_on"))
        assert values["energy_steps"] == "3" and int(values["energy_refined_chunks"]) >= 2, values
        before, after = float(values["energy_before_last"]), float(values["energy_after_last"])
        assert math.isfinite(before) and after < before, values
        assert values["energy_fallbacks"] == "0"
        # ~/action goes out just before ~/delta_twist, whose first arrival `first` is: allow for that
        actions = np.array([a.data for _, a in driver.actions.since(first - 0.1)])
        assert np.all(np.isfinite(actions))

        assert all(result.successful for result in driver.set(energy_steps=0))  # off, in the same run
        time.sleep(1.0)
        switched = time.monotonic()
        refined = int(status_values(latest_status(diagnostics, "energy_on"))["energy_refined_chunks"])
        time.sleep(3.2)
        rate_off = rate_over(driver.twists, switched, 3.0)
        later = status_values(latest_status(diagnostics, "energy_on"))
        assert later["energy_steps"] == "0" and int(later["energy_refined_chunks"]) == refined, "refinement is off"
        assert int(later["chunks"]) > 2
        allowed_off = min(RATE_HZ, CHUNK * 1e3 / float(later["chunk_latency_ms_median"]))
        assert rate_off >= 0.6 * allowed_off, f"{rate_off:.2f} Hz without energy, its latency allows {allowed_off:.2f}"
        # on again. The cost of refinement is a benchmark figure (benchmarks/energy.py); here the node
        # must keep the rate its own chunk latency allows, refinement included, in the same window:
        # a fixed rate or an on/off ratio would depend on how busy the machine is
        assert all(result.successful for result in driver.set(energy_steps=3))
        time.sleep(1.0)
        again = time.monotonic()
        time.sleep(3.2)
        rate_on = max(rate_on, rate_over(driver.twists, again, 3.0))
        values = status_values(latest_status(diagnostics, "energy_on"))
        assert int(values["energy_refined_chunks"]) > refined, "refinement is on again"
        allowed = min(RATE_HZ, CHUNK * 1e3 / float(values["chunk_latency_ms_median"]))
        assert rate_on >= 0.6 * allowed, f"{rate_on:.2f} Hz with energy on, its chunk latency allows {allowed:.2f} Hz"
        assert rate_on <= 1.05 * RATE_HZ
        assert "energy refinement off" in nodes["energy_on"].log()
    finally:
        driver.camera.mode = "stopped"
        driver.enable(False)


def test_a_nan_energy_publishes_the_uncorrected_chunk_with_one_warning(
    ros_node: rclpy.node.Node, nodes: dict[str, NodeProcess], diagnostics: Received
) -> None:
    driver = _driver(ros_node, nodes, "energy_nan")
    try:
        first = drive(driver, count=20, timeout_s=60.0)
        wait_until(lambda: int(status_values(latest_status(diagnostics, "energy_nan"))["energy_fallbacks"]) >= 2,
                   30.0, "two chunks without correction")
        # ~/action goes out just before ~/delta_twist, whose first arrival `first` is: allow for that
        actions = np.array([a.data for _, a in driver.actions.since(first - 0.1)])
        assert len(actions) >= 20 and np.all(np.isfinite(actions)), "never a NaN published"
        values = status_values(latest_status(diagnostics, "energy_nan"))
        assert "not finite" in values["energy_last_problem"] and values["energy_refined_chunks"] == "0"
        assert nodes["energy_nan"].log().count("energy refinement skipped") == 1
    finally:
        driver.camera.mode = "stopped"
        driver.enable(False)


def test_energy_steps_on_a_model_without_an_energy_file_leave_the_node_unconfigured(
    ros_node: rclpy.node.Node, nodes: dict[str, NodeProcess]
) -> None:
    process = nodes["energy_missing"]
    driver = Driver(ros_node, "energy_missing", *_topics("energy_missing"), compressed=False)
    driver.wait_ready(120.0)
    wait_until(lambda: "could not load the model" in process.log(), 60.0, "the load failure")
    assert "energy_steps 2 needs an energy model" in process.log()
    assert driver.state() == "unconfigured"
