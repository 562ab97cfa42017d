"""train a ControlNet with Ray Train DDP: python train/run.py --preset debug --data data/demo/canny --run-name x"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
import traceback
from functools import partial
from pathlib import Path
from typing import NoReturn

if __package__ in (None, ""):  # `python train/run.py`: import from the repo root, not from inside train/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
if __name__ == "__main__":  # a Ctrl-C while the imports below load (seconds): one line, not their traceback
    from pipeline.format import quiet_ctrl_c_while_starting
    from train.config import parse_args

    quiet_ctrl_c_while_starting()
    parse_args(sys.argv[1:])  # --help, or a mistyped flag's one line, before the ~5 s that torch, Ray and diffusers
    # take to import (main() parses them again, at no cost)

import ray
import ray.train
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.callback import WorkerCallback  # a DeveloperAPI, which RunConfig passes on

from pipeline.format import (
    ClusterUnreachable,
    SignalLog,
    StorageFailed,
    connected_ray_node,
    ctrl_c_as_usual,
    exit_with_last_line,
    join_ray,
    kill_process_trees,
    own_cluster_alive,
    own_cluster_processes,
    refusing_storage_failures,
    signal_each,
    started_its_own_cluster,
)
from train.checkpoints import damaged_checkpoints, forget_stale_ray_record, latest_checkpoint, run_url, step_of
from train.config import TINY_SD, TrainConfig, exit_without_collecting, parse_args
from train.loop import RunRefused, split_validation, train_loop_per_worker
from train.plots import curves_of
from train.report import curve_text
from train.tracking import close_open_runs, plot_url, read_results, results_url, wandb_mode


def prepare_base_model(cfg: TrainConfig) -> TrainConfig:
    """The debug preset's tiny SD is built once, locally, then loaded like any real base model."""
    if cfg.base_model == TINY_SD:
        from train.tiny_sd import build_tiny_sd

        build_tiny_sd(Path(TINY_SD))
        return dataclasses.replace(cfg, base_model=str(Path(TINY_SD).resolve()))
    return cfg


def absolute_local(path: str) -> str:
    """Workers may run elsewhere (another cwd, another node): local paths are made absolute."""
    return path if "://" in path else str(Path(path).resolve())


def absolute_base_model(base_model: str) -> str:
    """A base model in a local folder, made absolute (Ray Train runs workers in their own working directory);
    hub ids ("org/name", no such folder here) and URLs pass through."""
    return absolute_local(base_model) if "://" not in base_model and Path(base_model).is_dir() else base_model


def local_mode(cfg: TrainConfig) -> bool:
    """--num-workers 0: Ray Train's local mode, the training function in this process (no Ray cluster, no worker
    processes); one process, as on a laptop or a one-GPU box."""
    return cfg.num_workers == 0


def cpus_per_worker(cfg: TrainConfig, use_gpu: bool) -> int:
    """The CPUs each worker reserves (and uses as threads): as asked; 1 beside a GPU; in local mode the CPUs this
    process may run on; else the largest node's CPUs shared among the workers, so a one-worker run on a laptop
    trains on every core, not on Ray's one."""
    if cfg.cpus_per_worker is not None:
        return cfg.cpus_per_worker
    if use_gpu:
        return 1
    if local_mode(cfg):
        return len(os.sched_getaffinity(0))
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
    return max(1, int(largest) // cfg.num_workers)


def gpu_wanted(cfg: TrainConfig) -> bool:
    """--use-gpu, else whether there is a GPU: in the cluster for workers, in this process in local mode."""
    if cfg.use_gpu is not None:
        return cfg.use_gpu
    if local_mode(cfg):
        import torch

        return torch.cuda.is_available()
    return ray.cluster_resources().get("GPU", 0) >= 1


SECRETS = ("WANDB_API_KEY",)


def secrets_ref() -> ray.ObjectRef | None:
    """The driver's secrets as an object in Ray's object store: the workers get them by reference (see
    train.loop.apply_secrets). A runtime environment's env_vars, the usual route, are shown by Ray's dashboard
    and state API; an object's value is not."""
    secrets = {k: os.environ[k] for k in SECRETS if os.environ.get(k)}
    return ray.put(secrets) if secrets else None


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The run's paths as its workers (and its checkpoints' train_config.json) see them."""
    return dataclasses.replace(cfg, storage_path=absolute_local(cfg.storage_path),
                               base_model=absolute_base_model(cfg.base_model),
                               controlnet=absolute_base_model(cfg.controlnet) if cfg.controlnet else None,
                               data=[absolute_local(d) for d in cfg.data],
                               validation_data=[absolute_local(d) for d in cfg.validation_data]
                               if cfg.validation_data else None)


class ResumeMismatch(ValueError):
    """The run of this name was started with other experiment settings (train.config.EXPERIMENT_SETTINGS)."""


def checkpoint_to_resume(cfg: TrainConfig, name_flag: str = "--run-name", say: bool = True) -> str | None:
    """The run's last checkpoint, which a run submitted again resumes from; refused (ResumeMismatch) when the run
    was started with other experiment settings, and a note (`say`) where it goes on with other ranks or loader
    workers. `cfg`'s paths are absolute (with_absolute_paths). `name_flag`: what names the run, in the message (the
    sweep's --run-prefix)."""
    import json

    import fsspec

    from train.checkpoints import CONFIG_FILE
    from train.config import resume_mismatch, stream_changes

    resume = latest_checkpoint(cfg.storage_path, cfg.run_name)
    if resume is not None:
        with fsspec.open(f"{resume}/{CONFIG_FILE}", "rb") as f:
            saved = json.load(f)
        differences = resume_mismatch(saved, cfg)
        if differences:
            raise ResumeMismatch(f"run {cfg.run_name} was started with other settings: {'; '.join(differences)}; "
                                 f"submit it with the same values to resume it, or start another {name_flag}")
        changes = stream_changes(saved, cfg)
        if changes and say:
            print(f"note: {'; '.join(changes)} since the checkpoint of step {step_of(resume)}: from here on the run "
                  "draws other samples than an uninterrupted one would (each rank and loader worker draws shards of "
                  "its own)", file=sys.stderr, flush=True)
    return resume


def join_or_start_ray() -> None:
    """Join the cluster in RAY_ADDRESS (a submitted job's), else start one here without the dashboard (its
    processes cost a local run start-up time and CPU). Without the dashboard, Ray's state API is down, and Ray
    Train's placement-group cleaner, which polls it, would warn every second of the run; on a cluster this process
    starts it has nothing to do (the cluster ends with the process), so its workers quieten it."""
    global _joined_here
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    quiet = {"worker_process_setup_hook": "train.tracking.quiet_placement_group_cleaner"}
    join_ray(address, include_dashboard=False, configure_logging=False, runtime_env=None if address else quiet)
    _joined_here = True
    if started_its_own_cluster():  # (without RAY_ADDRESS, ray.init joins a cluster that `ray start` began here)
        os.environ.setdefault(HEALTH_CHECK_INTERVAL_VAR, OWN_CLUSTER_HEALTH_CHECK_INTERVAL_S)


# Ray Train's controller sees its workers' reports, and their end, only when it polls them: every 2 s by default,
# which a cluster of many nodes wants. A cluster started here is this node alone, with a few workers, and each poll
# is one cheap call to each; polled every 0.5 s, a run's reports and its end are seen up to 1.5 s sooner (a run of
# the debug preset on 1 worker ended ~3 s sooner after its last step; its start did not change). Ray Train passes
# the driver's value to its controller; one the user set is kept.
HEALTH_CHECK_INTERVAL_VAR = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
OWN_CLUSTER_HEALTH_CHECK_INTERVAL_S = "0.5"


_joined_here = False  # join_or_start_ray joined or started Ray (not the caller: a test's or a notebook's session)


class RunBusy(RuntimeError):
    """Another driver, alive, trains the run."""


def run_lease(cfg: TrainConfig) -> contextlib.AbstractContextManager[None]:
    """The run's lease in its folder (pipeline.format.folder_lease), shared with no one: two drivers of one run
    (the command started twice, a job submitted again while the first still ran) both trained it, from the same
    checkpoint, and published their checkpoints and W&B steps over each other's. The second is refused in one
    line, before it starts Ray or touches the run's folder."""
    from pipeline.format import STALE_S, describe, folder_lease

    def refusal(busy: dict, now: float) -> RunBusy:
        return RunBusy(f"run {cfg.run_name} is being trained by another driver ({describe(busy, now)}): stop it, or "
                       f"wait for it to end, or give another --run-name (a driver that is gone no longer counts: at "
                       f"once on its own host, elsewhere once its lease is {STALE_S:.0f} s old)")

    return folder_lease(run_url(cfg.storage_path, cfg.run_name), {"run_name": cfg.run_name}, refusal, shared=False)


def leave_ray() -> None:
    """Leave the Ray that join_or_start_ray joined or started, now, while the run's last line is still to come
    (its detached actors log until then). A Ray the caller had initialized stays up: main() called in a process
    that started its cluster (a test session, a notebook) stopped that cluster on its way out."""
    global _joined_here
    if _joined_here and ray.is_initialized():
        ray.shutdown()
    _joined_here = False


def build_trainer(cfg: TrainConfig) -> TorchTrainer:
    """The run on Ray Train: its resume checked first, then Ray joined (RAY_ADDRESS) or started here for workers
    (local mode needs no cluster), a local one without the dashboard."""
    cfg = with_absolute_paths(prepare_base_model(cfg))
    resume = checkpoint_to_resume(cfg)
    mode, message = wandb_mode(cfg.wandb)
    print(message, flush=True)
    local = local_mode(cfg)
    if not local:
        join_or_start_ray()
    use_gpu = gpu_wanted(cfg)
    cfg = dataclasses.replace(cfg, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker(cfg, use_gpu))
    resumed_step = step_of(resume) if resume else -1
    for damaged in damaged_checkpoints(run_url(cfg.storage_path, cfg.run_name)):
        if step_of(damaged) > resumed_step:
            print(f"passing over {damaged}: it lacks a file, or holds one cut short, since it was written", flush=True)
    if resume:
        print(f"resuming {cfg.run_name} from {resume}", flush=True)
    if not local:
        stale = forget_stale_ray_record(run_url(cfg.storage_path, cfg.run_name))
        if stale:
            print(f"Ray Train's record of the run {stale}: it is dropped, and the run goes on from its newest complete "
                  "checkpoint", flush=True)
    if local:
        quiet_local_mode_reports()
    return TorchTrainerStoppedInTime(
        train_loop_per_worker,
        train_loop_config={"train": dataclasses.asdict(cfg), "wandb_mode": mode, "local": local,
                           "secrets": None if local else secrets_ref(),  # local mode: this process's environment
                           "wandb_dir": absolute_local(os.environ.get("WANDB_DIR", "data/wandb"))},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu and not local,
                                               resources_per_worker=None if local else {"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=cfg.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=None if local else [CloseWandbOnStop()],
        ),
    )


class TorchTrainerStoppedInTime(TorchTrainer):
    """TorchTrainer whose Ctrl-C gives Ray Train's abort ABORT_PATIENCE_S, as a SIGTERM does (_exit_with_signal),
    then ends the run as Ray's handler does once the abort is done (SystemExit). Ray's handler waits on the
    controller's abort, which a controller starting a worker group the cluster has no room for (a node lost: 60 s a
    try, tried again for ever) does not answer: the first Ctrl-C did nothing, in silence, the second nothing either,
    and the third ended the run."""

    def _register_sigint_handler(self, controller) -> None:
        super()._register_sigint_handler(controller)
        abort = signal.getsignal(signal.SIGINT)

        def abort_in_time(signum: int, frame) -> None:
            while_cluster_lives(abort, signum, frame)
            sys.exit(0)

        abort_in_time.__wrapped__ = abort  # Ray Train's, for _exit_with_signal
        signal.signal(signal.SIGINT, abort_in_time)


class CloseWandbOnStop(WorkerCallback):
    """Ray Train calls this on each worker before it kills it (a Ctrl-C's abort, a restart after a rank failed):
    rank 0's W&B run is closed first, so that what it logged since W&B last wrote its file is not lost with the
    process, a gap in the curve that the resumed run, which logs the steps after its checkpoint, never fills. A
    run that finished has closed it already."""

    def before_worker_shutdown(self) -> None:
        from train.tracking import close_open_runs

        close_open_runs()


def quiet_local_mode_reports() -> None:
    """Local mode logs every ray.train.report's metrics at INFO; the run's own progress lines say it already."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.train_fn_utils").setLevel(logging.WARNING)


def check_data(cfg: TrainConfig) -> None:
    """Resolve --data and --validation-data, find a local --base-model, check --controlnet against it
    (train.model.check_controlnet) and find W&B's key for --wandb online, on the driver before Ray starts: a
    typo is one line here, not a worker failure that Ray retries --max-failures times after loading the base model."""
    from train.data import resolve_shards
    from train.model import check_controlnet, check_local_base_model

    check_local_base_model(cfg.base_model)
    if cfg.controlnet:
        try:
            check_controlnet(cfg.controlnet, cfg.base_model)
        except (FileNotFoundError, ValueError) as e:  # (each message names the folder)
            raise ValueError(f"--controlnet {e}") from None
    wandb_mode(cfg.wandb)
    source = resolve_shards(cfg.data, cfg.condition)
    if not source.conditions:  # the input shards of the dataset job, say: they stream, and every sample is bad
        raise ValueError(f"--data {' '.join(cfg.data)}: its shards hold no condition maps (<key>.<task>.png); "
                         "train on a dataset that python -m pipeline.build made")
    _, held_out = split_validation(source, cfg.validation_data)  # refused here when it leaves nothing to train on
    # --validation-data, or a subset's own held-out set, with the training shards: one listing of a shared folder
    check_shards_there(list(dict.fromkeys([*source.urls, *held_out.urls])),
                       subset=source.keys is not None or held_out.keys is not None)
    check_storage_writable(cfg)


def check_shards_there(urls: list[str], subset: bool = True) -> None:
    """Every shard a source names exists, by one listing of each folder they are in: a subset manifest names its
    dataset's shards by path, so a dataset moved since streamed no sample (the run ended in the loop, "no sample in
    100 shards"); a shard deleted from the middle of a dataset was read as errors, or passed over, for the whole run."""
    missing = missing_shards(urls)
    if missing:
        some = f"{len(missing)} of the {len(urls)} shards it names are" if len(urls) > 1 else "it is"
        # the hint where a subset names them (a brace range that names shards past a dataset's end was told to
        # make its subsets again)
        hint = (" (a subset names its dataset's shards by path: make the subsets again where the dataset is now)"
                if subset else "")
        raise FileNotFoundError(f"shard {missing[0]} is not there: {some} missing{hint}")


def missing_shards(urls: list[str]) -> list[str]:
    """The URLs among `urls` whose folder does not list them."""
    import fsspec

    by_folder: dict[str, list[str]] = {}
    for url in urls:
        by_folder.setdefault(url.rsplit("/", 1)[0], []).append(url)
    missing = []
    for folder, named in by_folder.items():
        fs, path = fsspec.core.url_to_fs(folder)
        try:
            listed = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)}
        except (FileNotFoundError, NotADirectoryError):
            listed = set()
        missing += [url for url in named if url.rsplit("/", 1)[-1] not in listed]
    return missing


def check_storage_writable(cfg: TrainConfig) -> None:
    """A file written into the run's folder and removed: a --storage-path that is a file, read-only, or a bucket
    that does not exist failed only at the first checkpoint, after a segment of training. Storage that does not
    answer is left to the run's own patience (pipeline.format.retried)."""
    from pipeline.format import write_refusal

    refusal = write_refusal(run_url(cfg.storage_path, cfg.run_name))
    if refusal:
        raise ValueError(f"--storage-path {cfg.storage_path}: the run's folder cannot be written ({refusal})")


def finished_line(cfg: TrainConfig, metrics: dict | None, checkpoint: str | None, results: dict | None) -> str:
    """The run's last line. A run submitted again after it reached --max-steps trains and reports nothing: its
    step comes from its results, its checkpoint from storage."""
    if metrics:
        return f"finished {cfg.run_name}: step {metrics.get('step')}, loss {metrics.get('loss'):.4f}, " \
               f"checkpoint {checkpoint}"
    step = results.get("final_step") if results else None
    return f"finished {cfg.run_name}: already at step {step} of {cfg.max_steps}, nothing left to train; " \
           f"checkpoint {checkpoint or latest_checkpoint(cfg.storage_path, cfg.run_name)}"


def resume_hint(cfg: TrainConfig) -> str:
    """What the same command does next: resume from the run's last complete checkpoint (one being published when
    the run ended has no progress.json yet and is passed over), or start again."""
    from pipeline.format import STOP_READ_S, answer_within

    try:
        checkpoint = answer_within(STOP_READ_S, partial(latest_checkpoint, cfg.storage_path, cfg.run_name))
    except Exception as e:  # the storage that ended the run may still be down, or not answer (a stop's line waited
        # ~7 min on an endpoint that accepts and never answers)
        return f"the same command resumes {cfg.run_name} from its last checkpoint in {cfg.storage_path} " \
               f"(unreadable now: {type(e).__name__})"
    if checkpoint is None:
        return f"{cfg.run_name} has no checkpoint yet; the same command starts it again"
    return f"the same command resumes {cfg.run_name} from its last checkpoint, {checkpoint}"


def stopped_line(cfg: TrainConfig) -> str:
    return f"stopped: {resume_hint(cfg)}"


def root_error(error: BaseException) -> BaseException:
    """The first failed rank's own error rather than Ray Train's wrapper (WorkerGroupError, ControllerError), which
    repeats the worker's whole traceback."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        error = failures[min(failures)]
    error = getattr(error, "controller_failure", None) or error
    return getattr(error, "cause", None) or error  # a RayTaskError's own exception


def failure_cause(error: BaseException) -> str:
    """The error that ended a run, in one line (root_error's)."""
    error = root_error(error)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


def stopped_exit_code(stop: BaseException, signals: set[int] = frozenset()) -> int:
    """The shell's code for the signal that stopped the run: 130 for Ctrl-C (a KeyboardInterrupt, or a SIGINT among
    the `signals` received: see SignalLog), 143 for SIGTERM (`ray job stop`, a pod's eviction: Ray's driver handler
    and exit_on_sigterm make it SystemExit(15), which Ray's get() turns into SystemExit(1) on workers); else the
    stop's own code, never 0: the run did not finish."""
    code = getattr(stop, "code", None)
    if isinstance(stop, KeyboardInterrupt) or signal.SIGINT in signals:
        return 128 + signal.SIGINT
    if signal.SIGTERM in signals or code == signal.SIGTERM:
        return 128 + signal.SIGTERM
    return code if isinstance(code, int) and code != 0 else 1


def stop_signals(signals: set[int]) -> set[int]:
    """The stops (Ctrl-C, SIGTERM) among the signals a process received."""
    return signals & {signal.SIGINT, signal.SIGTERM}


def ray_trains_abort_handler(handler) -> bool:
    """Whether a SIGINT handler is the one Ray Train sets while fit() runs on workers: it aborts the run, letting
    each worker's shutdown hooks run first (CloseWandbOnStop), and the run ends in SystemExit."""
    return "_register_sigint_handler" in getattr(handler, "__qualname__", "")


ABORT_PATIENCE_S = 30  # how long a SIGTERM waits for Ray Train's abort: on a cluster this process started, under
# the 60 s after which Ray's driver, its GCS gone, ends the process itself (exit 1, without the stopped line)


def _exit_with_signal(signum: int, frame) -> None:
    if _leaving:  # a second SIGTERM (`kill PID`, then the process group's) while the stop cleans up: that stop is
        return  # what it asks for; cut short, it left Ray's processes and its W&B run half-closed
    abort = signal.getsignal(signal.SIGINT)
    abort = getattr(abort, "__wrapped__", abort)  # Ray Train's, under TorchTrainerStoppedInTime's
    # on workers: stopped as Ctrl-C stops them, the W&B run closed. On a cluster started here too (`kill PID`, a
    # container's stop: skipping the abort there let Ray kill rank 0 with its W&B service, and every step logged
    # since W&B last wrote was lost), while that cluster lives: a SIGTERM sent to the process group (`kill -- -PGID`,
    # a batch scheduler) reaches its GCS and raylet as well, and the abort waited on them for ever. On a cluster
    # joined, for up to ABORT_PATIENCE_S too: a controller starting a worker group the cluster has no room for (a
    # node lost) answers no abort while it waits (60 s a try, tried again for ever), and the stop waited with it;
    # leaving ends the controller, and no worker runs then to close a W&B run
    if ray_trains_abort_handler(abort):
        while_cluster_lives(abort, signum, frame)
    sys.exit(signum)


_calls_in_ray: list[threading.Thread] = []  # the calls while_cluster_lives made, finished or not
_leaving = False  # the command's stop or failure is cleaning up (leave_with_last_line)


def while_cluster_lives(call, *args) -> None:
    """call(*args), given up on once a process of the cluster started here has died, or after ABORT_PATIENCE_S (it
    goes on in a daemon thread, which the exit ends: exit_leaving_threads). The thread is on record before the
    wait: a second SIGTERM inside it ended the wait in SystemExit, and the stop, taking the abort for finished,
    left Ray through ray.shutdown() while the abort still waited in Ray."""
    worker = threading.Thread(target=call, args=args, daemon=True)
    _calls_in_ray.append(worker)
    worker.start()
    deadline = time.monotonic() + ABORT_PATIENCE_S
    while worker.is_alive() and time.monotonic() < deadline and own_cluster_alive():
        worker.join(0.2)


def threads_blocked_in_ray() -> bool:
    """Whether a call while_cluster_lives made still waits in Ray."""
    return any(worker.is_alive() for worker in _calls_in_ray)


def exit_leaving_threads(code: int, last_line: str) -> NoReturn:
    """Print the command's last line and end the process without Ray's disconnect or the interpreter's teardown:
    where threads still wait in Ray (an abort given up on, a sweep's sizes in Ray Train's fit()), which nothing
    ends, so they cannot be joined, or where this process started its cluster. Disconnecting from a cluster
    joined, or the interpreter's own end, with a thread blocked in Ray ended the process in SIGSEGV after the line
    (seen in CI), or at once with code 1 (3 tries of 8): the process's end ends its job (controllers, workers) on
    that cluster anyway. The processes of a cluster this command started (GCS, raylet, its agents and workers)
    are killed, all stopped first, without ray.shutdown(): the same stop may be ending them (a SIGTERM to the
    process group), and its disconnect then waited on them (8.8 s: task events flushed to a dying GCS). None may
    see another die: a GCS that saw its raylet go, with this process still connected, told it so, and its core
    worker, finding the objects it had put there lost, ended the process at once ('The connection to the plasma
    store is failed. Terminate the process'): exit 1 before the line, 3 tries of 3 with Ray's own shutdown order
    (raylet first) after a SIGTERM to the driver. A SIGTERM to the process group, which ends the cluster by
    itself, ended the same way (its last message 'Attempting to recover 1 lost objects') in 1 CI suite run of 4:
    the sooner this process ends, the less likely. The agents, once their raylet is gone, are no longer this
    process's descendants, and lived on."""
    if started_its_cluster_here():
        kill_process_trees(own_cluster_processes())
    exit_with_last_line(code, last_line)


GROUP_STOP_PROBE_S = 0.5  # how long a SIGTERM holds the GCS of the cluster started here, looking for it dying too


def end_own_cluster_with_the_stop(signum: int) -> None:
    """On a SIGTERM, as it comes (SignalLog's listener: the main thread's handler may run a second later), kill the
    cluster this command started if it is dying with this process (`kill -- -PGID`, a batch scheduler's stop,
    reaches its processes too), before its GCS can tell this process that its raylet has gone: the core worker,
    finding the objects it had put there lost, then ended the process at once, with exit 1 before the stop's line
    (exit_leaving_threads: 1 CI suite run of 4; here, under a second suite's load, 2 of 8 group stops with the
    cluster's processes checking for signals every 50 ms, 0 of 8 at Ray's 1 s). The GCS is held
    (SIGSTOP) while the rest is looked at, GROUP_STOP_PROBE_S at most: the log monitor keeps SIGTERM's default
    action, so it dies the moment the group's signal does; a SIGTERM to this process alone finds the cluster
    whole, and Ray Train's abort runs on it as before (_exit_with_signal)."""
    if signum != signal.SIGTERM or not started_its_cluster_here():
        return
    from ray._private.ray_constants import PROCESS_TYPE_GCS_SERVER

    gcs = [info.process.pid for info in connected_ray_node().all_processes.get(PROCESS_TYPE_GCS_SERVER, [])]
    signal_each(gcs, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + GROUP_STOP_PROBE_S
        while time.monotonic() < deadline:
            if not own_cluster_alive():
                kill_process_trees(own_cluster_processes())
                return
            time.sleep(0.005)
    finally:
        signal_each(gcs, signal.SIGCONT)


def leave_with_last_line(code: int, last_line: str, threads_left: bool = False) -> int:
    """A stopped or failed command's end: this process's W&B runs closed (a run, or a sweep's size, in local mode;
    on workers CloseWandbOnStop closes rank 0's), Ray left and its last line printed after Ray's own (`code`
    returned); or, where threads still wait (`threads_left`: a sweep's sizes in fit(); an abort while_cluster_lives
    gave up on; W&B's teardown given up on), or where it started its cluster, the process ended at once after the
    line (exit_leaving_threads). A SIGTERM from here on changes none of it (_exit_with_signal)."""
    global _leaving
    _leaving = True
    try:
        closed = close_open_runs()
        if threads_left or not closed or threads_blocked_in_ray() or started_its_cluster_here():
            exit_leaving_threads(code, last_line)
        leave_ray()
        print(last_line, file=sys.stderr, flush=True)
        return code
    finally:  # (main() called again in the same process: a test, a notebook)
        _leaving = False


def started_its_cluster_here() -> bool:
    """Whether this command (join_or_start_ray) started the cluster it is connected to: not a caller's session (a
    test's, a notebook's), which its end must leave up."""
    return _joined_here and started_its_own_cluster()


def _is_rays_driver_handler(handler) -> bool:
    """ray.init's SIGTERM handler in a driver: sys.exit(signum), as ours, but the workers killed unannounced."""
    return getattr(handler, "__module__", None) == "ray._private.worker"


@contextlib.contextmanager
def exit_on_sigterm():
    """While open, SIGTERM ends the process in SystemExit(15): a run in local mode, which never calls ray.init, then
    stops as one on workers does, with the line naming the checkpoint it resumes from, and its W&B run closed,
    rather than dying mid-line. During fit() on workers it stops the run as Ctrl-C does (Ray Train's abort), so
    that rank 0 closes its W&B run before Ray kills it: ray.init's own handler exited at once. A handler someone
    else set is kept; the one found comes back on leaving, unless another replaced ours meanwhile."""
    previous = signal.getsignal(signal.SIGTERM)
    ours = threading.current_thread() is threading.main_thread() and \
        (previous is signal.SIG_DFL or _is_rays_driver_handler(previous))
    if ours:
        signal.signal(signal.SIGTERM, _exit_with_signal)
    try:
        yield
    finally:
        if ours and signal.getsignal(signal.SIGTERM) is _exit_with_signal:
            signal.signal(signal.SIGTERM, previous)


def fit(cfg: TrainConfig, trainer: TorchTrainer) -> ray.train.Result:
    """trainer.fit(), submitted again when Ray Train's controller stopped on its storage failing: Ray restarts
    failed workers itself (--max-failures), but a write of its own run state that fails ends the run, where the
    workers ride out the same outage (pipeline.format.retried). Once the storage answers, the run goes on from its last
    checkpoint, up to --max-failures times. A setting the run cannot train with, which its ranks returned (Ray Train
    finished the run, having trained nothing: train.loop.agreed_refusal), is raised here, RunRefused, so that no
    caller (the command, a sweep) takes the run for finished."""
    from pipeline.format import is_transient, retried

    refits = 0
    while True:
        try:
            result = trainer.fit()
            if isinstance(result.return_value, RunRefused):
                raise result.return_value
            return result
        except ray.train.ControllerError as error:
            if refits >= cfg.max_failures or not is_transient(error.controller_failure):
                raise
            refits += 1
            print(f"[{cfg.run_name}] Ray Train stopped on its storage ({failure_cause(error)}); the run goes on from "
                  "its last checkpoint once the storage answers", file=sys.stderr, flush=True)
            retried(partial(latest_checkpoint, cfg.storage_path, cfg.run_name), f"waiting for {cfg.storage_path}")
            trainer = build_trainer(cfg)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    ctrl_c_as_usual()
    with exit_on_sigterm(), SignalLog() as signals:
        try:
            return checked_and_trained(cfg)
        except (KeyboardInterrupt, SystemExit) as stop:  # before fit(): while the data is checked, or Ray starts
            # (a Ctrl-C ended the command in a KeyboardInterrupt traceback there, a SIGTERM with code 15 and no line)
            return leave_with_last_line(stopped_exit_code(stop, signals.received()), stopped_line(cfg))


def ended_stopped(cfg: TrainConfig, stop: BaseException, signals: set[int]) -> int:
    """A stopped fit() ended: its W&B run closed (in local mode rank 0's is this process's; on workers
    CloseWandbOnStop closed it), Ray left, the line naming the checkpoint it resumes from; the exit code."""
    return leave_with_last_line(stopped_exit_code(stop, signals), stopped_line(cfg))


def checked_and_trained(cfg: TrainConfig) -> int:
    """The command's work once its arguments parse: the checks, then the run; its exit code."""
    try:
        with refusing_storage_failures("the storage of --data, --validation-data or --storage-path",
                                       keep=(FileNotFoundError, ValueError)):
            check_data(cfg)
    except (FileNotFoundError, ValueError, StorageFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as held:  # the run's lease, from before Ray starts to the run's end
        try:
            with refusing_storage_failures("the storage of --storage-path"):
                held.enter_context(run_lease(cfg))
            trainer = build_trainer(cfg)  # refuses a mismatched resume before it starts Ray
        except (RunBusy, StorageFailed, ResumeMismatch, ClusterUnreachable) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return trained(cfg, trainer)


def trained(cfg: TrainConfig, trainer: TorchTrainer) -> int:
    """The run, once built: its stop, refusal or failure said in one line; its exit code."""
    with exit_on_sigterm(), SignalLog(on_signal=end_own_cluster_with_the_stop) as signals:
        try:
            result = fit(cfg, trainer)
        except (KeyboardInterrupt, SystemExit) as stop:  # Ctrl-C: in local mode the training function raises
            # KeyboardInterrupt; on workers, Ray Train's own SIGINT handler aborts the run and fit() ends in
            # SystemExit, as it does when the driver is sent SIGTERM (`ray job stop`) in either mode
            return ended_stopped(cfg, stop, signals.received())
        except Exception as error:  # the traceback in full, then what it means for the run
            refusal = root_error(error)
            if isinstance(refusal, RunRefused):  # found on the workers (the held-out set drawn, the VAE loaded)
                leave_ray()
                print(f"error: {refusal}", file=sys.stderr)
                return 2
            if stop_signals(signals.received()):  # a stop that reached the cluster first: `kill -- -PGID` on a
                # run that started its own cluster stops its raylet too, and fit() can fail on the dead controller
                # before this process's handler runs (then exit 1 and 'failed: ...', where the run was stopped)
                return ended_stopped(cfg, error, signals.received())
            traceback.print_exc()
            return leave_with_last_line(1, f"failed: {failure_cause(error)}; {resume_hint(cfg)}")
    results = read_results(cfg)
    print(finished_line(cfg, result.metrics, result.checkpoint.path if result.checkpoint else None, results))
    if results is not None:
        print(curve_text(results))
        print(f"results: {results_url(cfg)}" + (f", curves: {plot_url(cfg)}" if curves_of(results) else ""))
    return 0


if __name__ == "__main__":
    exit_without_collecting(main())
