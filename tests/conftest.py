"""shared fixtures: one Ray session, a moto S3 server on loopback, the sample shards"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ["HF_HUB_OFFLINE"] = "1"  # no test may download weights; the loaders read local files only
os.environ.setdefault("WANDB_MODE", "offline")
if platform.machine() in ("x86_64", "AMD64"):
    # before torch loads (here, and in every process the tests start): the parity fixtures were made with torch's
    # AVX2 kernels, and AVX-512 ones (oneDNN's convolutions, ATen's vector ops) round differently: OpenPose's peak
    # scores up to 3e-6 apart, a peak moved by a pixel; pinned, the suite computes the same bits on any x86-64 CPU
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """The moto server, which a test may stop and start again on the same port (its buckets live on: moto keeps
    them in this process)."""

    def __init__(self):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(s3_server) -> str:
    """A real S3 API (moto server) on 127.0.0.1; credentials and endpoint go in the environment, so the
    Ray workers started after it, and subprocesses, reach the same server."""
    endpoint = s3_server.endpoint
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        FSSPEC_S3_ENDPOINT_URL=endpoint,
    )
    return endpoint


@pytest.fixture(scope="session", autouse=True)
def own_temp_dir(tmp_path_factory) -> Path:
    """This test process's temp folder, for it and every process it starts (TMPDIR): `make test` runs two test
    processes at once (pytest-xdist), and what a job keeps in the machine's temp folder meanwhile (a dataset job's
    staging for object storage) would show in the other's check that a job left nothing there."""
    import tempfile

    temp = tmp_path_factory.mktemp("tmp")
    os.environ["TMPDIR"] = str(temp)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    return temp


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory, own_temp_dir, s3_endpoint):
    """One local Ray for the test process's whole run (a ray.init costs seconds and ~0.8 GB; `make test` runs two
    test processes, each with its own), started after TMPDIR is set, which its workers inherit. Its session files go
    in the test tmp dir. Returns the GCS address, for driver subprocesses joining the same cluster."""
    import ray

    os.environ["RAY_TMPDIR"] = str(tmp_path_factory.mktemp("ray"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Train's controller polls its workers every 2 s: a finished or failed run is seen up to 2 s late, which
    # a suite of ~10 short runs pays for every time
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    context = ray.init(
        num_cpus=2,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        _temp_dir=os.environ["RAY_TMPDIR"],
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}},
    )
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture
def worker_errors(monkeypatch, tmp_path) -> Path:
    """A file to which Ray Train's controller adds a line (rank:error ...) each time the workers of a run that
    train.run builds raise: an attempt that failed, which Ray Train retries (--max-failures) before the driver
    hears of it. Through a UserCallback, which Ray Train calls on its controller."""
    import ray.train

    import train.run

    path = tmp_path / "worker-errors.txt"

    class WorkerErrors(ray.train.UserCallback):  # defined here, pickled by value: the controller needs no tests/
        def __init__(self, to: str):
            self.to = to

        def after_exception(self, run_context, worker_exceptions) -> None:
            with open(self.to, "a") as f:
                f.write(" ".join(f"{rank}:{type(e).__name__}" for rank, e in sorted(worker_exceptions.items())) + "\n")

    build = train.run.build_trainer

    def with_callback(cfg):
        trainer = build(cfg)
        trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []), WorkerErrors(str(path))]
        return trainer

    monkeypatch.setattr(train.run, "build_trainer", with_callback)
    return path


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Path:
    from pipeline.sample_data import write_shards

    out = tmp_path_factory.mktemp("sample") / "shards"
    write_shards(out, num_shards=4)
    return out


@pytest.fixture(scope="session")
def canny64(sample_shards, tmp_path_factory, ray_session) -> Path:
    """The sample shards as a 64 px Canny dataset, built once for the suite; use `copy_dataset` to write into it."""
    from pipeline.build import main as build_dataset

    out = tmp_path_factory.mktemp("canny64") / "canny"
    assert build_dataset(["--input", str(sample_shards), "--output", str(out), "--resolution", "64"]) == 0
    return out


def copy_dataset(dataset: Path, tmp_path_factory, name: str) -> Path:
    import shutil

    return Path(shutil.copytree(dataset, tmp_path_factory.mktemp(name) / "canny"))


def tar_members(tar: Path) -> dict[str, dict[str, bytes]]:
    """An output tar's samples, key -> {extension: bytes}, read with tarfile (independently of webdataset)."""
    import tarfile

    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar) as f:
        for member in f.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = f.extractfile(member).read()
    return samples


@pytest.fixture
def transformers_log() -> Iterator[list[str]]:
    """The lines transformers' logging would print while the test runs (its own handler writes to the stderr of the
    first import, which capfd does not see)."""
    import logging

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.extend(record.getMessage().splitlines())

    library, keep = logging.getLogger("transformers"), Keep()
    library.addHandler(keep)
    yield lines
    library.removeHandler(keep)


@pytest.fixture
def python() -> str:
    return sys.executable


def own_ray_processes(title: bytes) -> list[int]:
    """The pids of the processes Ray titled `title`... (b"ray::ShardActor", b"ray::RayTrainWorker") in this suite's
    Ray session, told apart by the RAY_TMPDIR its processes inherit: a test that kills one must not kill another
    Ray's on the same machine (a second suite's, a user's)."""
    own = f"RAY_TMPDIR={os.environ.get('RAY_TMPDIR')}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(title)
                    and own in (entry / "environ").read_bytes().split(b"\0")):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def processes_with_ray_tmpdir(ray_tmp: str) -> dict[int, list[bytes]]:
    """pid -> command line of each process that Ray started with RAY_TMPDIR=ray_tmp (a command's own cluster): its
    GCS, raylet, agents and workers inherit the driver's environment."""
    own, found = f"RAY_TMPDIR={ray_tmp}".encode(), {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and own in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
    return found


RAY_AGENTS = (b"dashboard/agent.py", b"runtime_env/agent/main.py", b"ray::DashboardAgent", b"ray::RuntimeEnvAgent")


def stopped_while_ray_starts(command: list[str], env: dict[str, str], stop: int) -> tuple[int, str, list[bytes]]:
    """Run `command` (a driver that starts its own cluster: no RAY_ADDRESS in `env`) with a RAY_TMPDIR of its own,
    send it `stop` once its raylet has started an agent, while ray.init waits for the raylet to register (seconds
    on 2 cores); (its exit code, its stderr, the command lines of its cluster's processes still running 5 s after
    it exited, which are then killed)."""
    import signal
    import subprocess
    import tempfile
    import time

    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as ray_tmp:  # Ray's socket paths must stay short
        run = subprocess.Popen(with_ctrl_c(command), env={**env, "RAY_TMPDIR": ray_tmp}, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while run.poll() is None and time.monotonic() < deadline and not any(
                    arg.endswith(RAY_AGENTS) for argv in processes_with_ray_tmpdir(ray_tmp).values() for arg in argv):
                time.sleep(0.01)
            run.send_signal(stop)
            _, stderr = run.communicate(timeout=60)
            deadline = time.monotonic() + 5
            while (left := processes_with_ray_tmpdir(ray_tmp)) and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
            for pid in processes_with_ray_tmpdir(ray_tmp):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
    return run.returncode, stderr, [b" ".join(argv)[:100] for argv in left.values()]


RESTORE_CTRL_C = "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "


RAY_FORWARDED_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\([\w.]+ pid=\d+")  # '(RayTrainWorker pid=11891) ...'


def own_output(output: str) -> str:
    """What a driver printed itself: its output less the lines Ray forwards from its actors' logs. A worker that Ray
    Train aborts in the middle of a call (a stop arriving while it reports a checkpoint) may log that call's
    traceback there, which no handling in the driver can prevent."""
    return "\n".join(line for line in output.splitlines() if not RAY_FORWARDED_LINE.match(line))


def sigterm_whose_handler_has_not_run() -> None:
    """SIGTERM to this process, taken by a handler that does nothing: the signal is received (a SignalLog logs it)
    but no SystemExit is raised, as when a run fails on a cluster that a stop reached before the driver's handler
    ran (SIGTERM to the process group of a command that started its own cluster)."""
    import signal
    import time

    took = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # Python runs handlers between bytecodes
    finally:
        signal.signal(signal.SIGTERM, took)


def with_ctrl_c(command: list[str]) -> list[str]:
    """`python -m module ...` or `python script ...`, run with Python's Ctrl-C handler whatever this process's: a
    suite started in the background by a shell without job control inherits SIGINT ignored, and so would the
    command, which a test's SIGINT would then not reach."""
    python, *rest = command
    if rest[0] == "-m":
        module, *args = rest[1:]
        return [python, "-c", RESTORE_CTRL_C + f"sys.argv[0] = {module!r}; "
                f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)", *args]
    return [python, "-c", RESTORE_CTRL_C + "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
            *rest]


def wandb_run_ids(segments: list[Path]) -> set[str]:
    """The W&B run ids of offline run folders, from their run files (`run-<id>.wandb`): a folder's name ends in -1,
    -2, ... where another segment of the run began in the same second."""
    return {run_file.name.removeprefix("run-").removesuffix(".wandb")
            for segment in segments for run_file in segment.glob("run-*.wandb")}


def wandb_logged_steps(run_folder: Path, key: str) -> tuple[list[int], int | None]:
    """(the steps at which an offline W&B run logged `key`, its exit code or None if it never recorded an exit)."""
    from train.tracking import wandb_file_records

    [run_file] = run_folder.glob("run-*.wandb")
    steps, exit_code = [], None
    for record in wandb_file_records(run_file):
        if record.HasField("history"):
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if key in items:
                steps.append(items["_step"])
        elif record.HasField("exit"):
            exit_code = record.exit.exit_code
    return steps, exit_code
