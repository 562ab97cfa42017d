"""the toy preset end to end on Ray Train (local mode and a worker): curves from step 0, console progress, results,
and resume across modes"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.build import main as build_dataset
from pipeline.toy_shapes import write_shards
from train.config import toy
from train.run import build_trainer

REPO = Path(__file__).resolve().parent.parent
TOY_CANNY = ["--resolution", "32", "--canny-low", "80", "120", "--canny-high-gap", "60", "100", "--jpeg-quality", "100"]
SMALL = ["--batch-size", "4", "--validation-samples", "6", "--validation-steps", "2", "--validate-every", "2",
         "--checkpoint-every", "2", "--epoch-samples", "16"]
CURVES = {f"fidelity/{mode}/cfg{scale}/edge_f1" for mode in ("caption", "empty") for scale in ("1", "9")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_session) -> Path:
    root = tmp_path_factory.mktemp("toy")
    write_shards(root / "shapes", 48, 3)
    assert build_dataset(["--input", str(root / "shapes"), "--output", str(root / "canny"), *TOY_CANNY]) == 0
    return root / "canny"


@pytest.fixture(scope="module")
def cli_run(dataset, ray_session, tmp_path_factory):
    """`train/run.py --preset toy` for 4 steps, as a user runs it: its output and its storage folder."""
    tmp_path = tmp_path_factory.mktemp("toy-cli")
    env = {**os.environ, "RAY_ADDRESS": ray_session, "WANDB_DIR": str(tmp_path / "wandb"), "PYTHONPATH": str(REPO)}
    # a base given by a path relative to where the command runs, as `make repro` gives its own
    shutil.copytree(REPO / "train" / "toy_base", tmp_path / "my_base")
    done = subprocess.run(
        [sys.executable, "train/run.py", "--preset", "toy", "--data", str(dataset), "--run-name", "toy-cli",
         "--base-model", os.path.relpath(tmp_path / "my_base", REPO),
         "--storage-path", str(tmp_path / "runs"), "--max-steps", "4", "--log-every", "2", "--wandb", "offline",
         *SMALL], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, tmp_path


def test_the_toy_preset_logs_fidelity_from_step_0_and_prints_progress(cli_run):
    out, tmp_path = cli_run
    # a console line per log step on rank 0 (W&B is offline), the curve at the end
    assert out.count("[toy-cli] step 0/4  fidelity/caption/cfg1/edge_f1") == 1  # once, not tee-d twice
    assert "[toy-cli] step 2/4  loss " in out and "[toy-cli] step 4/4  loss " in out and "samples/s" in out
    assert "waiting for data)" in out
    assert "sudden convergence:" in out and "mAUCC" in out
    results = json.loads((tmp_path / "runs" / "toy-cli" / "results.json").read_text())
    fidelity = results["fidelity"]
    assert fidelity["primary"] == "fidelity/caption/cfg1/edge_f1"  # captions, CFG 1: the toy's headline curve
    assert set(fidelity["curves"]) == CURVES
    for curve in fidelity["curves"].values():
        assert curve["steps"] == [0, 2, 4] and all(0.0 <= v <= 1.0 for v in curve["scores"])
    assert set(results["convergence"]) >= {"converged", "step", "start", "plateau", "mauc"}
    keys = results["validation"]["keys"]
    assert len(keys) == len(set(keys)) == 6 and results["validation"]["shards"][0].endswith("00002.tar")
    assert results["config"]["control_branches"] == "cond"
    assert results["config"]["base_model"] == str(tmp_path / "my_base")
    with Image.open(tmp_path / "runs" / "toy-cli" / "fidelity.png") as png:
        assert png.size[0] >= 900
    assert list((tmp_path / "wandb").rglob("offline-run-*-toy-cli-*"))  # a W&B run of its own (tracking.wandb_run_id)


def config(dataset, storage, name, **overrides):
    small = {"batch_size": 4, "validation_samples": 6, "validation_steps": 2, "validate_every": 2,
             "checkpoint_every": 2, "epoch_samples": 16, "wandb": "off"}
    return dataclasses.replace(toy(), data=[str(dataset)], storage_path=str(storage), run_name=name,
                               **{**small, **overrides})


def test_a_resumed_run_continues_exactly_like_the_uninterrupted_one(dataset, cli_run, tmp_path, capsys):
    """Resume, for every base: the same losses, weights and optimizer state, and the same fidelity curves,
    detected step and mAUCC (the curves restored from the checkpoint, not restarted after it). The uninterrupted
    run is the command-line one above (same settings; logging and the base's folder do not change training).
    The first half runs in Ray Train's local mode (the toy's default), the second on a Ray Train worker: both
    modes write, find and resume the same checkpoints, and train the same numbers. Ray Train's num_to_keep
    prunes only the checkpoints it recorded: the worker run deletes the local-mode one itself once it ages out.
    The first half's last checkpoint (step 3) is damaged after it was written, its weights cut short: the second
    half resumes from the one before it (step 2), and still trains what the uninterrupted run trained."""
    first = build_trainer(config(dataset, tmp_path, "halves", max_steps=3)).fit()  # stopped at its step-3 checkpoint
    assert first.metrics["step"] == 3 and Path(first.checkpoint.path).parent == tmp_path / "halves"
    weights = tmp_path / "halves" / "checkpoint_step00000003" / "controlnet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    second = build_trainer(config(dataset, tmp_path, "halves", max_steps=4, num_workers=1,  # resumes
                                  keep_checkpoints=1)).fit()
    said = {line.split(" ", 1)[0]: line for line in capsys.readouterr().out.splitlines()}
    passed_over, resuming = said["passing"], said["resuming"]
    assert passed_over.startswith("passing over ") and "/halves/checkpoint_step00000003: it lacks" in passed_over
    assert resuming.startswith("resuming halves from ") and resuming.endswith("/checkpoint_step00000002")
    assert sorted(p.name for p in (tmp_path / "halves").glob("checkpoint_step*")) == ["checkpoint_step00000004"]
    whole = cli_run[1] / "runs" / "toy-cli"
    uninterrupted, resumed = (json.loads((run / "results.json").read_text()) for run in (whole, tmp_path / "halves"))
    assert resumed["resumed_from"] == 2 and resumed["final_step"] == 4 and uninterrupted["final_step"] == 4
    assert resumed["samples_seen"] == uninterrupted["samples_seen"] == 4 * 4  # summed over both segments
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in uninterrupted["history"]]
    last = max(p for p in whole.glob("checkpoint_*") if p.is_dir())
    a, b = (load_file(Path(folder) / "controlnet" / "diffusion_pytorch_model.safetensors")
            for folder in (last, second.checkpoint.path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(Path(second.checkpoint.path) / "state.pt", weights_only=True)
    assert state["step"] == 4 and state["optimizer"]["state"]  # AdamW moments were restored and kept
    assert uninterrupted["fidelity"]["curves"]["fidelity/caption/cfg1/edge_f1"]["steps"] == [0, 2, 4]
    assert resumed["fidelity"] == uninterrupted["fidelity"]  # every curve, its detected step and mAUCC
    assert resumed["convergence"] == uninterrupted["convergence"]
    assert resumed["validation"] == uninterrupted["validation"]
