"""the ControlNet model (paper Sec. 3): a locked Stable Diffusion, its trainable copy, and the Eq. 10 loss"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class StableDiffusion:
    """The locked parts: tokenizer, CLIP text encoder, VAE, UNet, and the training noise scheduler."""

    tokenizer: Any
    text_encoder: nn.Module
    vae: nn.Module
    unet: nn.Module
    noise_scheduler: Any


def load_stable_diffusion(base_model: str) -> StableDiffusion:
    """Load SD from a hub id or a diffusers-layout folder (local, or copied from any fsspec URL first)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = local_model_folder(base_model)
    return StableDiffusion(
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder"),
        vae=AutoencoderKL.from_pretrained(source, subfolder="vae"),
        unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet"),
        noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler"),
    )


def local_model_folder(base_model: str) -> str:
    """Hub ids and local folders pass through; other URLs (s3://...) are copied to a local cache once.

    The debug preset's tiny SD is rebuilt where it is missing (on another node of a cluster): it is
    deterministic, so every node gets the same weights.
    """
    if "://" not in base_model or base_model.startswith("file://"):
        local = base_model.removeprefix("file://")
        if Path(local).name == "tiny-sd" and not (Path(local) / "model_index.json").exists():
            from train.tiny_sd import build_tiny_sd

            build_tiny_sd(Path(local))
        return local
    fs, path = fsspec.core.url_to_fs(base_model)
    target = Path(tempfile.gettempdir()) / "controlnet-base" / hashlib.sha256(base_model.encode()).hexdigest()[:16]
    if not (target / "model_index.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.partial{os.getpid()}")
        fs.get(path.rstrip("/") + "/", str(partial), recursive=True)
        try:
            partial.rename(target)
        except OSError:  # another rank on this node finished the same copy first
            shutil.rmtree(partial, ignore_errors=True)
    return str(target)


class ControlledUNet(nn.Module):
    """The locked UNet with its ControlNet: what DDP wraps, so an unlocked SD decoder syncs too.

    `middle_only` is the paper's small-scale mode: the ControlNet feeds the middle block only. Zeros, not
    None, go to the skip connections: diffusers drops the middle residual too when the skip list is None.
    """

    def __init__(self, unet: nn.Module, controlnet: nn.Module, middle_only: bool = False):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        self.middle_only = middle_only

    def forward(self, noisy_latents, timesteps, text_embeddings, condition) -> torch.Tensor:
        down_residuals, mid_residual = self.controlnet(
            noisy_latents, timesteps, encoder_hidden_states=text_embeddings, controlnet_cond=condition,
            return_dict=False,
        )
        if self.middle_only:
            down_residuals = [torch.zeros_like(r) for r in down_residuals]
        return self.unet(
            noisy_latents, timesteps, encoder_hidden_states=text_embeddings,
            down_block_additional_residuals=down_residuals, mid_block_additional_residual=mid_residual,
        ).sample


def build_controlnet(unet: nn.Module, pretrained: str | Path | None = None) -> nn.Module:
    """The trainable copy: encoder + middle block copied from the UNet, zero convolutions initialised to 0."""
    from diffusers import ControlNetModel

    if pretrained is not None:
        return ControlNetModel.from_pretrained(pretrained)
    return ControlNetModel.from_unet(unet)


def zero_convolutions(controlnet: nn.Module) -> list[nn.Module]:
    """The 1x1 convs joining ControlNet to SD (Eqs. 3-8), one per skip connection and one for the middle."""
    return [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]


def decoder_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The SD 'decoder' the paper unlocks for large-scale training: the UNet's up blocks and output head."""
    return [p for m in (unet.up_blocks, unet.conv_norm_out, unet.conv_out) for p in m.parameters()]


def freeze_for_training(sd: StableDiffusion, controlnet: nn.Module, middle_only: bool) -> None:
    """SD locked; the ControlNet trains, except the skip zero-convs in middle-only mode (they feed nothing)."""
    for module in (sd.text_encoder, sd.vae, sd.unet):
        module.requires_grad_(False)
        module.eval()
    controlnet.requires_grad_(True)
    controlnet.train()
    if middle_only:
        controlnet.controlnet_down_blocks.requires_grad_(False)


def unlock_decoder(unet: nn.Module) -> list[nn.Parameter]:
    params = decoder_parameters(unet)
    for p in params:
        p.requires_grad_(True)
    unet.up_blocks.train()
    return params


def encode_prompts(sd: StableDiffusion, captions: list[str], device: torch.device) -> torch.Tensor:
    """Captions -> CLIP hidden states (B, 77, D); "" is the empty prompt of prompt dropout."""
    ids = sd.tokenizer(
        captions, padding="max_length", max_length=sd.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    with torch.no_grad():
        return sd.text_encoder(ids)[0]


def diffusion_loss(
    sd: StableDiffusion,
    model: nn.Module,
    pixel_values: torch.Tensor,
    condition: torch.Tensor,
    text_embeddings: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Eq. 10: || eps - eps_theta(z_t, t, c_t, c_f) ||^2 (v-prediction when the scheduler says so).

    pixel_values: (B, 3, H, W) in [-1, 1]; condition: (B, 3, H, W) in [0, 1].
    """
    with torch.no_grad():
        latents = sd.vae.encode(pixel_values.to(sd.vae.dtype)).latent_dist.sample(generator)
        latents = latents * sd.vae.config.scaling_factor  # (B, 4, H/8, W/8)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    steps = sd.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=latents.device)
    noisy_latents = sd.noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = model(noisy_latents, timesteps, text_embeddings, condition)
    if sd.noise_scheduler.config.prediction_type == "v_prediction":
        target = sd.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(prediction.float(), target.float())
