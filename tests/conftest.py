"""shared fixtures: one Ray session, a moto S3 server on loopback, the sample shards"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ["HF_HUB_OFFLINE"] = "1"  # no test may download weights; the loaders read local files only
os.environ.setdefault("WANDB_MODE", "offline")


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


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory, s3_endpoint):
    """One local Ray for the whole suite (a ray.init costs seconds and ~0.8 GB). Its session files go in
    the test tmp dir. Returns the GCS address, for driver subprocesses joining the same cluster."""
    import ray

    os.environ["RAY_TMPDIR"] = str(tmp_path_factory.mktemp("ray"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    context = ray.init(
        num_cpus=2,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        _temp_dir=os.environ["RAY_TMPDIR"],
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Path:
    from pipeline.sample_data import write_shards

    out = tmp_path_factory.mktemp("sample") / "shards"
    write_shards(out, num_shards=4)
    return out


@pytest.fixture
def python() -> str:
    return sys.executable
