"""Age checks of the policy node's inputs (camera images, wrist camera images, proprio), without ROS.

An input is judged by the stamp of its newest message against the node's clock: missing (nothing
received yet), ahead (a stamp further in the future than the allowed age: the clocks disagree), stale
(older than the allowed age) or fresh. The node turns a finding into a logged problem and, for every
finding but a missing main camera image, a stop of the output.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Verdict(enum.Enum):
    """What the age of an input's newest message says."""

    MISSING = "missing"
    AHEAD = "ahead"
    STALE = "stale"
    FRESH = "fresh"


def judge_age(stamp_ns: int | None, now_ns: int, max_age_s: float) -> tuple[Verdict, float]:
    """Returns the verdict on a message stamped ``stamp_ns`` at ``now_ns`` and its age in seconds.

    A stamp more than ``max_age_s`` in the future cannot be judged fresh (the sender's clock and the
    node's disagree, or use_sim_time is set and /clock is not running yet): that is ``AHEAD``. The age
    is NaN for ``MISSING``.
    """
    if stamp_ns is None:
        return Verdict.MISSING, math.nan
    age_s = (now_ns - stamp_ns) / 1e9
    if age_s < -max_age_s:
        return Verdict.AHEAD, age_s
    if age_s > max_age_s:
        return Verdict.STALE, age_s
    return Verdict.FRESH, age_s


@dataclass(frozen=True)
class Finding:
    """A problem with one input: the problem key, the message logged once, its detail, whether it stops."""

    key: str
    message: str
    detail: str
    stops_output: bool
    warn: bool = True


@dataclass(frozen=True)
class InputSource:
    """One timed input of the node and the words its problems are reported with.

    ``key`` is ``"image"`` for the main camera (problem keys ``no_image``, ``clock_mismatch``,
    ``stale_image``), e.g. ``"wrist_image_1"`` or ``"proprio"`` for the others. ``name`` is the input
    in a sentence ("camera image", "wrist camera image on /wrist/image_raw"); ``plural`` and ``item``
    complete the messages ("camera images are older than ...", "newest image is 0.8 s old").
    """

    key: str
    name: str
    plural: str
    item: str
    age_parameter: str
    stop_when_missing: bool = True

    @property
    def missing_key(self) -> str:
        return f"no_{self.key}"

    @property
    def ahead_key(self) -> str:
        return "clock_mismatch" if self.key == "image" else f"clock_mismatch_{self.key}"

    @property
    def stale_key(self) -> str:
        return f"stale_{self.key}"

    def check(self, stamp_ns: int | None, now_ns: int, max_age_s: float) -> Finding | None:
        """Returns the problem with this input at ``now_ns``, or None when its newest message is fresh."""
        verdict, age_s = judge_age(stamp_ns, now_ns, max_age_s)
        if verdict is Verdict.MISSING:
            if self.stop_when_missing:
                message = f"no {self.name} received yet; output stopped until one arrives"
            else:
                message = f"enabled but no {self.name} received yet; publishing nothing"
            return Finding(self.missing_key, message, "", self.stop_when_missing, warn=self.stop_when_missing)
        if verdict is Verdict.AHEAD:
            message = (
                f"{self.name} stamps are ahead of the node's clock by more than {self.age_parameter}; output "
                "stopped (synchronise the clocks, or check use_sim_time and /clock)"
            )
            return Finding(self.ahead_key, message, f"newest {self.item} is {-age_s:.2f} s in the future", True)
        if verdict is Verdict.STALE:
            message = (
                f"{self.plural} are older than {self.age_parameter} ({max_age_s:g} s); output stopped until "
                f"fresh {self.item}s arrive"
            )
            return Finding(self.stale_key, message, f"newest {self.item} is {age_s:.2f} s old", True)
        return None

    def recoveries(self, finding: Finding | None) -> list[tuple[str, str | None]]:
        """Returns the (problem key, recovery message) pairs that ``finding`` shows to be over.

        The checks run in the order missing, ahead, stale: a problem is over when a later check (or
        none) is what fails now.
        """
        ordered = [
            (self.missing_key, None if not self.stop_when_missing else f"{self.name} received"),
            (self.ahead_key, f"{self.item} stamps agree with the node's clock again"),
            (self.stale_key, f"fresh {self.item}s again; output resumes"),
        ]
        if finding is None:
            return ordered
        keys = [key for key, _ in ordered]
        return ordered[: keys.index(finding.key)]


CAMERA = InputSource(
    "image", "camera image", "camera images", "image", "max_image_age_s", stop_when_missing=False
)


def wrist_camera(index: int, topic: str) -> InputSource:
    """Returns the input of wrist camera ``index`` (1-based) on ``topic``."""
    return InputSource(
        f"wrist_image_{index}", f"wrist camera image on {topic}", f"wrist camera images on {topic}", "image",
        "max_image_age_s",
    )


def proprio(topic: str) -> InputSource:
    """Returns the proprio input on ``topic``."""
    return InputSource("proprio", f"proprio on {topic}", f"proprio messages on {topic}", "proprio message",
                       "max_proprio_age_s")
