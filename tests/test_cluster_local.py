"""a real two-node Ray cluster on this machine: the dataset job spreads over both nodes, and `ray job submit`
runs 2-worker DDP across them with checkpoints on a real S3 endpoint (moto on loopback); then it all stops"""
import json
import os
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
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
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
             '--resources={"second_node": 1}', *node_ports()],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        ))
        wait_for_nodes(address, 2, env)
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        for node in reversed(nodes):  # `ray start --block` stops its node's processes when signalled
            os.killpg(node.pid, signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)


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
    submitted = run([RAY, "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO), "--",
                     sys.executable, "train/run.py", "--preset", "debug", "--data", "s3://cnd-cluster/canny",
                     "--run-name", "two-nodes", "--num-workers", "2", "--storage-path", "s3://cnd-cluster/runs",
                     "--max-steps", "4", "--checkpoint-every", "2", "--validate-every", "0", "--wandb", "off"],
                    job_env, timeout=600)
    logs = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, logs[-4000:]
    assert "node_rank=1" in logs  # the second rank ran on the second node
    assert "'ranks_in_sync': 1.0" in logs
    fs.invalidate_cache()
    results = json.loads(fs.cat_file("cnd-cluster/runs/two-nodes/results.json"))
    assert results["final_step"] == 4
    assert fs.glob("cnd-cluster/runs/two-nodes/checkpoint_*/controlnet/diffusion_pytorch_model.safetensors")
