"""sweep: one ControlNet run per dataset size (nested subsets of one dataset) on Ray, then the comparison report"""
from __future__ import annotations

import dataclasses
import sys
import threading
from pathlib import Path

if __package__ in (None, ""):  # `python train/sweep.py`: import from the repo root, not from inside train/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
if __name__ == "__main__":  # a Ctrl-C while the imports below load (seconds): one line, not their traceback
    from pipeline.format import quiet_ctrl_c_while_starting

    quiet_ctrl_c_while_starting()

from train.checkpoints import latest_checkpoint
from train.config import PresetName, TrainConfig, exit_without_collecting, parse_args
from train.subsets import Materialize
from train.tracking import read_results

# the sweep owns these per run; an override of them would make the runs differ in more than their data
SWEEP_FLAGS = ("--data", "--run-name", "--wandb-group", "--dataset-size")


class SweepError(RuntimeError):
    """A sweep that cannot start (bad arguments, subsets that cannot be made); one line for the user."""


# ---------------------------------------------------------------- pure: arguments and per-run configs


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """The sweep's own flags, and the trainer overrides after `--`."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def check_overrides(overrides: list[str]) -> None:
    for token in overrides:
        flag = token.split("=", 1)[0].replace("_", "-")
        if flag in SWEEP_FLAGS:
            raise SweepError(f"{flag} is set by the sweep for each size; leave it out of the trainer overrides")


def run_config(base: TrainConfig, subset: dict, prefix: str) -> TrainConfig:
    """One size's run: the shared settings, this subset's data, and a name and group that tie it to the sweep.
    Every size validates on the same held-out set (the subsets' own, unless --validation-data overrides it)."""
    validation = base.validation_data or ([subset["validation"]] if subset.get("validation") else None)
    return dataclasses.replace(base, data=[subset["url"]], run_name=f"{prefix}-{subset['label']}", wandb_group=prefix,
                               dataset_size=subset["size"], validation_data=validation)


def group_mismatch(cfg: TrainConfig, prefix: str, these_sizes: set[str]) -> str | None:
    """Why the sweep's other sizes on storage (runs of its group that this --sizes leaves out) would not compare
    with these: their experiment settings but the data (train.config.resume_mismatch). A size added later with
    another learning rate was trained, and reported beside the others as one experiment."""
    from train.config import resume_mismatch
    from train.report import load_runs

    for name, results in load_runs(cfg.storage_path, prefix).items():
        differences = [d for d in resume_mismatch(results.get("config") or {}, cfg) if not d.startswith("data ")]
        if name not in these_sizes and differences:
            return (f"run {name} of the sweep {prefix} was trained with other settings: {'; '.join(differences)}; "
                    f"its report would mix two experiments: use the same values, or another --run-prefix")
    return None


def is_finished(results: dict | None, max_steps: int) -> bool:
    return results is not None and results.get("final_step", 0) >= max_steps


# ---------------------------------------------------------------- I/O: subsets, results, training


def subsets_for(dataset: str, sizes: str, out: str | None, condition: str | None = None,
                materialize: Materialize = "never") -> list[dict]:
    """The nested subsets (train.subsets) of the condition trained on, written or rewritten; a request they refuse
    is one SweepError line."""
    from train.subsets import make_subsets, parse_sizes

    try:
        return make_subsets(dataset, parse_sizes(sizes), out, condition=condition, materialize_mode=materialize)
    except (FileNotFoundError, ValueError) as e:  # no dataset, bad sizes, a size too large
        raise SweepError(str(e)) from None


def concurrent_runs(per_run: dict[str, float], available: dict[str, float], runs: int, limit: int = 0) -> int:
    """How many runs train at once: as many as the free resources hold, each taking `per_run` (CPU, GPU), at most
    `limit` (0: no limit) and never more than `runs`; at least 1 (a run then waits for room, as Ray makes it)."""
    fits = min((int(available.get(name, 0) // need) for name, need in per_run.items() if need > 0), default=runs)
    return max(1, min(fits, runs, limit or runs))


def run_resources(cfg: TrainConfig) -> dict[str, float]:
    """What one run reserves on the cluster: its workers' CPUs and GPUs (Ray must be started)."""
    from train.run import cpus_per_worker, gpu_wanted

    use_gpu = gpu_wanted(cfg)
    return {"CPU": cfg.num_workers * cpus_per_worker(cfg, use_gpu), "GPU": cfg.num_workers * float(use_gpu)}


def train_all(configs: list[TrainConfig], slots: int, stopped=lambda: False) -> dict[str, str]:
    """Train the runs, `slots` at a time (each in a thread of this driver: Ray Train schedules its workers on the
    cluster); the runs that did not finish, each "failed" (the same command resumes it) or "refused" (a setting
    it cannot train with, train.loop.RunRefused: the same command would be refused again until that is put right).
    A run that fails once `stopped()` (a stop signal came) ends the sweep as that stop: SIGTERM to the process group
    of a sweep that started its own cluster stops its raylet too, and the run fails before the handler runs."""
    from concurrent.futures import ThreadPoolExecutor

    from train.loop import RunRefused
    from train.run import root_error
    from train.tracking import close_open_runs

    stopping = threading.Event()

    def one(cfg: TrainConfig) -> tuple[str, str] | None:
        try:
            train(cfg)
            return None
        except Exception as e:  # one failed size must not cost the others; re-running resumes it
            if stopped():  # not failed (nor the next size started): main takes the stop's line and code
                raise SystemExit(1) from e
            close_open_runs()  # a size in local mode: its W&B run ends failed before the next size starts its own
            outcome = "refused" if isinstance(root_error(e), RunRefused) else "failed"
            if not stopping.is_set():
                said = str(e) if outcome == "refused" else f"{type(e).__name__}: {e}"
                print(f"[sweep] {cfg.run_name} {outcome}: {said}", file=sys.stderr, flush=True)
            return cfg.run_name, outcome

    if slots <= 1:
        return dict(outcome for outcome in map(one, configs) if outcome)
    pool = ThreadPoolExecutor(slots, thread_name_prefix="sweep")
    try:
        outcomes = list(pool.map(one, configs))
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM as SystemExit(15) (train.run.exit_on_sigterm),
        # reaches this thread only; the runs' threads wait in fit() (see main)
        stopping.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return dict(outcome for outcome in outcomes if outcome)


def train(cfg: TrainConfig) -> None:
    """One run on Ray Train (in this process with --num-workers 0); a run of this name with checkpoints resumes
    from its last one (refused when started with other settings)."""
    from train.run import build_trainer, fit, run_lease

    with run_lease(cfg):  # RunBusy where another driver trains a run of this name
        fit(cfg, build_trainer(cfg))  # resubmitted where Ray Train's controller stopped on its storage


@dataclasses.dataclass
class SweepConfig:
    """Dataset-size ablation (the paper's Sec. 3.5): nested subsets of DATASET ranked by original resolution
    (python -m train.subsets), then one training run per size with identical settings but the data, named
    <prefix>-<size>, in the W&B group <prefix> with dataset_size in its config. Runs on Ray workers train
    concurrently when the cluster has room for more than one (--concurrent), else one after another; small sizes
    are copied into shards of their own (--materialize). Re-running the same command skips finished sizes and
    resumes unfinished ones from their last checkpoint. At the end it writes <storage>/<prefix>-report.{md,csv,png}
    (python -m train.report). Trainer flags after `--` apply to every run (see python train/run.py --help), e.g.
    -- --max-steps 5000 --wandb offline; with a dataset built with several tasks, -- --condition hed picks the
    condition (subsets are then ranked over the samples HED kept)."""

    dataset: str
    """Dataset folder or URL written by pipeline.build."""
    sizes: str
    """Comma-separated subset sizes: 500, 1k, 10k, 3m."""
    preset: PresetName = "debug"
    """Trainer preset."""
    run_prefix: str = "sweep"
    """Runs are named <prefix>-<size>."""
    storage_path: str | None = None
    """Where runs and the report go (default: the preset's)."""
    subsets_out: str | None = None
    """Folder/URL for the subset manifests (default: <dataset>/subsets; <dataset>/subsets/<condition> for a dataset of
    several conditions)."""
    concurrent: int = 0
    """Sizes trained at once: 0 fits as many as the cluster's free CPUs and GPUs hold (each run reserves
    --num-workers x --cpus-per-worker CPUs and a GPU per worker), 1 trains them in turn. Runs in local mode
    (--num-workers 0) are this process and always train in turn."""
    materialize: Materialize = "auto"
    """Copy each size's samples into compact shards of its own (python -m train.subsets --materialize): auto
    does it where streaming the size from the dataset's shards would read over 2x its samples."""
    report: bool = True
    """Write the report at the end (--no-report: train only)."""


def parse(argv: list[str]) -> tuple[SweepConfig, list[str]]:
    """The sweep's own flags (tyro, as the trainer's), and the trainer overrides after `--`."""
    from pipeline.format import cli

    own, overrides = split_overrides(argv)
    return cli(SweepConfig, args=own, prog="python train/sweep.py"), overrides


def sizes_at_once(base: TrainConfig, runs: int, concurrent: int) -> int:
    """Ray joined (RAY_ADDRESS, checked once before any size trains) or started here, then how many of the `runs`
    sizes train at once."""
    from train.run import join_or_start_ray

    join_or_start_ray()
    if concurrent == 1:
        return 1
    import ray

    per_run = run_resources(base)
    slots = concurrent_runs(per_run, ray.available_resources(), runs, concurrent)
    print(f"[sweep] {slots} size(s) at once: each run reserves {per_run['CPU']:g} CPU, {per_run['GPU']:g} GPU; "
          f"free now: {ray.available_resources().get('CPU', 0):g} CPU, "
          f"{ray.available_resources().get('GPU', 0):g} GPU", flush=True)
    return slots


def main(argv: list[str] | None = None) -> int:
    from pipeline.format import ctrl_c_as_usual, quiet_ctrl_c_while_starting

    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    ctrl_c_as_usual()
    try:
        if args.concurrent < 0:
            raise SweepError(f"--concurrent must be 0 (as many as fit) or more, not {args.concurrent}")
        check_overrides(overrides)
        base = parse_args(["--preset", args.preset, *overrides])
        if args.storage_path:
            base = dataclasses.replace(base, storage_path=args.storage_path)
        subsets = subsets_for(args.dataset, args.sizes, args.subsets_out, base.condition, args.materialize)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    quiet_ctrl_c_while_starting()  # the trainer's imports (torch, Ray, diffusers): seconds, in which Ctrl-C is one line
    from train.run import check_data, checkpoint_to_resume, prepare_base_model, with_absolute_paths

    ctrl_c_as_usual()

    try:
        these = [run_config(base, subset, args.run_prefix) for subset in subsets]
        mixed = group_mismatch(with_absolute_paths(prepare_base_model(these[0])), args.run_prefix,
                               {cfg.run_name for cfg in these})
    except (FileNotFoundError, ValueError) as e:  # a --run-prefix that is no folder name, a base that is not one
        mixed = str(e)
    if mixed:
        print(f"error: {mixed}", file=sys.stderr)
        return 2
    todo = []
    for subset, cfg in zip(subsets, these, strict=True):
        try:  # every size, finished ones too: a finished run of other settings would be reported as this sweep's
            checkpoint_to_resume(with_absolute_paths(prepare_base_model(cfg)), name_flag="--run-prefix",
                                 say=False)
            results = read_results(cfg)
            if not is_finished(results, cfg.max_steps):
                check_data(cfg)  # the trainer's checks (base model, data, storage), before any size trains
        except (FileNotFoundError, ValueError) as e:  # ResumeMismatch among them
            print(f"error: {e}", file=sys.stderr)
            return 2
        if is_finished(results, cfg.max_steps):
            print(f"[sweep] {cfg.run_name}: finished at step {results['final_step']}, skipped", flush=True)
            continue
        # the plan, before any size trains (in turn, or as many at once as fit)
        state = "to resume from its last checkpoint" if results or latest_checkpoint(cfg.storage_path, cfg.run_name) \
            else "to train from step 0"
        copied = " (copied into shards of its own)" if subset.get("materialized") else ""
        print(f"[sweep] {cfg.run_name}: {subset['size']} samples from {subset['shards']} shards{copied}, {state}",
              flush=True)
        todo.append(cfg)
    from pipeline.format import ClusterUnreachable
    from train.run import SignalLog, end_own_cluster_with_the_stop, exit_on_sigterm, stop_signals, stopped_exit_code

    slots = 1
    # as train/run.py: SIGTERM stops the sweep as Ctrl-C does, and a cluster started here dying with it goes at once
    with exit_on_sigterm(), SignalLog(on_signal=end_own_cluster_with_the_stop) as signals:
        try:
            if todo and base.num_workers > 0:
                slots = sizes_at_once(base, len(todo), args.concurrent)
            unfinished = train_all(todo, slots, stopped=lambda: bool(stop_signals(signals.received())))
        except ClusterUnreachable as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (KeyboardInterrupt, SystemExit) as stop:  # Ctrl-C (sizes one at a time on Ray workers: Ray Train's
            # handler ends fit() in SystemExit), or SIGTERM; also while the sweep starts its Ray cluster
            from train.run import leave_with_last_line

            # (a size in local mode trains in this process: leave_with_last_line closes its W&B run, as
            # train/run.py's stop does, with the last step it holds recorded for the resumed run)
            return leave_with_last_line(stopped_exit_code(stop, signals.received()),
                                        "[sweep] stopped: the same command resumes each unfinished size from its last "
                                        "checkpoint", threads_left=slots > 1)  # sizes in threads
    if args.report and len(unfinished) < len(subsets):  # a size has results to report
        from train.report import write_report

        report = write_report(args.run_prefix, base.storage_path, base.wandb)
        print(report["markdown"], flush=True)
        print("\n".join(f"wrote {f}" for f in report["files"]), flush=True)
    failed = [name for name, outcome in unfinished.items() if outcome == "failed"]
    refused = [name for name, outcome in unfinished.items() if outcome == "refused"]
    if refused:  # "run it again" would be refused again: each size's line above says what to put right
        print(f"[sweep] refused: {', '.join(refused)}; put right what each says above, then run the same command",
              file=sys.stderr)
    if failed:
        print(f"[sweep] failed: {', '.join(failed)}; run the same command again to resume them", file=sys.stderr)
        return 1
    return 2 if refused else 0


if __name__ == "__main__":
    exit_without_collecting(main())
