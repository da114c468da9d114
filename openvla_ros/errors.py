"""Domain exceptions raised by the openvla_ros core.

Every error names the problem and the way out; callers (the ROS node, the command-line tools)
catch :class:`OpenVLAError` at their boundary.
"""

from __future__ import annotations


class OpenVLAError(Exception):
    """Base class of every error the core raises on purpose."""


class CheckpointError(OpenVLAError):
    """A checkpoint is missing, incomplete, corrupt or of an unsupported layout."""


class ImageError(OpenVLAError):
    """An input image has the wrong type, dtype, shape or channel count, or cannot be decoded."""


class InstructionError(OpenVLAError):
    """A language instruction is empty or too long."""


class UnnormKeyError(OpenVLAError):
    """The requested action-statistics key is missing or ambiguous."""


class QuantizationError(OpenVLAError):
    """The requested precision or quantisation cannot be used on this machine."""


class DatasetError(OpenVLAError):
    """A recording or dataset is missing, unreadable or inconsistent."""


class TrainingError(OpenVLAError):
    """A fine-tuning run cannot start or continue (bad settings, out of memory, unusable checkpoint)."""
