"""the tiny SD base model and the ControlNet export, checked against diffusers' pipelines and its own converter"""
from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
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
from safetensors.torch import load_file, save_file

from train import export, tiny_sd
from train.checkpoints import DECODER_FILE, file_sizes
from train.config import TrainConfig
from train.loop import Trainer
from train.model import decoder_parameters, plain_attention_on_cpu
from train.sampling import sample

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
UNET = UNet2DConditionModel.__name__
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

# SD 1.5's and SD 2.1's UNet settings, for the key mappings at full size (on the meta device: no memory)
FULL_SIZE = pytest.mark.parametrize(
    "unet_config",
    [
        {"cross_attention_dim": 768},  # SD1.5
        {"cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True},  # SD2.1
    ],
    ids=["sd15", "sd21"],
)


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
    (ckpt / "progress.json").write_text('{"step": 1}')  # written last: the checkpoint is complete
    return ckpt


def randomise(params, seed: int, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=generator) * scale)


@pytest.fixture(scope="module")
def large_scale(tmp_path_factory, base) -> tuple[Trainer, Path]:
    """A large-scale run's trainer (--unlock-decoder-at) and the checkpoint it saved: its decoder moved away from
    the base's, its ControlNet random (zero convs too), so that dropping either from an export shows."""
    with torch.random.fork_rng():  # the ControlNet's hint embedding starts random: the same one in every run
        torch.manual_seed(0)
        trainer = Trainer(TrainConfig(base_model=str(base), unlock_decoder_at=0), rank=0, world_size=1, device=CPU)
    trainer.unlock_decoder()
    randomise(decoder_parameters(trainer.base.unet), seed=1)
    randomise(trainer.controlnet.parameters(), seed=2)
    ckpt = tmp_path_factory.mktemp("large-scale") / "checkpoint_000001"
    ckpt.mkdir()
    trainer.save(ckpt)
    assert (ckpt / DECODER_FILE).is_file()
    return trainer, ckpt


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
    out = config.get("out_channels", config["in_channels"])  # the UNet's noise; a ControlNet config names none
    ddconfig = {"ch": 128, "ch_mult": [1, 2, 4, 4], "resolution": image_size, "z_channels": 4, "num_res_blocks": 2}
    return {
        "model": {
            "target": "cldm.cldm.ControlLDM",
            "params": {
                "control_key": "hint",
                "control_stage_config": {"target": "cldm.cldm.ControlNet", "params": params},
                "unet_config": {"target": "cldm.cldm.ControlledUnetModel", "params": {**params, "out_channels": out}},
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


def test_exported_files_are_readable_as_the_umask_says_not_by_their_owner_alone(tmp_path, checkpoint):
    """safetensors' save_file creates its files 0o600: an export served by another account (a web UI) could not
    read its weights, while its config.json was readable."""
    previous = os.umask(0o022)
    try:
        export.main([str(checkpoint), "--format", "diffusers", "--out", str(tmp_path / "diffusers")])
        export.main([str(checkpoint), "--format", "original", "--out", str(tmp_path / "control.safetensors")])
    finally:
        os.umask(previous)
    written = [tmp_path / "control.safetensors", *(tmp_path / "diffusers").iterdir()]
    assert len(written) == 3
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in written} == {
        path.name: 0o644 for path in written}


def test_what_a_killed_export_left_beside_its_out_is_cleared_and_a_live_ones_kept(tmp_path, python, checkpoint):
    """An export writes into a sibling of --out (.<out>.tmp-...) and then moves it into place: a kill -9 meanwhile
    left that sibling, a whole copy of the weights (1.4 GB for SD 1.5's ControlNet), and no later export of the same
    --out removed it, each killed one adding its own."""
    import signal
    import socket
    import time

    out = tmp_path / "diffusers"
    command = [python, "-m", "train.export", str(checkpoint), "--format", "diffusers", "--out", str(out)]
    killed = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".diffusers.*")) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    [left] = tmp_path.glob(".diffusers.*")  # what the kill left, as it was
    live = tmp_path / f".diffusers.tmp-{socket.gethostname()}-{os.getppid()}"  # an export running now
    live.mkdir()
    export.main([str(checkpoint), "--format", "diffusers", "--out", str(out)])
    assert not left.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "diffusers"])


def test_a_previous_export_a_kill_left_set_aside_is_put_back_not_removed(tmp_path, checkpoint):
    """An export replacing another moves the previous one aside (.<out>.old-...), then its own into place: a kill
    between the two renames left no --out, and clearing the dead process's siblings removed the previous export."""
    import socket

    out = tmp_path / "diffusers"
    export.main([str(checkpoint), "--format", "diffusers", "--out", str(out)])
    files = sorted(p.relative_to(out) for p in out.rglob("*"))
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process that has ended: the killed export
    host = socket.gethostname()
    out.rename(tmp_path / f".diffusers.old-{host}-{gone.pid}")
    (tmp_path / f".diffusers.tmp-{host}-{gone.pid}").mkdir()  # its new export, not yet moved into place
    export.clear_left_siblings(out)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diffusers"]


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


@FULL_SIZE
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
    # SD1.5's UNet decoder: 3 layers per up block; an upsampler follows a resnet alone or a resnet + attention
    unet = export.Layout(layers_per_block=2, attention_up_blocks=(False, True, True, True))
    assert export.original_key("up_blocks.0.upsamplers.0.conv.weight", unet, export.UNET_PREFIX) == (
        "model.diffusion_model.output_blocks.2.1.conv.weight"
    )
    assert export.original_key("up_blocks.1.upsamplers.0.conv.weight", unet, export.UNET_PREFIX) == (
        "model.diffusion_model.output_blocks.5.2.conv.weight"
    )
    assert export.original_key("up_blocks.3.resnets.2.conv_shortcut.weight", unet, export.UNET_PREFIX) == (
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight"
    )



def test_export_cli_names_a_missing_controlnet(tmp_path, capsys):
    with pytest.raises(SystemExit):
        export.main([str(tmp_path), "--format", "diffusers", "--out", str(tmp_path / "out")])
    assert "controlnet" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a typo: said that it held no config.json
        export.main([str(tmp_path / "norun"), "--format", "diffusers", "--out", str(tmp_path / "out")])
    assert "no such checkpoint or run folder" in capsys.readouterr().err


def test_a_checkpoint_cut_short_is_never_exported(tmp_path, checkpoint, capsys):
    """The README promised it, but a checkpoint folder without progress.json was exported, and a run folder
    holding only such folders ended in an AttributeError traceback."""
    run = tmp_path / "run"
    cut = Path(shutil.copytree(checkpoint, run / "checkpoint_step00000002"))
    (cut / "progress.json").unlink()  # its upload stopped before the end
    for source, message in ((cut, "was cut short (no progress.json"), (run, "none of its checkpoints is complete")):
        with pytest.raises(SystemExit):
            export.main([str(source), "--format", "diffusers", "--out", str(tmp_path / "out")])
        assert message in capsys.readouterr().err and not (tmp_path / "out").exists()
    shutil.copytree(checkpoint, run / "checkpoint_step00000001")  # a complete one beside it: that one is taken
    assert export.controlnet_folder(run) == run / "checkpoint_step00000001" / "controlnet"
    # one damaged since it was written (progress.json lists each file's size): named, refused; in a run, passed over
    damaged = Path(shutil.copytree(checkpoint, run / "checkpoint_step00000003"))
    (damaged / "progress.json").write_text(json.dumps({"step": 3, "files": file_sizes(damaged)}))
    weights = damaged / "controlnet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SystemExit):
        export.main([str(damaged), "--format", "diffusers", "--out", str(tmp_path / "out")])
    assert "holds one cut short, since it was written" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert export.controlnet_folder(run) == run / "checkpoint_step00000001" / "controlnet"


def test_a_folder_of_another_model_or_of_weights_cut_short_is_refused_not_exported_as_random(tmp_path, base,
                                                                                            checkpoint, capsys):
    """A diffusers folder of another model (the base's UNet or VAE) loaded as a ControlNet of random weights, which
    was written out as the trained one, exit 0; a ControlNet folder whose weights were cut short (no progress.json
    beside it to tell) ended in diffusers' OSError traceback."""
    cut = Path(shutil.copytree(checkpoint / "controlnet", tmp_path / "cut"))
    weights = cut / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for source, message in ((base / "unet", "holds UNet2DConditionModel weights, not a ControlNetModel's"),
                            (base / "vae", "holds AutoencoderKL weights, not a ControlNetModel's"),
                            (cut, f"{cut} does not load as a ControlNetModel")):
        with pytest.raises(SystemExit) as stop:
            export.main([str(source), "--format", "diffusers", "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()


def test_a_controlnet_folder_holding_only_its_fp16_variant_is_exported(tmp_path, controlnet):
    """A published ControlNet downloaded with variant="fp16" holds diffusion_pytorch_model.fp16.safetensors alone:
    export refused it (diffusers looked for the plain files), as it would any folder without weights."""
    folder = tmp_path / "control_fp16"
    copy.deepcopy(controlnet).half().save_pretrained(folder, variant="fp16")
    assert [p.name for p in folder.glob("*.safetensors")] == ["diffusion_pytorch_model.fp16.safetensors"]
    export.main([str(folder), "--format", "diffusers", "--out", str(tmp_path / "out")])
    exported = ControlNetModel.from_pretrained(tmp_path / "out")
    assert exported.dtype == torch.float32
    expected = {k: v.half().float() for k, v in controlnet.state_dict().items()}
    got = exported.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_an_out_inside_the_checkpoint_it_exports_is_refused_and_leaves_it_whole(tmp_path, checkpoint, capsys):
    """--out RUN/checkpoint_x/controlnet, the checkpoint's own ControlNet folder, looked like a previous export and
    was replaced (in float16 here): the run's checkpoint no longer matched its progress.json, and resume and export
    passed it over (a run with one checkpoint lost it)."""
    run = tmp_path / "run"
    ckpt = Path(shutil.copytree(checkpoint, run / "checkpoint_step00000001"))
    (ckpt / "progress.json").write_text(json.dumps({"step": 1, "files": file_sizes(ckpt)}))
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    for out in (ckpt / "controlnet", ckpt / "export", ckpt / ".." / ckpt.name / "controlnet"):
        with pytest.raises(SystemExit) as stop:
            export.main([str(run), "--format", "diffusers", "--out", str(out), "--dtype", "float16", "--force"])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "lies in the checkpoint it exports" in err, err
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before
    assert export.controlnet_folder(run) == ckpt / "controlnet"


def test_export_never_replaces_what_is_not_an_export(tmp_path, checkpoint, capsys):
    dataset = tmp_path / "dataset"
    (dataset / "shards").mkdir(parents=True)
    (dataset / "shards" / "00000.tar").write_bytes(b"precious")
    with pytest.raises(SystemExit):
        export.main([str(checkpoint), "--format", "diffusers", "--out", str(dataset)])
    assert "--force" in capsys.readouterr().err and (dataset / "shards" / "00000.tar").read_bytes() == b"precious"
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"not an export")
    with pytest.raises(SystemExit):
        export.main([str(checkpoint), "--format", "original", "--out", str(model)])
    assert model.read_bytes() == b"not an export"
    with pytest.raises(SystemExit):
        export.main([str(checkpoint), "--format", "diffusers", "--out", "s3://bucket/controlnet"])
    assert "written locally" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a file where --out's folder goes: a FileExistsError traceback
        export.main([str(checkpoint), "--format", "diffusers", "--out", str(model / "sub")])
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and str(model) in error and "\n" not in error, error

    out = tmp_path / "export"
    for _ in range(2):  # a previous export is replaced
        export.main([str(checkpoint), "--format", "diffusers", "--out", str(out)])
        export.main([str(checkpoint), "--format", "original", "--out", str(model), "--force"])
        export.main([str(checkpoint), "--format", "original", "--out", str(model)])
    assert (out / "config.json").exists() and export.is_previous_export(model, "original")
    export.main([str(checkpoint), "--format", "diffusers", "--out", str(dataset), "--force"])
    assert export.is_previous_export(dataset, "diffusers")


def test_large_scale_export_reproduces_the_trainers_validation_sample(tmp_path, base, large_scale, capsys):
    """The diffusers export of a run that trained the SD decoder: a pipeline built from the base, the exported
    UNet and the exported ControlNet draws the trainer's own validation sample, to the bit when it computes
    attention as the trainer does on CPU (PyTorch's SDPA, the pipeline's default, rounds ~1e-5 apart); the
    base's UNet does not."""
    trainer, ckpt = large_scale
    out = tmp_path / "controlnet"
    export.main([str(ckpt), "--format", "diffusers", "--out", str(out)])
    unet_out = tmp_path / "controlnet-unet"
    printed = capsys.readouterr()
    assert printed.out.split() == [str(out), str(unet_out)]
    assert printed.err.strip() == f"exporting {ckpt.name} of {ckpt} as diffusers (float32)", printed.err

    exported, trained = UNet2DConditionModel.from_pretrained(unet_out), trainer.base.unet.state_dict()
    original = UNet2DConditionModel.from_pretrained(base, subfolder="unet").state_dict()
    decoder = {n for n, p in trainer.base.unet.named_parameters() if p.requires_grad}
    assert exported.state_dict().keys() == trained.keys()
    assert all(torch.equal(exported.state_dict()[k], trained[k]) for k in trained)
    assert all(torch.equal(trained[k], original[k]) != (k in decoder) for k in trained)  # only the decoder moved

    conditions = (torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    prompts = ["a red house", "a dog on the street"]
    ours = sample(trainer.base, trainer.controlnet, conditions, prompts, steps=3, guidance_scale=7.0, seed=5,
                  branches="both", sampler="ddim", device=CPU)

    def pipeline_images(unet: UNet2DConditionModel) -> np.ndarray:
        pipe = StableDiffusionControlNetPipeline.from_pretrained(
            base, unet=unet, controlnet=ControlNetModel.from_pretrained(out),
            scheduler=DDIMScheduler.from_pretrained(base, subfolder="scheduler"))
        pipe.set_progress_bar_config(disable=True)
        plain_attention_on_cpu(CPU, pipe.unet, pipe.controlnet)
        return pipe(prompt=prompts, image=conditions, num_inference_steps=3, guidance_scale=7.0, height=SIZE,
                    width=SIZE, generator=[torch.Generator().manual_seed(5 + i) for i in range(2)],
                    output_type="np").images

    np.testing.assert_array_equal(pipeline_images(exported), ours)
    base_unet = pipeline_images(UNet2DConditionModel.from_pretrained(base, subfolder="unet"))
    assert np.abs(base_unet - ours).max() > 1e-2  # the decoder is what makes the sample


def test_large_scale_original_export_round_trips_the_unet(tmp_path, large_scale):
    """One ControlLDM-layout file: control_model.* as before, and the whole trained UNet under
    model.diffusion_model.*, which diffusers' own converter reads back to the same state dict."""
    trainer, ckpt = large_scale
    out = tmp_path / "control_large.safetensors"
    export.main([str(ckpt), "--format", "original", "--out", str(out)])
    original = load_file(out)
    control = export.to_original(trainer.controlnet.state_dict(), trainer.controlnet.config)
    assert {k for k in original if k.startswith("control_model.")} == control.keys()
    expected = trainer.base.unet.state_dict()
    assert sum(k.startswith("model.diffusion_model.") for k in original) == len(expected)
    assert len(original) == len(control) + len(expected)

    cldm = cldm_config(dict(trainer.controlnet.config), SIZE)  # the ControlNet shares the UNet's architecture
    back = convert_ldm_unet_checkpoint(dict(original), create_unet_diffusers_config(cldm, image_size=SIZE))
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)


@FULL_SIZE
def test_original_unet_keys_at_full_size(unet_config):
    """Real-size UNets on the meta device: two layers per block, upsamplers after a resnet alone (the first up
    block) and after resnet + attention (the others); each tensor comes back from diffusers' converter as itself."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    state = unet.state_dict()
    original = export.to_original(state, unet.config, export.UNET_PREFIX)
    assert len(original) == len(state)
    # names as in the published v1-5-pruned.ckpt
    assert {"model.diffusion_model.output_blocks.2.1.conv.weight", "model.diffusion_model.output_blocks.5.2.conv.bias",
            "model.diffusion_model.output_blocks.11.1.proj_out.weight", "model.diffusion_model.out.2.weight",
            "model.diffusion_model.out.0.bias"} <= original.keys()

    cldm = cldm_config({**unet.config, "conditioning_channels": 3}, 512)  # the hint's channels name no UNet key
    config = create_unet_diffusers_config(cldm, image_size=512)
    back = convert_ldm_unet_checkpoint(dict(original), config)
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)


def test_re_export_replaces_both_parts_and_nothing_else(tmp_path, large_scale, checkpoint, capsys):
    _, ckpt = large_scale
    out, unet_out = tmp_path / "controlnet", tmp_path / "controlnet-unet"
    for _ in range(2):  # the second replaces the two-part export of the first
        export.main([str(ckpt), "--format", "diffusers", "--out", str(out)])
    assert export.is_previous_export(out, "diffusers") and export.is_previous_export(unet_out, "diffusers", UNET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["controlnet", "controlnet-unet"]  # no temp folder left

    # the UNet's folder is checked before anything is written
    shutil.rmtree(unet_out)
    (unet_out / "notes").mkdir(parents=True)
    stamp = (out / "config.json").stat().st_mtime_ns
    with pytest.raises(SystemExit):
        export.main([str(ckpt), "--format", "diffusers", "--out", str(out)])
    assert "--force" in capsys.readouterr().err
    assert (unet_out / "notes").is_dir() and (out / "config.json").stat().st_mtime_ns == stamp
    export.main([str(ckpt), "--format", "diffusers", "--out", str(out), "--force"])
    assert export.is_previous_export(unet_out, "diffusers", UNET)

    # a ControlNet without a decoder takes the stale UNet away: it was trained with another ControlNet
    export.main([str(checkpoint), "--format", "diffusers", "--out", str(out)])
    assert not unet_out.exists() and export.is_previous_export(out, "diffusers")

    model = tmp_path / "control.safetensors"
    for _ in range(2):
        export.main([str(ckpt), "--format", "original", "--out", str(model)])
    assert export.is_previous_export(model, "original")
    sd_unet = tmp_path / "unet.safetensors"  # somebody's SD UNet in the ldm layout is no export of ours
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, sd_unet)
    with pytest.raises(SystemExit):
        export.main([str(ckpt), "--format", "original", "--out", str(sd_unet)])
    assert list(load_file(sd_unet)) == ["model.diffusion_model.out.2.bias"]


def test_a_run_on_object_storage_is_exported_from_its_latest_complete_checkpoint(tmp_path, checkpoint, controlnet,
                                                                                  s3_endpoint, capsys):
    """The README's runs keep their checkpoints on s3://, which export took for a local path ('s3:/b/...': no such
    folder): it had to be downloaded by hand first."""
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("cnd-export")
    fs.put(str(checkpoint), "cnd-export/runs/r/checkpoint_step00000001", recursive=True)
    fs.put(str(checkpoint / "controlnet"), "cnd-export/runs/r/checkpoint_step00000002/controlnet", recursive=True)
    # step 2 has no progress.json (cut short): step 1 is the latest complete checkpoint
    out = tmp_path / "out"
    export.main(["s3://cnd-export/runs/r", "--format", "diffusers", "--out", str(out)])
    assert "downloading s3://cnd-export/runs/r/checkpoint_step00000001" in capsys.readouterr().err
    exported = ControlNetModel.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), controlnet.state_dict().values(),
                                                 strict=True))
    step3 = "cnd-export/runs/r/checkpoint_step00000003"
    fs.put(str(checkpoint / "controlnet"), f"{step3}/controlnet", recursive=True)
    files = {p.relative_to(checkpoint).as_posix(): p.stat().st_size for p in checkpoint.rglob("controlnet/*")}
    fs.pipe_file(f"{step3}/progress.json", json.dumps({"step": 3, "files": files}).encode())
    fs.pipe_file(f"{step3}/controlnet/config.json", b"{}")  # damaged since it was written: a file at another size
    for missing, message in (("s3://cnd-export/nothing", "no such checkpoint or run folder"),
                             ("s3://cnd-export/runs/r/checkpoint_step00000002", "was cut short"),
                             ("s3://cnd-export/runs/r/checkpoint_step00000003", "holds one cut short")):
        with pytest.raises(SystemExit):
            export.main([missing, "--format", "diffusers", "--out", str(tmp_path / "other")])
        err = capsys.readouterr().err  # named as given, refused before any download (it named the temp copy)
        assert err.startswith(f"error: {missing}") and message in err and "downloading" not in err, err
