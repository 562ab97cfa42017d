"""a base model's VAE encoding the stored target images once, in the dataset job, so the trainer need not encode
them at every step: each image's latent distribution (mean and std), exact because the job fixes the crop"""
from __future__ import annotations

import hashlib
import io
import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from annotate.device import pick_device
from annotate.weights import (
    MissingWeightsError,
    diffusers_loading,
    fetch_folder,
    load_complete_model,
    offline_hub_folder,
    one_line,
    pickle_only,
    weights_variant,
)

LATENT_DTYPE = np.float16  # mean and std: finer than the bf16 the trainer's autocast encodes in on GPUs


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """sha256 of the VAE's config and weights: the dataset job records it, the trainer compares its base's VAE
    with it (a folder name says nothing about the weights in it). The config's bookkeeping entries are left out
    (`_name_or_path`, the folder it was loaded from; `_diffusers_version`): the same VAE copied to another folder
    or node, or cached from an s3:// base, is the same VAE."""
    return _fingerprint({k: v for k, v in vae.config.items() if not k.startswith("_")}, vae)


def made_the_latents(vae: torch.nn.Module, record: dict[str, Any]) -> bool:
    """Whether a dataset's record of its stored latents (the manifest's "latents") names this VAE: by
    vae_fingerprint, or, in datasets made before 2026-12-01, whose fingerprint hashed the whole config, by that with
    the folder the dataset job loaded it from (the record's base_model): those were refused wherever the base had
    moved."""
    recorded, folder = record.get("vae_sha256"), record.get("base_model")
    if recorded == vae_fingerprint(vae):
        return True
    return bool(folder) and recorded == _fingerprint({**vae.config, "_name_or_path": folder}, vae)


def _fingerprint(config: dict[str, Any], vae: torch.nn.Module) -> str:
    digest = hashlib.sha256(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def pixels_of_jpeg(data: bytes) -> np.ndarray:
    """The stored JPEG decoded as the trainer decodes it (PIL, RGB): the latents are of these pixels, not of the
    pixels before compression."""
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))


def vae_source(base_model: str) -> str:
    """Where from_pretrained finds the base's vae/: a local folder or hub id as given (offline, the id's cached
    snapshot: offline_hub_folder); of a remote base (s3://..., as the trainer also takes one) only vae/ is copied,
    to the local cache, once per node."""
    if "://" not in base_model or base_model.startswith("file://"):
        return offline_hub_folder(base_model.removeprefix("file://"), "--latents")
    return str(fetch_folder(base_model.rstrip("/") + "/vae").parent)


def no_vae_refusal(source: str) -> str | None:
    """Why a local base folder has no VAE to encode with, or None: from_pretrained(subfolder="vae") of a base without
    vae/ (the pixel-space toy base) said 'no file named config.json found in directory <base>', which names the base
    folder, not the vae/ it lacks. A hub id (not a folder here) is left to the loader."""
    folder = Path(source)
    if not folder.is_dir() or (folder / "vae").is_dir():
        return None
    try:
        pixel_space = json.loads((folder / "model_index.json").read_text()).get("vae") in (None, [None, None])
    except (OSError, ValueError, AttributeError):  # no model_index.json, or not a JSON object: not a base at all
        pixel_space = False
    kind = "a pixel-space base: its model_index.json names no VAE; " if pixel_space else ""
    return f"no vae/ folder there ({kind}--latents encodes the images with a latent base's VAE)"


class LatentEncoder:
    """The VAE of a base model in diffusers layout (`<base>/vae`, a local folder, hub id or fsspec URL): images in,
    (2, C, h, w) float16 arrays out, mean then std of the encoder's diagonal Gaussian."""

    name = "latents"

    def __init__(self, base_model: str, device: str | None = None):
        from diffusers import AutoencoderKL

        self.base_model = base_model
        self.device = pick_device(device)
        try:
            source = vae_source(base_model)
        except MissingWeightsError:  # an id not cached offline: one line naming --latents already
            raise
        except OSError as e:  # a remote base without vae/
            raise ValueError(f"--latents {base_model}: no VAE there ({type(e).__name__}: {one_line(e, 200)})") \
                from None
        refusal = no_vae_refusal(source)
        if refusal:
            raise ValueError(f"--latents {base_model}: {refusal}")
        # an fp16 download loads as fp32 all the same; a file lacking some of the VAE's tensors is refused: diffusers
        # left them at a random init (a warning in the log), which encoded every image, another one in each actor
        load = partial(AutoencoderKL.from_pretrained, subfolder="vae", variant=weights_variant(source, "vae"),
                       torch_dtype=torch.float32, **diffusers_loading(), **pickle_only(source, "vae"))
        vae = load_complete_model(load, source, "the vae/ (AutoencoderKL) of a base model",
                                  label=f"--latents {base_model}")
        self.fingerprint = vae_fingerprint(vae)
        self.vae = vae.to(self.device).eval()  # fp32: these latents serve every later run

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """RGB uint8 (R, R, 3) images, as the trainer reads them -> latent distributions."""
        batch = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        dist = self.vae.encode(batch).latent_dist
        both = torch.stack([dist.mean, dist.std], dim=1).to("cpu").numpy()  # (B, 2, C, h, w)
        return [d.astype(LATENT_DTYPE) for d in both]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "base_model": self.base_model, "vae_sha256": self.fingerprint,
                "scaling_factor": self.vae.config.scaling_factor, "dtype": np.dtype(LATENT_DTYPE).name,
                "layout": "(2, C, H/8, W/8): mean, std"}
