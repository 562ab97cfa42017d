"""synthesised user scribbles: HED, thinned and randomly thresholded, masked and morphed per sample"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from annotate.base import Annotation
from annotate.canny import sample_rng
from annotate.hed import HEDAnnotator
from annotate.resize import DETECT_RESOLUTION

MORPH_OPS = ("none", "dilate", "erode")

# the four directions of the reference nms: a pixel survives if it is the max along any of them
_NMS_KERNELS = [
    np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8),
    np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.uint8),
    np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8),
    np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.uint8),
]


def nms(edge: np.ndarray, threshold: float, sigma: float) -> np.ndarray:
    """ControlNet 1.1's nms: (H, W) soft edges -> (H, W) {0, 255} ridges above `threshold` after a blur."""
    x = cv2.GaussianBlur(edge.astype(np.float32), (0, 0), sigma)
    ridge = np.zeros_like(x)
    for kernel in _NMS_KERNELS:
        np.putmask(ridge, cv2.dilate(x, kernel=kernel) == x, x)
    return np.where(ridge > threshold, 255, 0).astype(np.uint8)


def thicken(ridges: np.ndarray, sigma: float) -> np.ndarray:
    """1-px ridges -> pen-width strokes, as the reference scribble preprocessor does (blur, then > 4)."""
    blurred = cv2.GaussianBlur(ridges, (0, 0), sigma)
    return np.where(blurred > 4, 255, 0).astype(np.uint8)


def drop_strokes(strokes: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    """Erase round(fraction * n) of the n strokes (8-connected components), chosen at random.

    Returns the map, n and the number erased.
    """
    n_labels, labels = cv2.connectedComponents(strokes, connectivity=8)
    n_strokes = n_labels - 1  # label 0 is the background
    n_drop = round(fraction * n_strokes)
    if n_drop == 0:
        return strokes, n_strokes, 0
    dropped = rng.choice(np.arange(1, n_labels), size=n_drop, replace=False)
    return np.where(np.isin(labels, dropped), 0, strokes).astype(np.uint8), n_strokes, n_drop


def morph(strokes: np.ndarray, op: str, kernel: int) -> np.ndarray:
    """Dilate or erode with a `kernel` x `kernel` ellipse (op "none": unchanged)."""
    if op == "none":
        return strokes
    element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel, kernel))
    if op == "dilate":
        return cv2.dilate(strokes, element)
    if op == "erode":
        return cv2.erode(strokes, element)
    raise ValueError(f"unknown morphological op {op!r}; choose one of {', '.join(MORPH_OPS)}")


def draw_params(
    rng: np.random.Generator,
    threshold_range: tuple[int, int],
    max_drop: float,
    morph_kernels: tuple[int, ...],
) -> dict[str, Any]:
    """The per-sample random parameters, drawn before looking at the image so they depend on (seed, key) only.

    The fraction is rounded to what the json records, so a recorded sample can be rebuilt exactly.
    """
    return {
        "threshold": int(rng.integers(threshold_range[0], threshold_range[1], endpoint=True)),
        "drop_fraction": round(float(rng.uniform(0.0, max_drop)), 4),
        "morph_op": str(rng.choice(MORPH_OPS)),
        "morph_kernel": int(rng.choice(morph_kernels)),
    }


def scribble_map(
    edge: np.ndarray, params: dict[str, Any], rng: np.random.Generator, nms_sigma: float, stroke_sigma: float
) -> tuple[np.ndarray, dict[str, int]]:
    """(H, W) uint8 HED map -> (H, W) {0, 255} scribble, and the stroke counts it had and erased."""
    strokes = thicken(nms(edge, params["threshold"], nms_sigma), stroke_sigma)
    strokes, n_strokes, n_dropped = drop_strokes(strokes, params["drop_fraction"], rng)
    strokes = morph(strokes, params["morph_op"], params["morph_kernel"])
    return strokes, {"n_strokes": n_strokes, "n_dropped": n_dropped}


class ScribbleAnnotator:
    """The paper's synthesised scribbles: HED + NMS at a random threshold, random stroke masking and morphology.

    Every random parameter is drawn from an RNG seeded by (seed, key) and recorded in Annotation.params.
    """

    name = "scribble"
    channels = 1

    def __init__(
        self,
        seed: int = 0,
        weights: str | None = None,
        device: str | None = None,
        threshold_range: tuple[int, int] = (96, 160),
        max_drop: float = 0.5,
        morph_kernels: tuple[int, ...] = (3, 5),
        nms_sigma: float = 3.0,
        stroke_sigma: float = 3.0,
        fp16: bool = True,
        max_batch: int = 16,
        detect_resolution: int = DETECT_RESOLUTION,
    ):
        self.seed = seed
        self.threshold_range = tuple(threshold_range)
        self.max_drop = max_drop
        self.morph_kernels = tuple(morph_kernels)
        self.nms_sigma = nms_sigma
        self.stroke_sigma = stroke_sigma
        self.hed = HEDAnnotator(seed=seed, weights=weights, device=device, fp16=fp16, max_batch=max_batch,
                                detect_resolution=detect_resolution)

    def __call__(self, images: list[np.ndarray], keys: list[str]) -> list[Annotation]:
        if len(images) != len(keys):
            raise ValueError(f"{len(images)} images but {len(keys)} keys")
        out = []
        for edge, key in zip(self.hed.edge_maps(images), keys, strict=True):
            rng = sample_rng(self.seed, key)
            params = draw_params(rng, self.threshold_range, self.max_drop, self.morph_kernels)
            strokes, counts = scribble_map(edge, params, rng, self.nms_sigma, self.stroke_sigma)
            out.append(Annotation(strokes, params=params | counts | {"detect_resolution": self.hed.detect_resolution}))
        return out

    def describe(self) -> dict[str, Any]:
        return {
            **self.hed.describe(),
            "name": self.name,
            "threshold_range": list(self.threshold_range),
            "max_drop": self.max_drop,
            "morph_ops": list(MORPH_OPS),
            "morph_kernels": list(self.morph_kernels),
            "nms_sigma": self.nms_sigma,
            "stroke_sigma": self.stroke_sigma,
            "opencv": cv2.__version__,
        }
