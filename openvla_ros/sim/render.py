"""The tabletop's fixed overhead camera: a pinhole looking straight down, drawn with OpenCV.

The camera sits ``camera_height`` metres above the table centre; the table plane fills the image.
Objects closer to the camera look bigger, so height is visible: a lifted block grows and casts a
shadow. Images are RGB uint8 ``(height, width, 3)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from openvla_ros.sim.scene import COLORS, TabletopScene

TABLE_RGB = (196, 178, 150)
GRID_RGB = (184, 165, 136)
SHADOW_RGB = (150, 135, 112)
GRIPPER_RGB = (70, 70, 78)
FINGER_RGB = (30, 30, 34)
# Finger spacing (metres) of the open and the empty closed gripper.
OPEN_SPAN = 0.07
CLOSED_SPAN = 0.012
FINGER_LENGTH = 0.03
FINGER_WIDTH = 0.008
PALM_RADIUS = 0.02
# Height of the gripper's palm above its fingertips.
PALM_OFFSET = 0.03


@dataclass(frozen=True)
class CameraModel:
    """An overhead pinhole camera over the table centre, x to the right and y up in the image."""

    width: int = 640
    height: int = 480
    camera_height: float = 1.0
    # Metres of table visible across the image width at z = 0.
    table_width: float = 0.6
    # Mounted rotated by 180 degrees about its optical axis (x to the left and y down in the image).
    upside_down: bool = False

    @property
    def focal(self) -> float:
        return self.width * self.camera_height / self.table_width

    def project(self, x: float, y: float, z: float) -> tuple[float, float]:
        """Returns the pixel (u, v) of the world point (x, y, z); z must stay below the camera."""
        scale = self.focal / (self.camera_height - z)
        if self.upside_down:
            return self.width / 2 - scale * x, self.height / 2 + scale * y
        return self.width / 2 + scale * x, self.height / 2 - scale * y

    def pixels_per_metre(self, z: float) -> float:
        return self.focal / (self.camera_height - z)


class TabletopRenderer:
    """Renders a :class:`TabletopScene` as the overhead camera sees it."""

    def __init__(self, camera: CameraModel | None = None) -> None:
        self.camera = camera or CameraModel()
        self._table = self._draw_table()

    def _draw_table(self) -> np.ndarray:
        cam = self.camera
        image = np.empty((cam.height, cam.width, 3), np.uint8)
        image[:] = TABLE_RGB
        step = 0.1
        half_w = cam.table_width / 2 + step
        for value in np.arange(-math.floor(half_w / step) * step, half_w, step):
            u, _ = cam.project(value, 0.0, 0.0)
            _, v = cam.project(0.0, value, 0.0)
            cv2.line(image, (round(u), 0), (round(u), cam.height - 1), GRID_RGB, 1)
            cv2.line(image, (0, round(v)), (cam.width - 1, round(v)), GRID_RGB, 1)
        return image

    def render(self, scene: TabletopScene) -> np.ndarray:
        """Returns the camera image of the scene: RGB uint8 ``(height, width, 3)``."""
        image = self._table.copy()
        size = scene.config.block_size
        ee = scene.ee_position
        # Shadows first (directly below, on the table), then blocks from low to high, then the gripper.
        for block in scene.blocks.values():
            if block.position[2] > 1e-6 and block.color == scene.held:
                self._square(image, block.position[0], block.position[1], 0.0, size, SHADOW_RGB)
        self._disc(image, ee[0], ee[1], 0.0, PALM_RADIUS * 0.8, SHADOW_RGB)
        for block in sorted(scene.blocks.values(), key=lambda b: b.position[2]):
            x, y, z = block.position
            dark = tuple(int(c * 0.55) for c in COLORS[block.color])
            self._square(image, x, y, z, size, dark)  # sides, seen through the perspective
            self._square(image, x, y, z + size, size, COLORS[block.color])
        self._gripper(image, scene)
        return image

    def _square(self, image: np.ndarray, x: float, y: float, z: float, side: float, rgb: tuple) -> None:
        cam = self.camera
        u0, v0 = cam.project(x - side / 2, y + side / 2, z)
        u1, v1 = cam.project(x + side / 2, y - side / 2, z)
        cv2.rectangle(image, (round(u0), round(v0)), (round(u1), round(v1)), rgb, thickness=-1)

    def _disc(self, image: np.ndarray, x: float, y: float, z: float, radius: float, rgb: tuple) -> None:
        u, v = self.camera.project(x, y, z)
        cv2.circle(
            image, (round(u), round(v)), max(1, round(radius * self.camera.pixels_per_metre(z))), rgb, -1
        )

    def _gripper(self, image: np.ndarray, scene: TabletopScene) -> None:
        cam = self.camera
        x, y, z = scene.ee_position
        if scene.held is not None:
            span = scene.config.block_size + FINGER_WIDTH
        else:
            span = OPEN_SPAN if scene.gripper_open else CLOSED_SPAN
        # Fingers lie along the yaw axis on either side of the fingertip centre.
        cos_yaw, sin_yaw = math.cos(scene.ee_yaw), math.sin(scene.ee_yaw)
        for side in (-1.0, 1.0):
            cx = x + side * span / 2 * cos_yaw
            cy = y + side * span / 2 * sin_yaw
            corners = []
            for du, dv in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
                # Local frame: u across the fingers (along the yaw), v along the finger length.
                lx, ly = du * FINGER_WIDTH / 2, dv * FINGER_LENGTH / 2
                wx = cx + lx * cos_yaw - ly * sin_yaw
                wy = cy + lx * sin_yaw + ly * cos_yaw
                corners.append(cam.project(wx, wy, z + FINGER_LENGTH / 2))
            cv2.fillConvexPoly(image, np.round(np.array(corners)).astype(np.int32), FINGER_RGB)
        self._disc(image, x, y, z + PALM_OFFSET, PALM_RADIUS, GRIPPER_RGB)
        u0, v0 = cam.project(x, y, z + PALM_OFFSET)
        u1, v1 = cam.project(x + PALM_RADIUS * cos_yaw, y + PALM_RADIUS * sin_yaw, z + PALM_OFFSET)
        cv2.line(image, (round(u0), round(v0)), (round(u1), round(v1)), (230, 230, 230), 2)

    def world_to_pixel(self, x: float, y: float, z: float = 0.0) -> tuple[float, float]:
        """Returns the pixel of a world point (for drawing trajectories over a frame)."""
        return self.camera.project(x, y, z)
