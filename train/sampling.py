"""sampling: DDIM with classifier-free guidance for validation, the control on the conditional branch or on both"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from train.model import BaseModel, ControlledUNet, encode_prompts, from_model_space

ControlBranches = Literal["cond", "both"]


def initial_noise(shape: tuple[int, ...], seeds: list[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(N, C, h, w) Gaussian noise, one generator per sample (seed i for sample i), drawn one sample at a time as
    diffusers' pipelines draw it for a list of generators: a sample's noise does not depend on the batch."""
    return torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator(device).manual_seed(s), device=device,
                                  dtype=dtype) for s in seeds])


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
    base: BaseModel, controlnet: nn.Module, conditions: torch.Tensor, prompts: list[str], *, steps: int = 20,
    guidance_scale: float = 9.0, seed: int = 0, branches: ControlBranches = "cond", middle_only: bool = False,
    device: torch.device, amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Images for `conditions` (N, 3, R, R) in [0, 1] and `prompts`: (N, R, R, 3) float in [0, 1].

    DDIM (eta 0) from the base's training schedule, fixed seeds (seed + i for sample i), latent or pixel space.
    With branches="both" it reproduces StableDiffusionControlNetPipeline on the same modules.
    """
    from diffusers import DDIMScheduler

    was_training = controlnet.training
    controlnet.eval()
    scheduler = DDIMScheduler.from_config(base.noise_scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    model = ControlledUNet(base.unet, controlnet, middle_only=middle_only)
    n, side = len(prompts), conditions.shape[-1] // base.downsampling
    shape = (n, base.unet.config.in_channels, side, side)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        text = encode_prompts(base, prompts, device)
        null = encode_prompts(base, [""] * n, device) if guidance_scale != 1.0 else None
        condition = conditions.to(device)
        x = initial_noise(shape, [seed + i for i in range(n)], device, text.dtype) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            eps = guided_noise(model, model_input, t.expand(n), text, null, condition, guidance_scale, branches)
            x = scheduler.step(eps, t, x).prev_sample
        images = from_model_space(base, x.to(base.vae.dtype) if base.vae is not None else x)
    controlnet.train(was_training)
    return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
