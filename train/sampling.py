"""sampling: DDIM or Euler ancestral with classifier-free guidance for validation, the control on the conditional
branch or on both"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from train.model import BaseModel, ControlledUNet, encode_prompts, from_model_space

ControlBranches = Literal["cond", "both"]
Sampler = Literal["ddim", "euler_a"]


def sample_generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    """One generator per sample, as diffusers' pipelines take them: a sample's noise does not depend on the batch."""
    return [torch.Generator(device).manual_seed(s) for s in seeds]


def initial_noise(shape: tuple[int, ...], generators: list[torch.Generator], device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """(N, C, h, w) Gaussian noise drawn one sample at a time from its own generator, as diffusers' randn_tensor
    draws it for a list of generators."""
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generators])


def validation_scheduler(noise_scheduler, sampler: Sampler):
    """The sampler, configured from the base's training noise schedule."""
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

    kind = {"ddim": DDIMScheduler, "euler_a": EulerAncestralDiscreteScheduler}[sampler]
    return kind.from_config(noise_scheduler.config)


def guided_noise(model: ControlledUNet, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, null: torch.Tensor,
                 condition: torch.Tensor, scale: float, branches: ControlBranches) -> torch.Tensor:
    """eps = eps_u + s * (eps_c - eps_u). `cond`: the control feeds the conditional branch only, so eps_u is the
    locked base on the empty prompt (small ControlNets follow the condition under guidance only so); `both`: the
    control feeds both branches, as diffusers' StableDiffusionControlNetPipeline does. Scale 1 is eps_c alone."""
    if scale == 1.0:
        return model(x, t, text, condition)
    if branches == "both":
        eps_u, eps_c = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, text]),
                             torch.cat([condition, condition])).chunk(2)
    else:
        eps_u = ControlledUNet(model.unet, None)(x, t, null)
        eps_c = model(x, t, text, condition)
    return eps_u + scale * (eps_c - eps_u)


@torch.no_grad()
def sample(
    base: BaseModel, controlnet: nn.Module | None, conditions: torch.Tensor, prompts: list[str], *, steps: int = 20,
    guidance_scale: float = 9.0, seed: int = 0, branches: ControlBranches = "cond", middle_only: bool = False,
    sampler: Sampler = "ddim", device: torch.device, amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Images for `conditions` (N, 3, R, R) in [0, 1] and `prompts`: (N, R, R, 3) float in [0, 1].

    DDIM (eta 0) or Euler ancestral from the base's training schedule, fixed seeds (sample i draws its initial
    and per-step noise from generator seed + i), latent or pixel space. With branches="both" it reproduces
    StableDiffusionControlNetPipeline with the same scheduler on the same modules. Without a ControlNet it samples
    the base alone (`conditions` then only give the shape).
    """
    was_training = controlnet is not None and controlnet.training
    if controlnet is not None:
        controlnet.eval()
    scheduler = validation_scheduler(base.noise_scheduler, sampler)
    scheduler.set_timesteps(steps, device=device)
    model = ControlledUNet(base.unet, controlnet, middle_only=middle_only)
    n, side = len(prompts), conditions.shape[-1] // base.downsampling
    shape = (n, base.unet.config.in_channels, side, side)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        text = encode_prompts(base, prompts, device)
        null = encode_prompts(base, [""] * n, device) if guidance_scale != 1.0 else None
        condition = conditions.to(device)
        generators = sample_generators([seed + i for i in range(n)], device)
        x = initial_noise(shape, generators, device, text.dtype) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            eps = guided_noise(model, model_input, t.expand(n), text, null, condition, guidance_scale, branches)
            x = scheduler.step(eps, t, x, generator=generators).prev_sample
        images = from_model_space(base, x.to(base.vae.dtype) if base.vae is not None else x)
    if controlnet is not None:
        controlnet.train(was_training)
    return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
