"""base pretraining: the toy's pixel-space base in diffusers layout, loaded back by the trainer's own loader"""
import json
from pathlib import Path

import pytest
import torch

from pipeline.build import main as build_dataset
from pipeline.toy_shapes import write_shards
from train.model import ControlledUNet, encode_prompts, load_base_model
from train.pretrain_base import PretrainConfig, build_base, main, save_base

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base")
    write_shards(root / "shapes", 24, 2)
    assert build_dataset(["--input", str(root / "shapes"), "--output", str(root / "canny"), "--resolution", "32",
                          "--jpeg-quality", "100"]) == 0
    return root / "canny"


def test_a_base_round_trips_through_the_diffusers_layout(tmp_path):
    torch.manual_seed(0)
    cfg = PretrainConfig(channels=(8, 16), text_width=16)
    base = build_base(cfg, ["a", "red", "circle", "on", "white", "background"], tmp_path / "base")
    save_base(base, tmp_path / "base")
    loaded = load_base_model(str(tmp_path / "base"))
    assert loaded.vae is None and loaded.downsampling == 1 and loaded.unet.config.in_channels == 3
    captions = ["a red circle on a white background", ""]
    assert loaded.tokenizer(captions).input_ids == base.tokenizer(captions).input_ids
    assert torch.equal(encode_prompts(loaded, captions, torch.device("cpu")),
                       encode_prompts(base, captions, torch.device("cpu")))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    text = encode_prompts(base, captions, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(ControlledUNet(loaded.unet, None)(x, t, text), ControlledUNet(base.unet, None)(x, t, text))


def test_pretraining_writes_a_loadable_base_and_holds_out_the_last_shard(dataset, tmp_path):
    out = tmp_path / "base"
    assert main(["--data", str(dataset), "--out", str(out), "--steps", "3", "--batch-size", "4",
                 "--channels", "8", "16", "--text-width", "16"]) == 0
    record = json.loads((out / "pretrain.json").read_text())
    assert record["training_shards"] == 1 and record["config"]["steps"] == 3  # the last shard is held out
    assert (out / "base_samples.png").exists() and not list(tmp_path.glob(".base.partial*"))
    vocabulary = json.loads((out / "tokenizer" / "vocab.json").read_text())
    assert "circle</w>" in vocabulary and "background</w>" in vocabulary  # caption words are single tokens
    assert load_base_model(str(out)).unet.config.block_out_channels == [8, 16]
    stamp = (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert main(["--data", str(dataset), "--out", str(out), "--steps", "3", "--batch-size", "4",
                 "--channels", "8", "16", "--text-width", "16", "--threads", "1"]) == 0  # same settings: skipped
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("not a model")
    assert main(["--data", str(dataset), "--out", str(tmp_path / "other"), "--steps", "1"]) == 2  # never clobbered
    assert (tmp_path / "other" / "keep.txt").exists()


def test_toy_shapes_refuses_counts_that_make_empty_shards(tmp_path, capsys):
    from pipeline.toy_shapes import main as toy_shapes

    for args in (["--samples", "0"], ["--samples", "10", "--num-shards", "20"]):  # wrote empty tars, exit 0
        with pytest.raises(SystemExit) as stop:
            toy_shapes([*args, "--output", str(tmp_path / "shards")])
        assert stop.value.code == 2 and "--num-shards" in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()
