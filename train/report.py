"""report: compare a dataset-size sweep's runs (markdown + CSV table, PNG of fidelity curves, a W&B table)"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

if __package__ in (None, ""):  # `python train/report.py`: import from the repo root, not from inside train/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import fsspec
from PIL import Image

from train.convergence import common_max_step, mauc
from train.plots import curves_of, plot_curves

COLUMNS = ("size", "run", "steps", "convergence_step", "start", "plateau", "final_fidelity", "mauc")
COST_COLUMNS = ("samples_seen", "wall_minutes", "gpu_hours")  # what each size cost (cost_of)
RESULTS = "results.json"


# ---------------------------------------------------------------- pure: picking curves, the table


def primary_curve(results: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The run's headline fidelity curve, as the run named it; None when the run scored no fidelity."""
    name = (results.get("fidelity") or {}).get("primary")
    curve = curves_of(results).get(name)
    return (name, curve) if curve else None


def pick_curve(results: dict[str, Any], name: str | None) -> tuple[str, dict[str, Any]] | None:
    """A named curve (--curve) or the primary one."""
    if name is None:
        return primary_curve(results)
    curve = curves_of(results).get(name)
    return (name, curve) if curve else None


def sort_runs(runs: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(run name, results) by dataset size, runs without a size last."""
    def order(item: tuple[str, dict[str, Any]]) -> tuple[bool, int, str]:
        size = item[1].get("config", {}).get("dataset_size")
        return size is None, size or 0, item[0]
    return sorted(runs.items(), key=order)


def table(runs: dict[str, dict[str, Any]], curve: str | None = None) -> tuple[list[dict[str, Any]], float | None]:
    """One row per run (COLUMNS) and the common max step that every mAUCC is taken over (None: no curves)."""
    picked = {name: pick_curve(res, curve) for name, res in runs.items()}
    with_curve = [c for c in picked.values() if c and c[1].get("steps")]
    common = common_max_step(*[c[1]["steps"] for c in with_curve]) if with_curve else None
    rows = []
    for name, res in sort_runs(runs):
        found = picked[name]
        points = found[1] if found and found[1].get("steps") else None
        rows.append({
            "size": res.get("config", {}).get("dataset_size"),
            "run": name,
            "steps": res.get("final_step"),
            "convergence_step": points.get("step") if points and points.get("converged") else None,
            "start": _finite(points.get("start")) if points else None,
            "plateau": _finite(points.get("plateau")) if points else None,
            "final_fidelity": points["scores"][-1] if points else None,
            "mauc": _mauc(points, common),
        })
    return rows, common


def cost_of(results: dict[str, Any]) -> dict[str, Any]:
    """What a run cost: samples seen, its wall time over every segment (from loading the models to the last
    checkpoint), and GPU-hours (None on CPU), each summed over its segments, which may have had other numbers of
    ranks. A run that predates the sums: its last segment's rate throughout; None where it predates that too."""
    timing, config = results.get("timing") or {}, results.get("config", {})
    seconds = results.get("train_seconds")
    samples, gpu_seconds = results.get("samples_seen"), results.get("gpu_seconds")
    if samples is None:
        per_step = timing.get("samples_per_step") or (config.get("batch_size", 0) * config.get("grad_accum", 1)
                                                      * max(config.get("num_workers", 1), 1)) or None
        samples = results.get("final_step", 0) * per_step if per_step else None
    if gpu_seconds is None and seconds:
        gpu_seconds = seconds * (timing.get("devices", 0) if timing.get("device") == "cuda" else 0)
    return {"samples_seen": samples,
            "wall_minutes": seconds / 60 if seconds else None,
            "gpu_hours": gpu_seconds / 3600 if gpu_seconds else None}


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _mauc(points: dict[str, Any] | None, common: float | None) -> float | None:
    if points is None or common is None:
        return None
    try:
        return mauc(points["steps"], points["scores"], common)
    except ValueError:  # this run's first evaluation comes after the common range ends: no comparable area
        return None


def _cell(value: Any, empty: str) -> str:
    if value is None:
        return empty
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def to_markdown(rows: list[dict[str, Any]], prefix: str, curve: str | None, common: float | None,
                costs: dict[str, dict[str, Any]] | None = None) -> str:
    """The table with a heading that names the curve and the mAUCC range; `costs` (run -> cost_of) adds what each
    size cost."""
    header = ["size", "run", "steps", "convergence step", "start", "plateau", "final fidelity",
              f"mAUCC (to step {common:g})" if common is not None else "mAUCC"]
    if costs is not None:
        header += ["samples seen", "wall (min)", "GPU-hours"]
    lines = [
        f"# Dataset-size sweep `{prefix}`",
        "",
        f"Fidelity curve: `{curve or 'none (no fidelity scored)'}`. Convergence step: the detected sudden "
        "convergence (— when not converged or too few evaluations); start and plateau: the curve's first and last "
        "levels (means of 3 evaluations). mAUCC: mean area under the curve up to the last step every run reached.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if h not in ("run",) else "---" for h in header) + "|",
    ]
    for r in rows:
        cost = [_cell(costs.get(r["run"], {}).get(c), "—") for c in COST_COLUMNS] if costs is not None else []
        lines.append("| " + " | ".join([*(_cell(r[c], "—") for c in COLUMNS), *cost]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]], common: float | None, costs: dict[str, dict[str, Any]] | None = None) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*COLUMNS, "mauc_max_step", *(COST_COLUMNS if costs is not None else ())])
    for r in rows:
        cost = [_cell(costs.get(r["run"], {}).get(c), "") for c in COST_COLUMNS] if costs is not None else []
        writer.writerow([_cell(r[c], "") for c in COLUMNS] + [_cell(common, "")] + cost)
    return buffer.getvalue()


# ---------------------------------------------------------------- pure: the plot (PIL: no matplotlib needed)


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(scores: Sequence[float]) -> str:
    """Scores in [0, 1] as block characters, one per evaluation."""
    return "".join(SPARKS[min(len(SPARKS) - 1, max(0, int(v * len(SPARKS))))] for v in scores)


def curve_text(results: dict[str, Any], rows: int = 16) -> str:
    """The primary curve for a terminal: a sparkline, a table of (step, score) at up to `rows` evaluations (and
    the detected step's), and the detected step, plateau and mAUCC."""
    found = primary_curve(results)
    if found is None:
        return "no fidelity curve (validation off, or no task)"
    name, curve = found
    steps, scores = curve["steps"], curve["scores"]
    shown = min(rows, len(steps))  # evenly spread, the first and the last evaluation always among them
    picks = {round(i * (len(steps) - 1) / max(shown - 1, 1)) for i in range(shown)}
    if curve.get("converged") and curve.get("step") in steps:
        picks.add(steps.index(curve["step"]))
    picks = sorted(picks)
    lines = [f"{name}  {sparkline(scores)}  (0..1, one mark per evaluation)", "   step  score"]
    lines += [f"{steps[i]:>7}  {scores[i]:.3f}" for i in picks]
    step = f"detected step {curve['step']}" if curve.get("converged") else f"not detected ({curve.get('reason')})"
    start, plateau = curve.get("start"), curve.get("plateau")
    levels = f"start {start:.3f}, plateau {plateau:.3f}, " if start == start and start is not None else ""
    lines.append(f"sudden convergence: {levels}{step}, mAUCC {curve.get('mauc', 0):.3f}")
    return "\n".join(lines)


def plotted(runs: dict[str, dict[str, Any]], curve: str | None) -> list[tuple[str, list, list, float | None]]:
    """The plot's curves in table order, labelled by dataset size."""
    out = []
    for name, res in sort_runs(runs):
        found = pick_curve(res, curve)
        if found and found[1].get("steps"):
            size = res.get("config", {}).get("dataset_size")
            points = found[1]
            out.append((f"n={size:,}" if size is not None else name, points["steps"], points["scores"],
                        points.get("step") if points.get("converged") else None))
    return out


# ---------------------------------------------------------------- I/O: results in, report out


def load_runs(storage: str, prefix: str) -> dict[str, dict[str, Any]]:
    """results.json of every `<prefix>-*` run under storage that belongs to the sweep's group (or has none)."""
    fs, root = fsspec.core.url_to_fs(storage)
    fs.invalidate_cache()
    found = fs.glob(f"{root.rstrip('/')}/{prefix}-*/{RESULTS}")
    runs = {}
    for path in sorted(found):
        try:
            results = json.loads(fs.cat_file(path))
        except json.JSONDecodeError:  # cut short (train.tracking.read_results): that run is not in the report
            print(f"[report] {fs.unstrip_protocol(path)} is cut short: left out", file=sys.stderr, flush=True)
            continue
        if results.get("config", {}).get("wandb_group") in (prefix, None):  # `abl` must not take `abl-2`'s runs
            runs[path.rsplit("/", 2)[-2]] = results
    return runs


def runs_without_results(storage: str, prefix: str) -> list[str]:
    """The `<prefix>-*` run folders that have no results.json (a size still training, or one whose file was lost),
    which a report would otherwise leave out without a word."""
    fs, root = fsspec.core.url_to_fs(storage)
    folders = fs.glob(f"{root.rstrip('/')}/{prefix}-*", detail=True)  # types come with the listing
    with_results = {path.rsplit("/", 2)[-2] for path in fs.glob(f"{root.rstrip('/')}/{prefix}-*/{RESULTS}")}
    return sorted(name for name in (path.rsplit("/", 1)[-1] for path, info in folders.items()
                                    if info.get("type") == "directory") if name not in with_results)


def log_to_wandb(prefix: str, rows: list[dict[str, Any]], image: Image.Image, mode: str, project: str) -> None:
    """The table and the plot in a "report" run of the sweep's W&B group."""
    import wandb

    from train.tracking import run_id

    directory = os.environ.get("WANDB_DIR", "data/wandb")
    os.makedirs(directory, exist_ok=True)
    run = wandb.init(project=project, group=prefix, name=f"{prefix}-report", id=run_id(f"{prefix}-report"),
                     resume="allow", job_type="report", mode=mode, dir=directory)
    run.log({"sweep/sizes": wandb.Table(columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in rows]),
             "sweep/fidelity_curves": wandb.Image(image)})
    run.finish()


def write_report(prefix: str, storage: str, wandb: str | None = None, curve: str | None = None) -> dict[str, Any]:
    """Writes <storage>/<prefix>-report.{md,csv,png}, logs to W&B (mode from `wandb` or the runs' config).
    Returns {rows, markdown, files}."""
    runs = load_runs(storage, prefix)
    for name in runs_without_results(storage, prefix):
        print(f"[report] {storage.rstrip('/')}/{name} has no {RESULTS} yet: left out", file=sys.stderr, flush=True)
    if not runs:
        raise FileNotFoundError(f"no runs named {prefix}-* with a {RESULTS} in {storage}")
    known = sorted({name for results in runs.values() for name in curves_of(results)})
    if curve is not None and curve not in known:  # a table of dashes said nothing of why
        raise FileNotFoundError(f"no run of {prefix} has the curve {curve!r}; theirs: {', '.join(known) or 'none'}")
    rows, common = table(runs, curve)
    first = pick_curve(next(iter(sort_runs(runs)))[1], curve)
    curve_name = curve or (first[0] if first else None)
    costs = {name: cost_of(results) for name, results in runs.items()}
    markdown = to_markdown(rows, prefix, curve_name, common, costs)
    image = plot_curves(plotted(runs, curve), f"condition fidelity by dataset size: {prefix}",
                        curve_name or "fidelity")
    base = f"{storage.rstrip('/')}/{prefix}-report"
    png = io.BytesIO()
    image.save(png, format="PNG")
    files = {f"{base}.md": markdown.encode(), f"{base}.csv": to_csv(rows, common, costs).encode(),
             f"{base}.png": png.getvalue()}
    from pipeline.format import write_whole

    for url, data in files.items():
        write_whole(url, data)  # a report killed mid-write leaves the one before, not one cut short
    from train.tracking import wandb_mode

    config = next(iter(runs.values())).get("config", {})
    try:
        mode, message = wandb_mode(wandb or config.get("wandb", "auto"))
    except ValueError as e:  # the runs logged online, but this shell has no key: the files above are the report
        mode, message = "off", ""
        print(f"report not logged to W&B: {e}", flush=True)
    if mode != "off":
        print(f"report {message}", flush=True)
        log_to_wandb(prefix, rows, image, mode, config.get("wandb_project", "controlnet"))
    return {"rows": rows, "markdown": markdown, "files": list(files)}


@dataclass
class ReportArgs:
    """Compare the runs of a dataset-size sweep (train/sweep.py): a table (size, steps, detected convergence step,
    final fidelity, mAUCC over the common step range, samples seen, wall time, GPU-hours) as
    <storage>/<prefix>-report.md and .csv, the fidelity curves overlaid in <prefix>-report.png, and the table in a
    W&B 'report' run."""

    runs: str
    """The sweep's run prefix (runs <prefix>-<size>)."""
    storage_path: str = "data/runs"
    """Where the runs are (local folder or s3://)."""
    curve: str | None = None
    """Fidelity curve to compare (default: each run's primary curve)."""
    wandb: Literal["auto", "online", "offline", "off"] | None = None
    """W&B mode for the report run (default: the runs' own setting)."""


def main(argv: list[str] | None = None) -> int:
    from pipeline.format import StorageFailed, cli, refusing_storage_failures

    args = cli(ReportArgs, args=argv, prog="python -m train.report")
    try:
        with refusing_storage_failures(f"the storage of --storage-path {args.storage_path}", keep=(FileNotFoundError,)):
            report = write_report(args.runs, args.storage_path, args.wandb, args.curve)
    except (FileNotFoundError, StorageFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report["markdown"])
    print("\n".join(f"wrote {f}" for f in report["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
