"""One multi-task dataset job (--task canny,hed,midas,openpose --caption blip) against the four single-task jobs
run one after the other on the same input: wall time, images/s and BLIP captions, on random weights at the
published sizes (bench.annotators writes them). The goal: the single jobs' summed time / the combined job's >= 1.5x.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from bench import write_report
from bench.annotators import write_weights
from bench.canny_throughput import make_inputs
from pipeline import format as fmt

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "multitask.json"
NEURAL = ("hed", "midas", "openpose")


def prepare(work: Path, images: int, per_shard: int) -> tuple[Path, Path]:
    """Photo-sized input shards and one --weights folder holding every model at its published size."""
    inputs = work / "photos"
    make_inputs(inputs, images, per_shard)
    weights = work / "weights"
    for task in (*NEURAL, "blip"):
        print(f"writing random full-size {task} weights ...", flush=True)
        write_weights(task, weights)
    return inputs, weights


def job_command(tasks: str, inputs: Path, out: Path, weights: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "pipeline.build", "--task", tasks, "--input", str(inputs), "--output", str(out),
            "--caption", args.caption, "--weights", str(weights), "--resolution", str(args.resolution),
            "--detect-resolution", str(args.resolution), "--batch-size", str(args.batch_size),
            "--num-workers", "1", "--cpus-per-worker", str(args.cpus)]


def run_job(name: str, command: list[str], out: Path, work: Path) -> dict[str, Any]:
    """One dataset job as a user runs it (its own process, its own Ray start), timed from command to exit."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TMPDIR": str(work / "ray")}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    (work / f"{name.replace(',', '-')}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"the {name} job failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return {"seconds": seconds, **outcome(out)}


def outcome(dataset: Path) -> dict[str, Any]:
    """What a job wrote: input samples, BLIP captions (index rows captioned by BLIP), maps per task."""
    manifest = json.loads((dataset / fmt.MANIFEST).read_text())
    rows = [r for p in sorted((dataset / fmt.SHARDS_DIR).glob(f"*{fmt.INDEX_SUFFIX}"))
            for r in pq.read_table(p, columns=["caption_source"]).to_pylist()]
    tasks = fmt.dataset_tasks(manifest)
    by_task = manifest.get("totals_by_task") or {tasks[0]: manifest["totals"]}
    return {"samples": manifest["samples"], "blip_captions": sum(r["caption_source"] == "blip" for r in rows),
            "maps": {task: counts[fmt.OK] for task, counts in by_task.items()}}


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    inputs, weights = prepare(work, args.images, args.per_shard)
    tasks = args.tasks.split(",")
    runs: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):  # alternate combined and single jobs, so drift hits both alike
        jobs = [(args.tasks, work / f"combined-{repeat}")] + [(t, work / f"{t}-{repeat}") for t in tasks]
        for name, out in jobs:
            print(f"[{repeat}] {name} ...", flush=True)
            runs.setdefault(name, []).append(run_job(name, job_command(name, inputs, out, weights, args), out, work))
            print(f"    {runs[name][-1]['seconds']:.1f} s", flush=True)
    rows = []
    for name, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        rows.append({"job": name, "seconds": seconds, "images_per_s": results[0]["samples"] / seconds,
                     "blip_captions": results[0]["blip_captions"], "maps": results[0]["maps"],
                     "runs": [r["seconds"] for r in results]})
    single = sum(r["seconds"] for r in rows[1:])
    summary = {"combined_s": rows[0]["seconds"], "single_jobs_s": single, "speedup": single / rows[0]["seconds"],
               "blip_captions_combined": rows[0]["blip_captions"],
               "blip_captions_single_jobs": sum(r["blip_captions"] for r in rows[1:])}
    return {"rows": rows, "summary": summary}


def to_markdown(report: dict[str, Any]) -> str:
    lines = ["| job | wall (s) | images/s | BLIP captions | maps written |", "|---|---:|---:|---:|---|"]
    for r in report["rows"]:
        maps = ", ".join(f"{t} {n}" for t, n in r["maps"].items())
        lines.append(f"| {r['job']} | {r['seconds']:.1f} | {r['images_per_s']:.3f} | {r['blip_captions']} | {maps} |")
    s = report["summary"]
    lines.append(f"| four single jobs, one after the other | {s['single_jobs_s']:.1f} | | "
                 f"{s['blip_captions_single_jobs']} | |")
    lines.append(f"\nsingle jobs' time / combined job's time: **{s['speedup']:.2f}x** (goal >= 1.5x)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.multitask", description=__doc__)
    parser.add_argument("--tasks", default="canny,hed,midas,openpose", help="the combined job's --task")
    parser.add_argument("--caption", default="blip", help="--caption of every job")
    parser.add_argument("--images", type=int, default=8, help="input photos (400-800 px, as img2dataset writes)")
    parser.add_argument("--per-shard", type=int, default=8, help="photos per input shard")
    parser.add_argument("--resolution", type=int, default=512, help="--resolution and --detect-resolution")
    parser.add_argument("--batch-size", type=int, default=8, help="images per annotator call")
    parser.add_argument("--cpus", type=float, default=float(len(os.sched_getaffinity(0))),
                        help="--cpus-per-worker of the one actor each job runs")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each job (medians)")
    parser.add_argument("--work", help="working folder (default: a temp folder, removed at the end)")
    parser.add_argument("--out", default=str(RESULTS), help="JSON report")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="multitask-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = measure(args, work)
    report["settings"] = {k: v for k, v in vars(args).items() if k not in {"work", "out"}}
    report["environment"] = {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                             "weights": "random, published sizes (bench.annotators)"}
    print(f"\nDataset jobs on {args.images} photos at {args.resolution} px, {report['environment']['cpus']} CPUs:\n")
    print(to_markdown(report))
    print()
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
