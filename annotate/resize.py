"""ControlNet 1.1's resizing around an annotator's network, as controlnet_aux (`util.resize_image`) does it: the
image is scaled so its shorter side is the detect resolution, both sides rounded to multiples of 64; the uint8 map
is resized back to the image's size bilinearly. Users make their inference conditions this way."""
from __future__ import annotations

import cv2
import numpy as np

DETECT_RESOLUTION = 512  # controlnet_aux's default for HED, MiDaS and OpenPose


def detection_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(h, w) the network sees: the shorter side scaled to `resolution`, each side rounded to a multiple of 64."""
    k = float(resolution) / min(height, width)
    return int(np.round(float(height) * k / 64.0)) * 64, int(np.round(float(width) * k / 64.0)) * 64


def to_detection(image: np.ndarray, resolution: int) -> np.ndarray:
    """An image at its detection size: Lanczos when enlarging, area averaging when shrinking."""
    height, width = image.shape[:2]
    h, w = detection_size(height, width, resolution)
    enlarging = float(resolution) / min(height, width) > 1
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LANCZOS4 if enlarging else cv2.INTER_AREA)


def to_output(condition: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A uint8 map made at detection size, resized bilinearly to `size` = (H, W) (a no-op at the same size)."""
    if condition.shape[:2] == tuple(size):
        return condition
    return cv2.resize(condition, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
