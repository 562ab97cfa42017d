"""the toy reproduction: shapes generator, zero-start full-resolution ControlNet, CFG sampler, a tiny real run"""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.build import main as build_dataset
from pipeline.toy_shapes import write_shards
from train import toy

pytestmark = pytest.mark.usefixtures("ray_session")


def members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_generator_is_deterministic_and_writes_img2dataset_members(tmp_path):
    first, second = write_shards(tmp_path / "a", 10, 2, seed=3), write_shards(tmp_path / "b", 10, 2, seed=3)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    got = members(first[0])
    keys = sorted({name.split(".")[0] for name in got})
    assert len(keys) == 5 and set(got) == {f"{k}.{ext}" for k in keys for ext in ("png", "txt", "json")}
    meta = json.loads(got[f"{keys[0]}.json"])
    assert meta["caption"] == got[f"{keys[0]}.txt"].decode() and (meta["width"], meta["height"]) == (32, 32)
    assert meta["caption"].startswith("a ") and meta["caption"].endswith(" background")
    image = np.asarray(Image.open(io.BytesIO(got[f"{keys[0]}.png"])))
    assert image.shape == (32, 32, 3) and len(np.unique(image.reshape(-1, 3), axis=0)) == 2  # shape + background


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    unet = toy.build_unet(32)
    return unet, toy.build_controlnet(unet), toy.WordEncoder(["a", "red", "circle"])


def test_full_resolution_embedding_starts_at_zero_and_leaves_the_base_unchanged(models):
    unet, controlnet, words = models
    condition = torch.rand(2, 3, 32, 32)
    embedding = controlnet.controlnet_cond_embedding(condition)
    assert embedding.shape == (2, unet.config.block_out_channels[0], 32, 32)  # full resolution, no 8x stride
    assert embedding.abs().max() == 0
    x, t, text = torch.randn(2, 3, 32, 32), torch.tensor([10, 900]), words(["a red circle", ""])
    with torch.no_grad():
        assert torch.allclose(toy.predict(unet, x, t, text, controlnet, condition), toy.predict(unet, x, t, text),
                              atol=1e-6)


class Counting(torch.nn.Module):
    """The ControlNet, recording the batch size of each call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x, *args, **kwargs):
        self.calls.append(x.shape[0])
        return self.inner(x, *args, **kwargs)


def test_cfg_sampler_applies_the_control_to_the_conditional_branch_only(models):
    unet, controlnet, words = models
    counting = Counting(controlnet)
    text, null, condition = words(["a red circle", "a circle"]), words(["", ""]), torch.rand(2, 3, 32, 32)
    images = toy.sample(unet, text, null, 9.0, 2, 0, counting, condition)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all() and images.abs().max() <= 1
    assert counting.calls == [2, 2]  # once per DDIM step, on the 2 conditional samples only
    assert torch.equal(images, toy.sample(unet, text, null, 9.0, 2, 0, controlnet, condition))  # fixed seeds


def test_tiny_run_writes_curves_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    write_shards(tmp_path / "shards", 48, 2)
    data = tmp_path / "canny"
    assert build_dataset(["--input", str(tmp_path / "shards"), "--output", str(data), "--resolution", "32",
                          "--jpeg-quality", "100"]) == 0
    out = tmp_path / "run"
    toy.main(["--data", str(data), "--out", str(out), "--base-steps", "8", "--control-steps", "8", "--eval-every", "4",
              "--val-samples", "8", "--ddim-steps", "2", "--batch-size", "8"])
    results = json.loads((out / "results.json").read_text())
    assert results["primary"] == toy.PRIMARY_CURVE == "fidelity/captions/cfg1/edge_f1"
    assert set(results["curves"]) == {f"fidelity/{m}/cfg{s}/edge_f1" for m in ("captions", "empty") for s in (1, 9)}
    for curve in results["curves"].values():
        assert curve["steps"] == [0, 4, 8] and all(0 <= v <= 1 for v in curve["scores"])
    assert set(results["detection"][toy.PRIMARY_CURVE]) >= {"converged", "step", "start", "plateau", "mauc"}
    for png in ("fidelity.png", "samples.png", "base_samples.png"):
        assert Image.open(out / png).size[0] > 100
    assert (out / "base" / "unet" / "config.json").exists() and list((out / "wandb").glob("offline-run-*"))
