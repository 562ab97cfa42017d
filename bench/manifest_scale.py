"""The dataset job's end at the mission's scale: what every run of `python -m pipeline.build`, a no-op rerun
included, does after its shards (list the committed shards, check that no key is in two shards, read every
stats.json, rewrite the manifest), timed with its peak memory on a synthetic dataset (tests/synthetic_index.py,
no images) of N shards x 1,000 rows, on local disk and on a real S3 API (moto server on loopback); then how
long a Ctrl-C takes to end a process reading the indexes from an S3 endpoint that stopped answering."""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import write_report

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "manifest_scale.json"

# one run of the job's end, in a process of its own (its peak memory is its own): a first run and a no-op rerun
END_OF_JOB = r"""
import json, resource, sys, time
from pipeline import format as fmt
from pipeline.build import checked_keys, write_manifest
from pipeline.config import BuildConfig

out = sys.argv[1]
cfg = BuildConfig(output=out)
steps = {}
for run in ("first", "rerun"):
    started = time.perf_counter()
    shards = fmt.committed_shards(out)
    listed = time.perf_counter()
    all_stats = fmt.read_stats(shards)
    stats_read = time.perf_counter()
    shared = checked_keys(out, shards, all_stats)  # the first run checks; the rerun finds its check in the manifest
    checked = time.perf_counter()
    manifest = write_manifest(cfg, {}, all_stats, {}, shared)
    steps[run] = {"list_s": listed - started, "stats_s": stats_read - listed, "keys_s": checked - stats_read,
                  "manifest_s": time.perf_counter() - checked, "total_s": time.perf_counter() - started,
                  "keys_in_several_shards": manifest["keys_in_several_shards"]}
print(json.dumps({**steps, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""

# read the indexes until told to stop (SIGINT), then say how it ended
READ_UNTIL_STOPPED = r"""
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts with it ignored
from pipeline import format as fmt
from pipeline.build import keys_in_several_shards
shards = fmt.committed_shards(sys.argv[1])
print("reading", flush=True)
try:
    keys_in_several_shards(shards)
    print("read all", flush=True)
except KeyboardInterrupt:
    print("stopped", flush=True)
    sys.exit(130)
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.manifest_scale", description=__doc__)
    parser.add_argument("--shards", default="300,3000", help="dataset sizes in shards, comma-separated")
    parser.add_argument("--rows", type=int, default=1000, help="index rows per shard")
    parser.add_argument("--stores", default="local,s3", help="local, s3 (moto server on loopback), or both")
    parser.add_argument("--stop-after", type=float, default=0.5,
                        help="seconds of reading from S3 before the endpoint stops answering and SIGINT comes "
                             "(0: no stop measurement)")
    parser.add_argument("--work", help="working folder (default: a temp folder, removed at the end)")
    parser.add_argument("--out", default=str(RESULTS), help="JSON report")
    return parser.parse_args(argv)


class Moto:
    """A moto server in a process of its own, which SIGSTOP makes an endpoint that accepts and never answers."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                         str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("moto server did not start")

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint, "FSSPEC_S3_ENDPOINT_URL": self.endpoint}

    def close(self) -> None:
        self.process.send_signal(signal.SIGCONT)
        self.process.kill()
        self.process.wait()


def child_env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **extra, "PYTHONPATH": str(REPO)}


def end_of_job(dataset: str, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", END_OF_JOB, dataset], cwd=REPO, capture_output=True, text=True,
                          env=child_env(env))
    if done.returncode != 0:
        raise RuntimeError(f"end of job failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def stop_while_reading(dataset: str, moto: Moto, after_s: float) -> dict:
    """SIGSTOP the server `after_s` into the read, SIGINT the reader: seconds until it ends, and how."""
    reader = subprocess.Popen([sys.executable, "-c", READ_UNTIL_STOPPED, dataset], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(moto.env()))
    reader.stdout.readline()  # "reading"
    time.sleep(after_s)
    moto.process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(0.5)
        stopped = time.perf_counter()
        reader.send_signal(signal.SIGINT)
        try:
            out, err = reader.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            reader.kill()
            out, err = reader.communicate()
        seconds = time.perf_counter() - stopped
    finally:
        moto.process.send_signal(signal.SIGCONT)
    last = (err.strip().splitlines() or [""])[-1]
    return {"seconds": seconds, "exit_code": reader.returncode, "stdout": out.strip().splitlines()[-1:],
            "stderr_last": last[-200:]}


def upload(local: Path, url: str, env: dict[str, str]) -> None:
    code = ("import sys, s3fs; fs = s3fs.S3FileSystem(); b = sys.argv[2].split('/')[2]; "
            "fs.exists(b) or fs.mkdir(b); fs.put(sys.argv[1], sys.argv[2], recursive=True)")
    subprocess.run([sys.executable, "-c", code, str(local), url], check=True, env=child_env(env))


def main(argv: list[str] | None = None) -> dict:
    from tests.synthetic_index import write_synthetic_index

    args = parse_args(argv)
    sizes = [int(n) for n in args.shards.split(",")]
    stores = args.stores.split(",")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="manifest-scale-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        moto = Moto() if "s3" in stores else None
        try:
            for shards in sizes:
                local = work / f"dataset-{shards}x{args.rows}"
                if not (local / "manifest.json").exists():
                    write_synthetic_index(local, shards * args.rows, shards)
                for store in stores:
                    manifest = json.loads((local / "manifest.json").read_text())
                    manifest.pop("keys_checked", None)  # an earlier run's check: the first run here checks
                    (local / "manifest.json").write_text(json.dumps(manifest))
                    env = moto.env() if store == "s3" else {}
                    dataset = str(local)
                    if store == "s3":
                        dataset = f"s3://bench/{local.name}"
                        started = time.perf_counter()
                        upload(local, dataset, env)
                        print(f"uploaded {shards} shards to moto ({time.perf_counter() - started:.0f} s)")
                    row = {"shards": shards, "rows": shards * args.rows, "store": store, **end_of_job(dataset, env)}
                    if store == "s3" and args.stop_after:
                        row["stop"] = stop_while_reading(dataset, moto, args.stop_after)
                    rows.append(row)
                    print(json.dumps(row))
        finally:
            if moto:
                moto.close()
    report = {"rows_per_shard": args.rows, "results": rows,
              "environment": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()}}
    print("\n| shards | store | run | list (s) | stats (s) | key check (s) | manifest (s) | total (s) | peak (GB) |"
          " Ctrl-C to exit (s) |\n|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        for run in ("first", "rerun"):
            step = row[run]
            stop = f"{row['stop']['seconds']:.1f} (exit {row['stop']['exit_code']})" if "stop" in row else ""
            print(f"| {row['shards']:,} | {row['store']} | {run} | {step['list_s']:.2f} | {step['stats_s']:.2f} | "
                  f"{step['keys_s']:.2f} | {step['manifest_s']:.2f} | {step['total_s']:.2f} | "
                  f"{row['peak_rss_gb']:.2f} | "
                  f"{stop if run == 'first' else ''} |")
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
