"""writer stages one output shard locally and publishes it: tar, then parquet, then stats.json (the commit)"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline import format as fmt

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source_key", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("caption", pa.string()),
        ("caption_source", pa.string()),
        ("params", pa.string()),
    ]
)
assert tuple(INDEX_SCHEMA.names) == fmt.INDEX_COLUMNS
STAGING_DIR = "_staging"
REMOTE_STAGING_DIR = "controlnet-data-staging"


def index_schema(tasks: tuple[str, ...] = ()) -> pa.Schema:
    """The index's schema: with several tasks, a status and an error column per task after the shared ones."""
    if len(tasks) < 2:
        return INDEX_SCHEMA
    per_task = [(column(t), pa.string()) for t in tasks for column in (fmt.task_status_column, fmt.task_error_column)]
    return pa.schema([*INDEX_SCHEMA, *per_task])


def index_table(rows: list[dict[str, Any]], tasks: tuple[str, ...] = ()) -> pa.Table:
    """Parquet index rows -> an Arrow table; params become a JSON string (they differ per task). A sample that
    failed or was filtered before any annotator ran has that status (and error) for every task."""
    schema = index_schema(tasks)
    normalised = []
    for row in rows:
        full = {**{c: None for c in schema.names}, **row, "params": json.dumps(row.get("params") or {})}
        for task in tasks if len(tasks) > 1 else ():
            full[fmt.task_status_column(task)] = fmt.task_status(row, task)
            full[fmt.task_error_column(task)] = row.get(fmt.task_error_column(task), row.get("error"))
        normalised.append(full)
    return pa.Table.from_pylist(normalised, schema=schema)


def staging_root(out: str) -> Path:
    """Where shards are built before they are published: beside the shards of a local output (publishing is then
    a rename on the same disk), in this node's temp folder for an object store (one PUT per file publishes)."""
    fs, path = fsspec.core.url_to_fs(out)
    if isinstance(fs, LocalFileSystem):
        return Path(path) / fmt.SHARDS_DIR / STAGING_DIR
    return Path(tempfile.gettempdir()) / REMOTE_STAGING_DIR


def _staging_owner(folder: str) -> tuple[str, int] | None:
    """(host, pid) of the process that staged in `folder` ('<shard>@<host>@<pid>@<random>'); None if unnamed."""
    parts = folder.split("@")
    return (parts[1], int(parts[2])) if len(parts) == 4 and parts[2].isdigit() else None


def clear_stale_staging(root: Path, other_hosts: bool = False) -> list[str]:
    """Remove what killed processes of this host left in `root` (a live one, say another driver's actor on the
    same output, keeps its folder), and with `other_hosts` what other hosts' processes left (known gone: no live
    job holds the output); the folders removed."""
    host = socket.gethostname()
    removed = []
    for folder in root.iterdir() if root.is_dir() else []:
        owner = _staging_owner(folder.name)
        if owner is None or (fmt.left_by_a_gone_process(folder, owner[1]) if owner[0] == host else other_hosts):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    with contextlib.suppress(OSError):
        root.rmdir()  # only when empty
    return removed


class ShardWriter:
    """Builds one output shard in a staging folder; nothing is visible under its final names until commit().

    Staging lives in staging_root(out), one folder per shard named after the shard, host and process, so a
    later run on the same host clears what killed processes left, and only that.
    """

    def __init__(self, out: str, name: str, tasks: tuple[str, ...] = ()):
        self.fs, _ = fsspec.core.url_to_fs(out)
        self.paths = {k: fsspec.core.url_to_fs(v)[1] for k, v in fmt.shard_paths(out, name).items()}
        self.local = isinstance(self.fs, LocalFileSystem)
        self.tasks = tasks  # several: the index gets per-task status columns
        self.staging = self._make_staging(staging_root(out), f"{name}@{socket.gethostname()}@{os.getpid()}@")
        self._tar_file = open(self.staging / "shard.tar", "wb")  # noqa: SIM115 (closed in commit/abort)
        self._tar = fmt.SampleTarWriter(self._tar_file)

    @staticmethod
    def _make_staging(root: Path, prefix: str) -> Path:
        for attempt in range(3):
            root.mkdir(parents=True, exist_ok=True)
            try:
                return Path(tempfile.mkdtemp(prefix=prefix, dir=root))
            except FileNotFoundError:  # another run removed the empty root in between
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def write(self, key: str, members: dict[str, bytes]) -> None:
        self._tar.write(key, members)

    def _publish(self, local: Path, target: str) -> None:
        if self.local:
            os.replace(local, target)
        else:
            self.fs.put_file(str(local), target)

    def commit(self, rows: list[dict[str, Any]], stats: dict[str, Any]) -> None:
        """Publish tar, then index, then stats.json last: a shard with stats.json is complete."""
        self._tar.close()
        self._tar_file.close()  # its tail in Python's buffer (128 KiB on 3.14) would be published without it
        pq.write_table(index_table(rows, self.tasks), self.staging / "index.parquet")
        (self.staging / "stats.json").write_text(json.dumps(stats, indent=1))
        if self.fs.exists(self.paths["stats"]):  # --overwrite: un-commit first, so no moment shows the new tar
            self.fs.rm(self.paths["stats"])  # with the old stats (a crash in between leaves the shard to redo)
        for part, local in (("tar", "shard.tar"), ("index", "index.parquet"), ("stats", "stats.json")):
            self._publish(self.staging / local, self.paths[part])
        shutil.rmtree(self.staging, ignore_errors=True)

    def abort(self) -> None:
        if not self._tar_file.closed:
            self._tar_file.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def clear_staging(out: str, job_alone: bool = False) -> list[str]:
    """Remove staging that killed processes of this host left for `out` (each actor clears its own node's). A local
    output stages beside its shards: on a file system that hosts share (NFS, EFS), what a host that never came back
    left stayed for good; a job that holds the output alone (pipeline.lease: no other live job) clears it too. An
    object store's staging is in each node's temp folder, which other outputs' jobs share."""
    fs, _ = fsspec.core.url_to_fs(out)
    return clear_stale_staging(staging_root(out), other_hosts=job_alone and isinstance(fs, LocalFileSystem))
