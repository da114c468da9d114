"""Shared test fixtures: one tiny OpenVLA checkpoint per test session, built locally."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Returns the directory of a tiny random OpenVLA checkpoint (seed 0), built once per session."""
    from openvla_ros.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-openvla", seed=0)
