"""`make dataset TASK=... CAPTION=blip` end to end for every task, on tiny weights in the published layouts"""
import json
import os
import re
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from annotate import annotator_params
from pipeline import format as fmt
from pipeline.build import main as build_dataset
from tests.conftest import REPO
from tests.tiny_weights.blip import write_tiny_blip
from tests.tiny_weights.hed import write_tiny_hed
from tests.tiny_weights.midas import write_tiny_dpt
from tests.tiny_weights.openpose import write_tiny_openpose

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """One --weights folder holding every model by its published name, as a user would lay it out."""
    folder = tmp_path_factory.mktemp("weights")
    write_tiny_hed(folder)
    write_tiny_openpose(folder)
    write_tiny_dpt(folder)
    write_tiny_blip(folder)
    return folder


@pytest.fixture(scope="module")
def small_input(sample_shards, tmp_path_factory) -> Path:
    """One sample shard (12 photos): quick with real-size HED/OpenPose networks on CPU."""
    folder = tmp_path_factory.mktemp("small")
    for name in ("00002.tar",):
        (folder / name).write_bytes((sample_shards / name).read_bytes())
    return folder


# hed through `make dataset` as a user types it; MiDaS and OpenPose run (with HED and BLIP) in one multi-task job
# in tests/test_multitask.py, which checks the same records per task; scribble is HED's network
# (tests/test_scribble.py)
@pytest.mark.parametrize("task", ["hed"])
def test_make_dataset_with_blip_captions(task, weights, small_input, tmp_path, ray_session):
    out = tmp_path / task
    args = ["--resolution", "64", "--batch-size", "4", "--detect-resolution", "64"]  # 512 is slow on a CPU
    if task == "hed":
        command = ["make", "-s", "-o", ".venv/.installed", "dataset", f"TASK={task}", f"INPUT={small_input}",
                   f"OUTPUT={out}", "CAPTION=blip", f"WEIGHTS={weights}", f"ARGS={' '.join(args)}",
                   f"PY={os.sys.executable}"]
        env = {**os.environ, "RAY_ADDRESS": ray_session}
        run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    else:
        assert build_dataset(["--task", task, "--input", str(small_input), "--output", str(out), "--caption", "blip",
                              "--weights", str(weights), *args]) == 0

    manifest = json.loads((out / fmt.MANIFEST).read_text())
    assert manifest["task"] == task and manifest["captioner"]["name"] == "blip"
    # --detect-resolution: recorded, handed to the annotator (the trainer's fidelity annotator reads it back)
    assert manifest["config"]["detect_resolution"] == 64 and manifest["annotator"]["detect_resolution"] == 64
    assert annotator_params(task, manifest["config"])["detect_resolution"] == 64
    assert re.search(r"\b[0-9a-f]{64}\b", json.dumps(manifest["annotator"]))  # the weights' sha256
    assert sum(manifest["totals"].values()) == 12
    rows = [r for p in sorted((out / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == 12
    written = [s for tar in sorted((out / "shards").glob("*.tar"))
               for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False).decode("rgb8")]
    assert len(written) == manifest["totals"]["ok"]
    for sample in written:
        condition = sample[fmt.condition_ext(task)]
        assert condition.shape == (64, 64, 3)  # decoded as RGB; the stored PNG is 1 or 3 channels
        assert sample["json"]["caption_source"] == "blip" and isinstance(sample["txt"], str)
        assert sample["json"]["params"]["detect_resolution"] == 64
    if task == "openpose":
        assert all("keypoint_fraction" in json.loads(r["params"]) for r in rows if r["status"] != "failed")
        assert all("30%" in r["error"] for r in rows if r["status"] == "filtered")
    else:
        assert manifest["totals"]["ok"] == 12


def test_weights_naming_a_file_is_one_line_before_ray(weights, small_input, tmp_path, capsys):
    """--weights takes a folder: a file there passed the driver's check, and each actor found no published file
    under it."""
    assert build_dataset(["--task", "hed", "--input", str(small_input), "--output", str(tmp_path / "o"),
                          "--weights", str(weights / "ControlNetHED.pth")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: --weights") and "ControlNetHED.pth: not a folder" in last, last
    assert not (tmp_path / "o").exists()  # refused before the job made its output, let alone started actors


def test_the_midas_checkpoint_named_as_a_file_is_still_taken_alone(tmp_path):
    """MiDaS's loader takes its original checkpoint named as a file: a midas-only job given one passes the driver's
    check; with HED or BLIP beside it, which look up files in a folder, it is refused."""
    from pipeline.build import check_local_weights
    from pipeline.config import BuildConfig

    checkpoint = tmp_path / "dpt_hybrid-midas-501f0c75.pt"
    checkpoint.write_bytes(b"")
    check_local_weights(BuildConfig(task="midas", weights=str(checkpoint), caption="none"))
    for task, caption in (("hed,midas", "none"), ("midas", "blip")):
        with pytest.raises(ValueError, match="not a folder"):
            check_local_weights(BuildConfig(task=task, weights=str(checkpoint), caption=caption))


def test_missing_weights_are_one_clear_line(small_input, tmp_path, python, ray_session):
    """A --weights folder without the file is one line naming it; a --weights folder that is not there is one line
    before Ray starts (each actor found it missing)."""
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for weights, expected in ((tmp_path / "empty", "ControlNetHED.pth"), (tmp_path / "absent", "no such folder")):
        run = subprocess.run([python, "-m", "pipeline.build", "--task", "hed", "--input", str(small_input),
                              "--output", str(tmp_path / "o"), "--weights", str(weights)],
                             cwd=REPO, env={**env, "RAY_ADDRESS": ray_session}, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 2, run.stderr[-3000:]
        last = run.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and expected in last and "--weights" in last, last


def test_tiny_weights_command_writes_what_each_model_looks_up(tmp_path, python):
    """`make tiny-weights` (python -m tests.tiny_weights OUT), which the README gives for running the neural tasks
    offline: every file the annotators and BLIP look up by its published name."""
    from annotate import blip, hed, midas, openpose

    run = subprocess.run([python, "-m", "tests.tiny_weights", str(tmp_path / "w")], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr[-2000:]
    for name in (hed.WEIGHT_FILE, openpose.WEIGHT_FILE, f"{midas.HF_FOLDER}/config.json",
                 f"{blip.HF_FOLDER}/config.json"):
        assert (tmp_path / "w" / name).is_file(), name
