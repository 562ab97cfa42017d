"""Canny edges with per-sample random thresholds, as the paper trains its Canny model"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from annotate.base import Annotation


def sample_rng(seed: int, key: str) -> np.random.Generator:
    """An RNG that depends only on (run seed, sample key): a re-run draws the same numbers."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def draw_thresholds(
    rng: np.random.Generator, low_range: tuple[int, int], high_gap: tuple[int, int]
) -> tuple[int, int]:
    """low ~ U[low_range], high ~ U[low + high_gap[0], low + high_gap[1]] (integers, both ends included)."""
    low = int(rng.integers(low_range[0], low_range[1], endpoint=True))
    high = int(rng.integers(low + high_gap[0], low + high_gap[1], endpoint=True))
    return low, high


def canny_map(image: np.ndarray, low: int, high: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8 edges in {0, 255}.

    OpenCV's Canny on a 3-channel image takes the strongest gradient over the channels, which keeps
    edges between colours of equal brightness; the reference annotator calls it the same way.
    """
    return cv2.Canny(np.ascontiguousarray(image), low, high)


@dataclass
class CannyAnnotator:
    """Canny with thresholds drawn per sample from an RNG seeded by (seed, key)."""

    seed: int = 0
    weights: str | None = None  # unused: Canny has no weights; accepted so every task builds alike
    device: str | None = None  # OpenCV on CPU either way
    low_range: tuple[int, int] = (50, 150)
    high_gap: tuple[int, int] = (50, 150)
    name: str = "canny"
    channels: int = 1

    def __call__(self, images: list[np.ndarray], keys: list[str]) -> list[Annotation]:
        out = []
        for image, key in zip(images, keys, strict=True):
            low, high = draw_thresholds(sample_rng(self.seed, key), self.low_range, self.high_gap)
            out.append(Annotation(canny_map(image, low, high), params={"low": low, "high": high}))
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seed": self.seed,
            "low_range": list(self.low_range),
            "high_gap": list(self.high_gap),
            "opencv": cv2.__version__,
        }
