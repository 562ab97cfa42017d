"""W&B logging on rank 0 (online with an API key, offline otherwise, or off), and the run's results JSON"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import re
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from train.config import TrainConfig


def wandb_mode(choice: str) -> tuple[str, str]:
    """(mode, message) decided on the driver: 'auto' is online only when an API key is configured; 'online'
    without one is refused here (ValueError), not by wandb.init in a worker after the base model has loaded."""
    if choice == "online" and not has_api_key():
        raise ValueError("--wandb online needs a W&B API key (WANDB_API_KEY, or `wandb login`); --wandb offline "
                         "logs locally for `wandb sync` later")
    if choice != "auto":
        return choice, f"W&B: {choice}"
    if os.environ.get("WANDB_MODE") in {"offline", "disabled"}:
        mode = "off" if os.environ["WANDB_MODE"] == "disabled" else "offline"
        return mode, f"W&B: {mode} (WANDB_MODE={os.environ['WANDB_MODE']})"
    if has_api_key():
        return "online", "W&B: online"
    return "offline", "W&B: no API key found, logging offline; upload later with `wandb sync <dir>/offline-run-*`"


def has_api_key() -> bool:
    """A W&B API key in the environment or in ~/.netrc (where `wandb login` writes it)."""
    return bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()


def _netrc_has_wandb() -> bool:
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def say(text: str) -> None:
    """A console line from a training worker, printed once: Ray Train V2 patches print() to log it and also tee
    it to a wrapped sys.stdout, so a plain print shows twice on the driver; the process's own stdout does not."""
    print(text, file=sys.__stdout__ or sys.stdout, flush=True)


def quiet_placement_group_cleaner() -> None:
    """Ray's worker_process_setup_hook for the cluster a run starts itself (train.run.join_or_start_ray), which has
    no dashboard: Ray Train's placement-group cleaner warns there each second that the state API is down. Its
    state API also looks for 'the' cluster on the machine when RAY_ADDRESS is unset: beside another Ray instance
    (another user's, a test session's) its thread died in a 30-line traceback, so each worker is told its own."""
    import logging

    import ray

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    if ray.is_initialized():
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def run_id(run_name: str) -> str:
    """A W&B run id made of the run name (the characters W&B allows)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:64]


def wandb_run_id(run_name: str, recorded: str | None, resumed: bool) -> str:
    """The W&B run a segment logs to: the one its checkpoint recorded, so a resumed run continues it. A run from step
    0 gets one of its own: the run name alone (as before) sent a run of a reused name (its storage cleared, another
    --storage-path, or `exp.1` against `exp-1`) into the old W&B run, which dropped its steps up to the old one's
    last. A checkpoint from before ids were recorded continues the run named by run_name alone. (A run from step 0
    that its name started before with the same settings is given that one's: started_wandb_id.)"""
    if recorded:
        return recorded
    if resumed:
        return run_id(run_name)
    return f"{run_id(run_name)[:55]}-{uuid.uuid4().hex[:8]}"


def started_url(cfg: TrainConfig) -> str:
    return f"{cfg.storage_path.rstrip('/')}/{cfg.run_name}/wandb_run.json"


def started_wandb_id(cfg: TrainConfig) -> str:
    """The W&B run of a run from step 0 (rank 0's, before W&B opens): the one its name recorded at its last start from
    step 0 with the same experiment settings, else a new one (wandb_run_id), recorded here with this run's settings.
    A run stopped before its first checkpoint has no checkpoint to name its W&B run, and the same command run again
    started a second W&B run of that name beside the stopped one's first steps. A name reused for another
    experiment (other settings: a resume of it would be refused) gets a W&B run of its own, as does a run whose
    storage was cleared, which holds no record."""
    import fsspec

    from pipeline.format import retried, write_whole
    from train.config import resume_mismatch

    def read() -> dict | None:
        fs, path = fsspec.core.url_to_fs(started_url(cfg))
        fs.invalidate_cache()
        try:
            return json.loads(fs.cat_file(path))
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):  # none, or not ours: a new W&B run
            return None

    record = retried(read, f"reading the W&B run of {cfg.run_name}")  # storage that fails for a while is waited out
    if isinstance(record, dict) and record.get("id") and isinstance(record.get("config"), dict) \
            and not resume_mismatch(record["config"], cfg):
        return record["id"]
    wandb_id = wandb_run_id(cfg.run_name, None, resumed=False)
    record = {"id": wandb_id, "config": dataclasses.asdict(cfg)}
    retried(lambda: write_whole(started_url(cfg), json.dumps(record).encode()),
            f"recording the W&B run of {cfg.run_name}")
    return wandb_id


class RunLogger:
    """Rank 0's logger. With mode 'off' it only keeps the results JSON. The W&B run may be closed from another
    thread (close_open_runs, as Ray Train stops the worker), so every use of it holds the lock."""

    def __init__(self, cfg: TrainConfig, mode: str, directory: str | None, wandb_id: str | None = None):
        self.cfg = cfg
        self.run = None
        self._lock = threading.Lock()
        # what the W&B run holds (its last step, and the keys logged at that step): a resumed run drops it
        self.held: tuple[int, set[str]] = (-1, set())
        if mode != "off":
            import wandb

            os.makedirs(directory or "wandb", exist_ok=True)
            self.run = wandb.init(
                project=cfg.wandb_project, name=cfg.run_name, id=wandb_id or run_id(cfg.run_name), resume="allow",
                mode=mode, dir=directory, config=dataclasses.asdict(cfg), group=cfg.wandb_group,
            )
            self.held = logged_through(cfg, self.run.id)
            if mode == "offline":
                self.held = later(self.held, held_by_earlier_segments(Path(self.run.dir).parent, self.run.id))
            _OPEN_LOGGERS.append(self)

    def _new(self, step: int, keys: list[str]) -> list[str]:
        """The keys of a row at `step` that go to the W&B run: not those it holds already, from a segment stopped
        after its checkpoint (the resumed run trains those steps again, to the same values). A step is logged in
        parts (validation's scores and images, then the training metrics), and a stop may fall between them."""
        held_step, held_keys = self.held
        if self.run is None or step < held_step:
            return []
        new = [k for k in keys if step > held_step or k not in held_keys]
        if new:
            self.held = (step, (held_keys if step == held_step else set()) | set(new))
        return new

    def log(self, metrics: dict[str, Any], prefix: str = "train/") -> None:
        with self._lock:
            row = {f"{prefix}{k}": v for k, v in metrics.items() if k != "step"}
            new = self._new(metrics["step"], list(row))
            if new:
                self.run.log({k: row[k] for k in new}, step=metrics["step"])

    def log_images(self, name: str, images: list, captions: list[str], step: int) -> None:
        with self._lock:
            if self._new(step, [name]):
                import wandb

                self.run.log({name: [wandb.Image(i, caption=c) for i, c in zip(images, captions, strict=True)]},
                             step=step)

    def progress(self, step: int, fidelity: str, metrics: dict[str, Any] | None = None) -> None:
        """A console line per log step, whatever the W&B mode: hours of silence look like a hang."""
        parts = [f"[{self.cfg.run_name}] step {step}/{self.cfg.max_steps}"]
        if metrics:
            parts.append(f"loss {metrics['loss']:.4f}  {metrics['samples_per_s']:.1f} samples/s"
                         + (f" ({metrics['data_wait_fraction']:.0%} waiting for data)"
                            if "data_wait_fraction" in metrics else ""))
        if fidelity:
            parts.append(fidelity)
        say("  ".join(parts))

    def note(self, text: str) -> None:
        say(text)
        with self._lock:
            if self.run is not None:
                self.run.summary["note"] = text

    def close(self, exit_code: int) -> None:
        """End the W&B run now, before the run has finished: what it logged is written out (W&B flushes its file
        every 15 s, and a process killed in between loses the rest for good; the resumed run logs only the steps
        after its checkpoint). Later logging is dropped."""
        with self._lock:
            run, self.run = self.run, None
            if run is not None:
                run.finish(exit_code=exit_code)
                record_logged_through(self.cfg, run.id, *self.held)

    def finish(self, state) -> None:
        results = write_results(self.cfg, state)
        with self._lock:
            if self.run is not None:
                self.run.summary.update({"final_step": state.step, "resumed_from": state.resumed_from})
                for name, curve in state.fidelity.get("curves", {}).items():  # convergence step and mAUCC per curve
                    self.run.summary[f"{name}/convergence_step"] = curve.get("step")
                    self.run.summary[f"{name}/mauc"] = curve.get("mauc")
                if results.get("convergence"):
                    self.run.summary["primary_curve"] = results["fidelity"]["primary"]
                    self.run.summary.update({f"convergence/{k}": v for k, v in results["convergence"].items()})
                self.run.finish()
                self.run = None
        if self in _OPEN_LOGGERS:  # closed: nothing for close_open_runs to wait for when Ray stops the worker
            _OPEN_LOGGERS.remove(self)


def logged_url(cfg: TrainConfig) -> str:
    return f"{cfg.storage_path.rstrip('/')}/{cfg.run_name}/wandb_logged.json"


def logged_through(cfg: TrainConfig, wandb_id: str) -> tuple[int, set[str]]:
    """The last step that the W&B run `wandb_id` holds, and the keys it holds at that step, by the record of its last
    stop (record_logged_through); (-1, none) when there is none (a run from step 0 has a W&B run of its own, which no
    record names)."""
    import fsspec

    try:
        with fsspec.open(logged_url(cfg), "rb") as f:
            record = json.load(f)
        if record.get("id") == wandb_id:
            return int(record["step"]), set(record["keys"])
    except Exception:  # none, or unreadable: the resumed run logs the steps after its checkpoint, as before
        pass
    return -1, set()


def later(one: tuple[int, set[str]], other: tuple[int, set[str]]) -> tuple[int, set[str]]:
    """The later of two (step, keys held at it); at the same step, the keys of both."""
    if one[0] != other[0]:
        return max(one, other, key=lambda held: held[0])
    return one[0], one[1] | other[1]


def held_by_earlier_segments(own_folder: Path, wandb_id: str) -> tuple[int, set[str]]:
    """The last step, and its keys, that the earlier offline segments of the W&B run `wandb_id` beside this one's
    folder hold: a segment killed (kill -9, an OOM kill) records nothing (record_logged_through runs on a stop), and
    W&B had written its file up to its last whole 32 KiB block, so the resumed run logged those of the steps after
    its checkpoint again. (-1, none) where there is none, or W&B's file cannot be read."""
    held: tuple[int, set[str]] = (-1, set())
    # by its file's name: a segment begun in the same second as another gets a folder ending in -1, -2, ...
    for run_file in own_folder.parent.glob(f"offline-run-*/run-{glob.escape(wandb_id)}.wandb"):
        if run_file.parent == own_folder:
            continue
        with contextlib.suppress(Exception):  # another wandb's format: at worst steps are logged twice, as before
            for record in wandb_file_records(run_file):
                if record.HasField("history"):
                    row = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                    held = later(held, (int(json.loads(row["_step"])), {k for k in row if not k.startswith("_")}))
    return held


def wandb_file_records(path: Path) -> Iterator[Any]:
    """The records of a W&B run file (`run-<id>.wandb`, what `wandb sync` uploads), as wandb's own protobuf Records
    (wandb 0.31 has no reader of its own in Python), up to one cut short by a kill. The file is a LevelDB log: a
    7-byte header, then 32 KiB blocks of chunks, each with a 7-byte header (crc32c, length, type: 1 whole record,
    2 first piece, 3 middle, 4 last); a block's tail under 7 bytes is padding."""
    import struct

    from wandb.proto import wandb_internal_pb2

    block, data = 32768, path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pieces, position = b"", 7
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if position + 7 + length > len(data):  # cut short
            return
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        if kind in (1, 2):
            pieces = chunk
        elif kind in (3, 4):
            pieces += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record
        if kind == 0 and length == 0:  # zeros: the rest of the block is padding
            position += block - position % block


def record_logged_through(cfg: TrainConfig, wandb_id: str, step: int, keys: set[str]) -> None:
    """Note beside the run's checkpoints the last step its W&B run holds, once W&B has written it (the run closed
    on a stop): the resumed run, which trains the steps after its checkpoint again, logs only the steps after this
    one, so that the W&B curve holds each step once, as results.json does. After a kill -9 there is no record, and
    the W&B run holds what W&B had written."""
    from pipeline.format import STOP_READ_S, answer_within, write_whole

    record = json.dumps({"id": wandb_id, "step": step, "keys": sorted(keys)}).encode()
    with contextlib.suppress(Exception):  # a storage that fails or does not answer: at worst steps are logged twice
        answer_within(STOP_READ_S, lambda: write_whole(logged_url(cfg), record))


_OPEN_LOGGERS: list[RunLogger] = []  # this process's W&B runs (rank 0's), for close_open_runs


TEARDOWN_PATIENCE_S = 20.0  # W&B's teardown after finish(): its service ends in well under a second


def close_open_runs(exit_code: int = 1) -> bool:
    """Close this process's W&B runs that have not finished: Ray Train is stopping the worker (a Ctrl-C, a stop,
    a restart after another rank failed) and kills it once this returns (train.run.CloseWandbOnStop). False when
    W&B's teardown still waits after TEARDOWN_PATIENCE_S, in a daemon thread: the process should then end without
    the interpreter's own end, which may wait on it again (train.run.exit_leaving_threads)."""
    if not _OPEN_LOGGERS:
        return True
    while _OPEN_LOGGERS:
        _OPEN_LOGGERS.pop().close(exit_code)
    import wandb

    from pipeline.format import answer_within

    # finish() returns before W&B's service has written the run's file: a process killed right after lost it all.
    # The teardown's last wait can last for ever (wandb 0.31): seen once, a run stopped by Ctrl-C in local mode hung
    # in AsyncioManager.join, waiting on a task of W&B's asyncio thread, its service shut down and its files whole.
    try:
        answer_within(TEARDOWN_PATIENCE_S, wandb.teardown)
    except TimeoutError:
        print(f"W&B's teardown still waits after {TEARDOWN_PATIENCE_S:.0f} s; its run's files are closed, going on",
              file=sys.stderr, flush=True)
        return False
    return True


def results_url(cfg: TrainConfig) -> str:
    return f"{cfg.storage_path.rstrip('/')}/{cfg.run_name}/results.json"


def strict_json(value: Any) -> Any:
    """`value` with each NaN or infinite float as None: Python writes them as bare NaN and Infinity, which is no
    JSON to other readers (jq, JavaScript, a browser); a curve's start and plateau are NaN before enough
    evaluations, a diverged run's loss too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def read_results(cfg: TrainConfig) -> dict[str, Any] | None:
    """A run's results.json, or None before it has written one, or when the one there is cut short (written in
    place by a version before write_whole, by a run killed mid-write): the run writes it again when it ends."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(results_url(cfg))
    fs.invalidate_cache()
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, NotADirectoryError):  # (a --storage-path that is a file: check_data says so)
        return None
    except json.JSONDecodeError:
        print(f"[{cfg.run_name}] {results_url(cfg)} is cut short: taken as not written", file=sys.stderr, flush=True)
        return None


def plot_url(cfg: TrainConfig) -> str:
    return f"{cfg.storage_path.rstrip('/')}/{cfg.run_name}/fidelity.png"


def convergence(fidelity: dict[str, Any]) -> dict[str, Any] | None:
    """The primary curve's headline numbers: detected step (None: not converged), start, plateau, mAUCC."""
    curve = fidelity.get("curves", {}).get(fidelity.get("primary"))
    if not curve:
        return None
    return {k: curve.get(k) for k in ("converged", "step", "start", "plateau", "mauc", "reason")}


def write_results(cfg: TrainConfig, state) -> dict[str, Any]:
    """The run's results JSON next to its checkpoints (config, per-step losses, where it resumed from, the fidelity
    curves with the primary one's convergence), and the curves as fidelity.png."""
    import io

    from pipeline.format import retried, write_whole
    from train.plots import run_plot

    results = {"config": dataclasses.asdict(cfg), "final_step": state.step, "resumed_from": state.resumed_from,
               "history": state.history, "fidelity": state.fidelity, "convergence": convergence(state.fidelity),
               "validation": state.validation, "train_seconds": state.train_seconds,
               "samples_seen": state.samples_seen, "gpu_seconds": state.gpu_seconds, "timing": state.timing}
    png = io.BytesIO()
    if state.fidelity.get("curves"):
        run_plot(results).save(png, format="PNG")

    def write() -> None:  # each whole or not at all: a run killed mid-write left a results.json cut short
        write_whole(results_url(cfg), json.dumps(strict_json(results), indent=1, allow_nan=False).encode())
        if png.getvalue():
            write_whole(plot_url(cfg), png.getvalue())

    retried(write, f"writing the results of {cfg.run_name}")  # storage that fails for a while is waited out
    return results
