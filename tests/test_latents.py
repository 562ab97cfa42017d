"""latents stored by the dataset job (--latents BASE): written beside each image, named by their VAE in the
manifest, and trained on in place of the VAE encoding every image at every step; another VAE is refused"""
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from annotate.latents import vae_fingerprint
from pipeline.build import main as build_dataset
from tests.conftest import tar_members
from train.config import debug
from train.loop import Trainer, stored_latents_plan, use_stored_latents
from train.run import build_trainer
from train.tiny_sd import build_tiny_sd

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("latents-base") / "tiny-sd")


@pytest.fixture(scope="module")
def dataset(sample_shards, base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents") / "canny"
    shards = sorted(str(p) for p in sample_shards.glob("*.tar"))[:2]
    assert build_dataset(["--input", *shards, "--output", str(out), "--resolution", "64", "--latents", str(base)]) == 0
    return out


def test_each_stored_image_has_its_vae_distribution_and_the_manifest_names_the_vae(dataset, base):
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["latents"]["vae_sha256"] == vae_fingerprint(vae) and manifest["config"]["latents"] == str(base)
    samples = [s for tar in sorted((dataset / "shards").glob("*.tar")) for s in tar_members(tar).values()]
    assert samples and all("latent.npy" in s for s in samples)
    sample = samples[0]
    stored = np.load(io.BytesIO(sample["latent.npy"]), allow_pickle=False)
    assert stored.shape == (2, 4, 8, 8) and stored.dtype == np.float16
    # the distribution of the stored JPEG's pixels, as the trainer decodes them, not of the pixels before JPEG
    pixels = np.array(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1).latent_dist
    np.testing.assert_allclose(stored[0], dist.mean[0].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(stored[1], dist.std[0].numpy(), rtol=2e-3, atol=1e-5)


def train(dataset: Path, base: Path, storage: Path, name: str, **overrides):
    cfg = dataclasses.replace(debug(), data=[str(dataset)], base_model=str(base), storage_path=str(storage),
                              run_name=name, max_steps=3, checkpoint_every=3, validate_every=0, wandb="off",
                              **overrides)
    return build_trainer(cfg).fit()


def test_training_on_stored_latents_skips_the_vae_and_matches_encoding(dataset, base, tmp_path, monkeypatch,
                                                                        capfd):
    encodes = []
    original = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, *a, **k: encodes.append(1) or original(self, *a, **k))
    train(dataset, base, tmp_path, "stored")
    assert not encodes and "training on the dataset's stored latents" in capfd.readouterr().out
    train(dataset, base, tmp_path, "encoded", latents="off")
    assert encodes
    stored, encoded = (json.loads((tmp_path / name / "results.json").read_text())["history"]
                       for name in ("stored", "encoded"))
    # the same noise draws and the same samples; only the float16 storage of mean and std differs
    assert [h["step"] for h in stored] == [1, 2, 3]
    np.testing.assert_allclose([h["loss"] for h in stored], [h["loss"] for h in encoded], rtol=1e-3)


def test_latents_of_another_vae_are_refused(dataset, tmp_path):
    other = build_tiny_sd(tmp_path / "other-sd", seed=1)
    with pytest.raises(Exception, match="--latents off"):
        train(dataset, other, tmp_path, "other")


def test_the_vae_is_fingerprinted_as_loaded_not_as_cast_for_autocast(dataset, base):
    """On a GPU the trainer casts the frozen VAE to bf16; the stored latents are checked against the VAE as loaded."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    cfg = dataclasses.replace(debug(), data=[str(dataset)], base_model=str(base))
    trainer = Trainer(cfg, 0, 1, torch.device("cpu"), fingerprint_vae=True)
    trainer.base.vae.to(torch.bfloat16)  # what the bf16 autocast path does to the frozen modules
    assert vae_fingerprint(trainer.base.vae) != manifest["latents"]["vae_sha256"]
    assert "stored latents" in use_stored_latents(trainer, manifest) and trainer.latents


def test_when_stored_latents_are_used():
    cfg = dataclasses.replace(debug(), resolution=64)
    stored = {"vae_sha256": "x"}
    assert stored_latents_plan(stored, 64, cfg, base_has_vae=True) == (True, "")
    assert stored_latents_plan(None, 64, cfg, base_has_vae=True) == (False, "")
    assert "pixel-space" in stored_latents_plan(stored, 64, cfg, base_has_vae=False)[1]
    assert "128 px" in stored_latents_plan(stored, 128, cfg, base_has_vae=True)[1]
    assert "--latents off" in stored_latents_plan(stored, 64, dataclasses.replace(cfg, latents="off"), True)[1]
