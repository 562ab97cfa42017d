"""latents stored by the dataset job (--latents BASE): written beside each image, named by their VAE in the
manifest, and trained on in place of the VAE encoding every image at every step; another VAE is refused"""
import dataclasses
import hashlib
import io
import json
import shutil
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
from train.loop import StoredLatentsMismatch, Trainer, stored_latents_plan, use_stored_latents
from train.run import build_trainer, fit
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


def test_each_stored_image_has_its_vae_distribution_and_the_manifest_names_the_vae(dataset, base, sample_shards,
                                                                                    tmp_path):
    """A job stopped after its last shard, before its manifest, left a rerun (nothing to do) a manifest without
    the models, so the trainer ignored the stored latents in silence: the shards' stats now say what made them."""
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["latents"]["vae_sha256"] == vae_fingerprint(vae) and manifest["config"]["latents"] == str(base)
    stopped = shutil.copytree(dataset, tmp_path / "canny")
    (stopped / "manifest.json").unlink()
    shards = sorted(str(p) for p in sample_shards.glob("*.tar"))[:2]  # the dataset's
    assert build_dataset(["--input", *shards, "--output", str(stopped), "--resolution", "64", "--latents",
                          str(base)]) == 0
    rewritten = json.loads((stopped / "manifest.json").read_text())
    assert {k: rewritten[k] for k in ("annotator", "captioner", "latents")} == \
        {k: manifest[k] for k in ("annotator", "captioner", "latents")}
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
    return fit(cfg, build_trainer(cfg))


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
    with pytest.raises(StoredLatentsMismatch, match="--latents off"):
        train(dataset, other, tmp_path, "other")
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())  # nothing written


def test_a_run_on_latents_of_another_vae_is_refused_in_one_line_at_its_first_attempt(dataset, tmp_path, capsys,
                                                                                    ray_session, worker_errors):
    """The refusal came as a traceback, exit 1 and "the same command starts it again", which would fail again.
    main() leaves up the Ray its caller had started: on its way out it shut down this test session's cluster,
    and every later test that used it failed. On Ray workers, it came only after Ray Train had restarted the
    worker group --max-failures times (2), each loading the base model again: a worker's error is retried."""
    import ray

    from train.run import main

    other = build_tiny_sd(tmp_path / "other-sd", seed=1)
    assert main(["--preset", "debug", "--data", str(dataset), "--base-model", str(other), "--storage-path",
                 str(tmp_path / "runs"), "--run-name", "other", "--wandb", "off", "--max-steps", "2",
                 "--num-workers", "1", "--max-failures", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: the dataset's latents were made")
    assert not worker_errors.exists(), worker_errors.read_text()  # no attempt failed: none was retried
    assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2


def test_a_sweep_whose_sizes_are_refused_says_so_not_that_they_failed(dataset, tmp_path, capsys):
    """Each size of a sweep on latents of another VAE was reported "failed" (with the exception's class), and the
    sweep ended "run the same command again to resume them", exit 1: run again, it is refused again."""
    from train.sweep import main as sweep

    other = build_tiny_sd(tmp_path / "other-sd", seed=1)
    assert sweep(["--dataset", str(dataset), "--sizes", "4", "--preset", "debug", "--run-prefix", "vae",
                  "--storage-path", str(tmp_path / "runs"), "--subsets-out", str(tmp_path / "subsets"), "--no-report",
                  "--", "--base-model", str(other), "--max-steps", "2", "--wandb", "off", "--validate-every", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2].startswith("[sweep] vae-4 refused: the dataset's latents were made by the VAE of "), err
    assert err[-1] == "[sweep] refused: vae-4; put right what each says above, then run the same command"
    assert not any("failed" in line for line in err), err


def test_the_vae_is_fingerprinted_as_loaded_not_as_cast_for_autocast(dataset, base):
    """On a GPU the trainer casts the frozen VAE to bf16; the stored latents are checked against the VAE as loaded."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    cfg = dataclasses.replace(debug(), data=[str(dataset)], base_model=str(base))
    trainer = Trainer(cfg, 0, 1, torch.device("cpu"), stored_latents=manifest["latents"])
    trainer.base.vae.to(torch.bfloat16)  # what the bf16 autocast path does to the frozen modules
    assert vae_fingerprint(trainer.base.vae) != manifest["latents"]["vae_sha256"]
    assert "stored latents" in use_stored_latents(trainer, manifest) and trainer.latents


def fingerprint_of_whole_config(vae: AutoencoderKL) -> str:
    """The VAE's fingerprint as manifests written before 2026-12-01 hold it: the whole config hashed, with the
    folder the dataset job loaded it from (diffusers' `_name_or_path`)."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_the_same_vae_in_another_folder_is_the_same_vae(dataset, base, tmp_path):
    """The fingerprint hashed the folder the VAE was loaded from: a base copied to another folder or node, or cached
    from an s3:// base, was refused the latents its own VAE had made. Datasets that recorded it so still train."""
    moved = shutil.copytree(base, tmp_path / "moved-sd")
    manifest = json.loads((dataset / "manifest.json").read_text())
    cfg = dataclasses.replace(debug(), data=[str(dataset)], base_model=str(moved))
    trainer = Trainer(cfg, 0, 1, torch.device("cpu"), stored_latents=manifest["latents"])
    assert "stored latents" in use_stored_latents(trainer, manifest) and trainer.latents

    made_before = fingerprint_of_whole_config(AutoencoderKL.from_pretrained(base, subfolder="vae"))
    assert made_before != manifest["latents"]["vae_sha256"]
    old = {**manifest, "latents": {**manifest["latents"], "vae_sha256": made_before}}
    trainer = Trainer(cfg, 0, 1, torch.device("cpu"), stored_latents=old["latents"])
    assert "stored latents" in use_stored_latents(trainer, old) and trainer.latents
    # such a record matches with the folder it names only: here, another folder's VAE
    other = {**old, "latents": {**old["latents"], "base_model": str(tmp_path / "elsewhere")}}
    trainer = Trainer(cfg, 0, 1, torch.device("cpu"), stored_latents=other["latents"])
    with pytest.raises(ValueError, match="--latents off"):
        use_stored_latents(trainer, other)


def test_a_resume_takes_the_same_vae_from_another_folder_and_refuses_another_vae(dataset, base, sample_shards,
                                                                                   tmp_path, capsys):
    """The dataset job's resume compared the --latents path: the same base copied elsewhere (or cached from s3://)
    was refused as "other settings". The VAE's hash, kept per shard, decides instead."""
    copy = Path(shutil.copytree(dataset, tmp_path / "canny"))
    before = (copy / "shards" / "00001.tar").read_bytes()
    (copy / "shards" / "00001.stats.json").unlink()  # a job stopped before it committed this shard
    shards = sorted(str(p) for p in sample_shards.glob("*.tar"))[:2]
    common = ["--input", *shards, "--output", str(copy), "--resolution", "64"]
    other_vae = build_tiny_sd(tmp_path / "other-sd", seed=1)
    assert build_dataset([*common, "--latents", str(other_vae)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "built with other weights: latents.vae_sha256 " in error and "(1 shards)" in error
    assert not (copy / "shards" / "00001.stats.json").exists()
    assert build_dataset([*common, "--latents", str(shutil.copytree(base, tmp_path / "moved-sd"))]) == 0
    assert "1 done, 1 to do" in capsys.readouterr().out
    assert (copy / "shards" / "00001.tar").read_bytes() == before  # the same latents from the same VAE


def test_a_base_in_object_storage_encodes_as_its_copy_here(base, s3_endpoint, tmp_path, monkeypatch):
    """--latents s3://...: the dataset job takes a base in object storage, as the trainer does (vae/ alone is
    copied to the node's cache), and names its VAE as any copy of it."""
    import fsspec

    from annotate.latents import LatentEncoder

    monkeypatch.setattr("annotate.weights.DEFAULT_CACHE", tmp_path / "cache")
    fs = fsspec.filesystem("s3")
    fs.mkdir("cnd-latents-base")
    fs.put(str(base), "cnd-latents-base/tiny-sd", recursive=True)
    remote, local = (LatentEncoder(url, device="cpu") for url in ("s3://cnd-latents-base/tiny-sd", str(base)))
    assert remote.fingerprint == local.fingerprint and list((tmp_path / "cache").rglob("vae/config.json"))
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(remote([image])[0], local([image])[0])
    with pytest.raises(ValueError, match="--latents s3://cnd-latents-base/nothing: no VAE there"):
        LatentEncoder("s3://cnd-latents-base/nothing", device="cpu")


def test_a_vae_whose_weights_lack_tensors_is_refused_not_encoded_with_random_ones(base, tmp_path):
    """diffusers filled the tensors the VAE's file lacks with its random init, with a warning in the log: the job
    stored latents of a partly random encoder, another one in each actor (their fingerprints differed)."""
    from safetensors.torch import load_file, save_file

    from annotate.latents import LatentEncoder

    copy = Path(shutil.copytree(base, tmp_path / "tiny-sd"))
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("encoder.mid_block.")}, weights)
    with pytest.raises(ValueError, match=rf"^--latents {copy} is not the vae/ \(AutoencoderKL\) of a base model: its "
                       r"weights lack \d+ of the model's tensors \(e\.g\. \['encoder\.mid_block\.") as err:
        LatentEncoder(str(copy), device="cpu")
    assert "\n" not in str(err.value)
    weights.unlink()  # no weights at all: diffusers' own error, on one line after ours
    with pytest.raises(ValueError, match=rf"^--latents {copy} does not load as the vae/ \(AutoencoderKL\) of a base "
                       r"model \(OSError: .*diffusion_pytorch_model") as err:
        LatentEncoder(str(copy), device="cpu")
    assert "\n" not in str(err.value)


def test_when_stored_latents_are_used():
    cfg = dataclasses.replace(debug(), resolution=64)
    stored = {"vae_sha256": "x"}
    assert stored_latents_plan(stored, 64, cfg, base_has_vae=True) == (True, "")
    assert stored_latents_plan(None, 64, cfg, base_has_vae=True) == (False, "")
    assert "pixel-space" in stored_latents_plan(stored, 64, cfg, base_has_vae=False)[1]
    assert "128 px" in stored_latents_plan(stored, 128, cfg, base_has_vae=True)[1]
    assert "--latents off" in stored_latents_plan(stored, 64, dataclasses.replace(cfg, latents="off"), True)[1]


def test_a_pixel_space_base_is_refused_naming_the_vae_folder_it_lacks(sample_shards, tmp_path, capsys):
    """--latents train/toy_base (a base without a VAE) was refused in diffusers' words, 'no file named config.json
    found in directory <base>': it named the base folder, not the vae/ that --latents needs."""
    from train.model import PACKAGED

    toy = PACKAGED / "toy_base"
    shards = sorted(str(p) for p in sample_shards.glob("*.tar"))[:1]
    assert build_dataset(["--input", *shards, "--output", str(tmp_path / "out"), "--resolution", "64",
                          "--latents", str(toy)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--latents {toy}: no vae/ folder there (a pixel-space base: its model_index.json names no VAE; " \
           "--latents encodes the images with a latent base's VAE)" in error, error
    assert "config.json" not in error, error
