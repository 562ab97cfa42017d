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


def describe(vset: ValidationSet) -> dict[str, Any]:
    return {"keys": vset.keys, "prompts": vset.prompts}
