"""the output shard format: the one contract between the dataset job and the trainer. It names the files and
members, and it is the one place that lists a dataset's committed shards and reads their stats, indexes and the
manifest (the dataset job, the trainer, the preview and the subsets all read through it), how both sides ride
out an outage of the storage they share and find the cluster they share, and the command line both sides' jobs
parse."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import posixpath
import select
import signal
import socket
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any, Final, NoReturn, TypeVar

import fsspec
import numpy as np

# 1: one condition task per dataset. 2: one or more (python -m pipeline.build --task canny,hed): the manifest lists
# "tasks"; with several, a sample holds one <task>.png per task that kept it, its index row a status and error per
# task (task_status_column), its json params by task, and a shard's stats counts by task ("task_counts"). A
# single-task dataset is written exactly as in version 1, and version 1 datasets read as single-task ones.
FORMAT_VERSION: Final = 2

# statuses of a parquet row: every input sample lands in exactly one row with one of these
OK: Final = "ok"
FILTERED: Final = "filtered"
FAILED: Final = "failed"
STATUSES: Final = (OK, FILTERED, FAILED)

MANIFEST: Final = "manifest.json"
SHARDS_DIR: Final = "shards"

# per-shard files, named after the input shard; stats.json is written last and marks the shard done
TAR_SUFFIX: Final = ".tar"
INDEX_SUFFIX: Final = ".parquet"
STATS_SUFFIX: Final = ".stats.json"

# members of one sample inside an output tar
IMAGE_EXT: Final = "jpg"
CAPTION_EXT: Final = "txt"
META_EXT: Final = "json"
# optional (python -m pipeline.build --latents BASE): the base VAE's latent distribution of the stored image, an
# .npy of (2, C, H/8, W/8) float16, mean then std; the manifest's "latents" names the VAE (its sha256)
LATENT_EXT: Final = "latent.npy"


def latent_npy(distribution: np.ndarray) -> bytes:
    """A latent distribution (2, C, h, w) as the bytes of its <key>.latent.npy member."""
    buffer = io.BytesIO()
    np.save(buffer, distribution, allow_pickle=False)
    return buffer.getvalue()


def read_latent_npy(data: bytes) -> np.ndarray:
    """A <key>.latent.npy member's array (no pickles: the bytes come from storage)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def condition_ext(task: str) -> str:
    """The condition member's extension, e.g. `hed.png` for <key>.hed.png."""
    return f"{task}.png"


def task_status_column(task: str) -> str:
    """The index column of a multi-task dataset holding `task`'s status of each sample."""
    return f"status_{task}"


def task_error_column(task: str) -> str:
    """The index column of a multi-task dataset holding why `task` filtered or failed a sample."""
    return f"error_{task}"


def task_status(row: dict[str, Any], task: str) -> str:
    """A sample's status for one task: its task column in a multi-task index, else the row's own status."""
    return row.get(task_status_column(task)) or row["status"]


def dataset_tasks(manifest: dict[str, Any]) -> list[str]:
    """The condition tasks a dataset's manifest lists (version 1 manifests name one, as "task")."""
    return list(manifest.get("tasks") or ([manifest["task"]] if manifest.get("task") else []))


def task_counts(stats: dict[str, Any], task: str) -> dict[str, int]:
    """A shard's samples by status for one task (a single-task shard's own counts)."""
    return (stats.get("task_counts") or {}).get(task) or stats["counts"]


# parquet index columns, one row per input sample (a multi-task index adds status_<task> and error_<task>)
INDEX_COLUMNS: Final = (
    "key",  # output key (no dots), or the best-effort key of a sample that failed early
    "source_key",  # the key as it appeared in the input shard
    "status",
    "error",  # why it failed or was filtered; empty when ok
    "original_width",
    "original_height",
    "width",
    "height",
    "caption",
    "caption_source",  # source | blip | none
    "params",  # annotator parameters as a JSON string
)


def key_hash(key: str) -> int:
    """A stable order of sample keys (unlike hash(), the same in every process and Python version): subsets break
    ties with it, and the trainer picks its validation samples by it, so a choice never depends on listing order."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class CommittedShard:
    """One committed output shard (its stats.json exists: it is written last): its name and its files' URLs."""

    name: str
    tar: str
    index: str
    stats: str


def committed_shards(dataset: str) -> list[CommittedShard]:
    """The dataset's committed shards, by name, as URLs in the dataset's own style (plain local paths stay plain).
    A tar or parquet whose stats.json is missing belongs to a shard still being written, or abandoned: not listed."""
    fs, root = fsspec.core.url_to_fs(dataset)
    fs.invalidate_cache()  # other processes commit shards: a cached listing would be stale
    like = fs.unstrip_protocol if "://" in dataset else str
    shards = []
    for stats in sorted(fs.glob(f"{root.rstrip('/')}/{SHARDS_DIR}/*{STATS_SUFFIX}")):
        base = stats.removesuffix(STATS_SUFFIX)
        shards.append(CommittedShard(base.rsplit("/", 1)[-1], like(base + TAR_SUFFIX), like(base + INDEX_SUFFIX),
                                     like(stats)))
    return shards


def no_shards_error(dataset: str, named_as: str = "") -> FileNotFoundError:
    """Why a dataset lists no committed shard: a folder that is not there (a typo) says so, rather than what a
    dataset folder would lack. `named_as`: the flag the user gave it with, for the message."""
    fs, path = fsspec.core.url_to_fs(dataset)
    if not fs.exists(path):
        return FileNotFoundError(f"{named_as}{dataset}: no such dataset folder")
    return FileNotFoundError(f"no committed shards (*{STATS_SUFFIX}) in {dataset}/{SHARDS_DIR}")


def read_stats(shards: list[CommittedShard]) -> list[dict[str, Any]]:
    """The shards' stats.json (in no particular order: each names its shard), fetched in one concurrent batch
    (object stores answer slowly one at a time)."""
    if not shards:
        return []
    fs, _ = fsspec.core.url_to_fs(shards[0].stats)
    blobs = fs.cat([fsspec.core.url_to_fs(s.stats)[1] for s in shards])  # a list in: a {path: bytes} out
    return [json.loads(b) for b in blobs.values()]


def read_index(shard: CommittedShard, columns: list[str] | None) -> dict[str, list]:
    """Columns of a shard's parquet index (one row per input sample; None: every column), as lists."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # the file whole, in one request (an index is one row per input sample: small), then parsed from memory on this
    # thread alone: no Python file under Arrow, whose reads called back into Python from C++ (a thread still
    # waiting on the storage when a stopped process exits is then in Python alone, which the interpreter ends
    # cleanly), and whose last buffer, released by an Arrow pool thread as the interpreter exited, aborted the
    # process ("terminate called without an active exception", exit 134: train.subsets in about one run in ten)
    fs, path = fsspec.core.url_to_fs(shard.index)
    with pq.ParquetFile(pa.BufferReader(fs.cat_file(path))) as index:
        return index.read(columns=columns, use_threads=False).to_pydict()


_T = TypeVar("_T")
INDEX_READ_THREADS: Final = 16  # parquet indexes fetched concurrently (object stores answer slowly one at a time)


def each_index(shards: list[CommittedShard], columns: list[str],
               reduce: Callable[[CommittedShard, dict[str, list]], _T]) -> list[_T]:
    """`reduce(shard, its index columns)` for each shard, the indexes read concurrently, in the shards' order:
    only what `reduce` keeps of each index stays in memory."""
    return concurrently(lambda shard: reduce(shard, read_index(shard, columns)), shards, INDEX_READ_THREADS)


_I = TypeVar("_I")


def concurrently(call: Callable[[_I], _T], items: list[_I], threads: int) -> list[_T]:
    """call(item) for each item on up to `threads` daemon threads, the results in the items' order. The first error,
    in a call or in the caller (Ctrl-C, SIGTERM), ends it at once: no item is started after it, and the calls
    under way are left to their threads, which neither this nor the process's exit waits for. (A
    ThreadPoolExecutor joins its threads on the way out and at exit: a Ctrl-C while 3,000 indexes were read from
    an S3 endpoint that had stopped answering ended the process after 225 s, its requests' timeouts and retries.)
    Of the calls that failed before it ended, the error of the first in the items' order is raised."""
    results: list[Any] = [None] * len(items)
    lock = threading.Lock()
    pending = iter(range(len(items)))
    errors: dict[int, BaseException] = {}
    left = [len(items)]
    over = threading.Event()

    def work() -> None:
        while not over.is_set():
            with lock:
                i = next(pending, None)
            if i is None:
                return
            try:
                results[i] = call(items[i])
            except BaseException as error:  # raised in the caller's thread
                with lock:
                    errors[i] = error
                over.set()
                return
            with lock:
                left[0] -= 1
                if not left[0]:
                    over.set()

    if not items:
        return []
    for n in range(min(threads, len(items))):
        threading.Thread(target=work, daemon=True, name=f"concurrently-{n}").start()
    try:
        over.wait()
    finally:
        over.set()  # a stop in the caller: no thread takes another item
    if errors:
        raise errors[min(errors)]
    return results


# ---------------------------------------------------------------- riding out storage outages
# Both sides read and write shards, checkpoints and results on the same object stores: an error of the connection
# (refused, reset, timed out, a 5xx) is retried with backoff for a bounded time, so a blip of the store costs a long
# job a pause, not its progress; an error the storage would give again (a missing object, access refused) is not.

log = logging.getLogger(__name__)
# how long one outage is waited out before its error stands (the environment sets it for every process of a job)
PATIENCE_S = float(os.environ.get("CONTROLNET_STORAGE_PATIENCE_S", "120"))
FIRST_WAIT_S, LONGEST_WAIT_S = 1.0, 15.0
_ANSWERS_FOR_GOOD = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# a disk that is full, over its quota or read-only answers the same until someone acts: no outage to wait out
_FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}



class StorageOutage(OSError):
    """The storage stayed unreachable for the whole patience."""


def is_transient(error: BaseException) -> bool:
    """Whether the storage may answer differently if asked again. OSErrors are (ConnectionError, TimeoutError,
    aiohttp's connection errors, what s3fs makes of a 5xx) but for the answers a retry would only repeat; botocore's
    connection errors are not OSErrors, and are named for what they are (EndpointConnectionError, ReadTimeoutError,
    ConnectionClosedError), as are the errors of a response cut part-way (aiohttp's ClientPayloadError, botocore's
    ResponseStreamingError and IncompleteReadError, http.client's IncompleteRead)."""
    if isinstance(error, (*_ANSWERS_FOR_GOOD, StorageOutage)) or getattr(error, "errno", None) in _FULL_OR_READ_ONLY:
        return False
    if isinstance(error, OSError):
        return True
    return any(word in cls.__name__ for cls in type(error).__mro__ for word in _NAMED_TRANSIENT)


_NAMED_TRANSIENT = ("Connection", "Timeout", "Payload", "Streaming", "IncompleteRead")
STORAGE_LIBRARIES = {"botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs", "fsspec", "google", "azure", "aiohttp",
                     "http", "urllib3"}


def storage_error(error: BaseException) -> bool:
    """Whether storage raised it (the OS, or an object store's client library), as opposed to a bug of ours."""
    return isinstance(error, OSError) or type(error).__module__.split(".")[0] in STORAGE_LIBRARIES


def storage_refusal(error: BaseException) -> str | None:
    """An error the storage raised (an endpoint that refuses, a bucket that is not there), as a command's one line
    says it: its type and first line; None for any other error, a bug, which keeps its traceback."""
    if not storage_error(error):
        return None
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


class StorageFailed(Exception):
    """A storage error as a command says it in one line: "<what> failed: <type>: <first line>"."""


@contextlib.contextmanager
def refusing_storage_failures(what: str, keep: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """An error the storage raises in the block (storage_refusal) comes out as StorageFailed naming `what` failed,
    from None: botocore's traceback, from a command's first listing, said it in forty lines. `keep`: the errors
    (OSErrors) a command says in its own words, such as a dataset that is not there, which pass unchanged, as does
    any error not the storage's (a bug, with its traceback)."""
    try:
        yield
    except keep:
        raise
    except Exception as e:
        if (refusal := storage_refusal(e)) is None:
            raise
        raise StorageFailed(f"{what} failed: {refusal}") from None


STOP_READ_S = 10.0  # a stop's last storage call: a stop is often the answer to an outage, and SIGTERM's sender
# (a pod's eviction, a batch scheduler) SIGKILLs ~30 s later


def answer_within(timeout_s: float, call: Callable[[], _T]) -> _T:
    """call()'s result, or its exception; TimeoutError when it has not returned within `timeout_s`. For the calls a
    stop makes to a storage that may not answer: an endpoint that accepts and never answers holds one for ~7 min
    (s3fs's and botocore's retries of their read timeouts). It goes on in a daemon thread, which does not hold the
    process at exit."""
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as e:  # handed to the caller, as call() would have raised it
            outcome.append((False, e))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        raise TimeoutError(f"no answer within {timeout_s:.0f} s")
    returned, value = outcome[0]
    if returned:
        return value
    raise value


def wait_before_try(tries: int) -> float:
    """Seconds to wait before retry number `tries` (1, 2, ...): doubling from FIRST_WAIT_S, at most LONGEST_WAIT_S."""
    return min(FIRST_WAIT_S * 2 ** (tries - 1), LONGEST_WAIT_S)


class Outage:
    """One outage, waited out: `wait(error)` sleeps before the next try, and raises StorageOutage (from the error)
    once `patience_s` have passed since the outage's first error; `over()` after a success starts the count again."""

    def __init__(self, what: str, patience_s: float | None = None, clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], None] | None = None):
        self.what, self.clock, self.sleep = what, clock or time.monotonic, sleep or time.sleep
        self.patience_s = PATIENCE_S if patience_s is None else patience_s
        self.began: float | None = None
        self.tries = 0

    def wait(self, error: BaseException) -> None:
        now = self.clock()
        if self.began is None:
            self.began = now
        waited = now - self.began
        if waited >= self.patience_s:
            raise StorageOutage(f"{self.what}: the storage failed for {waited:.0f} s; last error: "
                                f"{type(error).__name__}: {error}") from error
        self.tries += 1
        pause = min(wait_before_try(self.tries), max(self.patience_s - waited, 0.0))
        log.warning("%s: %s: %s; trying again in %.0f s", self.what, type(error).__name__, error, pause)
        self.sleep(pause)

    def over(self) -> None:
        self.began, self.tries = None, 0


def retried(call: Callable[[], _T], what: str, patience_s: float | None = None) -> _T:
    """call(), tried again while it fails with a transient storage error, for up to `patience_s`. `call` must be
    safe to repeat from its start."""
    outage = Outage(what, patience_s)
    while True:
        try:
            return call()
        except Exception as error:
            if not is_transient(error):
                raise
            outage.wait(error)


def _reraise(exn: BaseException) -> bool:
    raise exn


# on every sample shard_samples yields: the byte offset in its tar where the next sample's first header begins (a
# stream resumes there: shard_samples([{"url": ..., "offset": ...}])), or None after a shard's last sample
NEXT_OFFSET: Final = "__next_offset__"
# on a sample: its members over the read cap, {extension: size in bytes}, left unread (their bytes are skipped, not
# held): the dataset job writes members of a few hundred KB, so one of this size is not its output
OVERSIZED: Final = "__oversized__"
MAX_MEMBER_BYTES: Final = 64 << 20


def shard_samples(shards: Iterable[dict[str, Any]], handler: Callable[[BaseException], bool] = _reraise,
                  opened: Callable[[], None] | None = None,
                  patience_s: float | None = None) -> Iterator[dict[str, Any]]:
    """Output tars ({"url": ...} each, as a webdataset stage receives them; with "offset", read from that byte
    on, where a sample begins) -> their samples, grouped by key: {"__key__", "__url__", NEXT_OFFSET, "jpg",
    "<task>.png", "txt", "json", ...} with the members' bytes. Streamed with fsspec (s3://, gs://, local:
    webdataset's own opener would need the aws CLI for s3; an offset is one ranged read from there). The
    trainer's stream, its validation set and the preview read through here.

    A connection that fails (is_transient) is opened again where the next unread sample begins,
    with backoff, for up to `patience_s` of one outage (then StorageOutage is raised): a blip neither skips nor
    repeats a sample. Other read errors (a shard that is missing, a corrupt tar, a compressed one cut after its
    first sample, which has no offsets to resume at) go to `handler`, and the rest of that shard is passed over
    if it returns True, as webdataset's handlers do. `opened` is called as each shard is opened."""
    for shard in shards:
        if opened is not None:
            opened()
        url, resume_at = shard["url"], shard.get("offset") or 0
        outage = Outage(f"reading {url}", patience_s)
        while resume_at is not None:
            try:
                with fsspec.open(url, "rb") as stream:
                    stream.seek(resume_at)
                    for sample in tar_samples(stream, url, resume_at):
                        outage.over()
                        resume_at = sample[NEXT_OFFSET]  # None after the last (or in a compressed tar)
                        yield sample
                break
            except Exception as exn:
                if resume_at is not None and is_transient(exn):
                    outage.wait(exn)
                    continue
                exn.args = (*exn.args, url)
                if not handler(exn):
                    return
                break


def is_meta_member(name: str) -> bool:
    """webdataset's rule for a member that is not a sample's ('__index__'); a key may start with '__'."""
    return "/" not in name and name.startswith("__") and name.endswith("__")


def tar_samples(stream: IO[bytes], url: str, start: int = 0,
                max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict[str, Any]]:
    """A tar stream's samples (consecutive members sharing a key, by webdataset's naming rule), the stream read
    from byte `start` of the tar. A member named twice in a row starts a new sample (the dataset job never writes
    one). NEXT_OFFSET is known without reading ahead of what grouping reads anyway: the header that ends a sample
    is the next one's first; in a compressed tar, offsets are not file positions, so it is None. A member over
    `max_member_bytes` is not read into memory: the sample names it under OVERSIZED instead."""
    from webdataset.tariterators import base_plus_ext

    tar = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 (a stream: nothing to close but the file)
    positional = getattr(tar.fileobj, "comptype", "tar") == "tar"
    sample: dict[str, Any] | None = None
    for info in tar:
        key, ext = base_plus_ext(info.name)
        if not info.isreg() or key is None or is_meta_member(info.name):
            continue  # folders, links, webdataset's __meta__ members
        ext = ext.lower()
        if sample is not None and (key != sample["__key__"] or ext in sample):
            sample[NEXT_OFFSET] = start + info.offset if positional else None
            yield sample
            sample = None
        if sample is None:
            sample = {"__key__": key, "__url__": url}
        tar.members = []  # a stream-mode TarFile keeps every member's TarInfo otherwise
        if info.size > max_member_bytes:
            sample.setdefault(OVERSIZED, {})[ext] = info.size  # the stream skips its bytes at the next header
            continue
        sample[ext] = data = tar.extractfile(info).read()
        if len(data) != info.size:
            raise tarfile.ReadError(f"{url}: the file ends inside {info.name}")
    if sample is not None:
        sample[NEXT_OFFSET] = None
        yield sample


class SampleTarWriter:
    """Samples into one tar stream, member for member as webdataset's TarWriter(encoder=False, mtime=0) writes them
    (the same bytes: a test compares): <key>.<ext> in sorted order, mode 0444, mtime 0, owner "bigdata", so the same
    samples make the same tar. Not TarWriter itself: importing webdataset imports torch, 2.5 s of the start of every
    dataset actor and driver, which a Canny job otherwise never pays."""

    OWNER: Final = "bigdata"

    def __init__(self, fileobj: IO[bytes]):
        self.tar = tarfile.open(fileobj=fileobj, mode="w|")  # noqa: SIM115 (closed in close())

    def write(self, key: str, members: Mapping[str, bytes]) -> None:
        for ext in sorted(members):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(members[ext]), 0, 0o444
            info.uname = info.gname = self.OWNER
            self.tar.addfile(info, io.BytesIO(members[ext]))

    def close(self) -> None:
        self.tar.close()

    def __enter__(self) -> SampleTarWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_refusal(folder: str) -> str | None:
    """Why storage refuses a file in `folder` (one written there and removed), in a line: a bucket that does not
    exist, a read-only key, a file where the folder goes; None when it takes it, or does not answer (left to the
    caller's own patience). A local folder is made (an object store's makedirs would create a bucket)."""
    from fsspec.implementations.local import LocalFileSystem

    probe = f"{folder.rstrip('/')}/.write-check-{os.getpid()}"
    try:
        fs, path = fsspec.core.url_to_fs(probe)
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(fs._parent(path), exist_ok=True)
        fs.pipe_file(path, b"")
        fs.rm_file(path)
    except Exception as e:
        if is_transient(e):
            return None
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def write_whole(url: str, data: bytes) -> None:
    """Write `data` to `url` whole or not at all: on a local disk to a temporary name of this process's, then
    renamed (atomic on one disk), so a process killed mid-write leaves the file before (or none), never part of
    one, and two writers never share a temporary file; an object store's PUT is whole as it is."""
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(url)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


def read_manifest(dataset: str) -> dict[str, Any]:
    """The dataset's manifest.json; {} when it has none (tars given without their dataset)."""
    fs, root = fsspec.core.url_to_fs(f"{dataset.rstrip('/')}/{MANIFEST}")
    return json.loads(fs.cat_file(root)) if fs.exists(root) else {}


def shard_paths(out: str, name: str) -> dict[str, str]:
    """URLs of the files one output shard consists of."""
    base = f"{out.rstrip('/')}/{SHARDS_DIR}/{name}"
    return {"tar": base + TAR_SUFFIX, "index": base + INDEX_SUFFIX, "stats": base + STATS_SUFFIX}


# a subset manifest (dataset-size ablations, held-out splits): a JSON object that names shards and the keys to keep
SUBSET_SHARDS: Final = "shards"  # list of tar URLs; relative ones resolve against the subset file's folder
SUBSET_KEYS: Final = "keys"  # list of sample keys to keep (keys are unique across one dataset's shards)
SUBSET_TASK: Final = "task"  # the condition task, as in the dataset manifest
SUBSET_VALIDATION: Final = "validation"  # optional: URL of the held-out validation subset manifest to score on


def url_from(folder: str, url: str) -> str:
    """A URL as a manifest in `folder` writes it: relative ones ('../shards/00000.tar') resolve against the folder
    (local or an object store's, where '..' is no path of its own)."""
    if "://" in url or url.startswith("/"):
        return url
    protocol, separator, path = folder.rstrip("/").rpartition("://")
    return f"{protocol}{separator}{posixpath.normpath(f'{path}/{url}')}"


def url_within(url: str, folder: str, root: str) -> str:
    """`url` as a manifest in `folder` writes it: relative where both lie in `root` (a dataset and the subsets in
    it: a copy or a move of the whole dataset keeps them readable, and never reads the original), else as it is."""
    prefix = root.rstrip("/") + "/"
    target, start = url.rstrip("/") + "/", folder.rstrip("/") + "/"
    if not (target.startswith(prefix) and start.startswith(prefix)):
        return url
    return posixpath.relpath("/" + target[len(prefix):], "/" + start[len(prefix):])


def subset_manifest(shards: list[str], keys: list[str], task: str) -> dict[str, object]:
    """The JSON object of a subset manifest."""
    return {SUBSET_TASK: task, SUBSET_SHARDS: list(shards), SUBSET_KEYS: sorted(keys)}


class ClusterUnreachable(RuntimeError):
    """RAY_ADDRESS names a cluster this driver cannot reach: one line, where ray.init waited without end (a
    HOST:PORT nothing listens on) or raised a traceback ('auto' with no cluster)."""


def ray_address_refusal(address: str | None, timeout_s: float = 10.0) -> str | None:
    """Why the cluster RAY_ADDRESS names does not answer, in a line; None when its head's port takes a connection,
    or when ray.init answers the address itself ('auto', 'local', ray:// through Ray Client's own timeout).
    Shared by the dataset job's and the trainer's drivers, as write_refusal is."""
    if not address or address in {"auto", "local"} or "://" in address:
        return None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return f"RAY_ADDRESS={address!r} is not HOST:PORT (a cluster head's GCS address), 'auto' or ray://"
    import socket

    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        return (f"RAY_ADDRESS={address}: no Ray cluster answers there ({type(e).__name__}: {e}); start its head "
                f"(ray start --head) or unset RAY_ADDRESS to start a cluster in this process")
    return None


def join_ray(address: str | None, **init_kwargs: Any) -> None:
    """ray.init(address, ...), an address no cluster answers at raised as ClusterUnreachable (one line) first. This
    driver's signals stay Python's (keep_rays_failure_handler_out)."""
    import ray

    refusal = ray_address_refusal(address)
    if refusal:
        raise ClusterUnreachable(refusal)
    keep_rays_failure_handler_out()
    before = set(descendants())
    try:
        ray.init(address=address, **init_kwargs)
    except ConnectionError as e:  # 'auto' with no cluster on this node
        raise ClusterUnreachable(f"RAY_ADDRESS={address}: {(str(e).splitlines() or [''])[0]}") from None
    except BaseException:  # a stop (Ctrl-C; SIGTERM, ray.init's SystemExit(15)) while ray.init starts a cluster here
        global _ray_init_cut_short
        _ray_init_cut_short = True
        take_sigterm_back_from_ray()  # before the seconds leaving Ray takes
        leave_half_started_ray(before)
        raise
    else:
        take_sigterm_back_from_ray()


_ray_init_cut_short = False  # a stop reached join_ray inside ray.init


def end_process(code: int) -> NoReturn:
    """sys.exit(code), for a driver that has said its last line; os._exit(code), its output flushed, where a stop cut
    ray.init short: it can leave the C++ core worker built and owned by nothing, which neither ray.shutdown() nor
    Ray's atexit hook ends, and the interpreter's own teardown of it crashed the process (SIGSEGV ~5 s after the
    line: 4 of 30 SIGTERMs while a dataset job started its cluster)."""
    if _ray_init_cut_short:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def exit_with_last_line(code: int, last_line: str) -> NoReturn:
    """Print a command's last line and end the process at once (os._exit, its output flushed): no Ray disconnect,
    atexit hook or interpreter teardown. The leases it holds are released first, as the blocks holding them are
    skipped (a lease left behind held the output or run for STALE_S on other hosts)."""
    release_held_leases()
    print(last_line, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def keep_rays_failure_handler_out() -> None:
    """Have the core worker that ray.init builds in this driver leave out Ray's C++ failure handler (absl's), which
    it installs on SIGTERM among the crash signals, in front of Python's handlers. A SIGTERM it met armed a 3 s alarm
    that aborted the stop's clean-up (take_sigterm_back_from_ray). And ray.shutdown() resets those signals to their
    default action behind Python's back (RayLog::UninstallSignalAction): a SIGTERM from there on killed the driver
    before its last line (exit -15: 1 of 3 tries of a run sent SIGTERM, then its process group 1 s later). The
    constant is Ray's own switch, read when the core worker is built; set here rather than in the environment, as
    Ray's processes inherit that and keep their handler. A crash prints the Python threads' stacks instead
    (faulthandler)."""
    import faulthandler

    import ray._private.ray_constants as ray_constants

    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    if not faulthandler.is_enabled():
        with contextlib.suppress(Exception):  # (a stderr without a file descriptor: a caller's capture)
            faulthandler.enable()


def take_sigterm_back_from_ray() -> None:
    """Python's SIGTERM handler (ray.init's sys.exit, or the caller's) put back in front of the C++ failure handler
    (absl's), should ray.init's core worker have installed it over it all the same (keep_rays_failure_handler_out
    is Ray's switch, not a promise), and the alarm that handler arms cancelled. A SIGTERM it met logged a stack,
    was passed on to Python, and armed a 3 s alarm that aborted the process: a stop whose line and clean-up took
    longer (leaving a half-started Ray; closing a W&B run) ended in SIGABRT after its line (and once, in a suite
    run on a loaded machine, had not ended 60 s later)."""
    if threading.current_thread() is threading.main_thread():
        handler = signal.getsignal(signal.SIGTERM)
        if handler is not None:  # (None: a handler Python did not set, which it cannot set again)
            signal.signal(signal.SIGTERM, handler)
    signal.alarm(0)  # (this process sets no alarm of its own)


def leave_half_started_ray(before: set[int]) -> None:
    """Leave Ray, then kill what an interrupted ray.init started that is left (this process's descendants, less
    those `before` it). Most of ray.init's seconds go into Node(), which starts the GCS and the raylet, the raylet
    its dashboard and runtime-env agents, and waits for the raylet to register: until Node() returns, Ray's global
    node is unset, so neither ray.shutdown() nor Ray's atexit hook knows of those processes. The GCS and raylet
    died with this process (PR_SET_PDEATHSIG), but the agents, waiting on a GCS that was gone, lived on for good."""
    import ray

    started = [pid for pid in descendants() if pid not in before]  # listed now: the agents outlive their raylet
    try:
        ray.shutdown()  # Ray's node once Node() returned (a core worker whose raylet was killed under it crashed)
    finally:
        kill_stopped_first(started, before)


def connected_ray_node():
    """Ray's record of the node this process connected to (ray._private.node.Node; private: there is no public one):
    the processes it started, if it started the cluster; None before ray.init and in local mode."""
    import ray

    return getattr(ray._private.worker, "_global_node", None)


def started_its_own_cluster() -> bool:
    """Whether this process started the cluster it is connected to, whose processes share its process group."""
    node = connected_ray_node()
    return node is not None and node.is_head()


def own_cluster_processes() -> list[int]:
    """The processes Ray started for the cluster this process started (GCS, raylet, monitors: the raylet's own
    children, agents and workers, are theirs)."""
    node = connected_ray_node()
    return [info.process.pid for infos in node.all_processes.values() for info in infos] if node else []


def own_cluster_alive() -> bool:
    """Whether every process of the cluster this process started (GCS, raylet, ...) still runs."""
    node = connected_ray_node()
    return node is None or node.remaining_processes_alive()


def kill_process_trees(roots: Iterable[int]) -> None:
    """SIGKILL the processes `roots` and their descendants, all stopped before any is killed (kill_stopped_first),
    so that none sees another die and acts on it: a raylet starting another worker, a GCS announcing its raylet's
    death to the drivers still connected. This process's other children are spared."""
    roots = list(roots)
    if not roots:  # (descendants() of none is this process's own)
        return
    trees = list(dict.fromkeys([*roots, *descendants(*roots)]))  # (one reading of /proc for all of them)
    kill_stopped_first(trees, spare=set(descendants()) - set(trees))


def signal_each(pids: Iterable[int], signum: int) -> None:
    """os.kill each of `pids` with `signum`, those gone (or not ours to signal) skipped."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signum)


def kill_stopped_first(pids: list[int], spare: set[int]) -> None:
    """SIGKILL `pids` and this process's descendants not in `spare`, each stopped (SIGSTOP) before any is killed: a
    raylet that saw an agent die, or that was forking one as the list was read, started another, which the list
    missed."""
    frozen: list[int] = []
    while pids:
        signal_each(pids, signal.SIGSTOP)
        for pid in pids:
            wait_stopped(pid)  # a fork under way when the signal came has its child listed by then
        frozen += pids
        pids = [pid for pid in descendants() if pid not in spare and pid not in frozen]
    signal_each(frozen, signal.SIGKILL)


def process_alive(pid: int) -> bool:
    """Whether a process of this host runs under `pid` (another account's counts: signalling it is refused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_started_at(pid: int) -> float | None:
    """When the process `pid` of this host started (seconds since the epoch), or None where it cannot be told."""
    import psutil  # here: the GPU check imports this module where psutil may not be installed

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError, ValueError):
        return None


def process_start_ticks(pid: int) -> int | None:
    """When the process `pid` of this host started, in clock ticks since boot (/proc/<pid>/stat, Linux): unlike a
    start in seconds since the epoch, which is worked out from the wall clock now, no step of that clock moves it;
    None where it cannot be told."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])  # field 22; the name before ')' may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def process_runs(pid: int, start_ticks: int | None = None) -> bool:
    """Whether a process of this host runs under `pid` and, where `start_ticks` is given, is the one that started
    then: a restarted container gives its new process the old one's pid (pid 1 under `docker run`, say)."""
    if not process_alive(pid):
        return False
    now_ticks = process_start_ticks(pid) if start_ticks is not None else None
    return now_ticks is None or now_ticks == start_ticks


# How much later than a path's last change its pid's process must have started to be another process than the
# one that wrote it: start times since the epoch come from the wall clock now (psutil), which NTP may have stepped
PID_REUSE_SLACK_S = 10.0


def left_by_a_gone_process(path: str | os.PathLike, pid: int) -> bool:
    """Whether the process of this host that wrote `path` (named for its pid) is gone: the pid free, or run by a
    process started after the path last changed (a restarted container's processes take the old ones' pids). The
    change time, not the modification time: renaming a folder (an export setting the previous one aside) changes
    only the former."""
    if not process_alive(pid):
        return True
    started = process_started_at(pid)
    try:
        return started is not None and started > os.stat(path).st_ctime + PID_REUSE_SLACK_S
    except OSError:  # removed in between
        return False


def wait_stopped(pid: int, timeout_s: float = 1.0) -> None:
    """Wait until every thread of `pid` is stopped (or dead), `timeout_s` at most (from /proc: at once without)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            states = set()
            for task in os.scandir(f"/proc/{pid}/task"):
                with open(f"{task.path}/stat", "rb") as f:
                    states.add(f.read().rsplit(b")", 1)[1].split()[0])
        except (OSError, IndexError):  # gone
            return
        if states <= {b"T", b"t", b"Z", b"X"}:
            return
        time.sleep(0.001)


def descendants(*of: int) -> list[int]:
    """The pids of this process's children (or those of the processes `of`), theirs, and so on, each after its
    parent (from /proc: none where there is none)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    with open(f"/proc/{entry.name}/stat", "rb") as f:  # 'pid (comm) state ppid ...'
                        parent = int(f.read().rsplit(b")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):  # gone meanwhile
                    continue
                children.setdefault(parent, []).append(int(entry.name))
    found = list(of) or [os.getpid()]
    roots = len(found)
    for pid in found:  # grows as it goes: breadth first
        found += children.get(pid, [])
    return found[roots:]


def help_paragraphs(docstring: str) -> str:
    """A field's or class's docstring as --help shows it: the lines of a paragraph joined, a list item ('- ', '* ')
    on a line of its own, paragraphs apart."""
    out: list[str] = []
    for line in (line.strip() for line in docstring.strip().splitlines()):
        if not line:
            if out and out[-1] != "\n\n":
                out.append("\n\n")
        elif out and out[-1] != "\n\n":
            out.append(("\n" if line.startswith(("- ", "* ")) else " ") + line)
        else:
            out.append(line)
    return "".join(out)


def cli(cls: type, args: list[str] | None = None, **kwargs: Any) -> Any:
    """tyro.cli, each flag's help its field docstring as paragraphs: tyro 1.0 kept the docstring's line breaks
    (docstring_parser leaves the continuation lines indented, and tyro keeps a break before a line that does not
    start with a letter), so --help cut its sentences where the source wraps them. Only the field docstrings'
    reader is given help_paragraphs; the description above keeps its lines, which argparse prints as they are."""
    import types

    import tyro
    from tyro import _docstrings

    tyro_own = _docstrings._strings
    _docstrings._strings = types.SimpleNamespace(**{**vars(tyro_own), "remove_single_line_breaks": help_paragraphs})
    try:
        return tyro.cli(cls, args=args, **kwargs)
    finally:
        _docstrings._strings = tyro_own


STOPPED_STARTING: Final = "stopped: Ctrl-C while the command started; the same command starts it again"


def quiet_ctrl_c_while_starting() -> None:
    """Until ctrl_c_as_usual(), Ctrl-C ends the command at once, with STOPPED_STARTING and exit 130: for the imports
    an entry module runs before its main() (torch, Ray, diffusers: seconds), which a Ctrl-C ended in the traceback
    of the one it cut short. Only where nothing was started or written yet. A SIGINT the command was started with
    ignored (a background job of a shell without job control) stays ignored."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _stopped_while_starting)


def _stopped_while_starting(signum: int, frame: Any) -> None:
    print(STOPPED_STARTING, file=sys.stderr, flush=True)
    os._exit(128 + signum)


def ctrl_c_as_usual() -> None:
    """Ctrl-C raises KeyboardInterrupt again, which the command's own handling turns into its stopped line."""
    if signal.getsignal(signal.SIGINT) is _stopped_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class SignalLog:
    """The signals this process receives while it is open, whichever Python handler takes them, or none yet: a
    driver's stop is told from a failure by it. During the trainer's fit() on Ray workers, Ctrl-C goes to Ray
    Train's own SIGINT handler: it aborts the run and calls sys.exit(0), which Ray's get() turns into
    SystemExit(1), the code of any failure; SIGTERM to the process group of a dataset job that started its own
    cluster stops the raylet too, and ray.wait raised SystemExit(1) before the driver's handler had run. The
    interpreter writes each signal's number to its wakeup fd before a handler runs, so this log holds the signal
    all the same. It logs nothing outside the main thread, where no handler runs. With `on_signal`, a thread
    calls it with each signal's number as the signal comes: the main thread's handler may come a second later, as
    ray.get lets it run only between its checks, every 1 s."""

    def __init__(self, on_signal: Callable[[int], None] | None = None) -> None:
        self.on_signal = on_signal

    def __enter__(self) -> SignalLog:
        self.seen: set[int] = set()
        self._pipe, self._previous, self._listener = None, -1, None
        if threading.current_thread() is threading.main_thread():
            self._pipe = os.pipe()
            for end in self._pipe:
                os.set_blocking(end, False)  # set_wakeup_fd requires it; a full pipe drops a number, not the process
            self._previous = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
            if self.on_signal is not None:
                self._listener = threading.Thread(target=self._listen, daemon=True, name="signal-listener")
                self._listener.start()
        return self

    def _listen(self) -> None:
        while True:
            select.select([self._pipe[0]], [], [])
            try:
                numbers = os.read(self._pipe[0], 1024)
            except BlockingIOError:
                continue
            for number in numbers:
                if number == 0:  # (__exit__'s: no signal has the number 0)
                    return
                self.seen.add(number)
                try:
                    self.on_signal(number)
                except Exception:  # one that failed must not deafen the log to the next
                    logging.getLogger(__name__).exception("handling signal %d", number)

    def received(self) -> set[int]:
        if self._pipe and self._listener is None:  # (else the listener has read them)
            with contextlib.suppress(BlockingIOError):
                self.seen.update(os.read(self._pipe[0], 1024))
        return self.seen

    def __exit__(self, *exc_info) -> None:
        if self._pipe:
            self.received()  # `seen` keeps what came in while open
            signal.set_wakeup_fd(self._previous)
            if self._listener is not None:
                os.write(self._pipe[1], b"\0")
                self._listener.join()
            for end in self._pipe:
                os.close(end)


# Leases: a job holds `<folder>/job-<token>.json` (its host, process, settings) while it runs, renewed and removed
# when it ends. A lease whose job is gone (killed, its node lost) does not count: at once on the host it ran on (its
# process is not there, or its pid is another process's now), elsewhere once not renewed for STALE_S. Each job
# writes its own lease before it reads the others', so of two jobs that start together at least one sees the other
# (both may back off, never both go on).
# The dataset job's policy: pipeline.lease; a training run's: train.run.run_lease.

RENEW_S = 10.0  # how often a job rewrites its lease
STALE_S = 60.0  # a lease not renewed for this long is a gone job's (several renewals missed, storage hiccups too)
RELEASE_WAIT_S = 3.0  # how long the job's end waits for its lease's removal


def lease_url(output: str, token: str) -> str:
    return f"{output.rstrip('/')}/job-{token}.json"


def pid_namespace() -> str | None:
    """This process's pid namespace (Linux): containers on one host's network share its host name, not their pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def new_lease(settings: dict[str, Any], now: float) -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid_namespace": pid_namespace(), "pid": pid,
            "pid_start_ticks": process_start_ticks(pid), "token": uuid.uuid4().hex, "started_at": now,
            "renewed_at": now, "settings": settings}


def gone(lease: dict[str, Any], now: float, host: str,
         alive: Callable[[int, int | None], bool] = process_runs) -> bool:
    """Whether a lease's job is gone: its process no longer runs on this host (its pid free, or taken since by
    another process), or it was not renewed for STALE_S (another host's, or another container's on this host's
    network, whose processes cannot be looked up from here)."""
    theirs_to_look_up = lease.get("host") == host and lease.get("pid_namespace") in (None, pid_namespace())
    if theirs_to_look_up and not alive(int(lease.get("pid", -1)), lease.get("pid_start_ticks")):
        return True
    return now - float(lease.get("renewed_at", 0)) > STALE_S


def rival(mine: dict[str, Any], others: list[dict[str, Any]], now: float, host: str,
          alive: Callable[[int, int | None], bool] = process_runs, shared: bool = True) -> dict[str, Any] | None:
    """A live job's lease whose settings differ from `mine`'s, or None: jobs of the same settings share an output
    (`shared`); unshared, any live job's lease."""
    return next((lease for lease in others if (not shared or lease.get("settings") != mine["settings"])
                 and not gone(lease, now, host, alive)), None)


def describe(lease: dict[str, Any], now: float) -> str:
    started = datetime.fromtimestamp(float(lease.get("started_at", 0))).strftime("%Y-%m-%d %H:%M:%S")
    return (f"pid {lease.get('pid')} on {lease.get('host')}, started {started}, last renewed "
            f"{max(now - float(lease.get('renewed_at', 0)), 0):.0f} s ago")


def read_leases(output: str) -> dict[str, dict[str, Any]]:
    """The leases in `output`, by path in its filesystem; one that does not parse was cut short by a kill, and is
    passed over."""
    fs, root = fsspec.core.url_to_fs(output)
    leases = {}
    for path in fs.glob(f"{root.rstrip('/')}/job-*.json"):
        with contextlib.suppress(FileNotFoundError, ValueError):  # removed since the listing; cut short
            lease = json.loads(fs.cat_file(path))
            if isinstance(lease, dict):
                leases[path] = lease
    return leases


@contextlib.contextmanager
def folder_lease(folder: str, settings: dict[str, Any], refusal: Callable[[dict[str, Any], float], Exception],
                 shared: bool = True, clock: Callable[[], float] = time.time) -> Iterator[list[dict[str, Any]]]:
    """Hold a lease on `folder` while the block runs (refusal(their lease, now) raised where a live job holds one
    with other settings, or with any when not `shared`), renewed every RENEW_S by a daemon thread, and removed at
    the end however the block ends (a kill -9 leaves it: see gone). Gone jobs' leases are removed on the way. The
    block gets the leases of the live jobs that share the folder."""
    fs, _ = fsspec.core.url_to_fs(folder)
    mine = new_lease(settings, clock())
    url = lease_url(folder, mine["token"])
    write_whole(url, json.dumps(mine).encode())  # before reading the others': see folder_lease's docstring
    host, now = socket.gethostname(), clock()
    others = {path: theirs for path, theirs in read_leases(folder).items() if theirs.get("token") != mine["token"]}
    live = []
    for path, theirs in others.items():
        if not gone(theirs, now, host):
            live.append(theirs)
            continue
        with contextlib.suppress(Exception):
            fs.rm(path)
    busy = rival(mine, live, now, host, shared=shared)
    if busy:
        _remove(url)
        raise refusal(busy, now)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(url, mine, stop, clock), daemon=True, name="lease-renewer")
    renewer.start()

    def release() -> None:
        stop.set()
        # in a daemon thread, waited for RELEASE_WAIT_S at most: a stop must not wait on a storage that does not
        # answer (a lease left behind is a gone job's at once on this host, and elsewhere once stale)
        releasing = threading.Thread(target=_release, args=(url, renewer), daemon=True, name="lease-release")
        releasing.start()
        releasing.join(RELEASE_WAIT_S)

    _held_leases.append(release)
    try:
        yield live
    finally:
        if release in _held_leases:  # (not released already by release_held_leases)
            _held_leases.remove(release)
            release()


_held_leases: list[Callable[[], None]] = []  # the releases of the leases this process holds (folder_lease)


def release_held_leases() -> None:
    """Release this process's leases now, for an end that skips the blocks holding them (os._exit: a driver whose
    threads still wait in Ray). A lease left behind held the run for STALE_S on other hosts."""
    while _held_leases:
        _held_leases.pop()()


def _renew(url: str, lease: dict[str, Any], stop: threading.Event, clock: Callable[[], float]) -> None:
    while not stop.wait(RENEW_S):
        # an outage is the job's to wait out; a missed renewal or two is within STALE_S
        with contextlib.suppress(Exception):
            write_whole(url, json.dumps({**lease, "renewed_at": clock()}).encode())


def _release(url: str, renewer: threading.Thread) -> None:
    renewer.join()  # a renewal under way would write the lease again after its removal
    _remove(url)


def _remove(url: str) -> None:
    with contextlib.suppress(Exception):
        fs, path = fsspec.core.url_to_fs(url)
        fs.rm(path)
