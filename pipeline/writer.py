"""writer stages one output shard locally and publishes it: tar, then parquet, then stats.json (the commit)"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
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


def index_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Parquet index rows -> an Arrow table; params become a JSON string (they differ per task)."""
    normalised = [
        {**{c: None for c in fmt.INDEX_COLUMNS}, **row, "params": json.dumps(row.get("params") or {})}
        for row in rows
    ]
    return pa.Table.from_pylist(normalised, schema=INDEX_SCHEMA)


class ShardWriter:
    """Builds one output shard in a staging folder; nothing is visible under its final names until commit().

    Local outputs stage next to the shards so that publishing is an atomic rename on the same disk;
    object stores stage in a local temp folder and publish with one PUT per file, which is atomic there.
    """

    def __init__(self, out: str, name: str):
        self.fs, _ = fsspec.core.url_to_fs(out)
        self.paths = {k: fsspec.core.url_to_fs(v)[1] for k, v in fmt.shard_paths(out, name).items()}
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            staging_root = Path(self.paths["tar"]).parent / STAGING_DIR
            staging_root.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=staging_root))
        else:
            self.staging = Path(tempfile.mkdtemp(prefix=f"{name}."))
        self._tar_file = open(self.staging / "shard.tar", "wb")  # noqa: SIM115 (closed in commit/abort)
        self._tar = wds.TarWriter(self._tar_file, encoder=False, mtime=0)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        self._tar.write({"__key__": key, **members})

    def _publish(self, local: Path, target: str) -> None:
        if self.local:
            os.replace(local, target)
        else:
            self.fs.put_file(str(local), target)

    def commit(self, rows: list[dict[str, Any]], stats: dict[str, Any]) -> None:
        """Publish tar, then index, then stats.json last: a shard with stats.json is complete."""
        self._tar.close()
        pq.write_table(index_table(rows), self.staging / "index.parquet")
        (self.staging / "stats.json").write_text(json.dumps(stats, indent=1))
        for part, local in (("tar", "shard.tar"), ("index", "index.parquet"), ("stats", "stats.json")):
            self._publish(self.staging / local, self.paths[part])
        shutil.rmtree(self.staging, ignore_errors=True)

    def abort(self) -> None:
        if not self._tar_file.closed:
            self._tar_file.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def clear_staging(out: str) -> None:
    """Remove staging left by crashed runs (local outputs only; remote staging is in a temp folder)."""
    fs, path = fsspec.core.url_to_fs(out)
    if isinstance(fs, LocalFileSystem):
        shutil.rmtree(Path(path) / fmt.SHARDS_DIR / STAGING_DIR, ignore_errors=True)
