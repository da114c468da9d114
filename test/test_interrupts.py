"""SIGTERM and SIGHUP as Ctrl-C in long jobs, and the removal of what a killed run left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from openvla_ros.interrupts import (
    OWNER_FILE,
    Terminated,
    interrupt_exit_status,
    interrupt_name,
    mark_owner,
    remove_stale_staging,
    run_to_the_end,
    termination_as_interrupt,
)
from openvla_ros.model.loading import fresh_directory


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGHUP])
def test_a_termination_signal_becomes_an_interrupt_and_later_ones_are_ignored(signal_number: int) -> None:
    before = signal.getsignal(signal_number)
    cleaned_up = False
    with pytest.raises(KeyboardInterrupt) as caught, termination_as_interrupt():
        try:
            os.kill(os.getpid(), signal_number)
            signal.pause()  # not reached: the handler raises in this thread
        finally:
            os.kill(os.getpid(), signal_number)  # a second signal during the clean-up is ignored
            cleaned_up = True
    assert cleaned_up and isinstance(caught.value, Terminated)
    assert interrupt_exit_status(caught.value) == 128 + signal_number
    assert interrupt_name(caught.value) == signal.Signals(signal_number).name
    assert signal.getsignal(signal_number) == before  # handlers restored on leaving


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupt_lost_in_a_callback_that_ignores_exceptions_is_delivered_again(signal_number: int) -> None:
    import weakref

    class Referent:
        pass

    def callback(_reference: object) -> None:  # Python ignores what a weakref callback raises
        os.kill(os.getpid(), signal_number)
        for _ in range(100_000):  # the handler runs here, and its exception is "ignored"
            pass

    referent = Referent()
    reference = weakref.ref(referent, callback)
    with pytest.raises(KeyboardInterrupt) as caught, termination_as_interrupt():
        del referent  # runs the callback
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the job's own code: the interrupt must land here
            pass
    assert reference() is None
    assert interrupt_exit_status(caught.value) == 128 + signal_number


def test_ctrl_c_keeps_its_own_status_and_name() -> None:
    assert interrupt_exit_status(KeyboardInterrupt()) == 130 and interrupt_name(KeyboardInterrupt()) == "Ctrl-C"


def test_an_interrupt_waits_until_every_thread_has_cleaned_up() -> None:
    stop = threading.Event()
    cleaned: list[int] = []

    def job(number: int) -> None:
        while not stop.wait(0.01):
            pass
        time.sleep(0.7 - 0.2 * number)  # a child process taking its time to stop, the first one longest
        cleaned.append(number)

    def again(_number: int, _frame: object) -> None:
        raise KeyboardInterrupt  # as a second Ctrl-C would

    previous = signal.signal(signal.SIGUSR1, again)
    timers = [threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)),
              threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGUSR1))]  # while the jobs clean up
    try:
        with pytest.raises(Terminated), termination_as_interrupt():
            for timer in timers:
                timer.start()
            # Thread.join would be cut by the signal and take the first thread for finished.
            run_to_the_end([lambda n=n: job(n) for n in range(3)], stop, "test")
    finally:
        for timer in timers:
            timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
    assert sorted(cleaned) == [0, 1, 2]


def test_the_jobs_run_to_the_end_without_an_interrupt() -> None:
    stop = threading.Event()
    results: list[int] = []
    run_to_the_end([lambda n=n: results.append(n * n) for n in range(4)], stop)
    assert sorted(results) == [0, 1, 4, 9] and stop.is_set()


@pytest.mark.parametrize("where", ["making", "inside"])
def test_a_fresh_directory_is_gone_after_an_interrupt_wherever_it_lands(tmp_path: Path, where: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    original = Path.mkdir

    def mkdir_then_interrupt(self: Path, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        made.append(self)
        raise KeyboardInterrupt  # as a Ctrl-C landing right after the directory appeared

    if where == "making":
        monkeypatch.setattr(Path, "mkdir", mkdir_then_interrupt)
    with pytest.raises(KeyboardInterrupt), fresh_directory(tmp_path, ".staging-") as staging:
        made.append(staging)
        (staging / "half-written").write_text("x")
        raise KeyboardInterrupt
    assert made and made[0].name.startswith(".staging-") and list(tmp_path.iterdir()) == []


def test_a_fresh_directory_renamed_away_is_kept(tmp_path: Path) -> None:
    with fresh_directory(tmp_path, ".staging-") as staging:
        (staging / "weights").write_text("w")
        staging.rename(tmp_path / "final")
    assert [p.name for p in tmp_path.iterdir()] == ["final"] and (tmp_path / "final" / "weights").read_text() == "w"


def test_stale_staging_is_removed_unless_its_owner_runs(tmp_path: Path) -> None:
    dead = tmp_path / ".name-incomplete-dead"
    dead.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (dead / OWNER_FILE).write_text(finished.stdout.strip())  # a process that has exited
    unowned = tmp_path / ".name-incomplete-old"
    unowned.mkdir()
    live = tmp_path / ".name-incomplete-live"
    live.mkdir()
    mark_owner(live)
    other = tmp_path / ".other-incomplete-x"
    other.mkdir()
    removed = remove_stale_staging(tmp_path, ".name-incomplete-*")
    assert sorted(removed) == sorted([dead, unowned])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".name-incomplete-live", ".other-incomplete-x"]
    assert remove_stale_staging(tmp_path / "missing", "*") == []


def test_the_interrupted_runs_note_names_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    from openvla_ros.finetune.checkpoints import newest_checkpoint_note

    assert newest_checkpoint_note(None) == "no checkpoint was complete yet"
    assert newest_checkpoint_note(tmp_path).startswith("no checkpoint was complete yet in")
    for name in ("step-000004", "step-000012", "step-00003", ".staging-abc"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert newest_checkpoint_note(tmp_path).endswith("checkpoints/step-000012")


@pytest.mark.parametrize("left", [("fresh", "previous"), ("previous",), ("fresh",)])
def test_a_model_swap_cut_between_its_renames_is_put_back(tmp_path: Path, left: tuple[str, ...],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A run killed after merged/ -> .merged-old and before .merged-new -> merged/ leaves no merged/: the
    newest complete model is put back and the other removed, never both deleted."""
    from openvla_ros.finetune.checkpoints import recover_model_swap

    names = {"fresh": ".merged-new", "previous": ".merged-old"}
    for kind in left:
        (tmp_path / names[kind]).mkdir()
        (tmp_path / names[kind] / "config.json").write_text(kind)
    with caplog.at_level("WARNING"):
        restored = recover_model_swap(tmp_path, "merged", ".merged-new", ".merged-old")
    assert restored == tmp_path / "merged"
    assert (tmp_path / "merged" / "config.json").read_text() == left[0], "the newest complete model wins"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]
    assert "put back" in caplog.text


def test_with_the_model_in_place_only_the_leftovers_go(tmp_path: Path) -> None:
    from openvla_ros.finetune.checkpoints import recover_model_swap

    for name in ("merged", ".merged-new", ".merged-old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(name)
    assert recover_model_swap(tmp_path, "merged", ".merged-new", ".merged-old") is None
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]
    assert (tmp_path / "merged" / "config.json").read_text() == "merged"
