"""data streams the dataset job's output shards into ControlNet training batches with webdataset"""
from __future__ import annotations

import dataclasses
import heapq
import io
import itertools
import json
import logging
import os
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import cv2
import fsspec
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from pipeline import format as fmt

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 1000  # raw samples held per worker for the sample shuffle (~60 KB each at 512 px)
MAX_BAD_STREAK = 1000  # this many bad samples in a row means the data is broken, not a sample
MIN_DRY_SHARDS = 100  # resampling: shards read in a row with no usable sample before giving up
LOGGED_PER_REASON = 5  # skips logged with their error per reason and worker; the rest are only counted

# why a sample (or a whole shard read) was skipped: the keys of SkipCounter.counts and batch["skipped"]
MISSING = "missing"  # a member (jpg, <task>.png, txt) is absent
DECODE = "decode"  # an image or the caption does not decode
SIZE = "size"  # image and condition differ in size, or are not square, so no resize fits them
TOO_LARGE = "too_large"  # a member over the shard reader's cap (fmt.MAX_MEMBER_BYTES), never read into memory, or
# an image over MAX_SAMPLE_PIXELS, refused from its header before decoding
MAX_SAMPLE_PIXELS = 4096 * 4096  # the dataset job stores samples at the training resolution (512-768 px)
READ = "read"  # a shard could not be opened or its tar stream broke (counts shards, not samples)


# ---------------------------------------------------------------- resolving a spec to shards


@dataclass
class DataSource:
    """Shards to stream, the condition task, the keys to keep (None: all), and the dataset that wrote them.
    `conditions`: every condition the shards hold; with several (a multi-task dataset), the samples without a map
    of `task` (that task filtered or failed them, as the index records) are passed over."""

    urls: list[str]
    task: str | None = None
    keys: frozenset[str] | None = None
    counts: dict[str, int] = field(default_factory=dict)  # "shards"; "samples" where it is known up front
    dataset: str | None = None  # the dataset folder/URL (its manifest.json holds the job's settings), if known
    validation: str | None = None  # a subset's shared held-out validation manifest, if it names one
    conditions: tuple[str, ...] = ()
    weights: tuple[int, ...] | None = None  # samples of this stream in each shard (urls' order), where known
    url_keys: Mapping[str, frozenset[str]] | None = None  # the keys to keep in each shard, where they differ by
    # shard (several subsets in one --data, which may share keys or shards: _merge)

    @property
    def key_filter(self) -> frozenset[str] | Mapping[str, frozenset[str]] | None:
        """What keep_keys keeps: the keys per shard where known, else the keys, else everything (None)."""
        return self.url_keys if self.url_keys is not None else self.keys


def some_shards(source: DataSource, part: slice) -> DataSource:
    """The source over a slice of its shards (their weights with them)."""
    weights = source.weights[part] if source.weights is not None else None
    return dataclasses.replace(source, urls=source.urls[part], weights=weights)


def without_shards(source: DataSource, held: DataSource) -> DataSource:
    """The source less the shards `held` names: validation data named apart from --data but inside it (the dataset
    and its last shard, or the same dataset twice) was trained on, and its curve scored memorised samples. A
    source left with no shard is refused: there would be nothing to train on."""
    named = {shard_identity(url) for url in held.urls}
    kept = [i for i, url in enumerate(source.urls) if shard_identity(url) not in named]
    if not kept:
        raise ValueError(f"every shard of --data is in --validation-data ({len(held.urls)} shards): nothing is left "
                         "to train on once they are held out; give --data without them")
    urls = [source.urls[i] for i in kept]
    weights = tuple(source.weights[i] for i in kept) if source.weights is not None else None
    url_keys = {url: source.url_keys[url] for url in urls} if source.url_keys is not None else None
    return dataclasses.replace(source, urls=urls, weights=weights, url_keys=url_keys,
                               counts={**source.counts, "shards": len(urls)})


def shard_identity(url: str) -> str:
    """A shard URL as one string however it was written: a local path resolved (a tar named relative to the working
    directory is the one its dataset lists absolute), other URLs as they are."""
    if "://" in url and not url.startswith("file://"):
        return url
    return os.path.realpath(url.removeprefix("file://"))


def resolve_shards(spec: str | list[str], condition: str | None = None, flag: str = "--data",
                   alike: bool = True) -> DataSource:
    """A dataset folder/URL, its manifest.json, a subset manifest (.json), or tar URLs (list, glob, braces).
    `condition`: the condition to train on, for data holding several (default: the data's only one); `flag`: what
    gave the data, for the messages; `alike`: several datasets must be made alike (check_made_alike), which readers
    of the images alone need not ask."""
    if isinstance(spec, list | tuple):
        if len(spec) == 1:
            return resolve_shards(spec[0], condition, flag)
        parts = [resolve_shards(s, condition, flag) for s in spec]
        if alike:
            check_made_alike(parts, flag)
        return _merge(parts)
    if spec.endswith(".json"):
        return _from_json(spec, condition)
    if spec.endswith(fmt.TAR_SUFFIX) or _is_pattern(spec):
        return _tars(expand(spec), condition=condition)
    return _from_folder(spec, condition, flag)


class SeveralConditions(ValueError):
    """Data holding several conditions, read without naming one."""

    def __init__(self, where: str, conditions: list[str]):
        super().__init__(f"{where} holds the conditions {', '.join(conditions)}: choose one with --condition")
        self.conditions = conditions


def resolve_images(spec: str | list[str]) -> DataSource:
    """For readers of the images and captions alone (base pretraining): any condition the data holds will do, so
    the first (in a multi-task dataset, Canny's keeps every image it could read)."""
    try:
        return resolve_shards(spec, alike=False)
    except SeveralConditions as e:
        return resolve_shards(spec, e.conditions[0], alike=False)


def choose_condition(available: list[str], condition: str | None, where: str) -> str | None:
    """The condition to train on: the one asked for, which the data must hold, else the data's only one."""
    if condition is None:
        if len(available) > 1:
            raise SeveralConditions(where, available)
        return available[0] if available else None
    if available and condition not in available:
        raise ValueError(f"{where} holds no {condition!r} condition maps (it holds {', '.join(available)})")
    return condition


def made_with(manifest: Mapping[str, Any], task: str | None) -> dict[str, str]:
    """What the trainer reads from one dataset's manifest for all the data it streams: the condition's settings (the
    fidelity scorer annotates with them) and the stored latents (whose VAE, at what size), as words for a message.
    The weights' path is left out: the same weights in two places are the same settings."""
    from annotate import annotator_params

    config = manifest.get("config", {})
    latents = manifest.get("latents") or {}
    params = {k: v for k, v in annotator_params(task, config).items() if k != "weights"} if task else {}
    stored = (f"the VAE sha256 {str(latents.get('vae_sha256'))[:12]}... at {config.get('resolution')} px"
              if latents else "none")
    return {f"{task} settings": ", ".join(f"{k} {v}" for k, v in sorted(params.items())), "stored latents": stored}


def check_made_alike(parts: list[DataSource], flag: str) -> None:
    """Several datasets in one --data must agree on what the trainer takes from the first one's manifest for all:
    the condition's settings scored held-out samples of the others with the first's Canny thresholds or seed, and
    stored latents in the first alone had every sample of the others skipped for a missing latent (or latents of
    another VAE or size trained on). One line naming the setting instead."""
    datasets = list(dict.fromkeys(part.dataset for part in parts if part.dataset is not None))
    if len(datasets) < 2:
        return
    first, *others = datasets
    expected = made_with(fmt.read_manifest(first), parts[0].task)
    for other in others:
        found = made_with(fmt.read_manifest(other), parts[0].task)
        for setting, value in expected.items():
            if found[setting] != value:
                raise ValueError(f"{flag}'s datasets {first} and {other} were made with other {setting} ({value}; "
                                 f"{found[setting]}): the trainer reads one for both; give datasets made alike, or "
                                 f"make one again with the other's settings")


def _merge(parts: list[DataSource]) -> DataSource:
    """Several specs streamed as one: their shards together, each once. Subsets keep each their own keys in their
    own shards: one subset's keys applied to another's shards let in samples of neither (two datasets made from the
    same photos share keys), and a shard two subsets name was streamed twice. A shard's weight is the larger of
    its parts' (exact for nested subsets of one dataset)."""
    if not parts:
        raise ValueError("no shard URLs given")
    filters = [p.keys for p in parts]
    if any(k is None for k in filters) and not all(k is None for k in filters):
        raise ValueError("cannot mix subset manifests with whole datasets or shard lists in one --data")
    conditions = tuple(dict.fromkeys(c for p in parts for c in p.conditions))
    urls = list(dict.fromkeys(u for p in parts for u in p.urls))
    weights = None
    if all(p.weights is not None for p in parts):
        weight_of: dict[str, int] = {}
        for part in parts:
            for url, weight in zip(part.urls, part.weights, strict=True):
                weight_of[url] = max(weight_of.get(url, 0), weight)
        weights = tuple(weight_of[u] for u in urls)
    if filters[0] is None:
        return dataclasses.replace(_tars(urls, parts[0].task, None, parts[0].dataset, conditions=conditions),
                                   weights=weights)
    url_keys: dict[str, frozenset[str]] = {}
    for part in parts:
        for url in part.urls:
            url_keys[url] = url_keys.get(url, frozenset()) | part.keys
    by_dataset: dict[str | None, frozenset[str]] = {}  # the same key in two datasets is two samples
    for part in parts:
        by_dataset[part.dataset] = by_dataset.get(part.dataset, frozenset()) | part.keys
    merged = _tars(urls, parts[0].task, frozenset().union(*filters), parts[0].dataset, conditions=conditions)
    return dataclasses.replace(merged, weights=weights, url_keys=url_keys,
                               counts={**merged.counts, "samples": sum(map(len, by_dataset.values()))})


def _is_pattern(spec: str) -> bool:
    return any(c in spec for c in "*?[{")


def _like(spec: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path fsspec returned, as a URL in the spec's style (plain local paths stay plain)."""
    return fs.unstrip_protocol(path) if "://" in spec else path


def expand(spec: str) -> list[str]:
    """Brace ranges ({00000..00099}, webdataset's syntax), then globs, in sorted order; plain URLs as they are."""
    urls: list[str] = []
    for url in expand_urls(spec):
        if not any(c in url for c in "*?["):
            urls.append(url)
            continue
        fs, path = fsspec.core.url_to_fs(url)
        fs.invalidate_cache()
        found = sorted(fs.glob(path))
        if not found:
            raise FileNotFoundError(f"no shards match {url}")
        urls += [_like(url, fs, p) for p in found]
    return urls


def _tars(urls: list[str], task: str | None = None, keys: frozenset[str] | None = None,
          dataset: str | None = None, condition: str | None = None,
          conditions: tuple[str, ...] | None = None) -> DataSource:
    """Tar URLs; the conditions they hold (given, else read off the first sample's <key>.<task>.png members)."""
    if not urls:
        raise ValueError("no shard URLs given")
    counts = {"shards": len(urls), **({"samples": len(keys)} if keys is not None else {})}
    dataset = dataset or dataset_of(urls[0])
    if conditions is None:  # those of the dataset the tars belong to; else what the first sample holds
        known = fmt.dataset_tasks(fmt.read_manifest(dataset)) if dataset else []
        conditions = tuple(known or ([task] if task else infer_tasks(urls[0])))
    task = choose_condition(list(conditions), condition or task, urls[0])
    return DataSource(urls, task, keys, counts, dataset, conditions=conditions)


def dataset_of(shard_url: str) -> str | None:
    """The dataset a shard URL belongs to: `<dataset>/shards/<name>.tar` with a `<dataset>/manifest.json`."""
    folder, _, _ = shard_url.rpartition("/")
    dataset, _, shards = folder.rpartition("/")
    if shards != fmt.SHARDS_DIR or not dataset:
        return None
    fs, path = fsspec.core.url_to_fs(f"{dataset}/{fmt.MANIFEST}")
    return dataset if fs.exists(path) else None


def _from_folder(out: str, condition: str | None = None, flag: str = "--data") -> DataSource:
    """A dataset written by the dataset job: its committed shards (those with a stats.json), its conditions, and
    the samples holding a map of the one to train on."""
    shards = fmt.committed_shards(out)
    if not shards:
        raise fmt.no_shards_error(out, named_as=f"{flag} ")
    urls = [shard.tar for shard in shards]
    conditions = tuple(fmt.dataset_tasks(fmt.read_manifest(out)) or infer_tasks(urls[0]))
    task = choose_condition(list(conditions), condition, out)
    ok = {stats.get("shard"): fmt.task_counts(stats, task).get(fmt.OK, 0) for stats in fmt.read_stats(shards)}
    samples = sum(ok.values())
    if samples == 0:
        raise ValueError(f"{out} holds no usable {task} samples (its index says why: status and error columns)")
    weights = tuple(ok.get(shard.name, 0) for shard in shards) if None not in ok else None
    return DataSource(urls, task, None, {"shards": len(urls), "samples": samples}, out, conditions=conditions,
                      weights=weights)


def _from_json(spec: str, condition: str | None = None) -> DataSource:
    """A subset manifest (fmt.SUBSET_*), or a dataset's own manifest.json (meaning its folder)."""
    with fsspec.open(spec, "rb") as f:
        try:
            obj = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{spec} is not JSON ({e})") from None
    base, _, name = spec.rpartition("/")
    if isinstance(obj, dict) and fmt.SUBSET_KEYS in obj:
        urls = [fmt.url_from(base or ".", u) for u in obj[fmt.SUBSET_SHARDS]]
        task = obj.get(fmt.SUBSET_TASK)  # the condition the subset was chosen for: its samples all hold its map
        dataset = fmt.url_from(base or ".", obj["dataset"]) if obj.get("dataset") else None
        source = _tars(urls, task, frozenset(obj[fmt.SUBSET_KEYS]), dataset, condition,
                       conditions=(task,) if task else None)
        per_shard = obj.get("counts", {}).get("per_shard", {})  # the subset's samples in each of its shards
        weights = tuple(per_shard[u] for u in obj[fmt.SUBSET_SHARDS]) if set(obj[fmt.SUBSET_SHARDS]) <= set(
            per_shard) else None
        validation = obj.get(fmt.SUBSET_VALIDATION)
        return dataclasses.replace(source, validation=fmt.url_from(base or ".", validation) if validation else None,
                                   weights=weights)
    if name == fmt.MANIFEST:
        return _from_folder(base or ".", condition)
    raise ValueError(f"{spec}: neither a subset manifest (no {fmt.SUBSET_KEYS!r}) nor a dataset's {fmt.MANIFEST}")


def task_of(member: str) -> str | None:
    """'<key>.hed.png' -> 'hed'; None for the other members."""
    _, ext = base_plus_ext(member)
    parts = (ext or "").split(".")
    return parts[0] if len(parts) == 2 and parts[1] == "png" else None


def infer_tasks(url: str, members: int = 16) -> list[str]:
    """The tasks named by the `<key>.<task>.png` members of a shard's first sample (among its first members)."""
    tasks, first_key = [], None
    with fsspec.open(url, "rb") as stream:
        tar = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 (a stream: nothing to close but the file)
        for i, info in enumerate(tar):  # headers only: the members' bytes are passed over, never held
            key, _ = base_plus_ext(info.name)
            first_key = first_key or key
            if i >= members or (tasks and key != first_key):  # past the first sample that names a task
                break
            if (task := task_of(info.name)) and task not in tasks:
                tasks.append(task)
    return tasks


# ---------------------------------------------------------------- decoding one sample (pure)


class BadSample(ValueError):
    """A sample that cannot be used; `reason` is what it is counted under (MISSING, DECODE, SIZE, TOO_LARGE)."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def members(sample: Mapping[str, Any], task: str) -> tuple[bytes, bytes, bytes]:
    """(jpg, <task>.png, txt) bytes of a grouped tar sample."""
    names = (fmt.IMAGE_EXT, fmt.condition_ext(task), fmt.CAPTION_EXT)
    refuse_oversized(sample, names)
    missing = [n for n in names if n not in sample]
    if missing:
        raise BadSample(MISSING, f"{sample.get('__key__')} has no {', '.join(missing)} (has {_exts(sample)})")
    return sample[names[0]], sample[names[1]], sample[names[2]]


def refuse_oversized(sample: Mapping[str, Any], names: tuple[str, ...]) -> None:
    """A member the sample needs was over the reader's cap (so it is absent, but not missing)."""
    large = {n: size for n, size in sample.get(fmt.OVERSIZED, {}).items() if n in names}
    if large:
        sizes = ", ".join(f"{n} is {size} bytes" for n, size in large.items())
        raise BadSample(TOO_LARGE, f"{sample.get('__key__')}: {sizes}, over the {fmt.MAX_MEMBER_BYTES}-byte read cap")


def _exts(sample: Mapping[str, Any]) -> str:
    return ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "nothing"


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> (H, W, 3) uint8 RGB; 1-channel maps are repeated to 3 channels."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_SAMPLE_PIXELS:  # a decompression bomb: refused from the header
                raise BadSample(TOO_LARGE, f"image is {im.width}x{im.height}, over {MAX_SAMPLE_PIXELS} pixels")
            im.load()  # decode now: a truncated file fails here, not later
            gray = im.mode in {"1", "L", "LA", "I", "I;16", "F"}
            array = np.array(im.convert("L" if gray else "RGB"))  # a writable copy, as torch wants
    except BadSample:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadSample(DECODE, f"{type(e).__name__}: {e}") from e
    if array.size == 0:
        raise BadSample(DECODE, "empty image")
    return np.repeat(array[:, :, None], 3, axis=2) if array.ndim == 2 else array


def decode_caption(data: bytes) -> str:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise BadSample(DECODE, f"caption is not UTF-8: {e}") from e


def fit(image: np.ndarray, condition: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Both (R, R, 3) uint8; resized when stored at another resolution (they are square and aligned)."""
    if image.shape != condition.shape or image.shape[0] != image.shape[1]:
        raise BadSample(SIZE, f"image {image.shape[:2]} and condition {condition.shape[:2]} are not one square size")
    return resize(image, resolution), resize(condition, resolution)


def resize(array: np.ndarray, resolution: int) -> np.ndarray:
    """Square (S, S, C) -> (R, R, C): area when shrinking, Lanczos when growing (ControlNet's resize_image)."""
    if array.shape[0] == resolution:
        return array
    interpolation = cv2.INTER_AREA if array.shape[0] > resolution else cv2.INTER_LANCZOS4
    return cv2.resize(array, (resolution, resolution), interpolation=interpolation)


def to_tensors(image: np.ndarray, condition: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, R, 3) uint8 pair -> target (3, R, R) in [-1, 1], condition (3, R, R) in [0, 1], as the paper trains."""
    target = as_tensor(image).permute(2, 0, 1).float().div(127.5).sub(1.0)
    return target, condition_tensor(condition)


def condition_tensor(condition: np.ndarray) -> torch.Tensor:
    return as_tensor(condition).permute(2, 0, 1).float().div(255.0)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """The array as a tensor without a copy when it is contiguous and writable; a decoder's read-only array (PIL's
    through np.asarray) is copied, which torch.from_numpy would take with a warning that it is not writable."""
    return torch.from_numpy(np.require(array, requirements=("C", "W")))


def drop_prompt(caption: str, rng: random.Random, p: float) -> str:
    """The paper's prompt dropout: "" with probability p, so the model learns the condition alone."""
    return "" if rng.random() < p else caption


def decode_sample(sample: Mapping[str, Any], task: str, resolution: int, latents: bool = False) -> dict[str, Any]:
    """A grouped tar sample -> pixel_values, conditioning_pixel_values, caption, key. Raises BadSample.
    latents: the stored latent distribution (the dataset job's --latents, at the stored resolution) replaces the
    image, which is then not decoded at all."""
    jpg, png, txt = members(sample, task)
    out = {"caption": decode_caption(txt), "key": sample["__key__"]}
    if latents:
        condition = decode_image(png)
        if condition.shape[0] != condition.shape[1]:
            raise BadSample(SIZE, f"condition {condition.shape[:2]} is not square")
        out["latent_dist"] = latent_distribution(sample)
        out["conditioning_pixel_values"] = condition_tensor(resize(condition, resolution))
        return out
    image, condition = fit(decode_image(jpg), decode_image(png), resolution)
    out["pixel_values"], out["conditioning_pixel_values"] = to_tensors(image, condition)
    return out


def latent_distribution(sample: Mapping[str, Any]) -> torch.Tensor:
    """<key>.latent.npy -> (2, C, h, w) float32: the VAE's mean and std for the stored image."""
    refuse_oversized(sample, (fmt.LATENT_EXT,))
    if fmt.LATENT_EXT not in sample:
        raise BadSample(MISSING, f"{sample.get('__key__')} has no {fmt.LATENT_EXT} (has {_exts(sample)})")
    try:
        array = fmt.read_latent_npy(sample[fmt.LATENT_EXT])
    except Exception as e:  # numpy raises several types for a bad .npy
        raise BadSample(DECODE, f"{fmt.LATENT_EXT}: {type(e).__name__}: {e}") from e
    if array.ndim != 4 or array.shape[0] != 2 or not np.isfinite(array).all():
        raise BadSample(DECODE, f"{fmt.LATENT_EXT} of shape {array.shape} is not a finite (2, C, h, w) distribution")
    return torch.from_numpy(array.astype(np.float32))


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {
        "conditioning_pixel_values": torch.stack([s["conditioning_pixel_values"] for s in samples]),  # in [0, 1]
        "caption": [s["caption"] for s in samples],  # B str, "" where dropped
        "key": [s["key"] for s in samples],
    }
    for name in ("pixel_values", "latent_dist"):  # (B, 3, R, R) in [-1, 1]; or (B, 2, C, R/8, R/8)
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    return batch


# ---------------------------------------------------------------- skip accounting


class SkipCounter:
    """Counts what the stream skipped, by reason, in the process that iterates (main, or each loader worker).

    Used as webdataset's `handler=`: a handler returns True to skip and go on. Bad samples must be BadSample
    (anything else from the decode stage is a bug and is raised); shard-level read errors count as READ.
    A loader worker's counter lives in that worker, so each batch carries its worker's counts since its previous
    batch (batch["skipped"]); totals for any num_workers: a fresh SkipCounter() updated with every batch's.
    """

    def __init__(self, max_streak: int = MAX_BAD_STREAK, max_dry_shards: int = MIN_DRY_SHARDS):
        self.counts: Counter[str] = Counter()
        self.max_streak, self.max_dry_shards = max_streak, max_dry_shards
        self.streak = 0  # bad samples since the last good one
        self.dry_shards = 0  # shards opened since the last sample that passed the key filter
        self._reported: Counter[str] = Counter()

    def skip(self, reason: str, exn: BaseException) -> bool:
        self.counts[reason] += 1
        if self.counts[reason] <= LOGGED_PER_REASON:
            log.warning("skipped (%s): %s", reason, exn)
        return True

    def bad_sample(self, exn: BaseException) -> bool:
        if not isinstance(exn, BadSample):
            raise exn
        self.streak += 1
        if self.streak >= self.max_streak:
            raise RuntimeError(f"{self.streak} bad samples in a row ({dict(self.counts)}); last: {exn}") from exn
        return self.skip(exn.reason, exn)

    def read_error(self, exn: BaseException) -> bool:
        return self.skip(READ, exn)

    def good_sample(self) -> None:
        self.streak = 0

    def opened_shard(self) -> None:
        self.dry_shards += 1
        if self.dry_shards > self.max_dry_shards:
            raise RuntimeError(
                f"{self.dry_shards - 1} shards in a row gave no sample ({dict(self.counts)}): missing or broken "
                "shards, or subset keys that are not in them"
            )

    def passed(self) -> None:
        self.dry_shards = 0

    def delta(self) -> dict[str, int]:
        """Counts since the previous call: what rides on each batch as batch["skipped"]."""
        new = self.counts - self._reported
        self._reported = self.counts.copy()
        return dict(new)

    def update(self, counts: Mapping[str, int]) -> None:
        """Add counts from elsewhere, e.g. batch["skipped"] of batches made in loader workers."""
        self.counts.update(counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class ShardCursor:
    """Where one worker's stream goes on: (shard URL, byte offset of the next unread sample) after the last raw
    sample it read, or None where the next sample starts a fresh shard (the last one was read to its end, broke,
    or is compressed, where offsets are not file positions).

    A resampled epoch reads exactly the samples it yields (shuffled_once), so after an epoch's last batch the
    cursor marks the first sample nothing has read: the next epoch (or a run resumed from a checkpoint taken
    there) starts from it, and goes on through every shard it draws to that shard's end."""

    def __init__(self, start: tuple[str, int] | None = None):
        self.at = start

    def read(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """A pipeline stage right after the tar reader: every raw sample moves the cursor past it."""
        for sample in samples:
            offset = sample.get(fmt.NEXT_OFFSET)
            self.at = (sample["__url__"], offset) if offset is not None else None
            yield sample

    def lost(self) -> None:
        """The shard being read broke: go on with a fresh one rather than meet the break again."""
        self.at = None

    def shards(self, drawn: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
        """The first pipeline stage: the rest of the shard the cursor is in, if any, then the shards drawn."""
        if self.at is not None:
            url, offset = self.at
            yield {"url": url, "offset": offset}
        yield from drawn


# ---------------------------------------------------------------- pipeline stages


def keep_keys(samples: Iterable[dict[str, Any]], keys: frozenset[str] | Mapping[str, frozenset[str]] | None,
              counter: SkipCounter, member: str | None = None) -> Iterator[dict]:
    """Only the subset's keys pass (all when keys is None; per shard URL for a mapping: DataSource.key_filter), and
    with `member`, only samples that hold it (the condition map of a multi-task dataset: the others were filtered
    for that task, as the index records, and are passed over like keys outside a subset, not counted as bad); a
    passing sample proves the shards readable."""
    for sample in samples:
        wanted = keys.get(sample["__url__"], frozenset()) if isinstance(keys, Mapping) else keys
        if (wanted is None or sample["__key__"] in wanted) and (member is None or member in sample):
            counter.passed()
            yield sample


def decoded(
    samples: Iterable[dict[str, Any]], task: str, resolution: int, dropout: float, rng: random.Random,
    counter: SkipCounter, latents: bool = False,
) -> Iterator[dict[str, Any]]:
    """Decode each sample, skip and count the bad ones (webdataset's map with a handler), drop prompts."""
    decode = wds.map(partial(decode_sample, task=task, resolution=resolution, latents=latents),
                     handler=counter.bad_sample)
    for sample in decode(samples):
        counter.good_sample()
        yield {**sample, "caption": drop_prompt(sample["caption"], rng, dropout)}


def condition_member(source: DataSource) -> str | None:
    """The member a sample must hold to be streamed: the chosen map, where the data holds several conditions."""
    return fmt.condition_ext(source.task) if source.task and len(source.conditions) > 1 else None


def stamped_batches(samples: Iterable[dict[str, Any]], batch_size: int, partial_last: bool,
                    stamp: Callable[[], dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Batches of `batch_size`, each with what `stamp` says as it is made (the skip counts since this worker's
    previous batch, the worker's stream position). A batch goes out as soon as it is full: webdataset's `batched`
    waits for the sample after it, which reads and decodes one sample past an epoch's last batch for nothing."""
    batch: list[dict[str, Any]] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield {**collate(batch), **stamp()}
            batch = []
    if batch and partial_last:
        yield {**collate(batch), **stamp()}


def shard_split(urls: list[str], seed: int, epoch: int, rank: int, world_size: int, worker: int,
                num_workers: int) -> list[str]:
    """This (rank, worker)'s shards of one pass: one seeded order shared by all, dealt out round-robin."""
    order = list(urls)
    random.Random(_seed(seed, epoch)).shuffle(order)  # identical on every rank and worker: a partition
    return order[rank::world_size][worker::num_workers]


def as_shards(urls: list[str]) -> Iterator[dict[str, str]]:
    """The first pipeline stage of a pass: {url} per shard (a list itself would be read as stages)."""
    return iter([{"url": url} for url in urls])


def worker_share(total: int, worker: int, num_workers: int) -> int:
    """How many of `total` batches this loader worker makes, so the workers together make exactly `total`."""
    return total // num_workers + (worker < total % num_workers)


def _seed(*parts: int) -> int:
    """A 32-bit seed from ints, the same in every process (unlike hash() of a str)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# ---------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class StreamConfig:
    resolution: int
    batch_size: int
    seed: int
    prompt_dropout: float
    epoch_samples: int | None  # per rank; None: one pass over this rank's shards, no resampling
    rank: int
    world_size: int
    shuffle_buffer: int
    latents: bool = False  # read the stored latent distributions instead of decoding the images
    # resampled: where each loader worker's stream goes on (ShardCursor.at, by worker; batch["stream_position"] of
    # its previous epoch's last batch); missing or None: at the start of a freshly drawn shard
    start: tuple[tuple[str, int] | None, ...] = ()


class ControlNetStream(IterableDataset):
    """Batches of (target, condition, caption) from shards; each iter() is one epoch.

    epoch_samples set: shards resampled with replacement, seeded per (seed, rank, worker, epoch), so ranks see
    different sequences, and every rank yields exactly epoch_samples // batch_size full batches. Each worker reads
    a shard it draws to the end: its next epoch goes on where the last one stopped, and a batch's
    "stream_position" is its worker's ShardCursor, which another stream's cfg.start takes up (the trainer's next
    segment, or a resumed run) to go on from there.
    epoch_samples None: one pass; the shards are dealt out to ranks, then to workers (disjoint sets), and the
    last batch of each worker may be short. The epoch counter advances on each iter() in the iterating process;
    set_epoch() sets it explicitly (needed with non-persistent workers, which iterate a fresh copy each epoch), and
    starts the workers again from cfg.start.
    """

    def __init__(self, source: DataSource, cfg: StreamConfig):
        super().__init__()
        if source.task is None:
            raise ValueError(f"no task known for {source.urls[0]}: no manifest and no <key>.<task>.png member")
        if cfg.epoch_samples is not None and cfg.epoch_samples < cfg.batch_size:
            raise ValueError(f"epoch_samples={cfg.epoch_samples} is less than one batch of {cfg.batch_size}")
        if cfg.epoch_samples is None and len(source.urls) < cfg.world_size:
            raise ValueError(f"{len(source.urls)} shards cannot be split over {cfg.world_size} ranks; resample")
        if not 0.0 <= cfg.prompt_dropout <= 1.0:
            raise ValueError(f"prompt_dropout={cfg.prompt_dropout} is not a probability")
        self.source, self.cfg = source, cfg
        self.epoch = 0
        self.cursors: dict[int, ShardCursor] = {}  # by loader worker, in the iterating process
        self.skips = SkipCounter(max_dry_shards=max(MIN_DRY_SHARDS, 4 * len(source.urls)))

    @property
    def batches_per_epoch(self) -> int | None:
        """Batches one rank yields per epoch (None for a one-pass stream)."""
        return None if self.cfg.epoch_samples is None else self.cfg.epoch_samples // self.cfg.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.cursors = {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        epoch, self.epoch = self.epoch, self.epoch + 1
        return iter(self.pipeline(worker, num_workers, epoch))

    def pipeline(self, worker: int, num_workers: int, epoch: int) -> wds.DataPipeline:
        cfg, counter = self.cfg, self.skips
        shard_seed, shuffle_seed, dropout_seed = np.random.SeedSequence(
            [cfg.seed, cfg.rank, worker, epoch]).generate_state(3).tolist()
        resampled = cfg.epoch_samples is not None
        share = worker_share(self.batches_per_epoch or 0, worker, num_workers)  # this worker's batches (resampled)
        start = cfg.start[worker] if worker < len(cfg.start) else None
        cursor = self.cursors[worker] = ShardCursor(self.cursors[worker].at if worker in self.cursors else start)
        if resampled:
            shards: Any = partial(cursor.shards, resampled_shards(self.source.urls, self.source.weights, shard_seed))
            shuffle: Any = partial(shuffled_once, count=share * cfg.batch_size, bufsize=cfg.shuffle_buffer,
                                   seed=shuffle_seed)
        else:  # a finite pass: webdataset's shuffle empties its buffer at the end
            mine = shard_split(self.source.urls, cfg.seed, epoch, cfg.rank, cfg.world_size, worker, num_workers)
            shards = partial(as_shards, mine)
            shuffle = wds.shuffle(cfg.shuffle_buffer, initial=min(100, cfg.shuffle_buffer), seed=shuffle_seed)

        def read_error(exn: BaseException) -> bool:
            cursor.lost()
            return counter.read_error(exn)

        def stamp() -> dict[str, Any]:
            return {"skipped": counter.delta(), "stream_position": {"worker": worker, "at": cursor.at}}

        stages: list[Any] = [
            shards,
            partial(fmt.shard_samples, handler=read_error, opened=counter.opened_shard),  # {__key__, jpg, ...}
            cursor.read,
            partial(keep_keys, keys=self.source.key_filter, counter=counter, member=condition_member(self.source)),
            shuffle,
            partial(decoded, task=self.source.task, resolution=cfg.resolution, dropout=cfg.prompt_dropout,
                    rng=random.Random(dropout_seed), counter=counter, latents=cfg.latents),
            partial(stamped_batches, batch_size=cfg.batch_size, partial_last=not resampled, stamp=stamp),
        ]
        if resampled:
            stages.append(wds.slice(share))
        return wds.DataPipeline(*stages)


def shuffled_once(samples: Iterable[dict[str, Any]], count: int, bufsize: int, seed: int) -> Iterator[dict[str, Any]]:
    """An endless stream's next `count` samples, shuffled within a buffer of `bufsize` and all of them yielded (the
    buffer is emptied at the end), then the samples after them in stream order: only read where decoding skipped
    bad samples, to fill the epoch's last batches.

    webdataset's shuffle on an endless stream reads two samples for each one it yields while its buffer fills, and
    what the buffer holds when the epoch (or, in the trainer, the segment up to the next checkpoint) ends is read
    for nothing: a buffer per loader worker at every restart of the stream, 25-50% more reads from storage at SD
    1.5's checkpoint cadence. Read this way, an epoch reads the samples it yields and no more."""
    samples = iter(samples)
    yield from wds.shuffle(bufsize, initial=min(100, bufsize), seed=seed)(itertools.islice(samples, count))
    yield from samples


def resampled_shards(urls: list[str], weights: tuple[int, ...] | None, seed: int) -> Iterator[dict[str, str]]:
    """Shards drawn with replacement, each in proportion to the samples it holds for this stream (uniformly when
    unknown), so every sample is drawn equally often however the shards are filled: a subset's few samples in a
    big shard, or a short last shard, are not over-weighted."""
    if weights is not None and len(weights) != len(urls):
        raise ValueError(f"{len(weights)} shard weights for {len(urls)} shards")
    rng = random.Random(seed)
    cumulative = list(itertools.accumulate(weights)) if weights and sum(weights) > 0 else None
    while True:
        yield {"url": rng.choices(urls, cum_weights=cumulative)[0]}


def make_dataset(
    source: DataSource | str | list[str],
    *,
    resolution: int,
    batch_size: int,
    seed: int,
    prompt_dropout: float = 0.5,
    epoch_samples: int | None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = SHUFFLE_BUFFER,
    latents: bool = False,
    start: tuple[tuple[str, int] | None, ...] = (),
) -> ControlNetStream:
    """The stream of batches for one rank. Workers split the work by torch's worker info at iter(); num_workers
    (the loader's) is only checked here: in one pass, a worker without a shard of its own makes no batch."""
    source = source if isinstance(source, DataSource) else resolve_shards(source)
    if epoch_samples is None and len(source.urls) < world_size * max(num_workers, 1):
        log.warning("%d shards for %d ranks x %d workers: some workers get none", len(source.urls), world_size,
                    num_workers)
    cfg = StreamConfig(resolution, batch_size, seed, prompt_dropout, epoch_samples, rank, world_size, shuffle_buffer,
                       latents, start)
    return ControlNetStream(source, cfg)


def make_loader(source: DataSource | str | list[str], *, num_workers: int = 0, pin_memory: bool = False,
                **stream: Any) -> DataLoader:
    """A DataLoader over make_dataset's batches (batched already: batch_size=None here); `stream` takes
    make_dataset's keywords.

    Workers persist across epochs so each one's epoch counter advances (fresh copies would repeat epoch 0).
    """
    dataset = make_dataset(source, num_workers=num_workers, **stream)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                      pin_memory=pin_memory)


# ---------------------------------------------------------------- the validation set and the dataset's settings


def dataset_manifest(source: DataSource) -> dict[str, Any]:
    """The dataset's manifest.json; {} when no manifest is known."""
    return fmt.read_manifest(source.dataset) if source.dataset is not None else {}


def job_settings(source: DataSource) -> dict[str, Any]:
    """The dataset job's settings (the `config` of the dataset's manifest.json); {} when no manifest is known."""
    return dataset_manifest(source).get("config", {})


def lowest_key_hashes(source: DataSource, count: int, resolution: int, spare: int | None = None) -> list[dict]:
    """The usable samples with the `count` lowest key hashes (fmt.key_hash) among the source's distinct keys, in
    that order, decoded like training samples but with every caption kept.

    One pass over the shards, holding at most count + spare raw samples: the choice depends on the keys alone,
    never on shard order or a shuffle, so every run over the same data (every size of a sweep) gets the same set.
    A key seen twice is taken once; samples that fail to decode give way to the next keys (the spares).
    """
    spare = count if spare is None else spare
    counter = SkipCounter(max_dry_shards=len(source.urls) + 1)
    stages = wds.DataPipeline(
        partial(as_shards, source.urls),
        partial(fmt.shard_samples, handler=counter.read_error, opened=counter.opened_shard),
        partial(keep_keys, keys=source.key_filter, counter=counter, member=condition_member(source)),
    )
    kept: list[tuple[int, str]] = []  # a max-heap by hash, as (-hash, key)
    raw: dict[str, dict[str, Any]] = {}
    for sample in stages:
        key = sample["__key__"]
        if key in raw:
            continue
        item = (-fmt.key_hash(key), key)
        if len(kept) < count + spare:
            heapq.heappush(kept, item)
        elif item > kept[0]:  # a lower hash than the highest kept
            raw.pop(heapq.heappushpop(kept, item)[1])
        else:
            continue
        raw[key] = sample
    chosen = []
    for _, key in sorted(kept, reverse=True):  # lowest hash first
        try:
            chosen.append(decode_sample(raw[key], source.task, resolution))
        except BadSample as exn:
            counter.skip(exn.reason, exn)
        if len(chosen) == count:
            break
    return chosen
