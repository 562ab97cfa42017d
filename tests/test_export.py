"""the tiny SD base model and the ControlNet export, checked against diffusers' pipelines and its own converter"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.convert_from_ckpt import (
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config,
    download_controlnet_from_original_ckpt,
)
from PIL import Image
from safetensors.torch import load_file

from train import export, tiny_sd

REPO = Path(__file__).resolve().parent.parent
SIZE = tiny_sd.IMAGE_SIZE
# the parameter names the brief and A1111/ComfyUI rely on
ORIGINAL_NAMES = [
    "control_model.input_hint_block.0.weight",
    "control_model.input_blocks.0.0.weight",
    "control_model.input_blocks.1.1.proj_in.weight",
    "control_model.zero_convs.0.0.weight",
    "control_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight",
    "control_model.middle_block_out.0.weight",
    "control_model.time_embed.0.weight",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_sd.build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def controlnet(base) -> ControlNetModel:
    """from_unet on the tiny UNet, every weight random and non-zero (zero convs included), so a swapped or
    dropped tensor shows."""
    controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(base / "unet"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in controlnet.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return controlnet


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, controlnet) -> Path:
    """A training checkpoint folder: the ControlNet in controlnet/, beside files export ignores."""
    ckpt = tmp_path_factory.mktemp("checkpoint")
    controlnet.save_pretrained(ckpt / "controlnet", safe_serialization=True)
    (ckpt / "train_state.json").write_text("{}")
    return ckpt


def condition() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def cldm_config(config: dict, image_size: int) -> dict:
    """The original ControlNet yaml (cldm_v15.yaml / cldm_v21.yaml) that describes a diffusers ControlNet config."""
    channels = list(config["block_out_channels"])
    heads = config["attention_head_dim"]  # diffusers' legacy name for the number of heads
    params = {
        "image_size": 32,
        "in_channels": config["in_channels"],
        "hint_channels": config["conditioning_channels"],
        "model_channels": channels[0],
        "attention_resolutions": [2**i for i, t in enumerate(config["down_block_types"]) if "CrossAttn" in t],
        "num_res_blocks": config["layers_per_block"],
        "channel_mult": [c // channels[0] for c in channels],
        "transformer_depth": 1,
        "context_dim": config["cross_attention_dim"],
        "use_linear_in_transformer": config["use_linear_projection"],
        "legacy": False,
        # SD1.x names a head count; SD2.x a head width (64), from which diffusers derives per-block head counts
        **({"num_heads": heads} if isinstance(heads, int) else {"num_head_channels": channels[0] // heads[0]}),
    }
    ddconfig = {"ch": 128, "ch_mult": [1, 2, 4, 4], "resolution": image_size, "z_channels": 4, "num_res_blocks": 2}
    return {
        "model": {
            "target": "cldm.cldm.ControlLDM",
            "params": {
                "control_key": "hint",
                "control_stage_config": {"target": "cldm.cldm.ControlNet", "params": params},
                "unet_config": {"target": "cldm.cldm.ControlledUnetModel", "params": params},
                "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": ddconfig}},
            },
        }
    }


def test_tiny_sd_builds_once_and_generates(base):
    marker = base / "unet" / "marker"
    marker.write_text("a rebuild would replace the folder")
    tiny_sd.main(["--out", str(base)])
    assert marker.exists()
    assert not list(base.parent.glob(".*tmp*"))
    pipe = StableDiffusionPipeline.from_pretrained(base)
    images = pipe("a photo of a dog", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, SIZE, SIZE, 3)
    assert np.isfinite(images).all()


def test_export_diffusers_runs_in_the_controlnet_pipeline(tmp_path, python, base, checkpoint, controlnet):
    out = tmp_path / "controlnet-diffusers"
    cmd = [python, "-m", "train.export", str(checkpoint), "--format", "diffusers", "--out", str(out)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    assert (out / "diffusion_pytorch_model.safetensors").exists()
    pipe = StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=ControlNetModel.from_pretrained(out))
    images = pipe("a dog", image=condition(), num_inference_steps=2, output_type="np").images
    assert images.shape == (1, SIZE, SIZE, 3)
    expected, got = controlnet.state_dict(), pipe.controlnet.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_export_original_round_trips_through_diffusers_converter(tmp_path, checkpoint, controlnet):
    out = tmp_path / "control_tiny.safetensors"
    export.main([str(checkpoint), "--format", "original", "--out", str(out)])
    original = load_file(out)
    assert all(k.startswith("control_model.") for k in original)
    assert set(ORIGINAL_NAMES) <= original.keys()
    expected = controlnet.state_dict()
    assert len(original) == len(expected)  # the converter ignores extra keys: count them here

    # as diffusers' scripts/convert_original_controlnet_to_diffusers.py calls it
    config_file = tmp_path / "cldm_tiny.yaml"
    config_file.write_text(yaml.safe_dump(cldm_config(dict(controlnet.config), SIZE)))
    back = download_controlnet_from_original_ckpt(
        str(out), str(config_file), image_size=SIZE, from_safetensors=True, upcast_attention=False, device="cpu"
    ).state_dict()  # loaded with load_state_dict(strict=True): no key missing, none unexpected, shapes equal
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    "unet_config",
    [
        {"cross_attention_dim": 768},  # SD1.5
        {"cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True},  # SD2.1
    ],
    ids=["sd15", "sd21"],
)
def test_original_keys_at_full_size(unet_config):
    """Real-size ControlNets on the meta device (no memory): names and shapes through diffusers' converter, and
    each tensor comes back as the very object it left as, so no two same-shaped tensors are swapped."""
    with torch.device("meta"):
        controlnet = ControlNetModel.from_unet(UNet2DConditionModel(**unet_config))
    state = controlnet.state_dict()
    original = export.to_original(state, controlnet.config)
    assert set(ORIGINAL_NAMES) <= original.keys()
    assert len(original) == len(state)

    cldm = cldm_config(dict(controlnet.config), 512)
    config = create_unet_diffusers_config(cldm, image_size=512, controlnet=True)
    heads = controlnet.config.attention_head_dim
    assert config["attention_head_dim"] == (heads if isinstance(heads, int) else list(heads))
    assert config["use_linear_projection"] == controlnet.config.use_linear_projection
    back = convert_ldm_unet_checkpoint(dict(original), config, controlnet=True)
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)


def test_export_cli_rejects_a_file_name_without_safetensors(tmp_path, checkpoint):
    with pytest.raises(SystemExit):
        export.main([str(checkpoint), "--format", "original", "--out", str(tmp_path / "control.pth")])


def test_key_mapping_is_generic_over_layers_per_block():
    layout = export.Layout(layers_per_block=2, hint_convs=6)  # SD1.5: input_blocks 1,2 | 3 op | 4,5 | 6 op ...
    assert export.original_key("down_blocks.1.resnets.1.norm1.weight", layout) == (
        "control_model.input_blocks.5.0.in_layers.0.weight"
    )
    assert export.original_key("down_blocks.2.downsamplers.0.conv.bias", layout) == (
        "control_model.input_blocks.9.0.op.bias"
    )
    assert export.original_key("controlnet_cond_embedding.conv_out.weight", layout) == (
        "control_model.input_hint_block.14.weight"
    )
    with pytest.raises(ValueError, match="add_embedding"):
        export.original_key("add_embedding.linear_1.weight", layout)



def test_export_cli_names_a_missing_controlnet(tmp_path, capsys):
    with pytest.raises(SystemExit):
        export.main([str(tmp_path), "--format", "diffusers", "--out", str(tmp_path / "out")])
    assert "controlnet" in capsys.readouterr().err
