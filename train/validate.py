"""validation: sample fixed conditions with the current ControlNet (DDIM, CFG 9.0 as in the paper) and grid them"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class ValidationSet:
    """Fixed conditions and prompts, drawn once at the start of a run."""

    conditions: torch.Tensor  # (N, 3, R, R) in [0, 1]
    targets: torch.Tensor  # (N, 3, R, R) in [-1, 1], for the grid
    prompts: list[str]
    keys: list[str]


def take_validation_set(batches, count: int) -> ValidationSet:
    """The first `count` samples of a stream (seeded, so every run of the same data sees the same ones)."""
    conditions, targets, prompts, keys = [], [], [], []
    for batch in batches:
        conditions.append(batch["conditioning_pixel_values"])
        targets.append(batch["pixel_values"])
        prompts += list(batch["caption"])
        keys += list(batch["key"])
        if len(prompts) >= count:
            break
    return ValidationSet(torch.cat(conditions)[:count], torch.cat(targets)[:count], prompts[:count], keys[:count])


def sampling_pipeline(sd, controlnet: torch.nn.Module):
    """A StableDiffusionControlNetPipeline sharing the training modules (no copies), with a DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

    pipeline = StableDiffusionControlNetPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet, controlnet=controlnet,
        scheduler=DDIMScheduler.from_config(sd.noise_scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def generate(
    sd, controlnet: torch.nn.Module, conditions: torch.Tensor, prompts: list[str], *, steps: int = 20,
    guidance_scale: float = 9.0, seed: int = 0, device: torch.device, amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """(N, R, R, 3) float images in [0, 1], sampled with fixed seeds (one generator per image)."""
    was_training = controlnet.training
    controlnet.eval()
    pipeline = sampling_pipeline(sd, controlnet)
    generators = [torch.Generator(device).manual_seed(seed + i) for i in range(len(prompts))]
    size = conditions.shape[-1]
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        images = pipeline(
            prompt=prompts, image=conditions.to(device), num_inference_steps=steps, guidance_scale=guidance_scale,
            generator=generators, output_type="np", height=size, width=size,
        ).images
    controlnet.train(was_training)
    return images


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



DEFAULT_PROMPT = "a professional, detailed, high-quality image"  # the paper's default prompt
PROMPT_MODES = ("caption", "empty", "default")


def prompts_for(mode: str, captions: list[str]) -> list[str]:
    """The paper's prompt modes: the samples' own captions, no prompt, or the default prompt."""
    if mode == "caption":
        return captions
    return ["" if mode == "empty" else DEFAULT_PROMPT] * len(captions)


def condition_maps(conditions: torch.Tensor, task: str) -> list[np.ndarray]:
    """(N, 3, R, R) in [0, 1] -> uint8 maps as the dataset stores them (1 channel, RGB for openpose)."""
    images = to_uint8(conditions)
    return list(images) if task == "openpose" else [image[:, :, 0] for image in images]


@dataclass
class FidelityTracker:
    """Every validation: sample the fixed conditions per (prompt mode, CFG scale), re-annotate the generated
    images with the task's annotator, score agreement with the input maps, and keep the curves."""

    task: str
    annotator: Any
    modes: tuple[str, ...] = PROMPT_MODES
    scales: tuple[float, ...] = (9.0, 1.0)
    curves: dict[str, list[tuple[int, float]]] | None = None

    def evaluate(self, trainer, vset: ValidationSet, step: int) -> tuple[dict[str, float], np.ndarray]:
        from train.fidelity import PRIMARY, score_images

        cfg = trainer.cfg
        inputs = condition_maps(vset.conditions, self.task)
        params_input = None
        if self.task == "openpose":  # keypoints of the input skeletons: re-detected on the target images
            params_input = [a.params for a in self.annotator(list(to_uint8(vset.targets, (-1.0, 1.0))), vset.keys)]
        metrics, shown = {}, None
        for scale in self.scales:
            for mode in self.modes:
                images = generate(trainer.sd, trainer.controlnet, vset.conditions, prompts_for(mode, vset.prompts),
                                  steps=cfg.validation_steps, guidance_scale=scale, seed=cfg.seed,
                                  device=trainer.device, amp_dtype=trainer.amp_dtype)
                scores, _ = score_images(self.task, self.annotator, list(to_uint8(images)), inputs, vset.keys,
                                         params_input)
                for name, value in scores.items():
                    metrics[f"fidelity/{mode}/cfg{scale:g}/{name}"] = value
                if shown is None:  # the grid shows the first mode at the first (the paper's) scale
                    shown = images
        self.curves = self.curves or {}
        for name, value in metrics.items():
            if name.endswith("/" + PRIMARY[self.task]):
                self.curves.setdefault(name, []).append((step, value))
        return metrics, validation_grid(vset, shown)

    def summary(self) -> dict[str, Any]:
        """Per curve: the detected sudden-convergence step (or not converged) and mAUCC."""
        from train.convergence import detect_sudden_convergence, mauc

        out = {}
        for name, points in (self.curves or {}).items():
            steps, scores = [s for s, _ in points], [v for _, v in points]
            detection = detect_sudden_convergence(steps, scores) if len(points) >= 4 else {
                "converged": False, "step": None, "reason": "fewer than 4 evaluations"}
            out[name] = {**detection, "mauc": mauc(steps, scores) if len(points) >= 2 else None,
                         "steps": steps, "scores": scores}
        return out
