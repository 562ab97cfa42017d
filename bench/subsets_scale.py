"""Nested subsets at the mission's scale: a synthetic index of 3M rows in 1,000 parquet files (no images,
tests/synthetic_index.py), then `python -m train.subsets --sizes 1k,10k,50k,500k,3m` in a process of its own,
timed, with its peak memory (goal: under 2 minutes and 2 GB on 2 cores)."""
from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import write_report

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "subsets_scale.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.subsets_scale", description=__doc__)
    parser.add_argument("--rows", type=int, default=3_000_000, help="index rows (all ok, so 3m is the whole)")
    parser.add_argument("--files", type=int, default=1000, help="parquet files they are spread over")
    parser.add_argument("--sizes", default="1k,10k,50k,500k,3m", help="subset sizes")
    parser.add_argument("--repeats", type=int, default=1, help="subset runs (medians)")
    parser.add_argument("--work", help="working folder (default: a temp folder, removed at the end)")
    parser.add_argument("--out", default=str(RESULTS), help="JSON report")
    return parser.parse_args(argv)


def run_subsets(dataset: Path, sizes: str) -> dict[str, float]:
    """One subsets command: wall seconds and the peak resident memory of its process (ru_maxrss of children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "train.subsets", "--dataset", str(dataset), "--sizes", sizes,
                           "--holdout-shards", "0"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"subsets failed: {done.stderr.strip()[-2000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(done.stdout, end="")
    return {"seconds": seconds, "peak_rss_gb": max(peak_kb, before) / 2**20}


def main(argv: list[str] | None = None) -> dict:
    import statistics

    from tests.synthetic_index import write_synthetic_index

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="subsets-scale-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        dataset = work / "dataset"
        started = time.perf_counter()
        if not (dataset / "manifest.json").exists():
            write_synthetic_index(dataset, args.rows, args.files, ok_fraction=1.0)
        print(f"synthetic index: {args.rows:,} rows in {args.files:,} files ({time.perf_counter() - started:.0f} s)")
        runs = [run_subsets(dataset, args.sizes) for _ in range(args.repeats)]
        subset_bytes = {p.name: p.stat().st_size for p in sorted((dataset / "subsets").glob("*.json"))}
    report = {
        "rows": args.rows, "files": args.files, "sizes": args.sizes,
        "seconds": statistics.median(r["seconds"] for r in runs),
        "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
        "runs": runs, "manifest_bytes": subset_bytes,
        "environment": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()},
    }
    print(f"\n| rows | files | sizes | wall (s) | peak memory (GB) |\n|---:|---:|---|---:|---:|\n"
          f"| {args.rows:,} | {args.files:,} | {args.sizes} | {report['seconds']:.1f} | {report['peak_rss_gb']:.2f} |")
    print("goal: under 120 s and 2 GB")
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
