"""distributor maps the per-shard worker over shards with a pool of Ray actors, retrying failed shards"""
from __future__ import annotations

import logging
import re
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from annotate import NEURAL_TASKS
from pipeline.config import BuildConfig, weight_hashes, weights_mismatch
from pipeline.format import Outage, is_transient
from pipeline.reader import InputReadError, InputShard
from pipeline.worker import ActorFault, process_shard
from pipeline.writer import clear_staging

DIED_STARTING = "died starting: "
ACTOR_WAIT_NOTE_S = 30.0  # shards left and no actor up to take them for this long: the job says what it waits for


class ModelLoadError(RuntimeError):
    """An actor could not build its annotator or captioner (a missing weight file, a bad config)."""


def limit_torch_threads(threads: int) -> None:
    """torch's thread pool to the actor's CPUs, where its models imported torch: Canny's imports none (importing
    torch only to size its pool would add 2.5 s to every actor's start)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def drop_broken_connection_reports(record: logging.LogRecord) -> bool:
    """asyncio's filter for an actor's log: its "Task exception was never retrieved" for a storage connection that
    broke (aiohttp's write of a request an outage cut, in s3fs's loop) reached the job's terminal as a traceback,
    beside the driver's one line about the outage; the error itself reaches the shard's read or upload, which retries
    or waits."""
    error = record.exc_info[1] if record.exc_info else None
    return error is None or not is_transient(error)


@ray.remote
class ShardActor:
    """Holds the job's models (each requested task's annotator, the captioner, the VAE; weights loaded once per
    actor) and processes whole shards with them."""

    def __init__(self, cfg: BuildConfig):
        import cv2

        from pipeline.models import build_latent_encoder, build_models, models_device
        from pipeline.preprocess import open_images_up_to

        # one thread pool per reserved CPU: OpenCV and torch would otherwise each start one per core
        threads = max(1, int(cfg.cpus_per_worker))
        cv2.setNumThreads(threads)
        open_images_up_to(cfg.max_pixels)
        logging.getLogger("asyncio").addFilter(drop_broken_connection_reports)
        cfg = replace(cfg, device=models_device(cfg, ray.get_gpu_ids()))
        self.cfg = cfg
        clear_staging(cfg.output)  # what actors killed on this node left (an object store's staging is local)
        self.annotators, self.captioner, self.encoder = {}, None, None
        self.load_error = ""
        self.weights: dict[str, str] = {}
        try:
            self.annotators, self.captioner = build_models(cfg)
            self.encoder = build_latent_encoder(cfg)
            self.weights = weight_hashes(self.describe())
        except Exception as e:  # kept for describe(): the driver prints one line, not a remote traceback
            self.load_error = f"{type(e).__name__}: {e}"
        limit_torch_threads(threads)

    def describe(self) -> dict[str, Any]:
        if self.load_error:
            return {"error": self.load_error}
        annotators = {task: annotator.describe() for task, annotator in self.annotators.items()}
        return {
            **({"annotator": annotators[self.cfg.task]} if len(annotators) == 1 else {"annotators": annotators}),
            "captioner": self.captioner.describe() if self.captioner is not None else None,
            "latents": self.encoder.describe() if self.encoder is not None else None,
        }

    def process(self, shard: InputShard, job_weights: dict[str, str] | None = None) -> dict[str, Any]:
        """`job_weights`: the weight_hashes of the job's first actor; one on a node whose weights folder holds
        other files is unfit, as one without models is: its shards would mix two datasets."""
        if self.load_error:  # never annotate without models: every row would be a failure, committed as done
            raise ActorFault(f"this actor could not load its models: {self.load_error}")
        mismatch = weights_mismatch(job_weights, self.weights) if job_weights is not None else []
        if mismatch:
            raise ActorFault(f"this actor loaded other weights than the job's: {'; '.join(mismatch)}")
        return process_shard(shard, self.cfg, self.annotators, self.captioner, self.encoder, self.weights,
                             self.describe())


@dataclass
class PoolResult:
    models: dict[str, Any] = field(default_factory=dict)  # what the actors loaded, for the manifest
    done: list[dict[str, Any]] = field(default_factory=list)  # stats of committed shards
    failed: dict[str, str] = field(default_factory=dict)  # shard name -> last error


def default_num_workers(cfg: BuildConfig, num_shards: int) -> int:
    """One actor per `cpus_per_worker` CPUs (or per GPU share) of the cluster, never more than shards."""
    resources = ray.cluster_resources()
    by_cpu = int(resources.get("CPU", 1) // max(cfg.cpus_per_worker, 1e-3))
    by_gpu = int(resources.get("GPU", 0) // cfg.gpus_per_worker) if cfg.gpus_per_worker else by_cpu
    return max(1, min(num_shards, by_cpu, by_gpu))


def idle_gpus_note(cfg: BuildConfig, resources: dict[str, float]) -> str | None:
    """What to say when the cluster has GPUs that this job's networks will not use: an actor runs its models on the
    GPU it reserved, and with --gpus-per-worker 0 (the default) it reserves none and runs them on the CPU."""
    gpus = int(resources.get("GPU", 0))
    networks = [t for t in cfg.tasks if t in NEURAL_TASKS] + (["blip"] if cfg.caption in {"blip", "auto"} else []) \
        + (["the VAE (--latents)"] if cfg.latents else [])
    if not gpus or cfg.gpus_per_worker or cfg.device or not networks:
        return None
    return (f"the cluster has {gpus} GPU(s), which this job leaves idle: {', '.join(networks)} run on the CPU; "
            "give --gpus-per-worker (e.g. 0.25: four actors per GPU) to run them there")


def loaded_actors(actors: list[Any]) -> tuple[list[Any], dict[str, Any], list[str]]:
    """(the actors whose models loaded, what the first of them loaded, the load errors of the others, which are
    killed). Every actor's constructor loads the models: a missing weight file or an out-of-memory GPU on one
    node surfaces here, per actor, not as shards of failed rows; so does a node whose weights differ from the
    first actor's."""
    loaded, models, errors = [], {}, []
    for actor, ref in [(a, a.describe.remote()) for a in actors]:
        try:
            described = ray.get(ref)
        except RayActorError as e:  # its node lost (a spot reclaim), or the process killed, before it answered
            described = {"error": f"{DIED_STARTING}{_short_error(e)}"}
        mismatch = weights_mismatch(weight_hashes(models), weight_hashes(described)) \
            if models and "error" not in described else []
        if mismatch:
            described = {"error": f"loaded other weights than the first actor: {'; '.join(mismatch)}"}
        if "error" in described:
            errors.append(described["error"])
            ray.kill(actor, no_restart=True)
        else:
            loaded.append(actor)
            models = models or described
    return loaded, models, errors


def run_pool(
    shards: list[InputShard],
    cfg: BuildConfig,
    on_done: Callable[[dict[str, Any]], None] = lambda stats: None,
    on_fail: Callable[[InputShard, str, int], None] = lambda shard, error, attempt: None,
    on_note: Callable[[str], None] = print,
    check_models: Callable[[dict[str, Any]], None] = lambda models: None,
) -> PoolResult:
    """Process every shard on a pool of actors. A shard whose task raises (or whose actor dies, or whose actor
    is at fault) is retried up to cfg.max_retries times, on a fresh actor unless the error was the shard's own;
    after that it is reported as failed. A shard that failed on the storage (an input read or an upload cut off)
    is retried without counting while the storage is being waited for (pipeline.format.Outage): an outage fails every
    shard in flight at once, and is waited out once for all of them. `check_models` sees what the actors loaded
    before any shard starts; what it raises ends the job."""
    num_workers = cfg.num_workers or default_num_workers(cfg, len(shards))
    options = {"num_cpus": cfg.cpus_per_worker, "num_gpus": cfg.gpus_per_worker}
    if note := idle_gpus_note(cfg, ray.cluster_resources()):
        on_note(note)

    def new_actor():
        return ShardActor.options(**options).remote(cfg)

    started = [new_actor() for _ in range(min(num_workers, len(shards)))]
    loaded, models, errors = loaded_actors(started)
    if not loaded:
        raise ModelLoadError(errors[0])
    try:
        check_models(models)
    except Exception:
        for actor in loaded:
            ray.kill(actor)
        raise
    job_weights = weight_hashes(models)
    # replacements for actors that died, each until its models loaded (describe answered): a shard goes only to an
    # actor that is up. One queued on a replacement that the cluster had no room for (its node lost, the survivors'
    # actors holding every CPU) waited on it for good while those actors sat idle
    starting: dict[ray.ObjectRef, Any] = {}
    died = [error for error in errors if error.startswith(DIED_STARTING)]
    for _ in died:  # as one that dies later is: the pool kept none of them, a node lost in the job's first seconds
        replacement = new_actor()  # shrank it for the whole job
        starting[replacement.describe.remote()] = replacement
    if errors:
        unloaded = len(errors) - len(died)
        what = " and ".join(part for part in (f"{unloaded} could not load their models" if unloaded else "",
                                              f"{len(died)} died starting" if died else "") if part)
        on_note(f"{len(errors)} of {len(started)} actors did not start: {what} ({errors[0]}); going on with "
                f"{len(loaded)}" + (f", and {len(died)} started again" if died else ""))
    idle = deque(loaded)
    unfit = ""  # why the last replacement could not take shards
    result = PoolResult(models=models)
    todo = deque(shards)
    attempts = {s.name: 0 for s in shards}
    running: dict[ray.ObjectRef, tuple[Any, InputShard]] = {}
    outage = Outage("the job's storage")
    waiting_since, noted = None, False
    try:
        while todo or running:
            while todo and idle:
                actor, shard = idle.popleft(), todo.popleft()
                running[actor.process.remote(shard, job_weights)] = (actor, shard)
            waitable = [*running, *(starting if todo else ())]
            if not waitable:  # every actor is gone and no replacement could load its models: the rest cannot be done
                for shard in todo:
                    on_fail(shard, unfit, attempts[shard.name] + 1)
                    result.failed[shard.name] = unfit
                break
            ready, _ = ray.wait(waitable, num_returns=1, timeout=None if running else 1.0)
            if not ready:  # shards left, none running, and no replacement placed yet: say so once, then keep waiting
                waiting_since = waiting_since or time.monotonic()
                if not noted and time.monotonic() - waiting_since >= ACTOR_WAIT_NOTE_S:
                    noted = True
                    on_note(f"waiting for the cluster to place {len(starting)} actor(s) "
                            f"({cfg.cpus_per_worker:g} CPU, {cfg.gpus_per_worker:g} GPU each) in place of those lost "
                            f"(a node gone?): {len(todo)} shard(s) left, {len(result.done)} committed; Ctrl-C stops "
                            "the job, and the same command resumes it")
                continue
            waiting_since = None
            [ref] = ready
            if ref in starting:
                actor = starting.pop(ref)
                unfit = replacement_unfit(ref, job_weights)
                if unfit:
                    ray.kill(actor, no_restart=True)
                else:
                    idle.append(actor)
                continue
            actor, shard = running.pop(ref)
            try:
                stats = ray.get(ref)
            except (ActorDiedError, ActorUnavailableError, RayActorError, ActorFault) as e:
                ray.kill(actor, no_restart=True)
                replacement = new_actor()  # gone (OOM, node lost, SIGKILL) or unfit (no models): a fresh one
                starting[replacement.describe.remote()] = replacement
                _retry_or_fail(shard, e, attempts, cfg.max_retries, todo, result, on_fail)
                continue
            except Exception as e:
                idle.append(actor)
                # StorageOutage: the storage is down, not the shards: the job ends, its shards in flight too
                waited = waited_for_storage(outage, e)
                if waited:
                    todo.append(shard)
                else:
                    _retry_or_fail(shard, e, attempts, cfg.max_retries, todo, result, on_fail)
                continue
            outage.over()
            idle.append(actor)
            result.done.append(stats)
            on_done(stats)
    finally:  # what is left of the pool, however the loop ended (a note's handler that raises included)
        for actor in [*idle, *starting.values(), *(busy for busy, _ in running.values())]:
            ray.kill(actor)
    return result


def replacement_unfit(described_ref: ray.ObjectRef, job_weights: dict[str, str]) -> str:
    """Why a replacement actor cannot take shards ('' if it can): its models did not load, it loaded other weights
    than the job's (a node whose weights folder differs), or it died starting."""
    try:
        described = ray.get(described_ref)
    except RayActorError as e:
        return f"a replacement actor died starting: {_short_error(e)}"
    if "error" in described:
        return f"ActorFault: this actor could not load its models: {described['error']}"
    mismatch = weights_mismatch(job_weights, weight_hashes(described))
    return f"ActorFault: this actor loaded other weights than the job's: {'; '.join(mismatch)}" if mismatch else ""


def waited_for_storage(outage: Outage, error: BaseException) -> bool:
    """Whether `error` is the storage failing, having waited before the next try; False: the error counts as a
    failed attempt of its shard. Raises StorageOutage once the outage has outlasted its patience: each shard left,
    tried --max-retries times more through a storage that is down, cost each try's own retries (~10 s refused,
    ~7 min from an endpoint that never answers), and a job of many shards took hours to end."""
    cause = getattr(error, "cause", None) or error  # a task's RayTaskError wraps the actor's exception
    if not (isinstance(cause, InputReadError) or is_transient(cause)):
        return False
    outage.wait(cause)
    return True


def _retry_or_fail(shard, error, attempts, max_retries, todo, result, on_fail) -> None:
    attempts[shard.name] += 1
    message = _short_error(error)
    on_fail(shard, message, attempts[shard.name])
    if attempts[shard.name] <= max_retries:
        time.sleep(min(2.0 ** attempts[shard.name] / 4, 5.0))  # a little: storage outages are waited_for_storage
        todo.append(shard)
    else:
        result.failed[shard.name] = message


def _short_error(error: BaseException) -> str:
    """The root cause's one line ("MissingWeightsError: ..."), not Ray's wrapped traceback."""
    cause = getattr(error, "cause", None) or error
    lines = str(cause).strip().splitlines()
    last = lines[-1] if lines else ""
    named = re.match(r"^([\w.]+(?:Error|Exception)): (.*)$", last)
    if named:  # Ray's text ends with the remote exception as "module.Name: message"
        return f"{named.group(1).rsplit('.', 1)[-1]}: {named.group(2)}"
    return f"{type(cause).__name__}: {last}"
