"""the trainer on Ray Train end to end: gloo DDP, W&B offline, a killed worker resumed from its checkpoint on S3
(resume: test_toy_preset; DDP without Ray: test_ddp)"""
import dataclasses
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (
    REPO,
    copy_dataset,
    own_output,
    own_ray_processes,
    processes_with_ray_tmpdir,
    sigterm_whose_handler_has_not_run,
    stopped_while_ray_starts,
    wandb_logged_steps,
    wandb_run_ids,
    with_ctrl_c,
)
from train.checkpoints import forget_stale_ray_record, latest_checkpoint, step_of
from train.config import debug
from train.run import build_trainer

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def dataset(canny64, tmp_path_factory) -> Path:
    return copy_dataset(canny64, tmp_path_factory, "canny")


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def config(dataset, storage, name, **overrides):
    overrides = {"wandb": "off", **overrides}
    return dataclasses.replace(debug(), data=[str(dataset)], storage_path=str(storage), run_name=name, **overrides)


def results(storage, name) -> dict:
    return json.loads((storage / name / "results.json").read_text())


def final_weights(result) -> dict[str, torch.Tensor]:
    return load_file(Path(result.checkpoint.path) / "controlnet" / "diffusion_pytorch_model.safetensors")


def files_holding(text: str, *folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def test_two_workers_on_gloo_stay_in_sync(dataset, storage, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    key = "wandb-key-" + os.urandom(8).hex()  # must reach the workers, and be written nowhere
    monkeypatch.setenv("WANDB_API_KEY", key)
    cfg = config(dataset, storage, "ddp", num_workers=2, max_steps=4, checkpoint_every=2, wandb="offline",
                 validate_every=2, grad_accum=2)  # accumulation exercises DDP's no_sync on the first micro-batch
    result = build_trainer(cfg).fit()
    assert result.metrics["step"] == 4 and result.metrics["ranks_in_sync"] == 1.0
    # the folders local mode writes too, each published progress.json last (Ray Train's own upload copies files
    # in no set order: a folder cut short could hold progress.json without its weights)
    folders = sorted(p for p in (storage / "ddp").glob("checkpoint_*") if p.is_dir())
    assert [f.name for f in folders] == ["checkpoint_step00000002", "checkpoint_step00000004"]
    assert Path(result.checkpoint.path) == folders[-1]
    for folder in folders:
        written = {p.name: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
        assert len(written) > 3 and written["progress.json"] == max(written.values())
    weights = final_weights(result)
    zero_convs = [k for k in weights if k.startswith("controlnet_down_blocks") and k.endswith("weight")]
    assert zero_convs and all(weights[k].abs().sum() > 0 for k in zero_convs)  # it really trained
    # W&B ran offline on rank 0 only: one offline run folder with the run's history and validation grids
    runs = list((tmp_path / "wandb").rglob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert files_holding("from the driver: WANDB_API_KEY", runs[0])  # rank 0's note: the key reached it
    ray_files = Path(os.environ["RAY_TMPDIR"])
    assert not files_holding(key, tmp_path / "wandb", storage / "ddp", ray_files)  # logs, configs, checkpoints
    grids = sorted(runs[0].rglob("media/images/validation/grid_*.png"), key=lambda g: int(g.name.split("_")[1]))
    assert [g.name.split("_")[1] for g in grids] == ["0", "2", "4"]  # the starting level first
    # the condition-fidelity curves (Canny re-run on generated images, edge F1) with their detection and mAUCC
    assert results(storage, "ddp")["samples_seen"] == 4 * cfg.batch_size * 2 * 2  # steps x batch x accum x ranks
    fidelity = results(storage, "ddp")["fidelity"]
    assert fidelity["primary"] == "fidelity/caption/cfg9/edge_f1"  # first prompt mode, first (the paper's) scale
    assert set(fidelity["curves"]) == {f"fidelity/{mode}/cfg{scale}/edge_f1" for mode in ("caption", "empty", "default")
                                       for scale in ("9", "1")}
    for curve in fidelity["curves"].values():
        assert curve["steps"] == [0, 2, 4] and all(0.0 <= v <= 1.0 for v in curve["scores"])
        assert curve["converged"] is False and "too few evaluations" in curve["reason"] and curve["mauc"] is not None


def _registered_checkpoints(fs, run: str) -> int:
    """Checkpoints Ray Train has registered (a checkpoint folder alone may still be mid-upload)."""
    fs.invalidate_cache()
    try:
        return len(json.loads(fs.cat_file(f"{run}/checkpoint_manager_snapshot.json"))["checkpoint_results"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_a_killed_worker_is_restarted_from_its_last_checkpoint_on_s3(dataset, s3_endpoint):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("cnd-runs")
    name, killed = "fault", []

    def kill_after_first_checkpoint():
        deadline = time.time() + 240
        while time.time() < deadline:
            if _registered_checkpoints(fs, f"cnd-runs/runs/{name}"):
                workers = own_ray_processes(b"ray::RayTrainWorker")  # in this suite's Ray only
                if workers:
                    os.kill(workers[0], signal.SIGKILL)  # a real signal to a real training process
                    killed.append(workers[0])
                    return
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    cfg = config(dataset, "unused", name, max_steps=40, checkpoint_every=5, max_failures=2, validate_every=0,
                 num_workers=1)
    result = build_trainer(dataclasses.replace(cfg, storage_path="s3://cnd-runs/runs")).fit()
    watcher.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert result.metrics["step"] == 40 and result.checkpoint.path == f"cnd-runs/runs/{name}/checkpoint_step00000040"
    fs.invalidate_cache()
    files = fs.ls(result.checkpoint.path)
    assert any(f.endswith("state.pt") for f in files) and any(f.endswith("progress.json") for f in files)
    run = json.loads(fs.cat_file(f"cnd-runs/runs/{name}/results.json"))
    assert run["final_step"] == 40 and run["resumed_from"] is not None and run["resumed_from"] % 5 == 0


def test_a_run_resumed_in_local_mode_or_whose_ray_record_was_cut_short_resumes_on_workers(dataset, storage, capsys):
    """Local mode prunes the run's checkpoints itself, those Ray Train recorded too: its record
    (checkpoint_manager_snapshot.json) then named a folder that was gone, and Ray Train refused to start the run on
    workers again ("a corrupted run directory"): the command failed, saying that the same command resumes it, for
    good."""
    name = "modes"
    cfg = config(dataset, storage, name, validate_every=0, checkpoint_every=1, keep_checkpoints=1)
    build_trainer(dataclasses.replace(cfg, num_workers=1, max_steps=2)).fit()  # Ray Train records step 2
    build_trainer(dataclasses.replace(cfg, max_steps=3)).fit()  # local mode: step 3, and step 2 pruned
    assert not (storage / name / "checkpoint_step00000002").exists()
    assert "checkpoint_step00000002" in (storage / name / "checkpoint_manager_snapshot.json").read_text()
    capsys.readouterr()
    result = build_trainer(dataclasses.replace(cfg, num_workers=1, max_steps=4)).fit()
    assert result.metrics["step"] == 4 and results(storage, name)["resumed_from"] == 3
    assert "Ray Train's record of the run names checkpoint_step00000002, deleted since" in capsys.readouterr().out
    assert sorted(p.name for p in (storage / name).glob("checkpoint_step*")) == ["checkpoint_step00000004"]
    # a kill cut Ray's write of its record short (it writes it in place): Ray refused the run; dropped, as above
    record = storage / name / "checkpoint_manager_snapshot.json"
    record.write_text('{"checkpoint_results": [{"checkpoint_d')
    assert forget_stale_ray_record(str(storage / name)).startswith("cannot be read") and not record.exists()
    assert forget_stale_ray_record(str(storage / name)) is None


def test_a_run_run_again_at_its_last_step_keeps_no_more_checkpoints_than_asked(dataset, storage):
    """Checkpoints are pruned as each new one is published: a run restored at --max-steps publishes none, so what a
    stop had left past --keep-checkpoints stayed for good once the same command finished the run (a stop after the
    last checkpoint, before Ray Train recorded the checkpoints it was reported: 3, 6, 9 and 12 kept at 2). Here a
    lowered --keep-checkpoints leaves the same excess, on workers (the checkpoints Ray never recorded) and in local
    mode."""
    name = "kept"
    cfg = config(dataset, storage, name, validate_every=0, checkpoint_every=1, max_steps=3, keep_checkpoints=3)
    build_trainer(cfg).fit()
    kept = lambda: sorted(p.name for p in (storage / name).glob("checkpoint_step*"))  # noqa: E731
    assert kept() == [f"checkpoint_step0000000{s}" for s in (1, 2, 3)]
    build_trainer(dataclasses.replace(cfg, num_workers=1, keep_checkpoints=2)).fit()
    assert kept() == ["checkpoint_step00000002", "checkpoint_step00000003"]
    build_trainer(dataclasses.replace(cfg, keep_checkpoints=1)).fit()
    assert kept() == ["checkpoint_step00000003"] and results(storage, name)["final_step"] == 3


def test_validation_is_held_out_of_training(dataset):
    from train.data import DataSource
    from train.loop import split_validation

    train, held_out = split_validation(DataSource(["a.tar", "b.tar", "c.tar"], "canny"), None)
    assert train.urls == ["a.tar", "b.tar"] and held_out.urls == ["c.tar"] and held_out.task == "canny"
    only = DataSource(["a.tar"], "canny")
    assert split_validation(only, None) == (only, only)  # one shard: nothing to hold out
    # a subset that names no held-out set (train.subsets --holdout-shards 0) trains on every sample it names: its
    # last shard's samples were held out, a different share of each size of a sweep
    subset = DataSource(["a.tar", "b.tar", "c.tar"], "canny", keys=frozenset({"k1", "k2", "k3"}))
    assert split_validation(subset, None) == (subset, subset)
    train, given = split_validation(only, [str(dataset)])
    assert train.urls == only.urls and len(given.urls) == 4


def test_validation_data_that_training_data_holds_is_held_out_of_it(dataset, tmp_path, monkeypatch, capsys):
    """--validation-data naming shards --data holds too (the dataset and its last shard) trained on the samples its
    curve scores; they are held out, however the shard is written, and a run left nothing to train on is one line."""
    from train.data import resolve_shards
    from train.loop import split_validation, validation_note
    from train.run import main as train_main

    whole = resolve_shards(str(dataset))
    monkeypatch.chdir(dataset.parent)
    last = os.path.relpath(whole.urls[-1])  # the dataset lists it absolute
    train, held_out = split_validation(whole, [last])
    assert train.urls == whole.urls[:-1] and train.weights == whole.weights[:-1] and held_out.urls == [last]
    assert validation_note(train, held_out) == ""
    only = resolve_shards(whole.urls[0])  # one shard: scored on what it trains on, and the run's first line says so
    assert "drawn from the training data" in validation_note(*split_validation(only, None))
    storage = tmp_path / "runs"
    assert train_main(["--preset", "debug", "--data", str(dataset), "--validation-data", str(dataset),
                       "--storage-path", str(storage), "--wandb", "off"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: every shard of --data is in --validation-data") and len(error.splitlines()) == 1
    assert not storage.exists()  # refused before anything was written


def test_a_condition_that_only_the_held_out_shard_kept_is_refused_before_training(tmp_path, capsys):
    """Every image of the first input shard is under --min-size, so the last shard, held out for validation, holds
    every usable sample: the stream drew empty shards until "100 shards in a row gave no sample", on the worker after
    loading the base, with a traceback and "the same command starts it again". Now one line on the driver."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from pipeline.build import main as build_dataset
    from train.run import main as train_main

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for shard, side in (("00000", 16), ("00001", 64)):
        with tarfile.open(inputs / f"{shard}.tar", "w") as tar:
            for i in range(3):
                jpg = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (side, side, 3), np.uint8)).save(jpg, format="JPEG")
                for ext, data in (("jpg", jpg.getvalue()), ("txt", b"noise")):
                    info = tarfile.TarInfo(f"s{shard}_{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    data = tmp_path / "data"
    assert build_dataset(["--input", str(inputs), "--output", str(data), "--resolution", "64", "--min-size", "32"]) == 0
    assert json.loads((data / "shards" / "00000.stats.json").read_text())["counts"]["ok"] == 0
    capsys.readouterr()
    assert train_main(["--preset", "debug", "--data", str(data), "--storage-path", str(tmp_path / "runs"),
                       "--wandb", "off"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: no usable canny sample is left to train on: the last shard, held out")
    assert len(error.splitlines()) == 1


def wait_for_checkpoint(run: Path, process, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while not list(run.glob("checkpoint_*/progress.json")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert list(run.glob("checkpoint_*/progress.json")), "no checkpoint before the deadline"


@pytest.mark.parametrize("workers, stop", [(1, signal.SIGINT), (0, signal.SIGTERM), (1, signal.SIGTERM)],
                         ids=["ctrl-c-ray-worker", "sigterm-local-mode", "sigterm-ray-worker"])
def test_a_stop_ends_a_run_with_one_line_naming_the_checkpoint_it_resumes_from(dataset, storage, ray_session,
                                                                              python, workers, stop, tmp_path):
    """Ctrl-C printed a traceback in local mode (KeyboardInterrupt) and, on a Ray worker, exited 1 in silence once
    Ray Train's own SIGINT handler had aborted the run (fit() ends in SystemExit(0) there); then exited 1 with the
    line, where the shell's code for Ctrl-C is 130. SIGTERM (`ray job stop`) killed a run in local mode mid-line
    and ended one on workers with code 1; now both print the line and exit 143. On a worker, the W&B run was never
    closed: Ray killed the process before W&B wrote its file (every 15 s), so the steps before the checkpoint were
    lost from the curve for good (the resumed run logs those after it). Ctrl-C in local mode:
    test_a_stopped_run_resumed_logs_each_step_to_its_wandb_run_once."""
    name = f"stop {int(stop)}%{workers}"  # a space or a '%' broke every checkpoint (Ray parsed a file:// URL)
    command = [python, "train/run.py", "--preset", "debug", "--data", str(dataset), "--storage-path", str(storage),
               "--run-name", name, "--max-steps", "10000", "--checkpoint-every", "2", "--validate-every", "0",
               "--wandb", "offline", "--log-every", "1", "--num-workers", str(workers), "--cpus-per-worker", "1"]
    # a W&B service this test process started (the sweep's report run) would be shared through WANDB_SERVICE: the
    # run's data would be written by it, whenever it next writes, and not when the run ends
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "RAY_ADDRESS": ray_session,
           "WANDB_DIR": str(tmp_path / "wandb")}
    run = subprocess.Popen(with_ctrl_c(command), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(storage / name, run)
    run.send_signal(stop)
    _, stderr = run.communicate(timeout=90)
    assert run.returncode == 128 + stop and "Traceback" not in own_output(stderr), stderr[-3000:]
    last = latest_checkpoint(str(storage), name)
    assert last and stderr.strip().splitlines()[-1] == \
        f"stopped: the same command resumes {name} from its last checkpoint, {last}"
    [wandb_run] = (tmp_path / "wandb").rglob("offline-run-*")
    steps, exit_code = wandb_logged_steps(wandb_run, "train/loss")
    assert exit_code is not None and steps[:step_of(last)] == list(range(1, step_of(last) + 1)), (steps, exit_code)


def test_sigterm_to_the_process_group_of_a_run_that_started_its_own_cluster_stops_it(dataset, storage, python):
    """`kill -- -PGID` (a batch scheduler's stop) reaches the GCS and raylet the run started as well. Taking Ray
    Train's graceful abort there (as a SIGTERM on a cluster's workers does, to close the W&B run) waited on the
    dead cluster for ever."""
    import tempfile

    name = "group-stop"
    command = [python, "train/run.py", "--preset", "debug", "--data", str(dataset), "--storage-path", str(storage),
               "--run-name", name, "--max-steps", "10000", "--checkpoint-every", "2", "--validate-every", "0",
               "--wandb", "off", "--num-workers", "1", "--cpus-per-worker", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as ray_tmp:  # Ray's socket paths must stay short
        run = subprocess.Popen(command, env={**env, "RAY_TMPDIR": ray_tmp}, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            wait_for_checkpoint(storage / name, run)
            os.killpg(run.pid, signal.SIGTERM)
            _, stderr = run.communicate(timeout=90)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith(f"stopped: the same command resumes {name} from")
    # beside the suite's cluster, Ray Train's placement-group cleaner looked for 'the' cluster, and its thread died
    assert "Found multiple active Ray instances" not in stderr, stderr[-3000:]


def test_a_driver_that_started_its_cluster_ends_with_its_own_code_and_line_however_the_cluster_goes(python):
    """A stop or failure of a run whose cluster started here kills that cluster without ray.shutdown() (the same
    stop may be ending it) and exits with the run's code after its line. Killed raylet first, while the GCS lived,
    the GCS told this driver's core worker of its node's death, which found its objects on that node lost and ended
    the process itself: exit 1, no line ('The connection to the plasma store is failed')."""
    script = """
import ray
from train.run import exit_leaving_threads, join_or_start_ray
join_or_start_ray()
held = ray.put(b"x" * 1_000_000)  # in the object store of the node this driver is about to kill, as fit()'s are
exit_leaving_threads(143, "stopped: the line")
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as ray_tmp:  # Ray's socket paths must stay short
        run = subprocess.run([python, "-c", script], env={**env, "RAY_TMPDIR": ray_tmp}, cwd=REPO, text=True,
                             capture_output=True, timeout=120, start_new_session=True)
        deadline = time.time() + 30
        while processes_with_ray_tmpdir(ray_tmp) and time.time() < deadline:
            time.sleep(0.2)
        left = processes_with_ray_tmpdir(ray_tmp)
    assert run.returncode == 143, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1] == "stopped: the line"
    assert not left, left


def test_an_abort_a_second_sigterm_cuts_short_is_still_waited_on_in_ray(monkeypatch):
    """A second SIGTERM (`kill PID`, then the process group's) inside the first one's wait for Ray Train's abort
    ended that wait in SystemExit: the abort, still waiting in Ray, was not on record, and the stop left Ray through
    ray.shutdown() beside it."""
    import train.run as run

    abort_may_end = threading.Event()

    def second_sigterm() -> bool:
        raise SystemExit(15)  # what the handler, run again inside the wait, raises

    monkeypatch.setattr(run, "_calls_in_ray", [])
    monkeypatch.setattr(run, "own_cluster_alive", second_sigterm)
    with pytest.raises(SystemExit):
        run.while_cluster_lives(abort_may_end.wait)
    try:
        assert run.threads_blocked_in_ray()
    finally:
        abort_may_end.set()


def test_a_sigterm_while_a_stop_cleans_up_leaves_the_clean_up_whole(monkeypatch, capsys):
    """A second SIGTERM while the stop closes the W&B run and leaves Ray raised SystemExit in the middle of it."""
    import train.run as run

    done = []

    def clean_up_meeting_a_sigterm() -> bool:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs here
        done.append("closed")
        return True

    monkeypatch.setattr(run, "close_open_runs", clean_up_meeting_a_sigterm)
    monkeypatch.setattr(run, "leave_ray", lambda: done.append("left"))
    previous = signal.signal(signal.SIGTERM, run._exit_with_signal)
    try:
        code = run.leave_with_last_line(143, "stopped: the line")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143 and done == ["closed", "left"] and not run._leaving
    assert capsys.readouterr().err.splitlines()[-1] == "stopped: the line"


def test_sigterm_to_the_driver_of_a_run_that_started_its_own_cluster_closes_its_wandb_run(dataset, storage, python,
                                                                                         tmp_path):
    """`kill PID` (a container's stop) on `python train/run.py --num-workers N` without RAY_ADDRESS: the driver exited
    without Ray Train's abort, Ray killed rank 0 with its W&B service, and the W&B run held nothing of the steps it
    had logged (a gap in the curve: the resumed run logs only the steps after its checkpoint). The controller of a
    cluster the command started polls its workers every 0.5 s (Ray Train's default is 2 s), unless the user says."""
    import tempfile

    name = "driver-stop"
    command = [python, "train/run.py", "--preset", "debug", "--data", str(dataset), "--storage-path", str(storage),
               "--run-name", name, "--max-steps", "10000", "--checkpoint-every", "2", "--validate-every", "0",
               "--wandb", "offline", "--log-every", "1", "--num-workers", "1", "--cpus-per-worker", "1"]
    # (this suite's session sets Ray Train's poll interval for its own cluster: the command must set it itself)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "WANDB_SERVICE", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as ray_tmp:  # Ray's socket paths must stay short
        run = subprocess.Popen(command, env={**env, "RAY_TMPDIR": ray_tmp, "WANDB_DIR": str(tmp_path / "wandb")},
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
        try:
            wait_for_checkpoint(storage / name, run)
            [controller] = [pid for pid, cmdline in processes_with_ray_tmpdir(ray_tmp).items()
                            if cmdline[0].startswith(b"ray::TrainController")]
            controller_env = Path(f"/proc/{controller}/environ").read_bytes().split(b"\0")
            assert b"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5" in controller_env
            run.send_signal(signal.SIGTERM)  # the driver alone: its cluster stays up
            _, stderr = run.communicate(timeout=120)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 143, stderr[-3000:]
    last = latest_checkpoint(str(storage), name)
    [wandb_run] = (tmp_path / "wandb").rglob("offline-run-*")
    steps, exit_code = wandb_logged_steps(wandb_run, "train/loss")
    assert exit_code is not None and steps[:step_of(last)] == list(range(1, step_of(last) + 1)), (steps, exit_code)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_while_the_run_starts_its_cluster_is_the_stopped_line(dataset, storage, python, stop):
    """A stop right at the start, while the command started its Ray cluster (before fit()): Ctrl-C ended it in a
    KeyboardInterrupt traceback and exit 1, SIGTERM (Ray's driver handler: sys.exit(15)) with code 15 and no line."""
    import tempfile

    name = f"start-stop-{int(stop)}"
    command = [python, "train/run.py", "--preset", "debug", "--data", str(dataset), "--storage-path", str(storage),
               "--run-name", name, "--max-steps", "4", "--checkpoint-every", "2", "--validate-every", "0",
               "--wandb", "off", "--num-workers", "1", "--cpus-per-worker", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as ray_tmp:  # Ray's socket paths must stay short
        run = subprocess.Popen(with_ctrl_c(command), env={**env, "RAY_TMPDIR": ray_tmp}, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            for line in run.stdout:  # printed just before the cluster starts, which takes seconds
                if line.startswith("W&B:"):
                    break
            run.send_signal(stop)
            _, stderr = run.communicate(timeout=120)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 128 + stop and "Traceback" not in own_output(stderr), stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"stopped: {name} has no checkpoint yet; the same command starts it again"


@pytest.mark.parametrize("stop", [signal.SIGINT], ids=["ctrl-c"])  # SIGTERM: test_build's twin (one path: join_ray)
def test_a_stop_while_ray_init_starts_the_runs_cluster_leaves_none_of_it_running(dataset, storage, python, stop):
    """Stopped inside ray.init (its Node() waiting for the raylet to register, which Ray's global node is not yet),
    the run said its line and exited, and its cluster's dashboard and runtime-env agents ran on for good."""
    name = f"init-stop-{int(stop)}"
    command = [python, "train/run.py", "--preset", "debug", "--data", str(dataset), "--storage-path", str(storage),
               "--run-name", name, "--max-steps", "4", "--validate-every", "0", "--wandb", "off", "--num-workers", "1",
               "--cpus-per-worker", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    code, stderr, left = stopped_while_ray_starts(command, env, stop)
    assert code == 128 + stop and "Traceback" not in own_output(stderr), stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"stopped: {name} has no checkpoint yet; the same command starts it again"
    assert not left, left


def test_a_stopped_run_resumed_logs_each_step_to_its_wandb_run_once(dataset, storage, ray_session, python,
                                                                     tmp_path):
    """A stop after the checkpoint at step 5, at step 7: the W&B run held steps 6 and 7 from the stopped segment (it
    was closed, so they were written) and again from the resumed one, which logs every step after its checkpoint:
    two points per step in the curve, as results.json and an uninterrupted run have one. Ctrl-C in local mode, whose
    stop test_a_stop_ends_a_run_with_one_line_naming_the_checkpoint_it_resumes_from asks of the other modes."""
    name = "wandb-once"
    command = [python, "train/run.py", "--preset", "debug", "--data", str(dataset), "--storage-path", str(storage),
               "--run-name", name, "--max-steps", "10", "--checkpoint-every", "5", "--validate-every", "0",
               "--wandb", "offline", "--log-every", "1", "--num-workers", "0", "--cpus-per-worker", "1"]
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "RAY_ADDRESS": ray_session,
           "WANDB_DIR": str(tmp_path / "wandb")}
    run = subprocess.Popen(with_ctrl_c(command), env=env, cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    for line in run.stdout:  # rank 0's progress line, printed once the step is logged
        if f"[{name}] step 7/10" in line:
            break
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=90)
    last = latest_checkpoint(str(storage), name)
    assert run.returncode == 130 and step_of(last) == 5 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == \
        f"stopped: the same command resumes {name} from its last checkpoint, {last}"
    resumed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    segments = sorted((tmp_path / "wandb").rglob("offline-run-*"))
    assert len(segments) == 2 and len(wandb_run_ids(segments)) == 1  # one W&B run, resumed
    logged = [wandb_logged_steps(segment, "train/loss") for segment in segments]
    assert all(code is not None for _, code in logged) and \
        sorted(step for steps, _ in logged for step in steps) == list(range(1, 11)), logged


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_ends_a_run_waiting_for_room_for_its_workers(dataset, storage, ray_session, python, stop):
    """A node lost with its workers, and the cluster left without room for --num-workers: Ray Train's controller
    starts the worker group again and again (60 s a try, for ever), and answers no abort while it waits. A SIGTERM
    (`kill PID`) waited with it for good, and so did a Ctrl-C, in silence (the third ended it); each now ends the run
    in its line after ABORT_PATIENCE_S (3 s here). Three 1-CPU workers on the suite's 2-CPU cluster stand for the
    lost node."""
    name = f"no-room-{int(stop)}"
    run_py = ("import signal, sys, train.run; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "train.run.ABORT_PATIENCE_S = 3; sys.argv[0] = 'train/run.py'; sys.exit(train.run.main(sys.argv[1:]))")
    command = [python, "-c", run_py, "--preset", "debug", "--data", str(dataset), "--storage-path", str(storage),
               "--run-name", name, "--max-steps", "10", "--validate-every", "0", "--wandb", "off",
               "--num-workers", "3", "--cpus-per-worker", "1"]
    run = subprocess.Popen(command, env={**os.environ, "RAY_ADDRESS": ray_session}, cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in run.stderr:  # the controller's, forwarded by Ray
        lines.append(line)
        if "Attempting to start training worker group" in line:
            break
    time.sleep(1)
    run.send_signal(stop)
    try:
        _, stderr = run.communicate(timeout=25)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    stderr = "".join(lines) + stderr
    assert run.returncode == 128 + stop, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"stopped: {name} has no checkpoint yet; the same command starts it again"


def test_a_run_stopped_before_its_first_checkpoint_continues_its_wandb_run_when_run_again(dataset, storage, ray_session,
                                                                                       python, tmp_path):
    """A run stopped before its first checkpoint starts from step 0 again: it got a new W&B id, and the project held
    two runs of its name, the stopped one with its first steps. The same command now continues the same W&B run,
    each step once, as a resume from a checkpoint does."""
    workers = 0  # local mode: rank 0 records and reads the W&B id in train_loop_per_worker, as on a Ray worker
    name = f"wandb-no-checkpoint-{workers}"
    command = [python, "train/run.py", "--preset", "debug", "--data", str(dataset), "--storage-path", str(storage),
               "--run-name", name, "--max-steps", "100000", "--checkpoint-every", "100000", "--validate-every", "0",
               "--wandb", "offline", "--log-every", "1", "--num-workers", str(workers), "--cpus-per-worker", "1"]
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "RAY_ADDRESS": ray_session,
           "WANDB_DIR": str(tmp_path / "wandb")}
    run = subprocess.Popen(with_ctrl_c(command), env=env, cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    for line in run.stdout:  # rank 0's progress line, printed once the step is logged
        if f"[{name}] step 3/" in line:  # (on a worker, forwarded by Ray: a few steps late; the run is long enough)
            break
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=90)
    assert run.returncode == 143 and latest_checkpoint(str(storage), name) is None, stderr[-3000:]
    [stopped] = (tmp_path / "wandb").rglob("offline-run-*")
    last_logged = max(wandb_logged_steps(stopped, "train/loss")[0])
    # the same run again (--max-steps is no experiment setting): a few steps past what the stopped one logged
    command[command.index("--max-steps") + 1] = str(last_logged + 5)
    again = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    segments = sorted((tmp_path / "wandb").rglob("offline-run-*"))
    assert len(segments) == 2 and len(wandb_run_ids(segments)) == 1  # one W&B run, continued
    logged = [wandb_logged_steps(segment, "train/loss") for segment in segments]
    assert logged[0][0][:3] == [1, 2, 3] and \
        sorted(step for steps, _ in logged for step in steps) == list(range(1, last_logged + 6)), logged


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_run_from_step_0_continues_the_wandb_run_its_name_started_only_with_the_same_experiment_settings(
        where, s3_endpoint, tmp_path):
    """The W&B id a run from step 0 records in its storage folder is taken again by the same run started again (a
    stop before its first checkpoint), not by one with other experiment settings (the same name reused for another
    experiment: its steps would land in the old W&B run), nor once that folder is cleared."""
    import fsspec

    from train.tracking import started_wandb_id

    storage = str(tmp_path / "runs") if where == "local" else "s3://cnd-wandb-ids/runs"
    fs, folder = fsspec.core.url_to_fs(f"{storage}/again")
    if where == "s3" and not fs.exists("cnd-wandb-ids"):
        fs.mkdir("cnd-wandb-ids")
    cfg = config(tmp_path, storage, "again")
    first = started_wandb_id(cfg)
    assert first.startswith("again-") and started_wandb_id(cfg) == first
    assert started_wandb_id(dataclasses.replace(cfg, max_steps=cfg.max_steps + 5, log_every=2)) == first
    other = started_wandb_id(dataclasses.replace(cfg, lr=cfg.lr * 10))
    assert other not in {first, None} and started_wandb_id(cfg) not in {first, other}  # each start recorded anew
    fs.rm(folder, recursive=True)
    fs.invalidate_cache()
    assert started_wandb_id(cfg) not in {first, other}

def test_a_step_logged_in_part_before_a_stop_is_completed_by_the_resumed_run(tmp_path):
    """A validation step is logged in parts (its scores, then the training metrics): a stop between them left the
    step half held, and the resumed run, dropping what its W&B run holds, must log the other half once."""
    from train.tracking import RunLogger

    cfg = config(tmp_path, tmp_path / "runs", "parts")
    stopped = RunLogger(cfg, "offline", str(tmp_path / "wandb"), "parts-1")
    stopped.log({"step": 1, "loss": 1.0})
    stopped.log({"step": 2, "edge_f1": 0.5}, prefix="fidelity/")  # stopped before step 2's training metrics
    stopped.close(1)
    time.sleep(1.1)  # W&B names a run's offline folder by the second it started in
    resumed = RunLogger(cfg, "offline", str(tmp_path / "wandb"), "parts-1")  # from the checkpoint before step 1
    resumed.log({"step": 1, "loss": 1.0})
    resumed.log({"step": 2, "edge_f1": 0.5}, prefix="fidelity/")
    resumed.log({"step": 2, "loss": 2.0})
    resumed.log({"step": 3, "loss": 3.0})
    resumed.close(0)
    segments = sorted((tmp_path / "wandb").rglob("offline-run-*"))
    assert len(segments) == 2
    for key, steps in (("train/loss", [1, 2, 3]), ("fidelity/edge_f1", [2])):
        assert sorted(s for segment in segments for s in wandb_logged_steps(segment, key)[0]) == steps, key


def test_a_wandb_teardown_that_never_ends_is_given_up_on_after_the_runs_files_are_closed(tmp_path, monkeypatch):
    """A run stopped by Ctrl-C in local mode hung after its W&B files were whole (seen once in a suite run here):
    W&B's teardown waited for ever for a task of its client's asyncio thread, its service long gone (wandb 0.31).
    Such a task, one that never ends, is made here on that thread; close_open_runs gives the teardown
    TEARDOWN_PATIENCE_S and says it still waits, and the stop path then ends the process after its line."""
    import asyncio

    from wandb.sdk import wandb_setup

    from train import tracking

    monkeypatch.setattr(tracking, "TEARDOWN_PATIENCE_S", 2.0)
    logger = tracking.RunLogger(config(tmp_path, tmp_path / "runs", "wedged"), "offline", str(tmp_path / "wandb"),
                                "wedged-1")
    logger.log({"step": 1, "loss": 1.0})
    # The task waits in a thread, which holds it: a task waiting on an asyncio.Event no one else held was a garbage
    # cycle (asyncio holds tasks weakly), and once collected W&B counted it done (seen in CI).
    release = threading.Event()
    wandb_setup.singleton().asyncer.run_soon(lambda: asyncio.to_thread(release.wait))  # a task the teardown waits for
    started = time.monotonic()
    try:
        assert tracking.close_open_runs() is False and time.monotonic() - started < 10
    finally:
        release.set()  # lets W&B's loop and the given-up teardown end
    [segment] = (tmp_path / "wandb").rglob("offline-run-*")
    assert wandb_logged_steps(segment, "train/loss") == ([1], 1)  # closed whole, with the stopped run's exit code


def test_a_run_killed_after_wandb_wrote_steps_is_resumed_without_logging_them_twice(tmp_path, python):
    """kill -9 (an OOM kill, a container's) records nothing of what the W&B run holds: W&B had written its file up
    to its last whole 32 KiB block, and the resumed run, which trains the steps after its checkpoint again (here
    none: killed before it), logged them all again. An offline run now reads what its earlier segments hold."""
    import shutil

    import psutil

    from train import tracking

    logging = f"""
import dataclasses, time
from train import tracking
from train.config import debug
cfg = dataclasses.replace(debug(), run_name="killed", storage_path={str(tmp_path / "runs")!r})
logger = tracking.RunLogger(cfg, "offline", {str(tmp_path / "wandb")!r}, "killed-1")
for step in range(1, 100_000):
    logger.log({{"step": step, "loss": 1.0 / step, **{{f"metric_{{i}}": float(step * i) for i in range(10)}}}})
    time.sleep(0.002)
"""
    killed = subprocess.Popen([python, "-c", logging], cwd=REPO, env={**os.environ, "WANDB_SILENT": "true"})
    service = []
    try:
        deadline = time.monotonic() + 120
        while not any(f.stat().st_size > 32768 for f in (tmp_path / "wandb").rglob("run-killed-1.wandb")):
            assert killed.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        service = psutil.Process(killed.pid).children(recursive=True)  # W&B's, in a session of its own
    finally:
        killed.kill()  # SIGKILL
        killed.wait()
    for process in service:  # as a container's kill takes it too (alone, it writes on until it sees the kill)
        process.kill()
    _, alive = psutil.wait_procs(service, timeout=30)
    assert not alive
    [first] = (tmp_path / "wandb").rglob("offline-run-*")
    written = wandb_logged_steps(first, "train/loss")[0]
    assert written == list(range(1, len(written) + 1)) and written  # what W&B wrote before the kill: whole blocks
    # a segment begun in the same second as another of its run: W&B ends its folder's name in -1
    same_second = tmp_path / "same-second"
    shutil.copytree(first, same_second / f"{first.name}-1")
    assert tracking.held_by_earlier_segments(same_second / "offline-run-later-killed-1", "killed-1")[0] == written[-1]

    resumed = tracking.RunLogger(config(tmp_path, tmp_path / "runs", "killed"), "offline", str(tmp_path / "wandb"),
                                 "killed-1")
    assert resumed.held[0] == written[-1] and "train/loss" in resumed.held[1]
    for step in range(1, written[-1] + 6):  # the whole run again from step 0, deterministic: the same values
        resumed.log({"step": step, "loss": 1.0 / step})
    assert tracking.close_open_runs()
    segments = sorted((tmp_path / "wandb").rglob("offline-run-*"))
    logged = sorted(s for segment in segments for s in wandb_logged_steps(segment, "train/loss")[0])
    assert len(segments) == 2 and logged == list(range(1, written[-1] + 6))  # each step once


def test_a_sigint_another_handler_takes_still_makes_the_exit_code_ctrl_cs():
    """On Ray workers, Ray Train's own SIGINT handler takes Ctrl-C and fit() ends in SystemExit(1), the code of
    any failure: the run exited 1, where local mode exits 130."""
    from train.run import SignalLog, stopped_exit_code

    previous = signal.signal(signal.SIGINT, lambda *_: None)  # a handler that takes the signal, as Ray Train's
    try:
        with SignalLog() as signals:
            assert stopped_exit_code(SystemExit(1), signals.received()) == 1
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # Python runs handlers between bytecodes
            assert signal.SIGINT in signals.received()
            assert stopped_exit_code(SystemExit(1), signals.received()) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert signal.set_wakeup_fd(-1) == -1  # the log gave back the wakeup fd it found (none)
    assert stopped_exit_code(SystemExit(2)) == 2 and stopped_exit_code(SystemExit(0)) == 1
    assert stopped_exit_code(KeyboardInterrupt()) == 130
    assert stopped_exit_code(SystemExit(signal.SIGTERM)) == 143  # Ray's driver handler: sys.exit(15)
    assert stopped_exit_code(SystemExit(1), {signal.SIGTERM}) == 143  # that, through Ray's get() on workers


def test_a_cluster_the_trainer_starts_quietens_ray_trains_placement_group_cleaner(python):
    """A cluster started here has no dashboard, so no state API: Ray Train's placement-group cleaner warned each
    second of a run that it could not query it. Its workers now run a setup hook that quietens that one logger
    (a hook Ray cannot import would fail every worker)."""
    import tempfile

    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    script = ("import logging, ray; from train.run import join_or_start_ray; join_or_start_ray(); "
              f"level = ray.remote(lambda: logging.getLogger({placement_group_cleaner.__name__!r}).level); "
              "print('level', logging.getLevelName(ray.get(level.remote())))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as ray_tmp:  # Ray's socket paths must stay short
        done = subprocess.run([python, "-c", script], env={**env, "RAY_TMPDIR": ray_tmp}, cwd=REPO,
                              capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and "level ERROR" in done.stdout, done.stderr[-3000:]


def losses(history: list[dict]) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in history}


@pytest.mark.parametrize("workers", [0, 1], ids=["local-mode", "ray-worker"])
def test_a_run_rides_out_its_object_store_going_away(dataset, ray_session, s3_server, s3_endpoint, python, workers,
                                                     tmp_path):
    """The run's data and checkpoints on S3, and the endpoint gone for 5 s once the first checkpoint is
    published, while the run goes on: the shard being read is opened again where it broke, the checkpoint published
    again, and a Ray Train controller that stopped on its own storage write is submitted again (train.run.fit),
    so the run finishes with the losses of a run that saw no outage. Before, the run ended in a traceback."""
    import fsspec

    fs = fsspec.filesystem("s3")
    if not fs.exists("cnd-outage-train"):
        fs.mkdir("cnd-outage-train")
        fs.put(str(dataset), "cnd-outage-train/canny", recursive=True)
    storage = "s3://cnd-outage-train/runs"

    def command(name: str) -> list[str]:
        return [python, "train/run.py", "--preset", "debug", "--data", "s3://cnd-outage-train/canny",
                "--storage-path", storage, "--run-name", name, "--max-steps", "12", "--checkpoint-every", "4",
                "--validate-every", "0", "--wandb", "off", "--num-workers", str(workers), "--cpus-per-worker", "1"]

    # botocore's own retries would ride out a short outage in the driver; the shared cluster's workers keep theirs
    env = {**os.environ, "RAY_ADDRESS": ray_session, "AWS_MAX_ATTEMPTS": "1"}
    if not fs.exists("cnd-outage-train/runs/calm/results.json"):  # the reference (made once): either mode trains
        calm = subprocess.run(command("calm"), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert calm.returncode == 0, calm.stderr[-3000:]  # the same steps on the same stream
    name, log = f"outage-{workers}", tmp_path / "run.log"
    with log.open("w") as out:
        run = subprocess.Popen(command(name), env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while not fs.glob(f"cnd-outage-train/runs/{name}/checkpoint_*/progress.json") and time.time() < deadline:
            assert run.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
            fs.invalidate_cache()
        s3_server.stop()
        time.sleep(5)  # a checkpoint is published every ~2 s
        outage_met_the_run = run.poll() is None  # it cannot finish without writing its results to the store
        s3_server.start()
        run.wait(timeout=300)
    printed = log.read_text()
    assert outage_met_the_run and run.returncode == 0, printed[-4000:]
    if workers == 0:
        # Only the driver makes one attempt per request (AWS_MAX_ATTEMPTS): a worker of the shared cluster may ride
        # the outage out on botocore's own retries, so the project's waits are certain to show in local mode only.
        assert "trying again" in printed or "Ray Train stopped on its storage" in printed, printed[-4000:]
    fs.invalidate_cache()
    outcome = json.loads(fs.cat_file(f"cnd-outage-train/runs/{name}/results.json"))
    reference = json.loads(fs.cat_file("cnd-outage-train/runs/calm/results.json"))
    assert outcome["final_step"] == 12 and losses(outcome["history"]) == losses(reference["history"])


def test_a_failed_run_names_the_first_ranks_own_error_not_ray_trains_wrapper():
    from ray.train import ControllerError, WorkerGroupError

    from train.run import failure_cause

    workers = WorkerGroupError("rank 0: Traceback ...", {1: ValueError("second"), 0: RuntimeError("first\nlong")})
    assert failure_cause(workers) == "RuntimeError: first"
    assert failure_cause(ControllerError(OSError("storage down"))) == "OSError: storage down"
    assert failure_cause(KeyError()) == "KeyError"


def test_sigterm_becomes_an_exit_that_the_stop_handling_sees_and_another_handler_is_kept():
    """A run in local mode (and a sweep of them) never calls ray.init, whose driver handler makes SIGTERM a
    SystemExit(15): SIGTERM killed it mid-line, with no line naming the checkpoint it resumes from."""
    from train.run import exit_on_sigterm, stopped_exit_code

    def someone_elses(*_):
        pass

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(SystemExit) as stop, exit_on_sigterm():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # Python runs handlers between bytecodes
        assert stopped_exit_code(stop.value) == 143
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back on leaving
        signal.signal(signal.SIGTERM, someone_elses)
        with exit_on_sigterm():
            assert signal.getsignal(signal.SIGTERM) is someone_elses
        assert signal.getsignal(signal.SIGTERM) is someone_elses
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_run_that_fails_after_a_stop_reached_it_ends_as_stopped(monkeypatch, capsys):
    """`kill -- -PGID` on a run that started its own cluster stops its raylet and GCS too, and fit() can fail on the
    dead controller before this process's SIGTERM handler runs: the command ended 'failed: ...', exit 1, for a run
    that was stopped (test_sigterm_to_the_process_group_..., now and then under load)."""
    import train.run as run

    def fit_failing_on_the_stopped_cluster(cfg, trainer):
        sigterm_whose_handler_has_not_run()
        raise RuntimeError("the Ray Train controller died")

    monkeypatch.setattr(run, "check_data", lambda cfg: None)
    monkeypatch.setattr(run, "build_trainer", lambda cfg: None)
    monkeypatch.setattr(run, "fit", fit_failing_on_the_stopped_cluster)
    cfg = dataclasses.replace(debug(), data=["unused"], run_name="stopped-then-failed", wandb="off")
    assert run.checked_and_trained(cfg) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == run.stopped_line(cfg)

    def fit_failing(cfg, trainer):
        raise RuntimeError("a failure of its own")

    monkeypatch.setattr(run, "fit", fit_failing)  # no stop: the failure stands
    assert run.checked_and_trained(cfg) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("failed: RuntimeError: a failure of its own")


def test_a_run_from_step_0_logs_to_a_wandb_run_of_its_own_and_a_resume_to_the_one_it_recorded():
    """The id was the run name alone: a run whose name was used before (its storage cleared, another
    --storage-path, `exp.1` against `exp-1`) continued the old W&B run online, which dropped its steps."""
    from train.tracking import run_id, wandb_run_id

    fresh = {wandb_run_id("exp.1", None, resumed=False) for _ in range(3)} | {wandb_run_id("exp-1", None, False)}
    assert len(fresh) == 4 and all(i.startswith("exp-1-") and len(i) <= 64 for i in fresh)
    assert len(wandb_run_id("x" * 100, None, resumed=False)) <= 64
    assert wandb_run_id("exp.1", "exp-1-0a1b2c3d", resumed=True) == "exp-1-0a1b2c3d"
    assert wandb_run_id("exp.1", None, resumed=True) == run_id("exp.1")  # a checkpoint from before ids were kept


def test_a_results_file_cut_short_is_taken_as_not_written_and_one_is_written_whole_and_strict(tmp_path, capsys):
    """results.json was written in place: a run killed mid-write left it cut short, and every later run of that
    name (and the sweep, and its report) ended in a JSONDecodeError."""
    from pipeline.format import write_whole
    from train.report import load_runs
    from train.tracking import read_results, results_url

    cfg = config(tmp_path, tmp_path / "runs", "sw-8")
    Path(results_url(cfg)).parent.mkdir(parents=True)
    Path(results_url(cfg)).write_text('{"final_step": 4, "hist')
    assert read_results(cfg) is None and "cut short" in capsys.readouterr().err
    assert load_runs(str(tmp_path / "runs"), "sw") == {}
    write_whole(results_url(cfg), b'{"final_step": 4}')
    assert read_results(cfg) == {"final_step": 4} and load_runs(str(tmp_path / "runs"), "sw") == {"sw-8": {
        "final_step": 4}}
    assert sorted(p.name for p in Path(results_url(cfg)).parent.iterdir()) == ["results.json"]  # no temporary left
    # and strict JSON: a curve's start before enough evaluations was written as a bare NaN, which jq refuses
    from train.tracking import strict_json

    assert json.dumps(strict_json({"start": float("nan"), "history": [{"loss": float("inf")}, {"loss": 0.5}]}),
                      allow_nan=False) == '{"start": null, "history": [{"loss": null}, {"loss": 0.5}]}'


def test_a_resume_whose_held_out_samples_changed_is_refused(canny64, tmp_path_factory, tmp_path, capsys,
                                                             worker_errors):
    """The dataset grew by a shard between two segments (the dataset job resumed with more input, or subsets were
    made again): the last shard, which a whole dataset holds out, was another, and the resumed run scored its
    curves on other samples from there on, under the same run, with nothing said. Refused in local mode and on Ray
    workers alike; on workers it came only after Ray Train had restarted the worker group --max-failures times,
    each loading the base model again (rank 0 raised it, and a worker's error is retried): now at the first
    attempt, the other rank, which waited for rank 0's validation, told too."""
    from train.run import main as train

    data = copy_dataset(canny64, tmp_path_factory, "grows")
    last = sorted((data / "shards").glob("*.stats.json"))[-1]
    aside = tmp_path / last.name
    last.rename(aside)  # not committed yet: the dataset as the first segment saw it
    runs = tmp_path / "runs"
    args = ["--data", str(data), "--storage-path", str(runs), "--run-name", "grows", "--wandb", "off",
            "--validate-every", "2", "--checkpoint-every", "2", "--validation-samples", "2", "--validation-steps", "2"]
    assert train([*args, "--max-steps", "2"]) == 0
    segment = results(runs, "grows")
    aside.rename(last)  # the shard committed since
    on_workers = ["--num-workers", "2", "--max-failures", "2", "--validation-timeout-min", "2"]  # a rank left
    # waiting would time out, its error seen by worker_errors, rather than hang the suite
    for mode in ([], on_workers):
        assert train([*args, "--max-steps", "4", *mode]) == 2, mode
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("error: run grows's held-out samples changed since step 2"), err
        assert "Traceback" not in err
        assert step_of(latest_checkpoint(str(runs), "grows")) == 2  # nothing trained on the other set
        assert results(runs, "grows") == segment  # nor its results written again
    assert not worker_errors.exists(), worker_errors.read_text()  # no attempt failed: none was retried
    last.rename(aside)
    assert train([*args, "--max-steps", "4"]) == 0  # on the data it started on, it resumes


def test_a_brace_range_past_the_datasets_shards_is_not_told_to_make_its_subsets_again(canny64, tmp_path, capsys):
    """--data 'ds/shards/{00000..00009}.tar' on a dataset of 4 shards was refused, rightly, but told to "make the
    subsets again where the dataset is now", of data that names no subset."""
    from train.run import main

    spec = f"{canny64}/shards/{{00000..00009}}.tar"
    assert main(["--data", spec, "--storage-path", str(tmp_path), "--run-name", "x", "--wandb", "off"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: shard {canny64}/shards/00004.tar is not there: 6 of the 10 shards it names are "
                          "missing") and "subset" not in err, err
