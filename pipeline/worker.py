"""worker turns one input shard into one output shard: the unit of work the distributor maps over shards"""
from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import cv2
import fsspec
import numpy as np

from annotate import Annotation, Annotator, Captioner
from annotate.weights import one_line
from pipeline import format as fmt
from pipeline.config import BuildConfig
from pipeline.preprocess import (
    center_crop_resize,
    decode_caption,
    decode_image,
    encode_jpeg,
    encode_png,
    reject_reason,
)
from pipeline.reader import (
    IMAGE_EXTS,
    InputChanged,
    InputShard,
    RawSample,
    SplitSample,
    TarSamples,
    output_key,
    read_file_samples,
    valid_utf8,
)
from pipeline.writer import ShardWriter


class ShardUnreadable(RuntimeError):
    """Not one sample could be read from the input shard (not a tar, empty file, ...)."""


class ActorFault(RuntimeError):
    """The actor, not its samples, is at fault (its models did not load; a whole batch failed with one error):
    nothing of the shard is committed, and the distributor retries it on a fresh actor."""


def batch_fault(annotations: list[Annotation | Exception]) -> str:
    """The one error every sample of a batch (two or more) failed with, else "": an actor fault, not bad data."""
    errors = {f"{type(a).__name__}: {a}" for a in annotations if isinstance(a, Exception)}
    whole_batch = len(annotations) > 1 and all(isinstance(a, Exception) for a in annotations)
    return errors.pop() if whole_batch and len(errors) == 1 else ""


@dataclass
class Prepared:
    """A sample after decode + resize, waiting for the annotator. `row` is its parquet row so far."""

    row: dict[str, Any]
    image: np.ndarray | None = None  # (R, R, 3) uint8 RGB; None when it already failed or was filtered
    meta: dict[str, Any] = field(default_factory=dict)


def _source_caption(members: dict[str, bytes], source_meta: dict[str, Any]) -> tuple[str, str]:
    if "txt" in members:
        return decode_caption(members["txt"])
    caption = source_meta.get("caption")
    return (valid_utf8(caption.strip()), "") if isinstance(caption, str) else ("", "")


def _source_meta(members: dict[str, bytes]) -> tuple[dict[str, Any], str]:
    if "json" not in members:
        return {}, ""
    try:
        meta = json.loads(members["json"])
        return (meta, "") if isinstance(meta, dict) else ({}, "source json is not an object")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return {}, f"source json unreadable: {e}"


def prepare(raw: RawSample, key: str, shard: str, cfg: BuildConfig) -> Prepared:
    """Decode, check and resize one sample. Pure: every outcome is a row, never an exception."""
    row: dict[str, Any] = {"key": key, "source_key": raw.key, "status": fmt.FAILED, "error": ""}
    if raw.error:
        return Prepared({**row, "error": raw.error})
    image_ext = next((e for e in IMAGE_EXTS if e in raw.members), None)
    if image_ext is None:
        return Prepared({**row, "error": f"no image member (members: {', '.join(sorted(raw.members)) or 'none'})"})
    source_meta, meta_warning = _source_meta(raw.members)
    # the source's caption only where --caption may keep it: with none or blip, a row that fails before captioning
    # kept it (and an ok row the warning about it) though the dataset holds none of it
    caption, caption_warning = _source_caption(raw.members, source_meta) if cfg.caption in {"source", "auto"} \
        else ("", "")
    row.update(caption=caption, caption_source="source" if caption else "none")
    try:
        image, (width, height) = decode_image(raw.members[image_ext], cfg.resolution, cfg.max_pixels)
    except Exception as e:  # PIL raises many types for corrupt data; each is a recorded failure
        return Prepared({**row, "error": f"{type(e).__name__}: {e}"})
    row.update(original_width=width, original_height=height)
    reason = reject_reason(width, height, cfg.min_size, cfg.max_aspect)
    if reason:
        return Prepared({**row, "status": fmt.FILTERED, "error": reason})
    try:
        image = center_crop_resize(image, cfg.resolution)
    except (cv2.error, MemoryError) as e:  # OpenCV failing to allocate the output: this sample's failure alone
        return Prepared({**row, "error": f"{type(e).__name__}: {one_line(e)}"})
    meta = {
        "key": key,
        "source_key": raw.key,
        "source_shard": shard,
        "original_width": width,
        "original_height": height,
        "url": valid_utf8(url) if isinstance(url := source_meta.get("url"), str) else url,
        "warnings": [w for w in (meta_warning, caption_warning) if w],
    }
    return Prepared({**row, "width": cfg.resolution, "height": cfg.resolution}, image, meta)


def annotate_batch(annotator: Annotator, images: list[np.ndarray], keys: list[str]) -> list[Annotation | Exception]:
    """Annotate a batch; if the batch call fails, retry one by one so one bad image fails alone."""
    try:
        return list(annotator(images, keys))
    except Exception:
        out: list[Annotation | Exception] = []
        for image, key in zip(images, keys, strict=True):
            try:
                out.append(annotator([image], [key])[0])
            except Exception as e:
                out.append(e)
        return out


def caption_batch(captioner: Captioner | None, mode: str, batch: list[Prepared]) -> None:
    """Fill captions by the --caption rule: blip always, auto only where the source has none."""
    if captioner is None or mode in {"source", "none"}:
        return
    todo = [p for p in batch if mode == "blip" or not p.row["caption"]]
    if todo:
        for p, text in zip(todo, captioner([p.image for p in todo]), strict=True):
            p.row.update(caption=text, caption_source="blip")


def task_outcome(annotation: Annotation | Exception) -> tuple[str, str, dict[str, Any]]:
    """(status, error, params) of one task's verdict on one sample."""
    if isinstance(annotation, Exception):
        return fmt.FAILED, f"annotator failed: {type(annotation).__name__}: {annotation}", {}
    if not annotation.keep:
        return fmt.FILTERED, annotation.reason, annotation.params
    return fmt.OK, "", annotation.params


def overall_status(statuses: Iterable[str]) -> str:
    """A sample's status over its tasks: ok when some map was kept (the sample is written), else failed when a
    task failed, else filtered."""
    statuses = set(statuses)
    return next(s for s in (fmt.OK, fmt.FAILED, fmt.FILTERED) if s in statuses)


def finish(p: Prepared, annotations: dict[str, Annotation | Exception], quality: int) -> dict[str, bytes] | None:
    """Record each task's verdict in the row; the tar members when some task kept the sample: the image, the
    caption, the json and one <task>.png per task that kept it. One task: its status, error and params are the
    row's own (the single-task format); several: per-task columns (fmt.task_status_column), params by task."""
    outcomes = {task: task_outcome(a) for task, a in annotations.items()}
    maps: dict[str, bytes] = {}
    for task, annotation in annotations.items():
        if outcomes[task][0] == fmt.OK:
            try:
                maps[fmt.condition_ext(task)] = encode_png(annotation.condition)
            except Exception as e:  # e.g. an annotator returned a map OpenCV cannot encode
                outcomes[task] = (fmt.FAILED, f"encoding failed: {type(e).__name__}: {e}", outcomes[task][2])
    single = len(outcomes) == 1
    if single:
        [(status, error, params)] = outcomes.values()
    else:
        status = overall_status(s for s, _, _ in outcomes.values())
        error = "" if status == fmt.OK else "; ".join(f"{task}: {e}" for task, (_, e, _) in outcomes.items())
        params = {task: params for task, (_, _, params) in outcomes.items()}
        for task, (task_status, task_error, _) in outcomes.items():
            p.row[fmt.task_status_column(task)], p.row[fmt.task_error_column(task)] = task_status, task_error
    p.row["params"] = params
    if status != fmt.OK:
        p.row.update(status=status, error=error)
        return None
    meta = {**p.meta, "params": params, "caption_source": p.row["caption_source"]}
    try:
        members = {
            fmt.IMAGE_EXT: encode_jpeg(p.image, quality),
            **maps,
            fmt.CAPTION_EXT: p.row["caption"].encode("utf-8"),
            fmt.META_EXT: json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        }
    except Exception as e:  # the image itself: no task's map can be stored
        error = f"encoding failed: {type(e).__name__}: {e}"
        p.row.update(status=fmt.FAILED, error=error)
        for task in outcomes if not single else ():
            p.row[fmt.task_status_column(task)], p.row[fmt.task_error_column(task)] = fmt.FAILED, error
        return None
    p.row.update(status=fmt.OK, error="")
    return members


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _prefetch(batches: Iterator[list], fn: Callable, pool: ThreadPoolExecutor | None) -> Iterator[list]:
    """Apply fn to each item of each batch; with a pool, batch i+1 is decoded while batch i is annotated."""
    if pool is None:
        yield from ([fn(x) for x in b] for b in batches)
        return
    pending = None
    for b in batches:
        submitted = [pool.submit(fn, x) for x in b]
        if pending is not None:
            yield [f.result() for f in pending]
        pending = submitted
    if pending is not None:
        yield [f.result() for f in pending]


def _dedupe(samples: Iterable[RawSample], shard: str,
            keys_taken: tuple[tuple[str, str], ...] = ()) -> Iterator[tuple[RawSample, str]]:
    """(sample, output key); a source key seen before in this shard becomes a failed sample (nothing overwritten).
    Two source keys that output_key makes one ('photo 1' and 'photo_1') stay two samples: the later one's key
    ends in a hash of its source key. `keys_taken` (InputShard's): the keys earlier shards of the folder hold, as
    though seen before."""
    source_of: dict[str, str] = dict(keys_taken)  # output key -> the source key it was given to
    for raw in samples:
        key = output_key(raw.key)
        if source_of.get(key, raw.key) != raw.key:
            key = f"{key}-{hashlib.sha256(raw.key.encode()).hexdigest()[:8]}"
        if key in source_of:
            files = ", ".join(f"{raw.key}.{ext}" for ext in sorted(raw.members))  # x.png beside x.jpg: which one
            raw.error = raw.error or f"duplicate key {key!r} in shard {shard} ({files}; the first occurrence kept)"
        source_of.setdefault(key, raw.key)
        yield raw, key


def input_identity(shard: InputShard) -> dict[str, Any]:
    """What the input was, so a later reader can tell if it changed: URL, size, mtime or ETag."""
    if shard.files:
        listing = hashlib.sha256("\n".join(shard.files).encode("utf-8", "surrogateescape")).hexdigest()
        return {"url": shard.url, "files": len(shard.files), "first": shard.files[0], "last": shard.files[-1],
                "files_sha256": listing}
    fs, path = fsspec.core.url_to_fs(shard.url)
    info = fs.info(path)
    return {"url": shard.url, "size": info.get("size"), "etag": info.get("ETag"), "mtime": info.get("mtime")}


def identity_changes(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'size 10240 -> 20480' for each of a tar's size, ETag or mtime (what both record) that differs."""
    return [f"{k} {then[k]} -> {now.get(k)}" for k in ("size", "etag", "mtime")
            if then.get(k) is not None and then[k] != now.get(k)]


@contextmanager
def open_samples(shard: InputShard, max_member_bytes: int | None, regroup: bool = False,
                 identity: dict[str, Any] | None = None) -> Iterator[tuple[Iterable[RawSample], TarSamples | None]]:
    """The shard's samples, and the tar reader (to ask afterwards whether the file was truncated) for a tar;
    `regroup`: a tar whose samples' members are apart, read twice (TarSamples), the second time only if it is still
    the file of `identity` (input_identity's, taken before the first read; by default here)."""
    if shard.files:
        yield read_file_samples(shard.files, shard.url, max_member_bytes), None
        return
    identity = identity or (input_identity(shard) if regroup else None)
    with fsspec.open(shard.url, "rb") as stream:
        reader = TarSamples(stream, max_member_bytes, reopen=partial(reopen_unchanged, shard, identity) if regroup
                            else None)
        yield reader, reader


def reopen_unchanged(shard: InputShard, identity: dict[str, Any]) -> fsspec.core.OpenFile:
    """The tar opened again for a regroup's second read, unless its size, ETag or mtime are no longer those of
    `identity`: the two reads must read the same bytes, or samples would mix two files (InputChanged)."""
    changes = identity_changes(identity, input_identity(shard))
    if changes:
        raise InputChanged(f"{shard.url} changed between the two reads of its regroup ({', '.join(changes)})")
    return fsspec.open(shard.url, "rb")


def add_latents(encoder, kept: list[dict[str, bytes]]) -> None:
    """Each kept sample's latent distribution, from its stored JPEG as the trainer decodes it (one VAE batch)."""
    from annotate.latents import pixels_of_jpeg

    if kept:
        distributions = encoder([pixels_of_jpeg(members[fmt.IMAGE_EXT]) for members in kept])
        for members, distribution in zip(kept, distributions, strict=True):
            members[fmt.LATENT_EXT] = fmt.latent_npy(distribution)


def process_shard(
    shard: InputShard, cfg: BuildConfig, annotators: Annotator | Mapping[str, Annotator],
    captioner: Captioner | None = None, encoder=None, weights: Mapping[str, str] | None = None,
    models: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Input shard -> committed output shard; returns its stats. Raises ShardUnreadable if nothing was read.
    `annotators`: {task: annotator} for every task of cfg (or the one task's annotator); each image is decoded and
    captioned once and passes through all of them. `encoder`: an annotate.latents.LatentEncoder when the job
    stores latents (--latents). `weights`: the sha256s of the models' weights, kept in the stats (a resume onto
    shards made with other weights is refused, as one with other settings is); `models`: what the actor loaded
    (its describe()), kept in the stats too, for a manifest made from them alone. A tar whose samples' members are
    apart is read again, twice, and its members grouped by key (TarSamples; its stats say `regrouped`)."""
    if not isinstance(annotators, Mapping):
        annotators = {cfg.tasks[0]: annotators}
    try:
        return _write_shard(shard, cfg, annotators, captioner, encoder, weights, models, regroup=False)
    except SplitSample:
        return _write_shard(shard, cfg, annotators, captioner, encoder, weights, models, regroup=True)


def _write_shard(shard: InputShard, cfg: BuildConfig, annotators: Mapping[str, Annotator],
                 captioner: Captioner | None, encoder, weights: Mapping[str, str] | None,
                 models: Mapping[str, Any] | None, regroup: bool) -> dict[str, Any]:
    start = time.perf_counter()
    identity = input_identity(shard)
    rows: list[dict[str, Any]] = []
    writer = ShardWriter(cfg.output, shard.name, cfg.tasks)
    threads = cfg.decode_threads if cfg.decode_threads >= 0 else (0 if cfg.tasks == ("canny",) else 2)
    pool = ThreadPoolExecutor(threads) if threads > 0 else None

    def prepare_one(item: tuple[RawSample, str]) -> Prepared:
        return prepare(item[0], item[1], shard.name, cfg)

    def write_finished(pending: list[tuple[Prepared, Any]]) -> None:
        finished = [(p, members.result() if isinstance(members, Future) else members) for p, members in pending]
        kept = [(p, members) for p, members in finished if members is not None]
        if encoder is not None:
            add_latents(encoder, [members for _, members in kept])
        for p, members in kept:
            writer.write(p.row["key"], members)

    try:
        with open_samples(shard, cfg.max_member_mb << 20, regroup, identity) as (samples, reader):
            pending: list[tuple[Prepared, Any]] = []
            keyed = _dedupe(samples, shard.name, shard.keys_taken)
            for batch in _prefetch(_batches(keyed, cfg.batch_size), prepare_one, pool):
                ready = [p for p in batch if p.image is not None]
                if ready:
                    caption_batch(captioner, cfg.caption, ready)
                    keys = [p.row["key"] for p in ready]
                    by_task = {task: annotate_batch(annotator, [p.image for p in ready], keys)
                               for task, annotator in annotators.items()}
                    for task, annotations in by_task.items():
                        fault = batch_fault(annotations)
                        if fault:
                            raise ActorFault(f"all {len(ready)} samples of a batch failed {task} with {fault}")
                    write_finished(pending)  # the previous batch's encodes ran while this one was annotated
                    encode = partial(finish, quality=cfg.jpeg_quality)
                    verdicts = [{task: annotations[i] for task, annotations in by_task.items()}
                                for i in range(len(ready))]
                    pending = [(p, pool.submit(encode, p, v) if pool else encode(p, v))
                               for p, v in zip(ready, verdicts, strict=True)]
                rows += [p.row for p in batch]
            write_finished(pending)
        read_error = reader.error if reader is not None else ""
        if read_error and not rows:
            raise ShardUnreadable(f"{shard.url}: {read_error}")
        stats = {
            "shard": shard.name,
            "input": identity,
            "settings": cfg.output_settings(),
            **({"weights": dict(weights)} if weights is not None else {}),  # pipeline.config.weight_hashes
            **({"models": dict(models)} if models is not None else {}),  # the manifest's model entries
            "samples": len(rows),
            "counts": {s: sum(r["status"] == s for r in rows) for s in fmt.STATUSES},
            **({"task_counts": count_by_task(rows, cfg.tasks)} if len(cfg.tasks) > 1 else {}),
            "read_error": read_error,
            "truncated": bool(reader is not None and reader.truncated),  # the input file's bytes end early
            **({"regrouped": True} if regroup else {}),  # its samples' members were apart: read twice more
            "seconds": round(time.perf_counter() - start, 3),
            "host": socket.gethostname(),
            "node_id": _ray_node_id(),
            "finished_at": time.time(),
        }
        writer.commit(rows, stats)
        return stats
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def count_by_task(rows: list[dict[str, Any]], tasks: Iterable[str]) -> dict[str, dict[str, int]]:
    """{task: {status: samples}}: a sample that failed before annotation counts under its own status for every
    task (fmt.task_status)."""
    return {task: {s: sum(fmt.task_status(r, task) == s for r in rows) for s in fmt.STATUSES} for task in tasks}


def _ray_node_id() -> str | None:
    """Which Ray node ran the shard (None outside Ray): lets a user see the work spread over a cluster."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None
