"""the annotator contract: a batch of RGB images in, one Annotation per image out"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class Annotation:
    """What an annotator says about one image.

    `condition` is the condition map in pixel space, the same height and width as the input:
    (H, W) uint8 for single-channel tasks (canny, hed, midas, scribble), (H, W, 3) uint8 for openpose.
    `keep=False` means a rule filtered the sample out; `reason` says which rule, for the parquet row.
    `params` are the per-sample parameters used (e.g. sampled thresholds), recorded in the sample's json.
    """

    condition: np.ndarray | None
    keep: bool = True
    reason: str = ""
    params: dict[str, Any] = field(default_factory=dict)


class Annotator(Protocol):
    """An image -> condition-map model. Built once per worker, called on batches."""

    name: str  # the task name, used as the condition member's extension: <key>.<name>.png
    channels: int  # 1 or 3

    def __call__(self, images: list[np.ndarray], keys: list[str]) -> list[Annotation]:
        """images: RGB uint8 arrays (H, W, 3), already resized; keys seed per-sample randomness."""
        ...

    def describe(self) -> dict[str, Any]:
        """Name, configuration and weight sha256s, for the dataset manifest."""
        ...


class Captioner(Protocol):
    """An image -> caption model (BLIP). Built once per worker, called on batches."""

    name: str

    def __call__(self, images: list[np.ndarray]) -> list[str]: ...

    def describe(self) -> dict[str, Any]: ...
