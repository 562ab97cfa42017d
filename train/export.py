"""export writes a trained ControlNet as a diffusers folder or as one original-layout (cldm) .safetensors file,
with the SD UNet whose decoder the large-scale mode trained beside it"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, NoReturn

import tyro

from pipeline.format import left_by_a_gone_process
from train.checkpoints import CONFIG_FILE, CONTROLNET_DIR, DECODER_FILE

if TYPE_CHECKING:  # torch and diffusers are imported where they are used: --help and the argument checks answer
    # in a fraction of a second, not after the seconds their imports take
    import torch
    from diffusers import ControlNetModel, ModelMixin, UNet2DConditionModel

PREFIX = "control_model."  # lllyasviel's cldm.ControlLDM keeps the ControlNet under this name; A1111/ComfyUI expect it
UNET_PREFIX = "model.diffusion_model."  # ... and the SD UNet under this one, as every ldm checkpoint does
UNET_SUFFIX = "-unet"  # the diffusers export's UNet folder: OUT + this, beside the ControlNet folder OUT
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
    """What the key mapping needs of a ControlNet's or a UNet's config."""

    layers_per_block: int
    hint_convs: int = 0  # a ControlNet's convs between the hint embedding's conv_in and conv_out: 2 per later stage
    attention_up_blocks: tuple[bool, ...] = ()  # a UNet's up blocks with attention layers: their upsampler comes
    # third in ldm's output block (resnet, attention, upsample), second without

    @classmethod
    def of(cls, config: Mapping) -> Layout:
        layers = config["layers_per_block"]
        if not isinstance(layers, int):
            raise ValueError(f"layers_per_block={layers!r}: the original layout has one count for every block")
        hint = config.get("conditioning_embedding_out_channels")  # a ControlNet's only
        up = config.get("up_block_types") or ()  # a UNet's only
        return cls(layers, 2 * (len(hint) - 1) if hint else 0, tuple("Attn" in t for t in up))


def input_block(block: int, layer: int, layout: Layout) -> int:
    """Index in ldm's flat `input_blocks`: [conv_in, (resnet[+attn]) x layers, downsample] per block, none last."""
    return 1 + block * (layout.layers_per_block + 1) + layer


def output_block(block: int, layer: int, layout: Layout) -> int:
    """Index in ldm's flat `output_blocks`: (resnet[+attn]) x (layers + 1) per up block, the block's upsampler
    inside its last one."""
    return block * (layout.layers_per_block + 1) + layer


def upsampler(block: int, layout: Layout) -> str:
    """'output_blocks.5.2': where ldm puts up block `block`'s upsampler, in its last layer."""
    last = output_block(block, layout.layers_per_block, layout)
    return f"output_blocks.{last}.{2 if layout.attention_up_blocks[block] else 1}"  # after resnet (and attention)


def resnet_name(rest: list[str]) -> str:
    """['norm1', 'weight'] -> 'in_layers.0.weight'"""
    return ".".join([RESNET_NAMES[rest[0]], *rest[1:]])


def original_name(key: str, layout: Layout) -> str:
    """diffusers ControlNetModel or UNet2DConditionModel key -> cldm ControlNet or ldm UNet key, without the prefix.
    The two share conv_in, time_embed, input and middle blocks. Transformer (attention) blocks name their
    parameters alike in both layouts (norm, proj_in, transformer_blocks.N.attn1.to_q, ff.net.2, proj_out)."""
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
        # the UNet's decoder: output blocks mirror the input blocks, one more layer each, upsamplers for downsamplers
        case ["up_blocks", block, "resnets", layer, *rest]:
            return f"output_blocks.{output_block(int(block), int(layer), layout)}.0.{resnet_name(rest)}"
        case ["up_blocks", block, "attentions", layer, *rest]:
            return f"output_blocks.{output_block(int(block), int(layer), layout)}.1.{'.'.join(rest)}"
        case ["up_blocks", block, "upsamplers", "0", "conv", param]:
            return f"{upsampler(int(block), layout)}.conv.{param}"
        # out = GroupNorm, SiLU, conv
        case ["conv_norm_out", param]:
            return f"out.0.{param}"
        case ["conv_out", param]:
            return f"out.2.{param}"
    raise ValueError(f"{key}: no original (ldm/cldm) name (class/addition embeddings, as in SDXL, have none)")


def original_key(key: str, layout: Layout, prefix: str = PREFIX) -> str:
    """'down_blocks.0.resnets.0.norm1.weight' -> 'control_model.input_blocks.1.0.in_layers.0.weight'"""
    return prefix + original_name(key, layout)


def to_original(
    state_dict: Mapping[str, torch.Tensor], config: Mapping, prefix: str = PREFIX
) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet (or, with UNET_PREFIX, UNet) state dict in the cldm layout. Only names change: every
    tensor already has the shape cldm uses (proj_in/proj_out are 1x1 convs where use_linear_projection is False,
    as in SD1.x, linear in SD2.x; attention projections are linear in both)."""
    layout = Layout.of(config)
    out = {original_key(k, layout, prefix): v.contiguous() for k, v in state_dict.items()}
    if len(out) != len(state_dict):
        raise AssertionError("two diffusers keys map to one original key")  # a bug in the mapping, never the input
    return out


def controlnet_folder(checkpoint: Path) -> Path:
    """A training checkpoint holds the model in controlnet/, and is complete once its progress.json is written; a
    bare diffusers ControlNet folder is one itself; a run folder (holding checkpoint_*/) means its latest complete
    checkpoint."""
    from train.checkpoints import PROGRESS_FILE, file_sizes, is_whole, latest_in_run

    if not (checkpoint / "config.json").is_file() and any(checkpoint.glob("checkpoint_*")):
        latest = latest_in_run(str(checkpoint))
        if latest is None:
            raise FileNotFoundError(f"{checkpoint}: none of its checkpoints is complete and whole ({PROGRESS_FILE}, "
                                    "written last, marks one complete and lists its files)")
        checkpoint = Path(latest.removeprefix("file://"))
    if (checkpoint / "config.json").is_file():
        return checkpoint
    if (checkpoint / CONTROLNET_DIR / "config.json").is_file():
        if not (checkpoint / PROGRESS_FILE).is_file():
            raise FileNotFoundError(cut_short(checkpoint))
        if not is_whole(json.loads((checkpoint / PROGRESS_FILE).read_text()), file_sizes(checkpoint)):
            raise FileNotFoundError(damaged(checkpoint))
        return checkpoint / CONTROLNET_DIR
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint or run folder")
    raise FileNotFoundError(f"{checkpoint}: neither it nor {checkpoint / CONTROLNET_DIR} holds a config.json")


def cut_short(checkpoint: Path | str) -> str:
    from train.checkpoints import PROGRESS_FILE

    return (f"{checkpoint} was cut short (no {PROGRESS_FILE}, which is written last): export the run's folder for its "
            "latest complete checkpoint")


def damaged(checkpoint: Path | str) -> str:
    return (f"{checkpoint} lacks a file, or holds one cut short, since it was written: export the run's folder for "
            "its latest whole checkpoint")


def refuse_partial_checkpoint(source: str) -> None:
    """controlnet_folder's checks of a training checkpoint, made on object storage before the download: they named
    the local temporary copy, and came after gigabytes were downloaded for nothing."""
    import fsspec

    from train.checkpoints import PROGRESS_FILE, marked_checkpoints

    fs, path = fsspec.core.url_to_fs(source)
    path = path.rstrip("/")
    if fs.exists(f"{path}/config.json") or not fs.exists(f"{path}/{CONTROLNET_DIR}/config.json"):
        return  # a diffusers folder, or no checkpoint: controlnet_folder says which
    if not fs.exists(f"{path}/{PROGRESS_FILE}"):
        raise FileNotFoundError(cut_short(source))
    run = fs.unstrip_protocol(path.rsplit("/", 1)[0])
    whole = {url.rstrip("/"): whole for url, (_, whole) in marked_checkpoints(run).items()}
    if not whole.get(fs.unstrip_protocol(path), True):
        raise FileNotFoundError(damaged(source))


@contextmanager
def local_copy(source: str) -> Iterator[Path]:
    """`source` as a local folder: a path as it is; on object storage (a run's --storage-path on s3://), the run's
    latest complete checkpoint, or the checkpoint or ControlNet folder named, downloaded into a temporary folder
    for the export's length."""
    import fsspec

    from train.checkpoints import checkpoint_folders, fetch, latest_in_run

    if "://" not in source or source.startswith("file://"):
        yield Path(source.removeprefix("file://"))
        return
    fs, path = fsspec.core.url_to_fs(source)
    if not fs.exists(path):
        raise FileNotFoundError(f"{source}: no such checkpoint or run folder")
    chosen = latest_in_run(source)
    if chosen is None and checkpoint_folders(source):
        raise FileNotFoundError(f"{source}: none of its checkpoints is complete and whole")
    if chosen is None:
        refuse_partial_checkpoint(source)
    with tempfile.TemporaryDirectory(prefix="export-") as folder:
        chosen = chosen or source
        print(f"downloading {chosen}", file=sys.stderr, flush=True)
        yield fetch(chosen, Path(folder) / chosen.rstrip("/").rsplit("/", 1)[-1])


def decoder_file(controlnet: Path) -> Path | None:
    """The SD decoder a large-scale run (--unlock-decoder-at) trained: train.loop saves it beside controlnet/ in
    the checkpoint. None for a locked base, and for a bare ControlNet folder."""
    decoder = controlnet.parent / DECODER_FILE
    return decoder if controlnet.name == CONTROLNET_DIR and decoder.is_file() else None


def trained_unet(decoder: Path, dtype: torch.dtype) -> UNet2DConditionModel:
    """The run's base UNet (train_config.json beside the decoder names the base) with the trained decoder loaded
    into it, as Trainer.load does: the whole UNet, so that an export stands alone."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from annotate.weights import diffusers_loading, pickle_only, weights_variant
    from train.model import local_model_folder

    base_model = json.loads((decoder.parent / CONFIG_FILE).read_text())["base_model"]
    source = local_model_folder(base_model)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=weights_variant(source, "unet"),
                                                torch_dtype=dtype, **diffusers_loading(), **pickle_only(source, "unet"))
    weights = {k.removeprefix("unet."): v for k, v in load_file(decoder).items()}
    # strict=False: the file holds the decoder only. Shapes are checked even so, and the trained fp32 weights are
    # cast to `dtype` as they are copied in
    unexpected = unet.load_state_dict(weights, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{decoder}: {', '.join(unexpected[:3])} ... are not parameters of {base_model}'s UNet")
    return unet


def unet_folder(out: Path) -> Path:
    """Where a diffusers export puts the trained UNet: beside the ControlNet (controlnet/ -> controlnet-unet/)."""
    return out.with_name(out.name + UNET_SUFFIX)


# what save_pretrained writes for a model: a previous export, which --out may replace
EXPORT_FILE = re.compile(r"config\.json|diffusion_pytorch_model(-\d+-of-\d+)?\.safetensors(\.index\.json)?")
CONTROLNET_CLASS, UNET_CLASS = "ControlNetModel", "UNet2DConditionModel"  # the _class_name of their config.json


def is_previous_export(out: Path, fmt: str, model: str = CONTROLNET_CLASS) -> bool:
    """Whether `out` holds nothing but an earlier export in `fmt`: a diffusers folder of `model`, or a file of
    control_model.* (and model.diffusion_model.*) keys."""
    if fmt == "diffusers":
        config = out / "config.json"
        try:
            kind = json.loads(config.read_text()).get("_class_name") if out.is_dir() and config.is_file() else None
        except (OSError, ValueError):
            return False
        return kind == model and all(EXPORT_FILE.fullmatch(p.name) for p in out.iterdir())
    from safetensors import safe_open

    try:
        with safe_open(str(out), "pt") as weights:
            names = list(weights.keys())
    except Exception:
        return False
    # a ControlNet is what makes it ours: a file of model.diffusion_model.* alone is somebody's SD UNet
    return any(n.startswith(PREFIX) for n in names) and all(n.startswith((PREFIX, UNET_PREFIX)) for n in names)


def check_target(out: Path, fmt: str, force: bool, model: str = CONTROLNET_CLASS) -> None:
    """Refuse to replace anything but nothing, an empty folder or a previous export (--force overrides)."""
    if force or not out.exists() or (out.is_dir() and not any(out.iterdir())) or is_previous_export(out, fmt, model):
        return
    raise FileExistsError(f"{out} exists and is not a previous {fmt} export: choose another --out, or --force to "
                          f"replace it")


def check_targets(controlnet: Path, out: Path, fmt: str, force: bool) -> None:
    """check_target for every path the export of `controlnet` will write, before it writes any; none in the training
    checkpoint it exports (--force or not)."""
    checkpoint = controlnet.parent.resolve() if controlnet.name == CONTROLNET_DIR else None
    if checkpoint and (out.resolve() == checkpoint or checkpoint in out.resolve().parents):
        # its controlnet/ replaced (in float16, say) no longer matched the sizes progress.json lists: the run's
        # checkpoint was damaged, and resume and export passed it over
        raise FileExistsError(f"--out {out} lies in the checkpoint it exports ({checkpoint}): an export there "
                              "would damage it; choose another --out")
    check_target(out, fmt, force)
    if fmt == "diffusers" and decoder_file(controlnet):
        check_target(unet_folder(out), fmt, force, UNET_CLASS)


def temp_sibling(out: Path, kind: str = "tmp") -> Path:
    """Where `out` is written before it moves into place (tmp), or where the export it replaces waits meanwhile (old):
    named for this host and process, so that a later export clears what a killed one left (clear_left_siblings)."""
    return out.with_name(f".{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}")


def clear_left_siblings(out: Path) -> list[Path]:
    """Remove the temp siblings of `out` that exports killed on this host left (each a whole copy of the weights,
    which nothing else removes); a live export's stay. A previous export that a kill left set aside (between the two
    renames of `replace`, `out` gone) is moved back to `out`, not removed: it is whole, and the user's. The paths
    removed."""
    removed = []
    for kind in ("old", "tmp"):
        prefix = temp_sibling(out, kind).name.rsplit("-", 1)[0] + "-"
        for path in out.parent.glob(f"{glob.escape(prefix)}*"):
            pid = path.name.removeprefix(prefix)
            if not pid.isdigit() or not left_by_a_gone_process(path, int(pid)):
                continue
            if kind == "old" and not out.exists():
                path.rename(out)
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def new_file_mode() -> int:
    """The mode open() gives a new file under this process's umask (0o644 under the usual 022)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def readable_as_umask_says(tmp: Path) -> None:
    """Each file of an export gets the umask's mode: safetensors' save_file creates its files 0o600, so a
    ControlNet exported for a web UI or an inference server running under another account could not be read by
    it, while the config.json beside it could."""
    mode = new_file_mode()
    for path in [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]:
        if path.is_file():
            path.chmod(mode)


def replace(tmp: Path, out: Path) -> None:
    """Move a finished tmp into place; a previous export at `out` goes only once the new one is whole."""
    readable_as_umask_says(tmp)
    if out.is_dir():
        old = temp_sibling(out, "old")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def save_folders(models: Mapping[Path, ModelMixin]) -> None:
    """save_pretrained every model into a temp sibling of its folder, and only then move them all into place: a
    failed save leaves the previous export (both of its folders) as it was."""
    tmps = {out: temp_sibling(out) for out in models}
    try:
        for out, model in models.items():
            shutil.rmtree(tmps[out], ignore_errors=True)
            model.save_pretrained(str(tmps[out]), safe_serialization=True)
        for out, tmp in tmps.items():
            replace(tmp, out)
    finally:
        for tmp in tmps.values():
            shutil.rmtree(tmp, ignore_errors=True)


def write_diffusers(controlnet: ControlNetModel, unet: UNet2DConditionModel | None, out: Path) -> list[Path]:
    """The ControlNet folder at `out`, the trained UNet (if any) beside it. Without one, a UNet left there by an
    earlier export of a large-scale run goes: it would pair a decoder with a ControlNet not trained with it."""
    models = {out: controlnet}
    if unet is not None:
        models[unet_folder(out)] = unet
    elif is_previous_export(unet_folder(out), "diffusers", UNET_CLASS):
        shutil.rmtree(unet_folder(out))
    save_folders(models)
    return list(models)


def write_original(controlnet: ControlNetModel, unet: UNet2DConditionModel | None, out: Path) -> list[Path]:
    """One file, control_model.* and, with a trained UNet, model.diffusion_model.*: the ControlLDM layout."""
    from safetensors.torch import save_file

    weights = to_original(controlnet.state_dict(), controlnet.config)
    if unet is not None:
        weights |= to_original(unet.state_dict(), unet.config, UNET_PREFIX)
    tmp = temp_sibling(out)
    try:
        save_file(weights, str(tmp), metadata={"format": "pt"})
        replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return [out]


def load_controlnet(folder: Path, dtype: torch.dtype) -> ControlNetModel:
    """train.model.load_controlnet (another model's folder, missing tensors, NaN or unreadable weights refused in one
    line; an fp16-only folder loads as `dtype`): from_pretrained built a ControlNet of random weights from a UNet's
    folder, which the export wrote out as a trained one, exit 0."""
    from train.model import NotAControlNet
    from train.model import load_controlnet as load_checked_controlnet

    try:
        return load_checked_controlnet(folder, dtype)
    except NotAControlNet as e:
        raise ValueError(f"{e}: export a training checkpoint, a run folder or an exported ControlNet") from None


def export(checkpoint: Path, fmt: str, out: Path, dtype: torch.dtype | None = None) -> list[Path]:
    """Write the ControlNet of `checkpoint`, and the UNet when the run trained its decoder, to `out` as diffusers
    folders or one original .safetensors file (float32 unless `dtype`). Returns the paths written."""
    import torch

    dtype = dtype or torch.float32
    folder = controlnet_folder(Path(checkpoint))
    controlnet = load_controlnet(folder, dtype)
    decoder = decoder_file(folder)
    unet = trained_unet(decoder, dtype) if decoder else None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for target in (out, unet_folder(out)):
        clear_left_siblings(target)
    return {"diffusers": write_diffusers, "original": write_original}[fmt](controlnet, unet, out)


@dataclass
class ExportArgs:
    """Export a trained ControlNet for inference."""

    checkpoint: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="CHECKPOINT")]
    """A training checkpoint (with controlnet/), a run folder (its latest checkpoint) or a diffusers folder; a local
    path, or a URL (s3://...: what it names is downloaded first)."""
    format: Literal["diffusers", "original"]
    """diffusers: a ControlNetModel folder for StableDiffusionControlNetPipeline (and OUT-unet/, the UNet, when the
    run trained the SD decoder); original: one .safetensors file with control_model.* keys, as A1111 and ComfyUI
    load (and model.diffusion_model.*, the UNet, when the run trained the SD decoder)."""
    out: str
    """Local folder (diffusers) or .safetensors file (original); it must be new, empty or a previous export."""
    force: bool = False
    """Replace whatever --out holds."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """dtype of the written weights."""


def refuse(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    from pipeline.format import StorageFailed, cli, refusing_storage_failures

    args = cli(ExportArgs, args=argv, prog="python -m train.export")
    if "://" in args.out:
        refuse(f"--out {args.out}: exports are written locally; copy them to object storage afterwards "
               "(e.g. aws s3 cp --recursive)")
    out = Path(args.out)
    if args.format == "original" and out.suffix != ".safetensors":
        refuse("--format original writes one file: give --out a .safetensors name")
    with ExitStack() as stack:
        own_words = (FileNotFoundError, FileExistsError, NotADirectoryError)  # (mkdir: a file where a folder goes)
        try:
            with refusing_storage_failures(f"the storage of {args.checkpoint}", keep=own_words):
                folder = controlnet_folder(stack.enter_context(local_copy(args.checkpoint)))
                check_targets(folder, out, args.format, args.force)
                out.parent.mkdir(parents=True, exist_ok=True)
        except (*own_words, StorageFailed) as e:  # StorageFailed: an endpoint that refuses
            refuse(str(e))
        exported = folder.parent.name if folder.name == CONTROLNET_DIR else folder.name
        print(f"exporting {exported} of {args.checkpoint} as {args.format} ({args.dtype})", file=sys.stderr)
        import torch

        try:
            written = export(folder, args.format, out, getattr(torch, args.dtype))
        except ValueError as e:  # not a ControlNet, or weights that do not load (load_controlnet)
            refuse(str(e))
        for path in written:
            print(path)  # stdout: what was written, a line each (the ControlNet, the UNet when trained)


if __name__ == "__main__":
    main()
