"""export writes a trained ControlNet as a diffusers folder or as one original-layout (cldm) .safetensors file"""
from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ControlNetModel
from safetensors.torch import save_file

FORMATS = ("diffusers", "original")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PREFIX = "control_model."  # lllyasviel's cldm.ControlLDM keeps the ControlNet under this name; A1111/ComfyUI expect it
# diffusers ResnetBlock2D -> ldm ResBlock (in_layers: norm, SiLU, conv; out_layers: norm, SiLU, Dropout, conv)
RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",  # emb_layers = SiLU, Linear
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
TIME_EMBED_NAMES = {"linear_1": "0", "linear_2": "2"}  # time_embed = Linear, SiLU, Linear


@dataclass(frozen=True)
class Layout:
    """What the key mapping needs of a ControlNet's config."""

    layers_per_block: int
    hint_convs: int  # convs between the hint embedding's conv_in and conv_out: 2 per stage after the first

    @classmethod
    def of(cls, config: Mapping) -> Layout:
        layers = config["layers_per_block"]
        if not isinstance(layers, int):
            raise ValueError(f"layers_per_block={layers!r}: the original layout has one count for every block")
        return cls(layers, 2 * (len(config["conditioning_embedding_out_channels"]) - 1))


def input_block(block: int, layer: int, layout: Layout) -> int:
    """Index in ldm's flat `input_blocks`: [conv_in, (resnet[+attn]) x layers, downsample] per block, none last."""
    return 1 + block * (layout.layers_per_block + 1) + layer


def resnet_name(rest: list[str]) -> str:
    """['norm1', 'weight'] -> 'in_layers.0.weight'"""
    return ".".join([RESNET_NAMES[rest[0]], *rest[1:]])


def original_name(key: str, layout: Layout) -> str:
    """diffusers ControlNetModel key -> cldm ControlNet key, without the prefix. Transformer (attention) blocks
    name their parameters alike in both (norm, proj_in, transformer_blocks.N.attn1.to_q, ff.net.2, proj_out)."""
    match key.split("."):
        case ["conv_in", param]:
            return f"input_blocks.0.0.{param}"
        case ["time_embedding", linear, param]:
            return f"time_embed.{TIME_EMBED_NAMES[linear]}.{param}"
        # input_hint_block = conv, SiLU, (conv, SiLU) x hint_convs, conv: convs sit at the even indices
        case ["controlnet_cond_embedding", "conv_in", param]:
            return f"input_hint_block.0.{param}"
        case ["controlnet_cond_embedding", "blocks", j, param]:
            return f"input_hint_block.{2 * int(j) + 2}.{param}"
        case ["controlnet_cond_embedding", "conv_out", param]:
            return f"input_hint_block.{2 * layout.hint_convs + 2}.{param}"
        case ["down_blocks", block, "resnets", layer, *rest]:
            return f"input_blocks.{input_block(int(block), int(layer), layout)}.0.{resnet_name(rest)}"
        case ["down_blocks", block, "attentions", layer, *rest]:
            return f"input_blocks.{input_block(int(block), int(layer), layout)}.1.{'.'.join(rest)}"
        case ["down_blocks", block, "downsamplers", "0", "conv", param]:
            return f"input_blocks.{input_block(int(block), layout.layers_per_block, layout)}.0.op.{param}"
        # middle_block = resnet, attention, resnet (diffusers' UNetMidBlock2DCrossAttn interleaves them alike)
        case ["mid_block", "resnets", i, *rest]:
            return f"middle_block.{2 * int(i)}.{resnet_name(rest)}"
        case ["mid_block", "attentions", i, *rest]:
            return f"middle_block.{2 * int(i) + 1}.{'.'.join(rest)}"
        # the zero convolutions: one per input block, one after the middle block
        case ["controlnet_down_blocks", i, param]:
            return f"zero_convs.{i}.0.{param}"
        case ["controlnet_mid_block", param]:
            return f"middle_block_out.0.{param}"
    raise ValueError(f"{key}: no original ControlNet (cldm) name (class/addition embeddings, as in SDXL, have none)")


def original_key(key: str, layout: Layout) -> str:
    """'down_blocks.0.resnets.0.norm1.weight' -> 'control_model.input_blocks.1.0.in_layers.0.weight'"""
    return PREFIX + original_name(key, layout)


def to_original(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet state dict in the cldm layout. Only names change: every tensor already has the shape
    cldm uses (proj_in/proj_out are 1x1 convs where use_linear_projection is False, as in SD1.x, linear in SD2.x;
    attention projections are linear in both)."""
    layout = Layout.of(config)
    out = {original_key(k, layout): v.contiguous() for k, v in state_dict.items()}
    if len(out) != len(state_dict):
        raise AssertionError("two diffusers keys map to one original key")  # a bug in the mapping, never the input
    return out


def controlnet_folder(checkpoint: Path) -> Path:
    """A training checkpoint holds the model in controlnet/; a bare diffusers ControlNet folder is one itself;
    a run folder (holding checkpoint_*/) means its latest checkpoint."""
    if not (checkpoint / "config.json").is_file() and any(checkpoint.glob("checkpoint_*")):
        from train.checkpoints import latest_in_run

        checkpoint = Path(latest_in_run(str(checkpoint)).removeprefix("file://"))
    for folder in (checkpoint, checkpoint / "controlnet"):
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(f"{checkpoint}: neither it nor {checkpoint / 'controlnet'} holds a config.json")


def temp_sibling(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


def replace(tmp: Path, out: Path) -> None:
    """Move a finished tmp into place; a previous export at `out` goes only once the new one is whole."""
    if out.is_dir():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def write_diffusers(controlnet: ControlNetModel, out: Path) -> None:
    tmp = temp_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        controlnet.save_pretrained(str(tmp), safe_serialization=True)
        replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_original(controlnet: ControlNetModel, out: Path) -> None:
    tmp = temp_sibling(out)
    try:
        save_file(to_original(controlnet.state_dict(), controlnet.config), str(tmp), metadata={"format": "pt"})
        replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def export(checkpoint: Path, fmt: str, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the ControlNet of `checkpoint` to `out` as a diffusers folder or an original .safetensors file."""
    controlnet = ControlNetModel.from_pretrained(str(controlnet_folder(Path(checkpoint))), torch_dtype=dtype)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    {"diffusers": write_diffusers, "original": write_original}[fmt](controlnet, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__)
    parser.add_argument(
        "checkpoint", type=Path,
        help="a training checkpoint (with controlnet/), a run folder (its latest checkpoint) or a diffusers folder",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        required=True,
        help="diffusers: a ControlNetModel folder for StableDiffusionControlNetPipeline; "
        "original: one .safetensors file with control_model.* keys, as A1111 and ComfyUI load",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder (diffusers) or .safetensors file (original)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights")
    args = parser.parse_args(argv)
    if args.format == "original" and args.out.suffix != ".safetensors":
        parser.error("--format original writes one file: give --out a .safetensors name")
    try:
        folder = controlnet_folder(args.checkpoint)
    except FileNotFoundError as e:
        parser.error(str(e))
    print(export(folder, args.format, args.out, DTYPES[args.dtype]))


if __name__ == "__main__":
    main()
