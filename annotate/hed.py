"""HED soft edges from the ControlNet 1.1 network (ControlNetHED.pth, Apache-2.0), batched"""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from annotate.base import Annotation
from annotate.device import inference, pick_device
from annotate.resize import DETECT_RESOLUTION, to_detection, to_output
from annotate.weights import check_keys, load_state_dict_file, one_line, require_finite, resolve_weight, sha256_file

WEIGHT_FILE = "ControlNetHED.pth"
HUB_REPO = "lllyasviel/Annotators"


class DoubleConvBlock(nn.Module):
    """An optional 2x2 max-pool, `layer_number` 3x3 conv+ReLU, and a 1x1 projection to one edge logit."""

    def __init__(self, input_channel: int, output_channel: int, layer_number: int):
        super().__init__()
        # state-dict keys convs.<i>.weight/bias and projection.weight/bias, as published
        self.convs = nn.Sequential(
            *(
                nn.Conv2d(input_channel if i == 0 else output_channel, output_channel, 3, padding=1)
                for i in range(layer_number)
            )
        )
        self.projection = nn.Conv2d(output_channel, 1, 1)

    def forward(self, x: torch.Tensor, down_sampling: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if down_sampling:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class ControlNetHED_Apache2(nn.Module):
    """lllyasviel's HED network of ControlNet 1.1: RGB 0..255 in, five edge logits (full to 1/16 size) out."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))  # learned per-channel mean, subtracted from RGB
        self.block1 = DoubleConvBlock(3, 64, 2)
        self.block2 = DoubleConvBlock(64, 128, 2)
        self.block3 = DoubleConvBlock(128, 256, 3)
        self.block4 = DoubleConvBlock(256, 512, 3)
        self.block5 = DoubleConvBlock(512, 512, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, p1 = self.block1(x - self.norm)  # p1: (B, 1, H, W)
        h, p2 = self.block2(h, down_sampling=True)  # p2: (B, 1, H/2, W/2)
        h, p3 = self.block3(h, down_sampling=True)
        h, p4 = self.block4(h, down_sampling=True)
        _, p5 = self.block5(h, down_sampling=True)  # p5: (B, 1, H/16, W/16)
        return p1, p2, p3, p4, p5


def load_hed(path: str | os.PathLike) -> ControlNetHED_Apache2:
    """The network with the weights at `path` (strict: a missing or extra key is an error naming the file)."""
    state = load_state_dict_file(path, WEIGHT_FILE)
    model = ControlNetHED_Apache2()
    check_keys(path, f"the {WEIGHT_FILE} state dict", set(model.state_dict()), set(state))
    try:
        model.load_state_dict(state, strict=True)  # casts the published fp16 tensors into fp32 parameters
    except RuntimeError as err:  # the keys are right: a shape is not
        raise ValueError(f"{path} does not hold the {WEIGHT_FILE} state dict: {one_line(err)}") from None
    require_finite(model, path, f"the {WEIGHT_FILE} state dict")
    return model.eval().requires_grad_(False)


def fuse_logits(projections: tuple[torch.Tensor, ...], size: tuple[int, int]) -> torch.Tensor:
    """Five (B, 1, h_i, w_i) edge logits -> (B, H, W) mean logit, each resized bilinearly to `size` first.

    Bilinear with align_corners=False samples where cv2.resize(INTER_LINEAR) does, as the reference does it.
    """
    resized = [F.interpolate(p.float(), size=size, mode="bilinear", align_corners=False) for p in projections]
    return torch.cat(resized, dim=1).mean(dim=1)


def safe_step(edge: np.ndarray, step: int = 2) -> np.ndarray:
    """Quantise soft edges in [0, 1] to `step` levels (the reference's "safe" HED, fewer hidden details)."""
    return (edge.astype(np.float32) * float(step + 1)).astype(np.int32).astype(np.float32) / float(step)


def logit_to_map(logit: np.ndarray, safe: bool = False) -> np.ndarray:
    """(H, W) mean logit -> (H, W) uint8: sigmoid in float64, x255, truncated, as the reference does."""
    with np.errstate(over="ignore"):  # exp overflow -> inf -> edge 0, which is the right limit
        edge = 1.0 / (1.0 + np.exp(-logit.astype(np.float64)))
    if safe:
        edge = safe_step(edge)
    return (edge * 255.0).clip(0, 255).astype(np.uint8)


def same_size_batches(images: list[np.ndarray], max_batch: int) -> Iterator[list[int]]:
    """Indices of `images` grouped by (H, W), at most `max_batch` each: one forward per group."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape, []).append(i)
    for indices in groups.values():
        for start in range(0, len(indices), max_batch):
            yield indices[start : start + max_batch]


class HEDAnnotator:
    """HED soft edge maps, (H, W) uint8, with the ControlNet 1.1 network; deterministic (no params)."""

    name = "hed"
    channels = 1

    def __init__(
        self,
        seed: int = 0,
        weights: str | None = None,
        device: str | None = None,
        safe: bool = False,
        fp16: bool = True,
        max_batch: int = 16,
        detect_resolution: int = DETECT_RESOLUTION,
    ):
        self.seed = seed  # unused: HED draws nothing; accepted so every task builds alike
        self.detect_resolution = detect_resolution  # the shorter side the network sees (controlnet_aux's 512)
        self.device = pick_device(device)
        self.safe = safe
        self.fp16 = fp16 and self.device.type == "cuda"  # autocast only on GPU; CPU stays fp32
        self.max_batch = max_batch
        self.weight_path = resolve_weight(WEIGHT_FILE, source=weights, hub_repo=HUB_REPO)
        self.model = load_hed(self.weight_path).to(self.device)  # first: a folder of that name is its one line
        self.weight_sha256 = sha256_file(self.weight_path)

    @torch.inference_mode()
    def logits(self, images: list[np.ndarray]) -> torch.Tensor:
        """Same-size RGB uint8 images -> (B, H, W) fused edge logits on CPU, float32, in one forward."""
        batch = torch.from_numpy(np.stack(images)).to(self.device)  # (B, H, W, 3) uint8: 4x less to copy
        x = batch.permute(0, 3, 1, 2).float()  # (B, 3, H, W) RGB in 0..255, as the network was trained
        with inference(self.device, self.fp16):
            projections = self.model(x)
            return fuse_logits(projections, size=x.shape[-2:]).float().cpu()

    def edge_maps(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """RGB uint8 (H, W, 3) images of any sizes -> (H, W) uint8 HED maps, in order: made at the detection size
        (annotate.resize), then resized to the image's, as ControlNet 1.1's annotator does."""
        for image in images:
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"HED takes RGB uint8 (H, W, 3) images, got {image.dtype} {image.shape}")
        detected = [to_detection(np.ascontiguousarray(image), self.detect_resolution) for image in images]
        maps: dict[int, np.ndarray] = {}
        for indices in same_size_batches(detected, self.max_batch):
            logits = self.logits([detected[i] for i in indices]).numpy()
            maps.update((i, to_output(logit_to_map(logit, self.safe), images[i].shape[:2]))
                        for i, logit in zip(indices, logits, strict=True))
        return [maps[i] for i in range(len(images))]

    def __call__(self, images: list[np.ndarray], keys: list[str]) -> list[Annotation]:
        if len(images) != len(keys):
            raise ValueError(f"{len(images)} images but {len(keys)} keys")
        params = {"detect_resolution": self.detect_resolution}
        return [Annotation(edge, params=dict(params)) for edge in self.edge_maps(images)]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seed": self.seed,
            "safe": self.safe,
            "precision": "fp16-autocast" if self.fp16 else "fp32",
            "device": self.device.type,
            "max_batch": self.max_batch,
            "detect_resolution": self.detect_resolution,
            "weights": {WEIGHT_FILE: self.weight_sha256},
            "torch": torch.__version__,
        }
