"""--controlnet: a run starts from an existing ControlNet (one of our exports, an fp16-only folder), and one that is not
a whole ControlNet fitting the base is refused in one line, as is a resume with another"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel
from safetensors.torch import load_file, save_file

from train import export
from train.checkpoints import checkpoint_name, run_url
from train.config import TrainConfig, debug
from train.loop import RunRefused, Trainer
from train.run import ResumeMismatch, checkpoint_to_resume, with_absolute_paths
from train.run import main as train
from train.tiny_sd import build_tiny_sd

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> str:
    return str(build_tiny_sd(tmp_path_factory.mktemp("pretrained") / "tiny-sd"))


def config(tiny_sd: str, **overrides) -> TrainConfig:
    return dataclasses.replace(debug(), base_model=tiny_sd, resolution=64, batch_size=2, **overrides)


def batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1,
            "conditioning_pixel_values": (torch.rand(2, 3, 64, 64, generator=g) > 0.8).float(),
            "caption": ["a red square", ""]}


def saved_checkpoint(trainer: Trainer, storage: Path, run: str, step: int = 1) -> Path:
    """The trainer's checkpoint where a run's resume finds it."""
    trainer.state.step = step
    folder = Path(run_url(str(storage), run)) / checkpoint_name(step)
    folder.mkdir(parents=True)
    trainer.save(folder)
    return folder


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, different[:3]


@pytest.fixture(scope="module")
def exported(tiny_sd, tmp_path_factory) -> Path:
    """A short run's ControlNet (two steps at a large learning rate: its zero convolutions are no longer zero),
    checkpointed by the trainer and exported by train.export, as a user would."""
    torch.manual_seed(0)
    trainer = Trainer(config(tiny_sd, lr=1e-2), 0, 1, CPU)
    for step in range(2):
        trainer.train_step([batch(step)], torch.Generator().manual_seed(step))
    storage = tmp_path_factory.mktemp("short-run")
    checkpoint = saved_checkpoint(trainer, storage, "short")
    out = storage / "export"
    export.main([str(checkpoint), "--format", "diffusers", "--out", str(out)])
    return out


def test_a_run_started_from_an_export_begins_with_its_weights_and_exports_normally(tiny_sd, exported, tmp_path):
    """At step 0 the trained ControlNet is the export (not a copy of the UNet with zero convolutions); an export
    written as its fp16 variant alone starts the run as fp32; the run's own checkpoint exports as any other."""
    expected = weights(ControlNetModel.from_pretrained(exported))
    assert expected["controlnet_mid_block.weight"].abs().sum() > 0  # what a fresh ControlNet holds as zeros
    trainer = Trainer(config(tiny_sd, controlnet=str(exported)), 0, 1, CPU)
    assert_same(weights(trainer.controlnet), expected)
    assert trainer.controlnet.dtype == torch.float32

    fp16 = tmp_path / "fp16"
    ControlNetModel.from_pretrained(exported).half().save_pretrained(fp16, variant="fp16")
    assert [p.name for p in fp16.glob("*.safetensors")] == ["diffusion_pytorch_model.fp16.safetensors"]
    from_fp16 = Trainer(config(tiny_sd, controlnet=f"file://{fp16}"), 0, 1, CPU)
    assert from_fp16.controlnet.dtype == torch.float32
    assert_same(weights(from_fp16.controlnet), {k: v.half().float() for k, v in expected.items()})

    trainer.train_step([batch(5)], torch.Generator().manual_seed(5))
    checkpoint = saved_checkpoint(trainer, tmp_path / "runs", "tuned")
    assert json.loads((checkpoint / "train_config.json").read_text())["controlnet"] == str(exported)  # the record
    export.main([str(checkpoint.parent), "--format", "diffusers", "--out", str(tmp_path / "tuned-export")])
    assert_same(weights(ControlNetModel.from_pretrained(tmp_path / "tuned-export")), weights(trainer.controlnet))


def mismatched(tiny_sd: str, folder: Path, **changes) -> Path:
    """A ControlNet of the tiny SD's UNet but for `changes` (other block_out_channels, ...), saved as diffusers
    saves one."""
    unet = json.loads((Path(tiny_sd) / "unet" / "config.json").read_text())
    kept = {k: unet[k] for k in ("in_channels", "block_out_channels", "layers_per_block", "down_block_types",
                                 "cross_attention_dim", "attention_head_dim", "norm_num_groups")}
    ControlNetModel(**{**kept, **changes}).save_pretrained(folder)
    return folder


def refusal(argv: list[str], capsys) -> str:
    assert train(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Traceback" not in error, error
    return error


def test_a_controlnet_that_is_not_a_whole_one_fitting_the_base_is_refused_in_one_line(tiny_sd, exported, tmp_path,
                                                                                       capsys):
    """On the driver, before the data is read or Ray starts (--data is not even there); the same misfit found on a
    worker (a remote --controlnet, which the driver reads only the config of) is a RunRefused, one line too."""
    run = ["--base-model", tiny_sd, "--data", str(tmp_path / "no-data"), "--run-name", "t",
           "--storage-path", str(tmp_path / "runs"), "--wandb", "off"]
    other = mismatched(tiny_sd, tmp_path / "other", block_out_channels=(16, 64), norm_num_groups=16)
    assert refusal([*run, "--controlnet", str(other)], capsys) == (
        f"error: --controlnet {other} does not fit the base model: block_out_channels [16, 64] "
        "(the base UNet's: [32, 64])")
    wide = mismatched(tiny_sd, tmp_path / "wide", cross_attention_dim=64, in_channels=3,
                      conditioning_embedding_out_channels=(16, 32))
    error = refusal([*run, "--controlnet", str(wide)], capsys)
    assert all(s in error for s in ("in_channels 3 (the base UNet's: 4)", "cross_attention_dim 64 (",
                                    "conditioning_embedding_out_channels [16, 32] bring the condition map down 2x"))

    nan = tmp_path / "nan"
    nan_model = ControlNetModel.from_pretrained(exported)
    with torch.no_grad():
        nan_model.controlnet_mid_block.weight[0, 0, 0, 0] = float("nan")
    nan_model.save_pretrained(nan)
    cut = tmp_path / "cut"
    ControlNetModel.from_pretrained(exported).save_pretrained(cut)
    tensors = load_file(cut / "diffusion_pytorch_model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("controlnet_down_blocks.0.")},
              cut / "diffusion_pytorch_model.safetensors")
    for controlnet, message in ((tmp_path / "nowhere", "no config.json there"),
                                (Path(tiny_sd) / "unet", "holds UNet2DConditionModel weights, not a ControlNetModel's"),
                                (nan, "is not a ControlNetModel: NaN or inf in 1 of its"),
                                (cut, "is not a ControlNetModel: its weights lack 2 of the model's tensors")):
        error = refusal([*run, "--controlnet", str(controlnet)], capsys)
        assert error.startswith(f"error: --controlnet {controlnet}") and message in error, error
    error = refusal([*run, "--controlnet", "nobody/no-such-controlnet"], capsys)
    assert "neither a folder here nor in the Hugging Face hub's local cache" in error

    with pytest.raises(RunRefused, match=f"^--controlnet {other} does not fit the base model: block_out_channels"):
        Trainer(config(tiny_sd, controlnet=str(other)), 0, 1, CPU)


def test_a_resume_with_another_controlnet_is_refused_and_one_with_the_same_loads_its_checkpoint(tiny_sd, exported,
                                                                                              tmp_path):
    """--controlnet is an experiment setting; the resumed run's weights are its checkpoint's, not the --controlnet's
    it started from."""
    cfg = with_absolute_paths(config(tiny_sd, controlnet=str(exported), storage_path=str(tmp_path / "runs"),
                                     run_name="tuned"))
    trainer = Trainer(cfg, 0, 1, CPU)
    trainer.train_step([batch(7)], torch.Generator().manual_seed(7))
    checkpoint = saved_checkpoint(trainer, tmp_path / "runs", "tuned")
    other = with_absolute_paths(dataclasses.replace(cfg, controlnet=str(tmp_path / "another")))
    with pytest.raises(ResumeMismatch, match=f"controlnet '{exported}' -> '{tmp_path / 'another'}'"):
        checkpoint_to_resume(other)
    with pytest.raises(ResumeMismatch, match=f"controlnet '{exported}' -> None"):
        checkpoint_to_resume(dataclasses.replace(cfg, controlnet=None))
    assert checkpoint_to_resume(cfg).removeprefix("file://") == str(checkpoint)
    resumed = Trainer(cfg, 0, 1, CPU)
    resumed.load(checkpoint)
    assert_same(weights(resumed.controlnet), weights(trainer.controlnet))


def test_a_controlnet_on_object_storage_is_checked_on_the_driver_and_loaded_by_the_trainer(tiny_sd, exported, tmp_path,
                                                                                          s3_endpoint, monkeypatch,
                                                                                          capsys):
    """s3://, as a run's exports may be kept: the driver reads its config.json (a misfit is refused before Ray
    starts, its weights not downloaded), the trainer a copy per version of the folder (one replaced at the same URL
    is copied again, not taken from the old copy)."""
    import fsspec

    monkeypatch.setattr("annotate.weights.DEFAULT_CACHE", tmp_path / "cache")
    fs = fsspec.filesystem("s3")
    fs.mkdir("cnd-pretrained")
    fs.put(str(exported), "cnd-pretrained/tuned", recursive=True)
    trainer = Trainer(config(tiny_sd, controlnet="s3://cnd-pretrained/tuned"), 0, 1, CPU)
    assert_same(weights(trainer.controlnet), weights(ControlNetModel.from_pretrained(exported)))

    other = mismatched(tiny_sd, tmp_path / "other", block_out_channels=(16, 64), norm_num_groups=16)
    fs.put(str(other), "cnd-pretrained/other", recursive=True)
    error = refusal(["--base-model", tiny_sd, "--data", str(tmp_path / "no-data"), "--run-name", "t",
                     "--storage-path", str(tmp_path / "runs"), "--controlnet", "s3://cnd-pretrained/other"], capsys)
    assert error.startswith("error: --controlnet s3://cnd-pretrained/other does not fit the base model: ")
    assert len(list((tmp_path / "cache").glob("folders/*"))) == 1  # the first one's copy only

    fs.rm("cnd-pretrained/tuned", recursive=True)  # replaced: the next run starts from the new weights
    fs.put(str(other), "cnd-pretrained/tuned", recursive=True)
    with pytest.raises(RunRefused, match="does not fit the base model"):
        Trainer(config(tiny_sd, controlnet="s3://cnd-pretrained/tuned"), 0, 1, CPU)


def test_a_remote_controlnet_found_wanting_on_the_workers_ends_the_run_at_its_first_attempt(
        tiny_sd, exported, canny64, tmp_path, s3_endpoint, capsys, worker_errors):
    """An s3:// ControlNet whose config fits but whose weights lack tensors: the driver reads its config.json alone,
    the workers find the rest. Raised there, the refusal failed the worker group, which Ray Train restarted
    --max-failures times, each loading the base again; now every rank returns it, and the command says it in one
    line, exit 2, with no failed attempt and nothing written."""
    import fsspec

    cut = tmp_path / "cut"
    ControlNetModel.from_pretrained(exported).save_pretrained(cut)
    tensors = load_file(cut / "diffusion_pytorch_model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("controlnet_down_blocks.0.")},
              cut / "diffusion_pytorch_model.safetensors")
    fs = fsspec.filesystem("s3")
    fs.mkdir("cnd-pretrained-cut")
    fs.put(str(cut), "cnd-pretrained-cut/cut", recursive=True)
    error = refusal(["--preset", "debug", "--base-model", tiny_sd, "--data", str(canny64), "--run-name", "cut",
                     "--storage-path", str(tmp_path / "runs"), "--wandb", "off", "--max-steps", "2",
                     "--controlnet", "s3://cnd-pretrained-cut/cut", "--num-workers", "1", "--max-failures", "2"],
                    capsys)
    assert error.startswith("error: --controlnet ") and "its weights lack 2 of the model's tensors" in error, error
    assert not worker_errors.exists(), worker_errors.read_text()  # no attempt failed: none was retried
    assert not (tmp_path / "runs" / "cut").exists() or not any((tmp_path / "runs" / "cut").rglob("checkpoint*"))
