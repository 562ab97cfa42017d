"""a dataset's indexes without its images: parquet indexes, stats.json commit markers and a manifest, at any size,
for what reads only the indexes (subsets, their benchmark at 3M rows)"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import format as fmt
from pipeline.writer import INDEX_SCHEMA


def index_shard(shard: int, rows: int, rng: np.random.Generator, ok_fraction: float = 0.95) -> pa.Table:
    """One shard's index: keys `<shard><row>`, `ok_fraction` ok (the rest filtered or failed), photo-like original
    sizes (256-2048 wide)."""
    rest = (1 - ok_fraction) / 2
    statuses = rng.choice(np.array(fmt.STATUSES), size=rows, p=[ok_fraction, rest, rest])
    width = rng.integers(256, 2049, rows, dtype=np.int32)
    height = (width * rng.uniform(0.5, 1.5, rows)).astype(np.int32)
    ok = statuses == fmt.OK
    columns = {
        "key": pa.array([f"{shard:05d}{i:06d}" for i in range(rows)]),
        "source_key": pa.array([f"{shard:05d}/{i:06d}" for i in range(rows)]),
        "status": pa.array(statuses.tolist()),
        "error": pa.array(np.where(ok, "", "synthetic").tolist()),
        "original_width": pa.array(width),
        "original_height": pa.array(height),
        "width": pa.array(np.full(rows, 512, np.int32)),
        "height": pa.array(np.full(rows, 512, np.int32)),
        "caption": pa.array(["a synthetic photo"] * rows),
        "caption_source": pa.array(["source"] * rows),
        "params": pa.array(["{}"] * rows),
    }
    return pa.Table.from_pydict(columns, schema=INDEX_SCHEMA)


def write_synthetic_index(out: Path, rows: int, files: int, seed: int = 0, task: str = "canny",
                          ok_fraction: float = 0.95) -> Path:
    """`rows` index rows over `files` committed shards (parquet + stats.json, no tars) and a manifest."""
    rng = np.random.default_rng(seed)
    shards = out / fmt.SHARDS_DIR
    shards.mkdir(parents=True, exist_ok=True)
    per_file = [rows // files + (i < rows % files) for i in range(files)]
    for shard, count in enumerate(per_file):
        table = index_shard(shard, count, rng, ok_fraction)
        name = f"{shard:05d}"
        pq.write_table(table, shards / f"{name}{fmt.INDEX_SUFFIX}")
        statuses = table.column("status").to_pylist()
        stats = {"shard": name, "samples": count, "counts": {s: statuses.count(s) for s in fmt.STATUSES}}
        (shards / f"{name}{fmt.STATS_SUFFIX}").write_text(json.dumps(stats))
    (out / fmt.MANIFEST).write_text(json.dumps({"format_version": fmt.FORMAT_VERSION, "task": task, "tasks": [task],
                                                "samples": rows}))
    return out
