"""storage outages: which errors are waited out and for how long, and a real cut (the moto S3 server stopped and
started again) in the middle of reading a shard"""
import contextlib
import errno
import io
import logging
import re
import signal
import tarfile
import threading
import time

import fsspec
import numpy as np
import pytest

from pipeline import format as fmt
from pipeline.format import Outage, StorageOutage, is_transient, retried


def test_connection_errors_are_waited_out_and_answers_are_not():
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, ReadTimeoutError

    for error in (ConnectionResetError(), TimeoutError(), OSError(5, "Input/output error"),
                  EndpointConnectionError(endpoint_url="http://s3"), ReadTimeoutError(endpoint_url="http://s3")):
        assert is_transient(error), error
    for error in cut_responses():  # a response cut part-way: the next sample is read from where it broke
        assert is_transient(error), error
    for error in (FileNotFoundError("s3://b/k"), PermissionError("AccessDenied"), NoCredentialsError(),
                  tarfile.ReadError("bad header"), ValueError("a bug"), StorageOutage("waited already"),
                  OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EROFS, "Read-only file system"),
                  OSError(errno.EDQUOT, "Disk quota exceeded")):  # (each waited out 120 s, then failed all the same)
        assert not is_transient(error), error


def cut_responses() -> list[Exception]:
    """What a response cut part-way raises, by client: none is an OSError or named for a connection."""
    import http.client

    from aiohttp import ClientPayloadError
    from botocore.exceptions import IncompleteReadError, ResponseStreamingError

    return [ClientPayloadError("Response payload is not completed"), ResponseStreamingError(error="cut"),
            IncompleteReadError(actual_bytes=1, expected_bytes=2), http.client.IncompleteRead(b"", 2)]


class FakeClock:
    def __init__(self):
        self.now, self.slept = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_an_outage_backs_off_then_gives_up_after_its_patience_naming_the_last_error():
    clock = FakeClock()
    outage = Outage("reading s3://b/k", patience_s=40, clock=clock, sleep=clock.sleep)
    with pytest.raises(StorageOutage, match=r"reading s3://b/k: the storage failed for 4\d s; last error: "
                                            r"ConnectionResetError: reset 6") as raised:
        for attempt in range(20):
            outage.wait(ConnectionResetError(f"reset {attempt}"))
    assert clock.slept == [1, 2, 4, 8, 15, 10]  # doubling, capped, and the last wait ends at the patience
    assert isinstance(raised.value.__cause__, ConnectionResetError)

    outage.over()  # a success: the next outage has the whole patience again
    outage.wait(TimeoutError())
    assert clock.slept[-1] == 1


def test_retried_repeats_a_call_through_transient_errors_only(monkeypatch):
    monkeypatch.setattr(fmt.time, "sleep", lambda seconds: None)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError("down")
        return "done"

    assert retried(flaky, "writing") == "done" and len(calls) == 3

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("gone")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        retried(missing, "reading")
    assert len(calls) == 1


SAMPLES, MEMBER_BYTES = 24, 256 << 10


def big_shard() -> bytes:
    """A tar of SAMPLES samples whose bytes span several of s3fs's read blocks (set to 1 MiB below)."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    writer = fmt.SampleTarWriter(buffer)
    for i in range(SAMPLES):
        writer.write(f"{i:04d}", {"jpg": rng.bytes(MEMBER_BYTES), "txt": f"caption {i}".encode()})
    writer.close()
    return buffer.getvalue()


@pytest.fixture
def shard_on_s3(s3_endpoint, monkeypatch) -> str:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries would hide a short outage from the reader
    monkeypatch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}), "default_block_size": 1 << 20})
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    with contextlib.suppress(FileExistsError):  # made by an earlier test
        fs.mkdir("cnd-outage-read")
    fs.pipe_file("cnd-outage-read/big.tar", big_shard())
    return "s3://cnd-outage-read/big.tar"


def test_a_shard_read_through_a_cut_connection_goes_on_where_it_broke(shard_on_s3, s3_server, caplog):
    keys, outage = [], threading.Event()

    def restart_later() -> None:
        time.sleep(3)
        s3_server.start()

    for sample in fmt.shard_samples([{"url": shard_on_s3}], patience_s=60):
        keys.append(sample["__key__"])
        if len(keys) == 2:  # a block or so in: the next ranged read finds the endpoint gone
            s3_server.stop()
            outage.set()
            threading.Thread(target=restart_later, daemon=True).start()
    assert outage.is_set()
    assert keys == [f"{i:04d}" for i in range(SAMPLES)]  # every sample once, in order: none skipped, none repeated
    retries = [r.getMessage() for r in caplog.records if r.name == "pipeline.format"]
    assert retries and all(shard_on_s3 in m and "trying again" in m for m in retries)


def test_a_storage_that_stays_down_ends_the_read_with_one_error_not_skipped_shards(shard_on_s3, s3_server):
    skipped = []
    s3_server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StorageOutage, match="reading s3://cnd-outage-read/big.tar: the storage failed"):
            list(fmt.shard_samples([{"url": shard_on_s3}, {"url": shard_on_s3}], handler=skipped.append,
                                   patience_s=2))
        assert time.monotonic() - started < 60
    finally:
        s3_server.start()
    assert skipped == []  # not passed over as a bad shard: the stream stops instead
    missing = []
    assert list(fmt.shard_samples([{"url": shard_on_s3 + ".gone"}], handler=lambda e: missing.append(e) or True)) == []
    assert len(missing) == 1 and isinstance(missing[0], FileNotFoundError)  # an answer, handed on at once


@pytest.fixture(autouse=True)
def storage_warnings(caplog):
    caplog.set_level(logging.WARNING, logger="pipeline.format")


@pytest.mark.parametrize("command", [
    ["-m", "pipeline.preview", "s3://cnd-refused/canny"],
    ["-m", "train.subsets", "--dataset", "s3://cnd-refused/canny", "--sizes", "8"],
    ["-m", "train.report", "--runs", "sweep", "--storage-path", "s3://cnd-refused/runs"],
    ["-m", "train.export", "s3://cnd-refused/runs/x", "--format", "diffusers", "--out", "OUT"],
    ["train/run.py", "--data", "s3://cnd-refused/canny", "--run-name", "x", "--wandb", "off"],
])
def test_an_endpoint_that_refuses_is_one_line_in_every_command(command, python, tmp_path):
    """An endpoint nothing answers at (a wrong AWS_ENDPOINT_URL, no network) ended these commands in botocore's
    EndpointConnectionError traceback, from their first listing; the dataset job said it in one line."""
    import os
    import subprocess

    from tests.conftest import REPO, _free_port

    closed = f"http://127.0.0.1:{_free_port()}"  # bound and let go: nothing listens there
    env = {**os.environ, "AWS_ENDPOINT_URL": closed, "FSSPEC_S3_ENDPOINT_URL": closed, "AWS_MAX_ATTEMPTS": "1",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    args = [str(tmp_path / "out") if arg == "OUT" else arg for arg in command]
    done = subprocess.run([python, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert re.fullmatch(r"error: .*failed: EndpointConnectionError: Could not connect to the endpoint URL: .*",
                        done.stderr.strip().splitlines()[-1]), done.stderr[-1000:]


@pytest.fixture
def silent_endpoint_env():
    """The environment of a process whose S3 endpoint accepts connections (the kernel's backlog) and never answers,
    as an object store in an outage may."""
    import os
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(128)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        yield {**os.environ, "AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint,
               "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def test_ctrl_c_while_indexes_are_read_from_an_endpoint_that_never_answers_ends_the_process_at_once(
        python, silent_endpoint_env):
    """each_index read the indexes in a ThreadPoolExecutor, whose `with` block, and then the interpreter's exit,
    joined its threads: a Ctrl-C while the dataset job's key check read 3,000 indexes from an S3 endpoint that had
    stopped answering (a moto server under SIGSTOP) ended the process after 225 s of its requests' timeouts and
    retries (bench/manifest_scale.py). The threads are left to themselves now: the stop ends the process in well
    under a second, its own way."""
    import subprocess

    from tests.conftest import REPO

    reader = r"""
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts with it ignored
from pipeline import format as fmt
shards = [fmt.CommittedShard(f"{i:05d}", "", f"s3://silent/shards/{i:05d}.parquet", "") for i in range(64)]
print("reading", flush=True)
try:
    fmt.each_index(shards, ["key", "status"], lambda shard, index: None)
except KeyboardInterrupt:
    print("stopped", flush=True)
    sys.exit(130)
"""
    process = subprocess.Popen([python, "-c", reader], cwd=REPO, env=silent_endpoint_env,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout.readline() == "reading\n"
        time.sleep(1.5)  # its 16 threads are waiting for answers
        stopped = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
        took = time.monotonic() - stopped
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130 and out == "stopped\n" and "Traceback" not in err, err[-3000:]
    assert took < 5, took


def test_a_stopped_runs_storage_calls_give_up_on_an_endpoint_that_never_answers(python, silent_endpoint_env):
    """A run stopped in an outage (often why a user stops it): its last line looked up the last checkpoint, and rank
    0 recorded the last step its W&B run holds, each through ~7 min of s3fs's and botocore's retries against an
    endpoint that accepts and never answers, past the SIGKILL that follows a pod's SIGTERM ~30 s later. Each now
    gets STOP_READ_S (2 s here)."""
    import subprocess

    from tests.conftest import REPO

    stop = r"""
import dataclasses, time
import pipeline.format as fmt
from train.config import debug
from train.run import stopped_line
from train.tracking import record_logged_through
fmt.STOP_READ_S = 2.0
cfg = dataclasses.replace(debug(), storage_path="s3://silent/runs", run_name="silent")
started = time.monotonic()
line = stopped_line(cfg)
record_logged_through(cfg, "silent-1", 7, {"train/loss"})
print(f"{time.monotonic() - started:.1f}", line, flush=True)
"""
    done = subprocess.run([python, "-c", stop], cwd=REPO, env=silent_endpoint_env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    took, line = done.stdout.strip().split(" ", 1)
    assert float(took) < 8 and line == ("stopped: the same command resumes silent from its last checkpoint in "
                                        "s3://silent/runs (unreadable now: TimeoutError)"), done.stdout
