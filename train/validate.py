"""validation: a fixed held-out set, sampled every N steps; condition-fidelity curves kept across resumes"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

DEFAULT_PROMPT = "a professional, detailed, high-quality image"  # the paper's default prompt
PROMPT_MODES = ("caption", "empty", "default")


@dataclass
class ValidationSet:
    """Fixed conditions and prompts: distinct held-out samples, chosen once by key."""

    conditions: torch.Tensor  # (N, 3, R, R) in [0, 1]
    targets: torch.Tensor  # (N, 3, R, R) in [-1, 1], for the grid
    prompts: list[str]
    keys: list[str]

    @classmethod
    def of(cls, samples: list[dict[str, Any]]) -> ValidationSet:
        if not samples:
            raise ValueError("no usable validation sample in the held-out data")
        return cls(torch.stack([s["conditioning_pixel_values"] for s in samples]),
                   torch.stack([s["pixel_values"] for s in samples]), [s["caption"] for s in samples],
                   [s["key"] for s in samples])


def curve_name(mode: str, scale: float, metric: str) -> str:
    """The one naming scheme of fidelity metrics and curves: fidelity/<prompt mode>/cfg<scale>/<metric>."""
    return f"fidelity/{mode}/cfg{scale:g}/{metric}"


def primary_curve(task: str, modes: tuple[str, ...] | list[str], scales: tuple[float, ...] | list[float]) -> str:
    """A run's headline curve: the task's primary metric at the first prompt mode and the first CFG scale."""
    from train.fidelity import PRIMARY

    return curve_name(modes[0], scales[0], PRIMARY[task])


def prompts_for(mode: str, captions: list[str]) -> list[str]:
    """The paper's prompt modes: the samples' own captions, no prompt, or the default prompt."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"unknown prompt mode {mode!r}; choose from {', '.join(PROMPT_MODES)}")
    if mode == "caption":
        return captions
    return ["" if mode == "empty" else DEFAULT_PROMPT] * len(captions)


def to_uint8(images: torch.Tensor | np.ndarray, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """(N, 3, H, W) tensor or (N, H, W, 3) array -> (N, H, W, 3) uint8."""
    array = images.detach().float().cpu().permute(0, 2, 3, 1).numpy() if torch.is_tensor(images) else images
    low, high = value_range
    return np.clip((array - low) / (high - low) * 255 + 0.5, 0, 255).astype(np.uint8)


def grid(columns: list[np.ndarray]) -> np.ndarray:
    """Columns of (N, H, W, 3) uint8 -> one (N*H, len(columns)*W, 3) image: a row per sample."""
    return np.concatenate([np.concatenate(list(column), axis=0) for column in columns], axis=1)


def validation_grid(vset: ValidationSet, generated: np.ndarray) -> np.ndarray:
    """condition | generated | target, one row per validation sample."""
    return grid([to_uint8(vset.conditions), to_uint8(generated), to_uint8(vset.targets, (-1.0, 1.0))])


def condition_maps(conditions: torch.Tensor, task: str) -> list[np.ndarray]:
    """(N, 3, R, R) in [0, 1] -> uint8 maps as the dataset stores them (1 channel, RGB for openpose)."""
    images = to_uint8(conditions)
    return list(images) if task == "openpose" else [image[:, :, 0] for image in images]


def curve_summary(points: list[tuple[int, float]]) -> dict[str, Any]:
    """One curve's points with its detected sudden-convergence step (or not converged) and mAUCC."""
    from train.convergence import detect_sudden_convergence, mauc

    steps, scores = [s for s, _ in points], [v for _, v in points]
    return {**detect_sudden_convergence(steps, scores), "mauc": mauc(steps, scores) if points else None,
            "steps": steps, "scores": scores}


@dataclass
class FidelityTracker:
    """Every validation: sample the fixed conditions per (prompt mode, CFG scale), re-annotate the generated
    images with the dataset's own annotator settings, score them against the input maps, and extend the curves.

    The curves are part of the training state: a tracker made from a checkpoint's state continues them, so a
    resumed run ends with the same curve, step and mAUCC as an uninterrupted one.
    """

    task: str
    annotator: Any
    modes: tuple[str, ...] = PROMPT_MODES
    scales: tuple[float, ...] = (9.0, 1.0)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def primary(self) -> str:
        return primary_curve(self.task, self.modes, self.scales)

    @classmethod
    def restore(cls, task: str, annotator: Any, modes, scales, state: dict[str, Any]) -> FidelityTracker:
        """From TrainState.fidelity (a summary() of an earlier segment of the same run)."""
        curves = {name: list(zip(c["steps"], c["scores"], strict=True)) for name, c in state.get("curves", {}).items()}
        return cls(task, annotator, tuple(modes), tuple(scales), curves)

    def has(self, step: int) -> bool:
        return any(s == step for s, _ in self.curves.get(self.primary, []))

    def latest(self) -> tuple[int, float] | None:
        points = self.curves.get(self.primary)
        return points[-1] if points else None

    def evaluate(self, trainer, vset: ValidationSet, step: int) -> tuple[dict[str, float], np.ndarray]:
        """Metrics of this step (fidelity/<mode>/cfg<s>/<metric>) and the grid of the first mode at the first scale."""
        from train.fidelity import PRIMARY, score_images
        from train.sampling import sample

        cfg = trainer.cfg
        inputs = condition_maps(vset.conditions, self.task)
        params_input = None
        if self.task == "openpose":  # keypoints of the input skeletons: re-detected on the target images
            params_input = [a.params for a in self.annotator(list(to_uint8(vset.targets, (-1.0, 1.0))), vset.keys)]
        metrics, shown = {}, None
        for scale in self.scales:
            for mode in self.modes:
                images = sample(trainer.base, trainer.controlnet, vset.conditions, prompts_for(mode, vset.prompts),
                                steps=cfg.validation_steps, sampler=cfg.validation_sampler, guidance_scale=scale,
                                seed=cfg.seed, branches=cfg.control_branches, middle_only=cfg.mode == "middle",
                                device=trainer.device, amp_dtype=trainer.amp_dtype)
                scores, _ = score_images(self.task, self.annotator, list(to_uint8(images)), inputs, vset.keys,
                                         params_input)
                metrics |= {curve_name(mode, scale, name): value for name, value in scores.items()}
                if shown is None:
                    shown = images
        for name, value in metrics.items():
            if name.endswith("/" + PRIMARY[self.task]):
                points = [p for p in self.curves.get(name, []) if p[0] < step]  # a re-done step replaces its point
                self.curves[name] = [*points, (step, value)]
        return metrics, validation_grid(vset, shown)

    def summary(self) -> dict[str, Any]:
        """{primary: name, curves: {name: detection + mAUCC + points}}: what the state and results.json keep."""
        return {"primary": self.primary, "curves": {n: curve_summary(p) for n, p in sorted(self.curves.items())}}
