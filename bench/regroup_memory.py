"""The peak memory of reading a tar whose samples' members are apart (`tar -C folder .`: every image first, every
caption last), regrouped by pipeline.reader.TarSamples, against streaming the same samples from a tar that keeps
them adjacent; each read in a process of its own. `--code` measures another checkout's reader side by side (one from
before the two-pass regroup takes `regroup=True`)."""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bench import write_report

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "regroup_memory.json"

# run in a child process, the checkout to measure first on its path: peak RSS and seconds of reading every sample
READ = """
import inspect, json, resource, sys, time
from functools import partial
from pipeline.reader import TarSamples
path, regroup = sys.argv[1], sys.argv[2] == "regroup"
started = time.perf_counter()
with open(path, "rb") as f:
    if not regroup:
        reader = TarSamples(f)
    elif "reopen" in inspect.signature(TarSamples).parameters:
        reader = TarSamples(f, reopen=partial(open, path, "rb"))
    else:  # a reader from before the two-pass regroup
        reader = TarSamples(f, regroup=True)
    samples = image_bytes = 0
    for sample in reader:
        samples += 1
        image_bytes += len(sample.members.get("jpg", b""))
print(json.dumps({"samples": samples, "image_bytes": image_bytes, "seconds": time.perf_counter() - started,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.regroup_memory", description=__doc__)
    parser.add_argument("--images", type=int, default=400, help="samples in the tar (an image and a caption each)")
    parser.add_argument("--image-kb", type=int, default=500, help="bytes of each image, in KiB (200 MB in all)")
    parser.add_argument("--code", action="append", default=[],
                        help="a checkout whose reader to measure (repeatable; default: this one)")
    parser.add_argument("--out", default=str(RESULTS), help="JSON report")
    return parser.parse_args(argv)


def write_tar(path: Path, images: int, image_bytes: int, apart: bool) -> None:
    """`images` samples of random image bytes and a caption; `apart`: every image first, every caption last."""
    names = [f"./{i:05d}.{ext}" for i in range(images) for ext in ("jpg", "txt")]
    if apart:
        names.sort(key=lambda name: name.endswith(".txt"))
    with tarfile.open(path, "w") as tar:
        for name in names:
            data = os.urandom(image_bytes) if name.endswith(".jpg") else f"caption of {name}".encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def read_in_child(code: Path, tar: Path, mode: str) -> dict:
    """One read of every sample of `tar` by `code`'s reader, in a process of its own."""
    done = subprocess.run([sys.executable, "-c", READ, str(tar), mode], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(code)}, cwd=code)
    if done.returncode != 0:
        raise RuntimeError(f"reading {tar} with {code} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    codes = [Path(c).resolve() for c in args.code] or [REPO]
    runs = []
    with tempfile.TemporaryDirectory(prefix="regroup-memory-") as tmp:
        adjacent, apart = Path(tmp) / "adjacent.tar", Path(tmp) / "apart.tar"
        write_tar(adjacent, args.images, args.image_kb << 10, apart=False)
        write_tar(apart, args.images, args.image_kb << 10, apart=True)
        tar_mb = apart.stat().st_size / 2**20
        for code in codes:
            for tar, mode in ((adjacent, "stream"), (apart, "regroup")):
                run = {"code": str(code), "tar": tar.name, "mode": mode, **read_in_child(code, tar, mode)}
                if run["samples"] != args.images or run["image_bytes"] != args.images * (args.image_kb << 10):
                    raise RuntimeError(f"{code} read {run['samples']} samples of {args.images}: {run}")
                runs.append(run)
    report = {"images": args.images, "image_kb": args.image_kb, "tar_mb": tar_mb, "runs": runs,
              "environment": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()}}
    print(f"\n{args.images} samples, a tar of {tar_mb:.0f} MB\n| reader | tar | read | peak RSS (MB) | wall (s) |\n"
          "|---|---|---|---:|---:|")
    for run in runs:
        print(f"| {run['code']} | {run['tar']} | {run['mode']} | {run['peak_rss_mb']:.0f} | {run['seconds']:.2f} |")
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
