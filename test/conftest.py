"""Shared test fixtures: one tiny OpenVLA checkpoint per test session, built locally; the DDS driver node."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Under `make test` the files run on two workers (pytest-xdist): one thread each for torch and OpenMP, in
# the worker and in the processes it starts, so two workers on two cores do not each spin two threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    """Gives SIGINT its default behaviour back when the test run was started with it ignored.

    A shell ignores SIGINT in background jobs (``make test &``, CI runners), and child processes inherit
    an ignored signal: the tests that Ctrl-C a converter, recorder or node would then see it ignored.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# The slowest test files, slowest first. `make test` runs files on two workers (pytest-xdist, each file
# in one worker); starting with the long ones keeps one worker from finishing a long file alone at the end.
SLOW_FILES_FIRST = (
    "test_pipeline.py", "test_train_inference_guard.py", "test_finetune.py", "test_demo.py",
    "test_policy_node_timing.py", "test_ros2_cli.py", "test_energy_training.py", "test_finetune_oft.py",
    "test_pretrain.py", "test_energy_node.py", "test_node_chunk_mode.py", "test_policy_node.py",
    "test_full_size.py", "test_serve.py", "test_fidelity.py", "test_serve_node.py", "test_selection.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Puts the slowest files first (see SLOW_FILES_FIRST), keeping the order inside each file."""
    rank = {name: index for index, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Returns the directory of a tiny random OpenVLA checkpoint (seed 0), built once per session."""
    from openvla_ros.model.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-openvla", seed=0)


@pytest.fixture(scope="session")
def small_pretrained_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Returns a pretrained tiny base (an OFT model with proprio) from a build small enough for tests.

    The same stages as ``make pretrained`` (expert bags, converter, full training, evaluation) with a few
    episodes and steps: its layout is the real one, its skill is not.
    """
    import fcntl

    from openvla_ros.pretrain import PretrainSettings, build_pretrained

    # Built once per test run: under pytest-xdist the workers share their base directory's parent, and
    # the first to get the lock builds it (the base appears in one rename, with its pretrain.json).
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "shared-pretrained" / "tiny-pretrained"
    with open(shared / "shared-pretrained.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "pretrain.json").is_file():
            build_pretrained(out, PretrainSettings(episodes=4, steps=3, batch_size=4, eval_episodes=1, select_episodes=1),
                             progress=lambda _: None)
    return out


# The DDS driver node of the test modules that talk to nodes (module scope: each module gets its own,
# named after it), and the /diagnostics it receives. rclpy is imported only when a test asks for them;
# the modules themselves import ros_helpers first, which isolates their DDS traffic.


@pytest.fixture(scope="module")
def ros_node(request: pytest.FixtureRequest) -> Iterator[Any]:
    """This test module's rclpy node, spinning in the background."""
    from ros_helpers import spinning_node

    with spinning_node(f"{request.module.__name__.rsplit('.', 1)[-1]}_driver") as node:
        yield node


@pytest.fixture(scope="module")
def diagnostics(ros_node: Any) -> Any:
    """The policy_helpers.Received of everything published on /diagnostics while the module runs."""
    from policy_helpers import subscribe_diagnostics

    return subscribe_diagnostics(ros_node)
