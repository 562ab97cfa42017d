"""Trainer speed: `train/run.py` side by side with diffusers' `examples/controlnet/train_controlnet.py` (the trainer
users would pick instead), alternating runs, medians. Without --peer-script it times our variants alone.

Both train a ControlNet on the project's tiny debug SD, on the same 256 image/condition/caption triplets, at batch
4, 64 px, fp32, lr 1e-5, 50% empty prompts, gradient clipping at 1.0, no validation, on this machine's cores. Each
run is watched from outside: the time its console first reports step 1 (command to first step), the median step
time after the first few steps (from the times the peer reports its steps; ours, from the rate each of its step
lines reports, since Ray forwards a worker's output in batches), the time from the last step to the process's
exit, and the peak PSS of its whole process tree (Ray's processes included).

    python -m bench.trainer_speed [--peer-script PATH/train_controlnet.py] [--steps 60] [--repeats 3]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
SAMPLES, BATCH, RESOLUTION, LR, WARMUP_STEPS = 256, 4, 64, 1e-5, 5
PER_SHARD = 64  # the dataset's last shard is one more, held out: ours holds it out of training, the peer never sees it
OUR_STEP = re.compile(rb"\] step (\d+)/(\d+)")  # train.tracking's progress line
OUR_RATE = re.compile(rb"\] step (\d+)/\d+  loss \S+  ([\d.]+) samples/s")  # its rate over the steps since the last
PEER_STEP = re.compile(rb"Steps: +\d+%\|[^|]*\| *(\d+)/(\d+) \[")  # its tqdm bar, not the loading bars


@dataclass
class Timing:
    first_step_s: float  # command to the first step reported
    s_per_step: float  # median over the steps after WARMUP_STEPS
    after_last_s: float  # last step reported to process exit (saving, shutting down)
    total_s: float
    peak_pss_gb: float


# ---------------------------------------------------------------- pure: reading a run's step reports


def step_times(chunks: list[tuple[float, bytes]], pattern: re.Pattern) -> dict[int, float]:
    """{step: when it was first reported} from timestamped console output (a step may be printed again, as
    tqdm redraws its bar; the first sighting counts)."""
    seen: dict[int, float] = {}
    for when, text in chunks:
        for match in pattern.finditer(text):
            seen.setdefault(int(match.group(1)), when)
    return seen


def reported_step_seconds(chunks: list[tuple[float, bytes]], rate: re.Pattern) -> dict[int, float]:
    """{step: seconds} from the rate (samples/s, at BATCH samples a step, logged every step) each step line of
    ours reports, timed in the training process: a Ray worker's lines reach the console in batches, many with one
    timestamp (two of three runs of the Ray worker variant read 0.0-0.3 ms/step from their arrival times). In local
    mode the two agree (0.0408 s/step both ways in one run)."""
    text = b"".join(data for _, data in chunks)
    return {int(step): BATCH / float(samples_per_s) for step, samples_per_s in rate.findall(text)
            if float(samples_per_s) > 0}


def timing_of(started: float, ended: float, steps: dict[int, float], max_steps: int, peak_pss: float,
              reported: dict[int, float] | None = None) -> Timing:
    """`reported`: each step's seconds as the run measured them, used for the median step time when given."""
    if 1 not in steps or max_steps not in steps:
        raise RuntimeError(f"the run did not report steps 1 and {max_steps} (saw {sorted(steps)[:5]}...)")
    if reported:
        later = [seconds for step, seconds in reported.items() if WARMUP_STEPS < step <= max_steps]
    else:
        later = [steps[s] - steps[s - 1] for s in range(WARMUP_STEPS + 1, max_steps + 1)
                 if s in steps and s - 1 in steps]
    per_step = statistics.median(later) if later else (steps[max_steps] - steps[1]) / max(max_steps - 1, 1)
    return Timing(first_step_s=steps[1] - started, s_per_step=per_step, after_last_s=ended - steps[max_steps],
                  total_s=ended - started, peak_pss_gb=peak_pss / 2**30)


# ---------------------------------------------------------------- I/O: running and watching one command


def tree_pss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):  # a child that just ended
            total += p.memory_full_info().pss
    return total


def watch(argv: list[str], env: dict[str, str], pattern: re.Pattern, max_steps: int, log: Path,
          rate: re.Pattern | None = None) -> Timing:
    """Run a command to its end, timestamping its console output and sampling its tree's memory. `rate`: the
    pattern of the step lines' own rates, when the run reports them."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks: list[tuple[float, bytes]] = []

    def read() -> None:
        while data := proc.stdout.read1(65536):
            chunks.append((time.perf_counter(), data))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak, handle = 0, psutil.Process(proc.pid)
    while True:  # memory sampled every second; the exit seen when it happens, not at the next sample
        peak = max(peak, tree_pss(handle))
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)
            break
    ended = time.perf_counter()
    reader.join(timeout=10)
    log.write_bytes(b"".join(text for _, text in chunks))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited {proc.returncode}; see {log}")
    reported = reported_step_seconds(chunks, rate) if rate else None
    return timing_of(started, ended, step_times(chunks, pattern), max_steps, peak, reported)


# ---------------------------------------------------------------- the runs


def prepare(work: Path) -> tuple[Path, dict[str, Path], dict]:
    """The tiny debug SD and the same 256 photos, and a shard more held out, as a 64 px Canny dataset made by the
    dataset job, twice: plain, and with the VAE's latents stored (--latents); what storing them cost the job."""
    from bench.canny_throughput import make_inputs
    from pipeline.build import main as build_dataset
    from train.tiny_sd import build_tiny_sd

    base = build_tiny_sd(work / "tiny-sd")
    make_inputs(work / "photos", SAMPLES + PER_SHARD, per_shard=PER_SHARD)
    datasets, seconds = {"plain": work / "canny", "latents": work / "canny-latents"}, {}
    for name, folder in datasets.items():
        started = time.perf_counter()
        extra = ["--latents", str(base)] if name == "latents" else []
        if build_dataset(["--input", str(work / "photos"), "--output", str(folder), "--resolution", str(RESOLUTION),
                          "--num-workers", "1", *extra]) != 0:
            raise RuntimeError(f"the {name} dataset job failed")
        seconds[name] = time.perf_counter() - started
    latent_bytes = []
    for tar in (datasets["latents"] / "shards").glob("*.tar"):
        with tarfile.open(tar) as f:
            latent_bytes += [m.size for m in f.getmembers() if m.name.endswith(".latent.npy")]
    job = {"job_s_plain": seconds["plain"], "job_s_latents": seconds["latents"],
           "encode_ms_per_sample": encode_ms_per_sample(base, datasets["plain"]),
           "latent_bytes_per_sample": statistics.median(latent_bytes),
           "latent_bytes_per_sample_at_512px": 2 * 4 * 64 * 64 * 2 + 128}  # (2, 4, 64, 64) float16 + .npy header
    return base, datasets, job


def encode_ms_per_sample(base: Path, dataset: Path, batch: int = 16) -> float:
    """What --latents adds to the dataset job per sample, measured alone (the jobs' wall times above are mostly
    Ray's start-up at this size): decoding the stored JPEG and the VAE encoder, in batches as the job runs them."""
    from annotate.latents import LatentEncoder
    from pipeline import format as fmt
    from pipeline.worker import add_latents

    encoder = LatentEncoder(str(base), device="cpu")
    members = []
    for tar in sorted((dataset / "shards").glob("*.tar")):
        with tarfile.open(tar) as f:
            members += [{fmt.IMAGE_EXT: f.extractfile(m).read()} for m in f.getmembers() if m.name.endswith(".jpg")]
    times = []
    for start in range(0, len(members) - batch + 1, batch):
        started = time.perf_counter()
        add_latents(encoder, members[start : start + batch])
        times.append((time.perf_counter() - started) / batch * 1000)
    return statistics.median(times)


def ours(base: Path, dataset: Path, work: Path, steps: int, run: str, extra: list[str]) -> tuple[list[str], dict]:
    """Our trainer's command: the debug preset on the tiny SD, the benchmark's settings."""
    # without --validation-data the trainer holds the dataset's last shard out, as a user's run does: it trains on
    # the 256 samples of the others, which the peer is given
    argv = [sys.executable, "train/run.py", "--preset", "debug", "--base-model", str(base), "--data", str(dataset),
            "--resolution", str(RESOLUTION), "--batch-size", str(BATCH),
            "--lr", str(LR), "--max-steps", str(steps), "--validate-every", "0", "--checkpoint-every", str(steps),
            "--log-every", "1", "--epoch-samples", str(SAMPLES), "--wandb", "off",
            "--storage-path", str(work / "runs"), "--run-name", run, *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TMPDIR": str(work / "ray"), "WANDB_MODE": "disabled"}
    return argv, env


def with_bytecode(env: dict[str, str]) -> dict[str, str]:
    """The environment without PYTHONDONTWRITEBYTECODE (set machine-wide in some images): the peer's pip compiled
    its virtualenv's bytecode at install, uv installed ours without (the first import writes it), so with the
    variable set every run of ours compiled its imports again (10 s of its start here) and the peer's did not."""
    return {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}


VARIANTS = {  # ours, by lever: (flags, dataset); the last is what a user gets by default with stored latents
    "ours: Ray worker": (["--num-workers", "1"], "plain"),
    "ours: local mode, 1 thread": (["--num-workers", "0", "--cpus-per-worker", "1"], "plain"),
    "ours: local mode": (["--num-workers", "0"], "plain"),
    "ours: local mode, 1 data worker": (["--num-workers", "0", "--data-workers", "1"], "plain"),
    "ours: local mode, stored latents": (["--num-workers", "0"], "latents"),
    "ours: local mode, stored latents, compiled": (["--num-workers", "0", "--compile"], "latents"),
}
# the compiled variant's first run compiles for minutes (later runs read torch's compile cache): asked for by name
DEFAULT_VARIANTS = sorted(name for name in VARIANTS if "compiled" not in name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trainer_speed", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-script", type=Path, help="diffusers' examples/controlnet/train_controlnet.py")
    parser.add_argument("--peer-venv", type=Path, default=REPO / "bench" / "results" / "peer-venv",
                        help="the peer's own virtualenv, built on first use (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each trainer, alternating (default: %(default)s)")
    parser.add_argument("--variants", nargs="*", choices=sorted(VARIANTS), default=DEFAULT_VARIANTS,
                        help="which of our variants to time (default: all but the compiled one)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "trainer_speed.json",
                        help="the JSON written beside the printed table (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.steps < WARMUP_STEPS + 2:  # the median is over the steps after the warm-up: there must be one
        parser.error(f"--steps must be at least {WARMUP_STEPS + 2} (the first {WARMUP_STEPS} are warm-up)")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.peer_script and not args.peer_script.is_file():
        parser.error(f"--peer-script {args.peer_script}: no such file")
    work = Path(tempfile.mkdtemp(prefix="trainer-speed-"))
    base, datasets, job = prepare(work)
    print(f"dataset job: {job['job_s_plain']:.1f} s plain, {job['job_s_latents']:.1f} s storing latents; the latents "
          f"cost {job['encode_ms_per_sample']:.2f} ms/sample ({job['latent_bytes_per_sample']:.0f} B/sample here, "
          f"{job['latent_bytes_per_sample_at_512px'] / 1024:.0f} KiB at 512 px)", flush=True)
    commands: dict[str, tuple[list[str], dict, re.Pattern, re.Pattern | None]] = {}
    if args.peer_script:
        from bench.peer import build_peer_venv, peer_command, write_peer_dataset

        python = build_peer_venv(args.peer_venv)
        # the shards ours trains on: all but the last, which it holds out
        trained_shards = sorted(str(p) for p in (datasets["plain"] / "shards").glob("*.tar"))[:-1]
        write_peer_dataset(trained_shards, work / "peer-data")
    for repeat in range(args.repeats):
        if args.peer_script:
            peer_argv, peer_env = peer_command(python, args.peer_script, base, work / "peer-data",
                                               work / f"peer-out-{repeat}", steps=args.steps, batch_size=BATCH,
                                               resolution=RESOLUTION, lr=LR, seed=0,
                                               threads=len(os.sched_getaffinity(0)))
            commands["diffusers train_controlnet.py"] = (peer_argv, peer_env, PEER_STEP, None)
        for name in args.variants:
            flags, data = VARIANTS[name]
            run_argv, env = ours(base, datasets[data], work, args.steps, f"r{repeat}-{slug(name)}", flags)
            commands[name] = (run_argv, env, OUR_STEP, OUR_RATE)
        order = list(commands)
        order = order[repeat % len(order):] + order[: repeat % len(order)]  # alternate who goes first
        for name in order:
            command, env, pattern, rate = commands[name]
            log = work / f"{len(results_of(name))}-{slug(name)}.log"
            timing = watch(command, with_bytecode(env), pattern, args.steps, log, rate)
            results_of(name).append(timing)
            print(f"  {name}: {timing.s_per_step * 1000:.1f} ms/step, first step at {timing.first_step_s:.1f} s, "
                  f"{timing.after_last_s:.1f} s after the last, {timing.peak_pss_gb:.2f} GB", flush=True)
    rows = summarize(RUNS, "diffusers train_controlnet.py" if args.peer_script else None)
    print(to_markdown(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"samples": SAMPLES, "batch": BATCH, "resolution": RESOLUTION, "lr": LR, "steps": args.steps,
                "repeats": args.repeats, "cpus": len(os.sched_getaffinity(0))}
    args.out.write_text(json.dumps({"settings": settings, "dataset_job": job, "rows": rows,
                                    "runs": {k: [asdict(t) for t in v] for k, v in RUNS.items()}}, indent=1))
    for made in work.iterdir():  # the base, datasets and checkpoints (~50 MB a run): the logs alone are kept
        if made.suffix != ".log":
            shutil.rmtree(made) if made.is_dir() else made.unlink()
    print(f"wrote {args.out} (logs in {work})")
    return 0


RUNS: dict[str, list[Timing]] = {}


def results_of(name: str) -> list[Timing]:
    return RUNS.setdefault(name, [])


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def summarize(runs: dict[str, list[Timing]], peer: str | None) -> list[dict]:
    """One row per trainer: medians over its runs, and speed against the peer's: the ratio of the medians, the
    lowest and highest ratio within one repeat (whose runs follow each other, so they share the machine's drift),
    and the ratio of the two fastest runs (a shared machine's load only ever adds time, so each trainer's fastest
    run is its least disturbed one: with drift larger than the gap, this ratio moves least between benchmarks)."""
    rows = []
    for name, timings in runs.items():
        row = {"trainer": name, **{k: statistics.median(getattr(t, k) for t in timings) for k in asdict(timings[0])}}
        row["samples_per_s"] = BATCH / row["s_per_step"]
        rows.append(row)
    if peer and peer in runs:
        reference = next(r for r in rows if r["trainer"] == peer)
        for row in rows:
            row["speed_vs_peer"] = reference["s_per_step"] / row["s_per_step"]
            row["total_vs_peer"] = reference["total_s"] / row["total_s"]
            row["memory_vs_peer"] = row["peak_pss_gb"] / reference["peak_pss_gb"]
            per_repeat = [theirs.s_per_step / ours.s_per_step
                          for theirs, ours in zip(runs[peer], runs[row["trainer"]], strict=False)]
            row["speed_vs_peer_per_repeat"] = [min(per_repeat), max(per_repeat)]
            row["speed_vs_peer_fastest"] = (min(t.s_per_step for t in runs[peer])
                                            / min(t.s_per_step for t in runs[row["trainer"]]))
    return rows


def to_markdown(rows: list[dict]) -> str:
    peer = "speed_vs_peer" in rows[0] if rows else False
    head = "| trainer | s/step | samples/s | first step (s) | after last (s) | whole run (s) | peak PSS (GB) |"
    head += " speed vs peer | in one repeat | fastest runs | whole run vs peer | memory vs peer |" if peer else ""
    lines = [head, "|---" + "|---:" * (head.count("|") - 2) + "|"]
    for r in rows:
        line = (f"| {r['trainer']} | {r['s_per_step']:.4f} | {r['samples_per_s']:.1f} | {r['first_step_s']:.1f} | "
                f"{r['after_last_s']:.1f} | {r['total_s']:.1f} | {r['peak_pss_gb']:.2f} |")
        if peer:
            low, high = r["speed_vs_peer_per_repeat"]
            line += (f" {r['speed_vs_peer']:.2f}x | {low:.2f}-{high:.2f}x | {r['speed_vs_peer_fastest']:.2f}x |"
                     f" {r['total_vs_peer']:.2f}x | {r['memory_vs_peer']:.2f}x |")
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
