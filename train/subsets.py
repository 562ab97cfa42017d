"""subsets: nested dataset-size subsets ranked by original resolution, written as subset manifests, and (with
--materialize) as compact shards of their own, so that training on 1k samples of a 3M-sample dataset reads 1k
samples, not the thousand shards they are spread over. They read the dataset through the shard contract
(pipeline.format) and nothing else of the dataset job, so the sweep calls them directly."""
from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline import format as fmt

SUBSETS_DIR = "subsets"
VALIDATION_NAME = "validation.json"
COLUMNS = ["key", "status", "original_width", "original_height"]
RANKING_RULE = (
    "ok samples by original resolution (original_width * original_height, descending), ties by the blake2b-64 "
    "hash of the key (ascending); a subset of size n is the first n, so every smaller subset is inside every larger"
)
MAX_READ_AMPLIFICATION = 2.0  # --materialize auto: copy a subset whose shards hold over 2x its samples
SAMPLES_PER_SHARD = 1000  # a materialized subset's shards (the dataset job's images-per-shard default)
Materialize = Literal["auto", "always", "never"]
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
    value = Fraction(number) * _UNITS[unit]  # exact: 1.001k is 1001, where 1.001 * 1000 is 1000.9999999999999
    if value.denominator != 1 or value < 1:
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
    shard_of: dict[str, str] = {}
    for sample in ranked:
        if sample.key in shard_of:  # a subset names its samples by key: it could not tell these apart
            raise SubsetError(f"duplicate keys across shards: {sample.key!r} is in {shard_of[sample.key]} and "
                              f"{sample.shard}; a key must name one sample in a dataset (give each input shard its "
                              "own keys, e.g. prefixed with the shard's name)")
        shard_of[sample.key] = sample.shard
    return ranked


def select(ranked: list[Sample], sizes: list[int], held_out: int = 0, condition: str | None = None
           ) -> dict[int, list[Sample]]:
    """The top-n of one ranking per size: nested by construction. A size past the ok samples is an error.
    `condition`: the one a multi-task dataset's samples were counted for (ok for it), named in that error."""
    too_large = [s for s in sizes if s > len(ranked)]
    if too_large:
        largest = max(too_large)
        named = str(largest) if size_label(largest) == str(largest) else f"{size_label(largest)} ({largest})"
        held = f" ({held_out} more are held out for validation)" if held_out else ""
        which = f" ok samples for {condition}" if condition else " ok samples"
        raise SubsetError(f"size {named} is larger than the dataset's {len(ranked)}{which}{held}")
    return {size: ranked[:size] for size in sizes}


def hold_out(samples: list[Sample], shards: int) -> tuple[list[Sample], list[Sample]]:
    """(the pool subsets are drawn from, the held-out validation samples): the last `shards` shards in URL order
    are held out, so one validation set serves every size and none of its samples is in any subset."""
    names = sorted({s.shard for s in samples})
    if shards < 0:
        raise SubsetError(f"--holdout-shards must not be negative, not {shards}")
    if shards and len(names) <= shards:
        raise SubsetError(f"the dataset has {len(names)} shard(s) with ok samples: holding out {shards} for "
                          "validation leaves none to train on (--holdout-shards 0 holds out nothing)")
    held = set(names[len(names) - shards:]) if shards else set()
    return [s for s in samples if s.shard not in held], [s for s in samples if s.shard in held]


def read_amplification(chosen: list[Sample], shard_samples: dict[str, int]) -> float:
    """Samples in the shards a subset touches per sample of the subset: what streaming it from the dataset's own
    shards reads (and what uniform shard sampling dilutes) for each sample it trains on."""
    touched = {s.shard for s in chosen}
    return sum(shard_samples.get(t, 0) for t in touched) / max(len(chosen), 1)


def should_materialize(mode: Materialize, amplification: float) -> bool:
    """always; never; auto: when streaming the subset from the dataset's shards would read over
    MAX_READ_AMPLIFICATION times its own samples (every epoch), so one copy pays for itself within an epoch or two."""
    return mode == "always" or (mode == "auto" and amplification > MAX_READ_AMPLIFICATION)


def compact_shards(keys: list[str], per_shard: int) -> list[list[str]]:
    """A materialized subset's keys dealt into shards of `per_shard` (the last may be shorter)."""
    return [keys[i : i + per_shard] for i in range(0, len(keys), per_shard)]


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


def portable(document: dict[str, Any], folder: str, dataset: str) -> dict[str, Any]:
    """A subset manifest as written into `folder`: its URLs relative where they lie in the dataset, as the folder
    does (fmt.url_within), so that the dataset copied or moved whole keeps its subsets (they named the old place)."""
    here = partial(fmt.url_within, folder=folder, root=dataset)
    per_shard = {here(u): n for u, n in document["counts"]["per_shard"].items()}
    written = {**document, fmt.SUBSET_SHARDS: [here(u) for u in document[fmt.SUBSET_SHARDS]],
               "dataset": here(document["dataset"]), "counts": {**document["counts"], "per_shard": per_shard}}
    if document.get(fmt.SUBSET_VALIDATION):
        written[fmt.SUBSET_VALIDATION] = here(document[fmt.SUBSET_VALIDATION])
    if "materialized" in document:
        written["materialized"] = {**document["materialized"], "folder": here(document["materialized"]["folder"])}
    return written


# ---------------------------------------------------------------- I/O: parquet in, JSON out


def absolute(url: str) -> str:
    """Local paths become absolute, so the manifest works from any cwd; URLs stay as they are."""
    return url.rstrip("/") if "://" in url else str(Path(url).resolve())


def read_samples(dataset: str, task: str | None = None,
                 shards: list[fmt.CommittedShard] | None = None) -> list[Sample]:
    """The `ok` rows of every committed shard's parquet index (a shard with stats.json; `shards`: the dataset's
    committed shards, when listed already), reading 4 columns only: with `task` (a multi-task dataset's
    condition), the rows ok for that task."""
    shards = fmt.committed_shards(dataset) if shards is None else shards
    if not shards:
        raise fmt.no_shards_error(dataset)

    status = fmt.task_status_column(task) if task else "status"

    def ok_samples(shard: fmt.CommittedShard, table: dict[str, list]) -> list[Sample]:
        rows = zip(table["key"], table[status], table["original_width"], table["original_height"], strict=True)
        return [Sample(k, (w or 0) * (h or 0), shard.tar) for k, status, w, h in rows if status == fmt.OK]

    columns = [c if c != "status" else status for c in COLUMNS]
    return [s for part in fmt.each_index(shards, columns, ok_samples) for s in part]


def read_condition(dataset: str, condition: str | None) -> tuple[str | None, bool]:
    """(the condition subsets are ranked for: the one asked for, else the dataset's only one; whether the dataset
    holds several, so that the index has a status column per condition)."""
    from train.data import choose_condition

    tasks = fmt.dataset_tasks(fmt.read_manifest(dataset))
    return choose_condition(tasks, condition, dataset), len(tasks) > 1


def write_json(url: str, document: dict[str, object]) -> None:
    """The document written whole or not at all (pipeline.format.write_whole)."""
    fmt.write_whole(url, json.dumps(document, indent=1).encode())


def shard_sample_counts(shards: list[fmt.CommittedShard]) -> dict[str, int]:
    """Tar URL -> the samples written in it (its stats' ok count): what streaming that shard reads."""
    stats = {st.get("shard"): st for st in fmt.read_stats(shards)}
    return {sh.tar: stats[sh.name]["counts"][fmt.OK] for sh in shards if sh.name in stats}


class CompactWriter:
    """Writes one materialized subset's shards under `<folder>/shards/` in the dataset layout: NNNNN.tar, its
    parquet index rows (copied from the source) and NNNNN.stats.json last (the commit marker), `per_shard` samples
    each; built in a local temp folder and published file by file."""

    def __init__(self, folder: str, per_shard: int, tasks: list[str], dataset: str, schema: Any):
        import tempfile

        self.folder, self.per_shard, self.tasks, self.dataset = folder.rstrip("/"), per_shard, tasks, dataset
        self.schema = schema  # the source index's (a multi-task one has per-task status columns)
        self.fs, _ = fsspec.core.url_to_fs(self.folder)
        self.staging = Path(tempfile.mkdtemp(prefix="subset-"))
        self.tars: dict[str, int] = {}  # published tar URL -> samples
        self._open()

    def _open(self) -> None:
        self.name = f"{len(self.tars):05d}"
        self.rows: list[dict[str, Any]] = []  # the index rows of the samples in the open shard
        self._file = open(self.staging / "shard.tar", "wb")  # noqa: SIM115 (closed in _publish)
        self._tar = fmt.SampleTarWriter(self._file)

    def add(self, sample: dict[str, Any], row: dict[str, Any]) -> None:
        self._tar.write(sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")})
        self.rows.append(row)
        if len(self.rows) == self.per_shard:
            self._publish()
            self._open()

    def _publish(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._tar.close()
        pq.write_table(pa.Table.from_pylist(self.rows, schema=self.schema), self.staging / "index.parquet")
        counts = {s: sum(r["status"] == s for r in self.rows) for s in fmt.STATUSES}  # all ok: only ok rows copy
        stats = {"shard": self.name, "samples": len(self.rows), "counts": counts, "subset_of": self.dataset}
        if len(self.tasks) > 1:
            stats["task_counts"] = {t: {s: sum(fmt.task_status(r, t) == s for r in self.rows) for s in fmt.STATUSES}
                                    for t in self.tasks}
        (self.staging / "stats.json").write_text(json.dumps(stats))
        paths = fmt.shard_paths(self.folder, self.name)
        self.fs.makedirs(fsspec.core.url_to_fs(paths["tar"])[1].rsplit("/", 1)[0], exist_ok=True)
        for part, local in (("tar", "shard.tar"), ("index", "index.parquet"), ("stats", "stats.json")):
            target = fsspec.core.url_to_fs(paths[part])[1]
            if isinstance(self.fs, LocalFileSystem):
                os.replace(self.staging / local, target)
            else:
                self.fs.put_file(str(self.staging / local), target)
        self.tars[paths["tar"]] = len(self.rows)

    def close(self) -> dict[str, int]:
        """Publish the last, shorter shard; the tar URLs with their sample counts (discard removes the staging)."""
        if self.rows:
            self._publish()
        return self.tars

    def discard(self) -> None:
        """Remove the local staging folder (what is published stays; a failed copy is redone whole on rerun)."""
        import shutil

        self._file.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def materialize(dataset: str, shards: list[fmt.CommittedShard], chosen: dict[int, list[Sample]],
                folders: dict[int, str], per_shard: int = SAMPLES_PER_SHARD) -> dict[int, dict[str, int]]:
    """Copy each size's samples (every member, and the index row) into compact shards of its own under
    folders[size], reading each source shard that holds any of them once: sizes are nested, so a sample read once
    goes to every size that holds it. Returns each size's {tar URL: samples}."""
    order = max(chosen.values(), key=len)  # every size is a prefix of one ranking
    position = {s.key: i for i, s in enumerate(order)}
    sizes = sorted(chosen)
    tasks = fmt.dataset_tasks(fmt.read_manifest(dataset)) or [""]
    for folder in folders.values():  # a rerun rewrites the subset from scratch
        fs, root = fsspec.core.url_to_fs(folder)
        if fs.exists(root):
            fs.rm(root, recursive=True)
    by_shard: dict[str, list[Sample]] = {}
    for s in order:
        by_shard.setdefault(s.shard, []).append(s)
    index_of = {sh.tar: sh for sh in shards}
    schema = _schema_of(index_of[min(by_shard)])
    writers: dict[int, CompactWriter] = {}
    try:
        for size in sizes:
            writers[size] = CompactWriter(folders[size], per_shard, tasks, dataset, schema)
        copy_chosen(by_shard, index_of, position, writers)
        return {size: writer.close() for size, writer in writers.items()}
    finally:  # done, or failed (a shard short of its samples, storage gone): no staging folder stays in /tmp
        for writer in writers.values():
            writer.discard()


def copy_chosen(by_shard: dict[str, list[Sample]], index_of: dict[str, fmt.CommittedShard],
                position: dict[str, int], writers: dict[int, CompactWriter]) -> None:
    """Each chosen sample, read from its source shard once, added to every size's writer whose ranking holds it."""
    for tar in sorted(by_shard):
        wanted = {s.key for s in by_shard[tar]}
        index = fmt.read_index(index_of[tar], None)
        rows: dict[str, dict[str, Any]] = {}
        for i, key in enumerate(index["key"]):  # a key's first row: the sample written (a later one, a duplicate
            if key in wanted:                    # the job failed, is not in the tar)
                rows.setdefault(key, {c: index[c][i] for c in index})
        for sample in fmt.shard_samples([{"url": tar}]):
            key = sample["__key__"]
            if key not in wanted:
                continue
            wanted.discard(key)
            if fmt.OVERSIZED in sample:  # a copy must hold every member: refused rather than copied without it
                raise SubsetError(f"{tar}: {key}'s members {sample[fmt.OVERSIZED]} (bytes) are over the "
                                  f"{fmt.MAX_MEMBER_BYTES}-byte read cap")
            for size, writer in writers.items():
                if position[key] < size:
                    writer.add(sample, rows[key])
        if wanted:
            raise SubsetError(f"{tar} lacks {len(wanted)} samples its index calls ok (e.g. {sorted(wanted)[0]})")


def _schema_of(shard: fmt.CommittedShard):
    import pyarrow.parquet as pq

    with fsspec.open(shard.index, "rb") as f:
        return pq.read_schema(f)


def already_materialized(url: str, chosen: list[Sample], per_shard: int) -> dict[str, int] | None:
    """The {tar URL: samples} of a size copied before with the same selection and shard size, all its shards
    committed (a rerun of a sweep copies nothing again); None otherwise."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return None
    document = json.loads(fs.cat_file(path))
    folder = url.rpartition("/")[0]
    shards = {fmt.url_from(folder, u): n for u, n in document.get("counts", {}).get("per_shard", {}).items()}
    same = (document.get("materialized", {}).get("samples_per_shard") == per_shard
            and set(document.get(fmt.SUBSET_KEYS, [])) == {s.key for s in chosen})
    committed = all(fs.exists(fsspec.core.url_to_fs(u.removesuffix(fmt.TAR_SUFFIX) + fmt.STATS_SUFFIX)[1])
                    for u in shards)
    return dict(shards) if same and shards and committed else None


def write_subset_folder_manifest(folder: str, dataset: str, size: int, task: str | None, shards: int) -> None:
    """The materialized subset's manifest.json: the source's (settings, models), with this subset's counts, so the
    folder reads as a dataset (preview, resolve_shards) and names what it was cut from. Its shard counts are its
    own: the source's named shards this folder does not hold (and failed or truncated ones it never copied)."""
    manifest = fmt.read_manifest(dataset)
    manifest.update(samples=size, totals={fmt.OK: size, fmt.FILTERED: 0, fmt.FAILED: 0},
                    shards={"done": shards, "failed": {}, "truncated": {}},
                    subset={"of": dataset, "size": size, "condition": task, "ranking": RANKING_RULE})
    manifest.pop("totals_by_task", None)
    write_json(f"{folder.rstrip('/')}/{fmt.MANIFEST}", manifest)


def make_subsets(dataset: str, sizes: list[int], out: str | None = None, holdout_shards: int = 1,
                 condition: str | None = None, materialize_mode: Materialize = "never",
                 samples_per_shard: int = SAMPLES_PER_SHARD) -> list[dict[str, object]]:
    """Hold out the last `holdout_shards` shards as the shared validation set (`<out>/validation.json`), then rank,
    select and write one manifest per size to `<out or dataset/subsets>/<label>.json`. A multi-task dataset's
    subsets are per `condition` (ranked over the samples that condition kept; default folder
    `<dataset>/subsets/<condition>`). `materialize_mode`: copy a size's samples into compact shards of its own
    (`<out>/<label>/shards/`), which its manifest then lists: always, never, or auto (should_materialize).

    Returns one {label, size, shards, url, validation, materialized, read_amplification} per size; nothing is
    written when any size is too large."""
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be 1 or more, not {samples_per_shard}")
    dataset = absolute(dataset)
    task, several = read_condition(dataset, condition)
    out = absolute(out) if out else f"{dataset}/{SUBSETS_DIR}" + (f"/{task}" if several else "")
    shards = fmt.committed_shards(dataset)
    pool, held = hold_out(read_samples(dataset, task if several else None, shards), holdout_shards)
    ranked = rank(pool)
    chosen = select(ranked, sizes, len(held), task if several else None)
    shard_samples = shard_sample_counts(shards) if materialize_mode != "never" else {}
    amplification = {size: read_amplification(samples, shard_samples) for size, samples in chosen.items()}
    copy = {size: samples for size, samples in chosen.items()
            if should_materialize(materialize_mode, amplification[size])}
    folders = {size: f"{out}/{size_label(size)}" for size in copy}
    compact = {size: done for size in copy if (done := already_materialized(f"{out}/{size_label(size)}.json",
                                                                             copy[size], samples_per_shard))}
    todo = {size: samples for size, samples in copy.items() if size not in compact}
    if todo:
        compact |= materialize(dataset, shards, todo, {size: folders[size] for size in todo}, samples_per_shard)
    validation = None
    if held:
        validation = f"{out}/{VALIDATION_NAME}"
        document = subset_document(held, task, dataset, len(ranked) + len(held))
        write_json(validation, {**portable(document, out, dataset), "role": "validation: held out of every subset"})
    written = []
    for size, samples in chosen.items():
        document = subset_document(samples, task, dataset, len(ranked), validation)
        if size in compact:
            write_subset_folder_manifest(folders[size], dataset, size, task, len(compact[size]))
            document.update(shards=list(compact[size]))
            document["counts"].update(shards=len(compact[size]), per_shard=compact[size])
            document["materialized"] = {"folder": folders[size], "source_shards": len({s.shard for s in samples}),
                                        "read_amplification": round(amplification[size], 3),
                                        "samples_per_shard": samples_per_shard}
        url = f"{out}/{size_label(size)}.json"
        write_json(url, portable(document, out, dataset))
        written.append({"label": size_label(size), "size": size, "shards": document["counts"]["shards"], "url": url,
                        "validation": validation, "materialized": size in compact,
                        "read_amplification": amplification[size] if shard_samples else None})
    return written


@dataclass
class SubsetsArgs:
    """Nested dataset-size subsets for ablations (the paper's Sec. 3.5): rank a dataset's ok samples by original
    resolution, take the top n per size, and write one subset manifest per size that `train/run.py --data <file>`
    reads. Reads the parquet indexes only, never the tars, unless --materialize copies samples."""

    dataset: str
    """Dataset folder or URL written by pipeline.build."""
    sizes: str
    """Comma-separated counts: 500, 1k, 10k, 1.5k, 3m."""
    out: str | None = None
    """Folder/URL for the manifests (default: <dataset>/subsets; <dataset>/subsets/<condition> for a dataset of several
    conditions)."""
    holdout_shards: int = 1
    """Last shards held out of every subset as their shared validation set."""
    condition: str | None = None
    """The condition to rank for, in a dataset built with several tasks (default: the dataset's only one)."""
    materialize: Materialize = "never"
    """Copy each size's samples into compact shards of its own (<out>/<label>/shards/), so training on it reads
    only its samples: always; auto (when its samples sit in shards holding over 2x as many); never (the
    manifests name the dataset's shards and keys: nothing copied)."""
    samples_per_shard: int = SAMPLES_PER_SHARD
    """Samples per shard of a materialized subset."""
    json: bool = False
    """Print one JSON list of the written subsets instead."""


def main(argv: list[str] | None = None) -> int:
    from pipeline.format import cli

    args = cli(SubsetsArgs, args=argv, prog="python -m train.subsets")
    # bad sizes, a size too large, no dataset, a file where --out's folder goes: one line, in their own words
    own_words = (FileNotFoundError, ValueError, FileExistsError, NotADirectoryError)
    try:
        with fmt.refusing_storage_failures(f"the storage of {args.dataset} or --out", keep=own_words):
            written = make_subsets(args.dataset, parse_sizes(args.sizes), args.out, args.holdout_shards,
                                   args.condition, args.materialize, args.samples_per_shard)
    except (*own_words, fmt.StorageFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(written))
    else:
        for w in written:
            copied = "  copied" if w["materialized"] else ""
            print(f"{w['label']:>6}  {w['size']:>9} samples  {w['shards']:>6} shards  {w['url']}{copied}")
        if written and written[0]["validation"]:
            print(f"validation (held out of every size): {written[0]['validation']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
