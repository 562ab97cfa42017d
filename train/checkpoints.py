"""a run's checkpoints on storage (local or s3://): publishing them (progress.json last, in both of Ray Train's
modes), finding the latest, and, for runs Ray Train keeps no record of (its local mode), pruning and fetching them"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.format import retried

CONTROLNET_DIR = "controlnet"  # a checkpoint's ControlNet, a diffusers folder
DECODER_FILE = "decoder.safetensors"  # the SD decoder a large-scale run trained, beside it
CONFIG_FILE = "train_config.json"  # the run's settings, beside it
PROGRESS_FILE = "progress.json"  # written last into a checkpoint: a checkpoint without it is incomplete
RAY_STORAGE_MARKER = ".validate_storage_marker"  # Ray Train's controller writes it into the run's folder
RAY_RECORD = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it was reported, in the run


def run_url(storage_path: str, run_name: str) -> str:
    return f"{storage_path.rstrip('/')}/{run_name}"


def complete_checkpoints(run: str) -> dict[str, int]:
    """{checkpoint URL: step} of the run's complete checkpoints (Ray Train's and local mode's alike): marked
    (progress.json, written last) and whole (every file progress.json lists, at its size). One damaged since, a
    file deleted or cut, is passed over, and a resume or an export takes the one before it."""
    return whole_ones(marked_checkpoints(run))


def damaged_checkpoints(run: str) -> list[str]:
    """The URLs of the run's checkpoints that are marked complete but lack a file, or hold one at another size."""
    return damaged_ones(marked_checkpoints(run))


def whole_ones(marked: dict[str, tuple[int, bool]]) -> dict[str, int]:
    """{URL: step} of the whole checkpoints among marked_checkpoints'."""
    return {url: step for url, (step, whole) in marked.items() if whole}


def damaged_ones(marked: dict[str, tuple[int, bool]]) -> list[str]:
    """The URLs of the damaged checkpoints among marked_checkpoints', sorted."""
    return sorted(url for url, (_, whole) in marked.items() if not whole)


def marked_checkpoints(run: str) -> dict[str, tuple[int, bool]]:
    """{checkpoint URL: (step, whole)} of the run's checkpoints with a progress.json, from one listing of the run."""
    fs, root = fsspec.core.url_to_fs(run)
    fs.invalidate_cache()
    root = root.rstrip("/")
    sizes = {path: info.get("size") for path, info in fs.find(root, detail=True).items()}
    markers = [path for path in sizes if is_marker(path[len(root) + 1:])]
    found = {}
    for marker in sorted(markers):
        folder = marker.rsplit("/", 1)[0]
        try:
            progress = json.loads(fs.cat_file(marker))
        except FileNotFoundError:  # pruned since the listing (by the run, while an export or a resume looks)
            continue
        files = {path[len(folder) + 1:]: size for path, size in sizes.items() if path.startswith(f"{folder}/")}
        found[fs.unstrip_protocol(folder)] = (progress["step"], is_whole(progress, files))
    return found


def is_marker(path: str) -> bool:
    """'checkpoint_step00000010/progress.json', a path under the run's folder: a checkpoint's mark."""
    folder, _, name = path.partition("/")
    return folder.startswith("checkpoint_") and name == PROGRESS_FILE


def file_sizes(folder: Path) -> dict[str, int]:
    """{path under the folder: size} of every file of a checkpoint folder but progress.json, which lists them."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != PROGRESS_FILE}


def is_whole(progress: dict, found: dict[str, int | None]) -> bool:
    """Every file progress.json lists is in `found` (path under the folder: size) at its size. A progress.json
    written before it listed files says nothing either way: whole."""
    return all(found.get(name) == size for name, size in progress.get("files", {}).items())


def latest_in_run(run: str) -> str | None:
    """The URL of the run's checkpoint with the highest step, or None when the run has none."""
    steps = complete_checkpoints(run)
    return max(steps, key=steps.get) if steps else None


def latest_checkpoint(storage_path: str, run_name: str) -> str | None:
    return latest_in_run(run_url(storage_path, run_name))


def checkpoint_name(step: int) -> str:
    """One name per step, in both modes: a run that dies while publishing step N rewrites the same folder when it
    reaches step N again, instead of leaving an orphan beside it."""
    return f"checkpoint_step{step:08d}"


def step_of(checkpoint: str) -> int:
    """The step a checkpoint's folder is named for (checkpoint_name); -1 for a folder named otherwise."""
    name = checkpoint.rstrip("/").rsplit("/", 1)[-1]
    digits = name.removeprefix("checkpoint_step")
    return int(digits) if digits != name and digits.isdigit() else -1


def upload_order(folder: Path) -> list[Path]:
    """Every file of a checkpoint folder, progress.json last (it marks the checkpoint complete)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return [p for p in files if p.name != PROGRESS_FILE] + [p for p in files if p.name == PROGRESS_FILE]


def publish(folder: Path, run: str, step: int) -> str:
    """Copy a checkpoint written to a local folder to the run's storage; its URL. Storage that fails for a while
    (pipeline.format.retried) is waited out and the copy made again whole: a blip costs the run a pause, not the steps
    since its last checkpoint."""
    return retried(partial(_publish, folder, run, step), f"publishing step {step} of {run}")


def _publish(folder: Path, run: str, step: int) -> str:
    destination = f"{run.rstrip('/')}/{checkpoint_name(step)}"
    fs, root = fsspec.core.url_to_fs(destination)
    unmark(fs, root)  # step N published again (a worker that died after its upload but before Ray recorded it):
    # incomplete before any of its files change
    for path in upload_order(folder):
        target = f"{root}/{path.relative_to(folder).as_posix()}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(path), target)
    return fs.unstrip_protocol(root)


def for_ray(url: str) -> str:
    """A checkpoint's URL as Ray Train's Checkpoint takes it: a local folder as its path, as pyarrow parses a
    file:// URL as a URI, which a space or a '%' in the path breaks ('file:///runs/my runs/...'); others as they
    are."""
    fs, path = fsspec.core.url_to_fs(url)
    return path if isinstance(fs, LocalFileSystem) else url


def publish_from_worker(folder: Path, run: str, step: int) -> str:
    """publish, as Ray Train's upload on a worker (train.loop.report_checkpoint), after the check Ray's own upload
    makes: the run's folder must hold the marker Ray Train's controller wrote there, else this node does not see
    the driver's storage (a local --storage-path on a cluster of several nodes), and each node would keep
    checkpoints of its own that no resume finds."""
    fs, root = fsspec.core.url_to_fs(run)
    marker = f"{root.rstrip('/')}/{RAY_STORAGE_MARKER}"
    if not retried(partial(fs.exists, marker), f"looking for {fs.unstrip_protocol(marker)}"):
        raise RuntimeError(f"this worker's node cannot see the run's storage ({run}): on a cluster of several "
                           "nodes, --storage-path must be s3://... or a filesystem every node mounts")
    return publish(folder, run, step)


def prune(run: str, keep: int) -> list[str]:
    """Delete all but the `keep` newest complete checkpoints (as Ray Train's num_to_keep), and incomplete or
    damaged ones older than the newest; the deleted URLs."""
    return retried(partial(_prune, run, keep), f"pruning the checkpoints of {run}")


def newest_first(steps: dict[str, int]) -> list[str]:
    """The checkpoint URLs of {URL: step}, the highest step first: the first --keep-checkpoints are kept."""
    return sorted(steps, key=steps.get, reverse=True)


def _prune(run: str, keep: int) -> list[str]:
    steps = complete_checkpoints(run)
    deleted = newest_first(steps)[keep:] + abandoned(steps, checkpoint_folders(run))
    for url in deleted:
        _remove(url)
    return deleted


def abandoned(steps: dict[str, int], folders: list[str]) -> list[str]:
    """The folders among `folders` that are not complete (a publish or a deletion cut short, or damaged since) below
    the newest complete step of `steps`: nothing completes them, since the run resumes from that newest one and
    writes only later steps."""
    newest = max(steps.values(), default=-1)
    return [url for url in folders if url not in steps and 0 <= step_of(url) < newest]


def checkpoint_folders(run: str) -> list[str]:
    """The URLs of every checkpoint folder in the run, complete or not."""
    fs, root = fsspec.core.url_to_fs(run)
    found = fs.glob(f"{root.rstrip('/')}/checkpoint_*", detail=True)
    return [fs.unstrip_protocol(path) for path, info in found.items() if info["type"] == "directory"]


def unmark(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Make a checkpoint folder incomplete (its progress.json gone), before anything else in it changes."""
    with suppress(FileNotFoundError):
        fs.rm_file(f"{root.rstrip('/')}/{PROGRESS_FILE}")


def _remove(url: str) -> None:
    """Delete a checkpoint, unmarked first: one whose deletion is cut short (a process killed, the storage gone)
    is then an incomplete folder, never one that passes for complete without its weights."""
    fs, path = fsspec.core.url_to_fs(url)
    unmark(fs, path)
    fs.rm(path, recursive=True)


def unrecorded_checkpoints(run: str, recorded_step: int) -> list[str]:
    """The run's complete checkpoints newer than the last one Ray Train recorded (`recorded_step`, -1 when it has
    none): published by an attempt that died before Ray recorded them, or by a run of Ray Train's local mode,
    which keeps no record. Ray's num_to_keep never deletes these (retire_unrecorded does)."""
    return newer_than(complete_checkpoints(run), recorded_step)


def newer_than(steps: dict[str, int], recorded_step: int) -> list[str]:
    """The URLs in `steps` ({URL: step}) of the steps after `recorded_step`, oldest first."""
    return sorted((url for url, step in steps.items() if step > recorded_step), key=steps.get)


def retire_unrecorded(run: str, unrecorded: list[str], keep: int) -> list[str]:
    """Delete the checkpoints Ray Train never recorded once `keep` newer ones are complete, as its num_to_keep
    deletes the ones it recorded (only these: deleting one Ray recorded would break its own pruning), and damaged
    ones once a newer one is complete; the ones still kept."""
    return retried(partial(_retire_unrecorded, run, unrecorded, keep), f"pruning the checkpoints of {run}")


def _retire_unrecorded(run: str, unrecorded: list[str], keep: int) -> list[str]:
    steps = complete_checkpoints(run)
    present = set(checkpoint_folders(run))
    kept = set(newest_first(steps)[:keep])
    # a complete one once it ages out; a damaged one once a newer one is complete, as prune deletes it
    retired = {url for url in unrecorded if url in steps and url not in kept}
    retired |= set(abandoned(steps, [url for url in unrecorded if url in present]))
    for url in sorted(retired):
        _remove(url)
    return [url for url in unrecorded if url in present and url not in retired]  # one gone (by hand) is forgotten


def recorded_names(record: dict) -> set[str]:
    """The checkpoint folders Ray Train's record (RAY_RECORD, as parsed) names: those it keeps, and its latest."""
    results = [*record.get("checkpoint_results", []), record.get("latest_checkpoint_result") or {}]
    return {r["checkpoint_dir_name"] for r in results if r.get("checkpoint_dir_name")}


def forget_stale_ray_record(run: str) -> str | None:
    """Delete Ray Train's record of the run's checkpoints where it names a folder that is gone (local mode prunes the
    run's checkpoints itself, those Ray recorded too), or cannot be read (Ray writes it in place: on local disk a kill
    in that write leaves it empty or cut short): Ray Train refuses to start a run whose record names a missing
    checkpoint or does not parse ("a corrupted run directory"), so such a run could never go on on workers.
    Without the record, train.loop.restore resumes from the newest complete checkpoint on storage, and retires the
    ones Ray had recorded as they age out. What was wrong with the record it deleted, if it did."""
    fs, root = fsspec.core.url_to_fs(run)
    record = f"{root.rstrip('/')}/{RAY_RECORD}"
    try:
        names = recorded_names(json.loads(fs.cat_file(record)))
    except FileNotFoundError:
        return None
    except (ValueError, AttributeError, TypeError, KeyError):  # not JSON (UnicodeDecodeError too), or not a record
        fs.rm_file(record)
        return "cannot be read (a kill cut its write short)"
    present = {url.rstrip("/").rsplit("/", 1)[-1] for url in checkpoint_folders(run)}
    missing = sorted(names - present)
    if not missing:
        return None
    fs.rm_file(record)
    return f"names {', '.join(missing)}, deleted since (pruned by a run in local mode)"


def fetch(url: str, folder: Path) -> Path:
    """Download a checkpoint into a local folder (for loading: a resume, an export); the folder. Storage that fails
    for a while is waited out, and the download made again whole."""
    return retried(partial(_fetch, url, folder), f"fetching {url}")


@contextmanager
def scratch_folder(purpose: str, owner: str) -> Iterator[Path]:
    """An empty local folder of `owner`'s (a run's rank) for `purpose` (a checkpoint being saved or loaded), under
    `<temp>/controlnet-<purpose>/`, of this process's own and claimed while in use (annotate.weights.claimed), and
    removed after. A checkpoint is gigabytes at SD scale, and a process that dies in it leaves it: a stop on Ray
    workers (Ray Train ends them with a kill), an OOM kill, kill -9. Each use first removes what killed processes of
    this host left there, whichever run's: a folder per owner alone was replaced only by the same run's same rank,
    on the same node."""
    from annotate.weights import claim_name, claimed, clear_abandoned

    root = Path(tempfile.gettempdir()) / f"controlnet-{purpose}"
    root.mkdir(parents=True, exist_ok=True)
    owner_hash = hashlib.sha256(owner.encode()).hexdigest()[:16]
    clear_abandoned(root)
    shutil.rmtree(root / owner_hash, ignore_errors=True)  # the owner's folder before folders were claimed
    folder = root / claim_name(owner_hash)
    with claimed(folder):
        folder.mkdir()
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def loadable(url: str, owner: str) -> Iterator[Path]:
    """A checkpoint as a local folder to load from: a local one in place (a copy is gigabytes of disk and minutes
    for nothing), another downloaded into `owner`'s scratch_folder."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        yield Path(path)
        return
    with scratch_folder("fetch", owner) as folder:
        yield fetch(url, folder)


def _fetch(url: str, folder: Path) -> Path:
    fs, root = fsspec.core.url_to_fs(url)
    for path in fs.find(root):
        target = folder / path[len(root.rstrip("/")) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(target))
    return folder
