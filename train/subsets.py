"""subsets: nested dataset-size subsets ranked by original resolution, written as subset manifests. They read the
dataset's parquet indexes through the shard contract (pipeline.format) and nothing else of the dataset job, so the
sweep calls them directly."""
from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline import format as fmt

SUBSETS_DIR = "subsets"
VALIDATION_NAME = "validation.json"
READ_THREADS = 16  # parquet indexes fetched concurrently (object stores answer slowly one at a time)
COLUMNS = ["key", "status", "original_width", "original_height"]
RANKING_RULE = (
    "ok samples by original resolution (original_width * original_height, descending), ties by the blake2b-64 "
    "hash of the key (ascending); a subset of size n is the first n, so every smaller subset is inside every larger"
)
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([km]?)$")
_UNITS = {"": 1, "k": 1_000, "m": 1_000_000}


class Sample(NamedTuple):
    """One `ok` row of a parquet index, with the tar it lives in."""

    key: str
    pixels: int
    shard: str  # tar URL


class SubsetError(ValueError):
    """A request the dataset cannot satisfy (a size larger than its ok samples, duplicate keys)."""


# ---------------------------------------------------------------- pure: sizes, ranking, selection


def parse_size(text: str) -> int:
    """'1k' -> 1000, '3m' -> 3_000_000, '1.5k' -> 1500, '500' -> 500 (case-insensitive)."""
    match = _SIZE.match(text.strip().lower())
    if not match:
        raise ValueError(f"bad size {text!r}: expected a count such as 500, 1k, 10k, 3m")
    number, unit = match.groups()
    value = float(number) * _UNITS[unit]
    if value != int(value) or value < 1:
        raise ValueError(f"bad size {text!r}: not a positive whole number of samples")
    return int(value)


def parse_sizes(text: str) -> list[int]:
    """'1k,10k,3m' -> [1000, 10000, 3000000]: ascending, duplicates ('1k,1000') merged."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("no sizes given")
    return sorted({parse_size(p) for p in parts})


def size_label(size: int) -> str:
    """The canonical short name of a size, used for file and run names: 1000 -> '1k', 3000000 -> '3m'."""
    for unit, factor in (("m", 1_000_000), ("k", 1_000)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def rank(samples: Iterable[Sample]) -> list[Sample]:
    """Largest originals first; equal resolutions in key-hash order, so the order never depends on listing order."""
    ranked = sorted(samples, key=lambda s: (-s.pixels, fmt.key_hash(s.key), s.key))
    keys = [s.key for s in ranked]
    if len(set(keys)) != len(keys):
        raise SubsetError("duplicate keys across shards: a key must name one sample in a dataset")
    return ranked


def select(ranked: list[Sample], sizes: list[int], held_out: int = 0) -> dict[int, list[Sample]]:
    """The top-n of one ranking per size: nested by construction. A size past the ok samples is an error."""
    too_large = [s for s in sizes if s > len(ranked)]
    if too_large:
        largest = max(too_large)
        named = str(largest) if size_label(largest) == str(largest) else f"{size_label(largest)} ({largest})"
        held = f" ({held_out} more are held out for validation)" if held_out else ""
        raise SubsetError(f"size {named} is larger than the dataset's {len(ranked)} ok samples{held}")
    return {size: ranked[:size] for size in sizes}


def hold_out(samples: list[Sample], shards: int) -> tuple[list[Sample], list[Sample]]:
    """(the pool subsets are drawn from, the held-out validation samples): the last `shards` shards in URL order
    are held out, so one validation set serves every size and none of its samples is in any subset."""
    names = sorted({s.shard for s in samples})
    if shards and len(names) <= shards:
        raise SubsetError(f"the dataset has {len(names)} shard(s) with ok samples: holding out {shards} for "
                          "validation leaves none to train on (--holdout-shards 0 holds out nothing)")
    held = set(names[len(names) - shards:]) if shards else set()
    return [s for s in samples if s.shard not in held], [s for s in samples if s.shard in held]


def subset_document(chosen: list[Sample], task: str, dataset: str, available: int,
                    validation: str | None = None) -> dict[str, object]:
    """The subset manifest: the format's fields (task, shards, keys) plus counts, the rule, the source and the
    held-out validation manifest that every size shares (the trainer validates on it)."""
    per_shard = dict(sorted(Counter(s.shard for s in chosen).items()))
    shards = list(per_shard)
    return {
        **fmt.subset_manifest(shards, [s.key for s in chosen], task),
        "size": len(chosen),
        "counts": {"samples": len(chosen), "shards": len(shards), "ok_in_dataset": available,
                   "per_shard": per_shard},
        "ranking": RANKING_RULE,
        "dataset": dataset,
        **({fmt.SUBSET_VALIDATION: validation} if validation else {}),
    }


# ---------------------------------------------------------------- I/O: parquet in, JSON out


def absolute(url: str) -> str:
    """Local paths become absolute, so the manifest works from any cwd; URLs stay as they are."""
    return url.rstrip("/") if "://" in url else str(Path(url).resolve())


def read_samples(dataset: str, task: str | None = None) -> list[Sample]:
    """The `ok` rows of every committed shard's parquet index (a shard with stats.json), reading 4 columns only:
    with `task` (a multi-task dataset's condition), the rows ok for that task."""
    shards = fmt.committed_shards(dataset)
    if not shards:
        raise FileNotFoundError(f"no committed shards (*{fmt.STATS_SUFFIX}) in {dataset}/{fmt.SHARDS_DIR}")

    status = fmt.task_status_column(task) if task else "status"

    def one(shard: fmt.CommittedShard) -> list[Sample]:
        table = fmt.read_index(shard, [c if c != "status" else status for c in COLUMNS])
        rows = zip(table["key"], table[status], table["original_width"], table["original_height"], strict=True)
        return [Sample(k, (w or 0) * (h or 0), shard.tar) for k, status, w, h in rows if status == fmt.OK]

    with ThreadPoolExecutor(min(READ_THREADS, len(shards))) as pool:
        return [s for part in pool.map(one, shards) for s in part]


def read_condition(dataset: str, condition: str | None) -> tuple[str | None, bool]:
    """(the condition subsets are ranked for: the one asked for, else the dataset's only one; whether the dataset
    holds several, so that the index has a status column per condition)."""
    from train.data import choose_condition

    tasks = fmt.dataset_tasks(fmt.read_manifest(dataset))
    return choose_condition(tasks, condition, dataset), len(tasks) > 1


def write_json(url: str, document: dict[str, object]) -> None:
    """Local: temp name then rename (atomic on one disk); object stores: one PUT, which is atomic there."""
    fs, path = fsspec.core.url_to_fs(url)
    data = json.dumps(document, indent=1).encode()
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def make_subsets(dataset: str, sizes: list[int], out: str | None = None,
                 holdout_shards: int = 1, condition: str | None = None) -> list[dict[str, object]]:
    """Hold out the last `holdout_shards` shards as the shared validation set (`<out>/validation.json`), then rank,
    select and write one manifest per size to `<out or dataset/subsets>/<label>.json`. A multi-task dataset's
    subsets are per `condition` (ranked over the samples that condition kept; default folder
    `<dataset>/subsets/<condition>`).

    Returns one {label, size, shards, url, validation} per size; nothing is written when any size is too large."""
    dataset = absolute(dataset)
    task, several = read_condition(dataset, condition)
    out = absolute(out) if out else f"{dataset}/{SUBSETS_DIR}" + (f"/{task}" if several else "")
    pool, held = hold_out(read_samples(dataset, task if several else None), holdout_shards)
    ranked = rank(pool)
    chosen = select(ranked, sizes, len(held))
    validation = None
    if held:
        validation = f"{out}/{VALIDATION_NAME}"
        document = subset_document(held, task, dataset, len(ranked) + len(held))
        write_json(validation, {**document, "role": "validation: held out of every subset"})
    written = []
    for size, samples in chosen.items():
        document = subset_document(samples, task, dataset, len(ranked), validation)
        url = f"{out}/{size_label(size)}.json"
        write_json(url, document)
        written.append({"label": size_label(size), "size": size, "shards": document["counts"]["shards"], "url": url,
                        "validation": validation})
    return written


@dataclass
class SubsetsArgs:
    """Nested dataset-size subsets for ablations (the paper's Sec. 3.5): rank a dataset's ok samples by original
    resolution, take the top n per size, and write one subset manifest per size that `train/run.py --data <file>`
    reads. Reads the parquet indexes only, never the tars."""

    dataset: str
    """Dataset folder or URL written by pipeline.build."""
    sizes: str
    """Comma-separated counts: 500, 1k, 10k, 1.5k, 3m."""
    out: str | None = None
    """Folder/URL for the manifests (default: <dataset>/subsets)."""
    holdout_shards: int = 1
    """Last shards held out of every subset as their shared validation set."""
    condition: str | None = None
    """The condition to rank for, in a dataset built with several tasks (default: the dataset's only one)."""
    json: bool = False
    """Print one JSON list of the written subsets instead."""


def main(argv: list[str] | None = None) -> int:
    import tyro

    args = tyro.cli(SubsetsArgs, args=argv, prog="python -m train.subsets")
    try:
        written = make_subsets(args.dataset, parse_sizes(args.sizes), args.out, args.holdout_shards,
                               args.condition)
    except (FileNotFoundError, ValueError) as e:  # bad sizes, a size too large, no dataset: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(written))
    else:
        for w in written:
            print(f"{w['label']:>6}  {w['size']:>9} samples  {w['shards']:>6} shards  {w['url']}")
        if written and written[0]["validation"]:
            print(f"validation (held out of every size): {written[0]['validation']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
