"""a real two-node Ray cluster on this machine: the dataset job spreads over both nodes, and `ray job submit`
runs 2-worker DDP across them with checkpoints on a real S3 endpoint (moto on loopback); then it all stops"""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import pytest

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def node_ports() -> list[str]:
    """Every fixed-by-default port of a node, made free: two nodes share this machine."""
    agent, agent_grpc, runtime_env, metrics = free_ports(4)
    return [f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}"]


def run(command: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def wait_for_nodes(address: str, count: int, env: dict, timeout: float = 90) -> None:
    probe = (f"import ray; ray.init(address='{address}', logging_level='ERROR'); "
             "print(len([n for n in ray.nodes() if n['Alive']]))")
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = run([sys.executable, "-c", probe], env, timeout=60)
        if out.returncode == 0 and out.stdout.strip().endswith(str(count)):
            return
        time.sleep(1)
    raise TimeoutError(f"{count} Ray nodes did not come up at {address}")


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    """`ray start --head` and a second `ray start --address`, each with 1 CPU and a resource naming it."""
    gcs, dashboard, client = free_ports(3)
    # one temp dir per node, short (Ray's socket paths must stay under 107 bytes), and separate: two nodes on one
    # machine would otherwise unpack job working dirs into the same folder, under each other's feet
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    second_temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    # token auth off: a loopback-only test cluster, whose head would otherwise mint a token that clients started
    # with another temp dir do not find
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=1", "--num-gpus=0",
         '--resources={"head_node": 1}', "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}", f"--temp-dir={temp}",
         *node_ports()],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"127.0.0.1:{gcs}"
    nodes = [head]
    try:
        wait_for_nodes(address, 1, env)
        nodes.append(subprocess.Popen(
            [RAY, "start", "--block", f"--address={address}", "--num-cpus=1", "--num-gpus=0",
             '--resources={"second_node": 1}', f"--temp-dir={second_temp}",
             *node_ports()],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        ))
        wait_for_nodes(address, 2, env)
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        for node in reversed(nodes):  # `ray start --block` stops its node's processes when signalled
            os.killpg(node.pid, signal.SIGTERM)
        deadline = time.time() + 2  # a graceful stop of both nodes can take half a minute: not worth waiting for
        for node in nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=max(0.1, deadline - time.time()))
            with contextlib.suppress(ProcessLookupError):  # every process the node started is in its group
                os.killpg(node.pid, signal.SIGKILL)
        for folder in (temp, second_temp):
            shutil.rmtree(folder, ignore_errors=True)


def test_dataset_job_and_ddp_training_across_two_nodes(cluster, sample_shards):
    fs = fsspec.filesystem("s3")
    fs.mkdir("cnd-cluster")
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"]}

    built = run([sys.executable, "-m", "pipeline.build", "--input", str(sample_shards), "--output",
                 "s3://cnd-cluster/canny", "--resolution", "64", "--num-workers", "2"], env)
    assert built.returncode == 0, built.stderr[-3000:]
    fs.invalidate_cache()
    stats = [json.loads(fs.cat_file(p)) for p in fs.glob("cnd-cluster/canny/shards/*.stats.json")]
    assert len(stats) == 4
    assert len({s["node_id"] for s in stats}) == 2  # the shards were processed on both nodes

    job_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    submitted = run([RAY, "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO),
                     "--runtime-env-json", json.dumps({"excludes": [".git"]}), "--",
                     sys.executable, "train/run.py", "--preset", "debug", "--data", "s3://cnd-cluster/canny",
                     "--run-name", "two-nodes", "--num-workers", "2", "--storage-path", "s3://cnd-cluster/runs",
                     "--max-steps", "4", "--checkpoint-every", "2", "--validate-every", "0", "--wandb", "off"],
                    job_env, timeout=600)
    logs = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, logs[-4000:]
    assert "world_size=2" in logs and "'ranks_in_sync': 1.0" in logs
    # each node has 1 CPU, so the two 1-CPU ranks had to run on different nodes; the state API confirms it
    # (Ray Train's own node_rank groups by IP, and both nodes share this machine's IP)
    probe = ("from ray.util.state import list_actors; "
             f"actors = list_actors(address='{cluster['dashboard']}', "
             "filters=[('class_name', '=', 'RayTrainWorker')], detail=True); "
             "print(len({a.node_id for a in actors}))")
    nodes = run([sys.executable, "-c", probe], cluster["env"], timeout=120)
    assert nodes.stdout.strip().endswith("2"), nodes.stdout + nodes.stderr[-2000:]
    fs.invalidate_cache()
    results = json.loads(fs.cat_file("cnd-cluster/runs/two-nodes/results.json"))
    assert results["final_step"] == 4
    assert fs.glob("cnd-cluster/runs/two-nodes/checkpoint_*/controlnet/diffusion_pytorch_model.safetensors")
