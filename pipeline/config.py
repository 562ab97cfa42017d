"""the dataset job's typed configuration; its field docs are the command line's --help"""
from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from annotate import NEURAL_TASKS  # the tasks whose networks run at --detect-resolution
from annotate.resize import DETECT_RESOLUTION

SAMPLE_INPUT = "data/sample/shards"
# the largest --resolution or --detect-resolution: ControlNets train at 512-1024 px; a 4096 px RGB sample is already
# 50 MB in an actor's memory, and a batch holds --batch-size of them (at 100000 px every shard failed, retried)
MAX_SIDE = 4096
# the settings that shape a dataset's bytes: a resume with other values would mix two datasets in one
OUTPUT_SETTINGS = ("task", "resolution", "detect_resolution", "caption", "seed", "canny_low", "canny_high_gap",
                   "min_keypoint_fraction",
                   "caption_beams", "min_size", "max_aspect", "max_pixels", "max_member_mb", "jpeg_quality",
                   "files_per_shard", "latents")


Task = Literal["canny", "hed", "scribble", "midas", "openpose"]  # annotate.ANNOTATORS, without importing it here
CaptionSource = Literal["source", "blip", "auto", "none"]
TASKS: tuple[str, ...] = typing.get_args(Task)
CAPTION_SOURCES: tuple[str, ...] = typing.get_args(CaptionSource)


def absolute_if_local(path: str) -> str:
    """A local path made absolute, as the driver sees it ('~' expanded); a URL (s3://, file://) as it is."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


@dataclass
class BuildConfig:
    """Build a ControlNet dataset: input shards -> condition maps (and captions) -> WebDataset shards, on Ray."""

    task: Annotated[str, tyro.conf.arg(metavar="TASK[,TASK...]")] = "canny"
    """Annotator: the condition each sample gets ({canny,hed,scribble,midas,openpose}), or several, comma-separated
    (canny,hed,midas,openpose): one job then decodes and captions each image once and stores every map."""
    input: list[str] = field(default_factory=lambda: [SAMPLE_INPUT])
    """Input tar shards: URLs, globs, brace ranges (s3://b/{00000..00999}.tar), a folder of .tar files, a folder
    of images, or image files by name or glob ('photos/*.jpg')."""
    output: str | None = None
    """Output dataset folder or URL (None: data/<task>, data/canny-hed for several)."""
    resolution: int = 512
    """Output side in pixels (shorter side resized, centre crop), 8 to 4096."""
    detect_resolution: int = DETECT_RESOLUTION
    """hed, scribble, midas, openpose: the shorter side the network sees, rounded to a multiple of 64; maps are
    resized back to --resolution (ControlNet 1.1 / controlnet_aux: 512); 64 to 4096."""
    caption: CaptionSource = "source"
    """Caption source: source (from the input shard), blip, auto (source, else blip), none."""
    weights: str | None = None
    """Folder or URL holding model weights by their published file names."""
    latents: str | None = None
    """Base model (diffusers layout: a folder, fsspec URL or hub id with vae/) whose VAE encodes each stored image:
    <key>.latent.npy (mean and std, float16), which the trainer uses instead of encoding at every step when its
    base has the same VAE and trains at --resolution."""
    seed: int = 0
    """Seed for per-sample randomness (Canny thresholds, ...)."""
    canny_low: tuple[int, int] = (50, 150)
    """Range of the low Canny threshold."""
    canny_high_gap: tuple[int, int] = (50, 150)
    """High threshold = low + a value drawn from this range."""
    min_keypoint_fraction: float = 0.3
    """openpose: keep a sample only if some person has this many keypoints."""
    caption_beams: int = 1
    """blip: beam width (1 = greedy)."""
    min_size: int = 0
    """Filter images whose shorter side is below this (0: off)."""
    max_aspect: float = 0.0
    """Filter images with a longer aspect ratio (0: off)."""
    max_pixels: int = 89_478_485
    """Refuse images with more pixels (decompression bombs), from their header, before decoding."""
    max_member_mb: int = 64
    """A tar member or image file over this many MiB is a failed sample, never read."""
    jpeg_quality: int = 95
    """JPEG quality of the stored target image."""
    batch_size: int = 16
    """Images per annotator call."""
    decode_threads: int = -1
    """Threads decoding/encoding beside inference in each worker (0: inline; -1: auto, inline for canny, 2 for
    neural tasks so the GPU is not waiting on JPEG work)."""
    num_workers: int = 0
    """Actors in the pool (0: one per cpus-per-worker CPUs of the cluster)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved by each actor."""
    gpus_per_worker: float = 0.0
    """GPUs per actor (fractions share a GPU)."""
    device: str | None = None
    """Annotator device: cpu, cuda, cuda:1, ... (None: the GPU the actor reserved with --gpus-per-worker, else cpu)."""
    max_retries: int = 2
    """Retries of a shard that fails as a whole."""
    files_per_shard: int = 1000
    """Images per shard for a folder of images."""
    overwrite: bool = False
    """Redo shards that are already done."""
    dry_run: bool = False
    """Print the plan (shards to do, done) and exit."""

    def __post_init__(self) -> None:
        self.task = ",".join(parse_tasks(self.task))
        # local paths as absolute ones: the actors open them, and they may run in another working directory (on a
        # cluster joined through RAY_ADDRESS, a relative --output put the shards where the driver never looked)
        self.output = absolute_if_local(self.output or f"data/{self.task.replace(',', '-')}")
        self.weights = absolute_if_local(self.weights) if self.weights else self.weights
        if self.caption not in CAPTION_SOURCES:
            raise ValueError(f"--caption must be one of {', '.join(CAPTION_SOURCES)}, not {self.caption!r}")
        if not 8 <= self.resolution <= MAX_SIDE:
            raise ValueError(f"--resolution must be from 8 to {MAX_SIDE}, not {self.resolution}")
        if self.latents and "://" not in self.latents and Path(self.latents).is_dir():
            self.latents = str(Path(self.latents).resolve())  # actors may run in another working directory
        if not 64 <= self.detect_resolution <= MAX_SIDE:  # sides are rounded to multiples of 64: below 32 that is 0
            raise ValueError(f"--detect-resolution must be from 64 to {MAX_SIDE}, not {self.detect_resolution}")
        if self.latents and self.resolution % 8:  # the VAE maps 8 px to a latent; the trainer needs the same
            raise ValueError(f"--resolution must be a multiple of 8 with --latents, not {self.resolution}")
        self._check_ranges()

    def _check_ranges(self) -> None:
        """Values that would fail every sample, or the job part-way, refused before it starts (one line)."""
        if any(not spec.strip() for spec in self.input):  # '' is the working directory: --input "$UNSET" read it
            raise ValueError(f"--input must name shards, folders or images, not an empty string: {self.input}")
        for flag, value in (("--batch-size", self.batch_size), ("--files-per-shard", self.files_per_shard),
                            ("--caption-beams", self.caption_beams), ("--max-pixels", self.max_pixels),
                            ("--max-member-mb", self.max_member_mb)):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, not {value}")
        for flag, value in (("--num-workers", self.num_workers), ("--max-retries", self.max_retries),
                            ("--min-size", self.min_size), ("--max-aspect", self.max_aspect),
                            ("--cpus-per-worker", self.cpus_per_worker), ("--gpus-per-worker", self.gpus_per_worker)):
            if not value >= 0:  # `not >=`: NaN is refused too
                raise ValueError(f"{flag} must not be negative, not {value}")
        if self.decode_threads < -1:
            raise ValueError(f"--decode-threads must be -1 (auto), 0 (inline) or more, not {self.decode_threads}")
        if not 0 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality must be from 0 to 100, not {self.jpeg_quality}")
        if not 0 <= self.min_keypoint_fraction <= 1:
            raise ValueError(f"--min-keypoint-fraction must be from 0 to 1, not {self.min_keypoint_fraction}")
        for flag, (low, high) in (("--canny-low", self.canny_low), ("--canny-high-gap", self.canny_high_gap)):
            if not 0 <= low <= high:
                raise ValueError(f"{flag} is a range LOW HIGH with 0 <= LOW <= HIGH, not {low} {high}")

    @property
    def tasks(self) -> tuple[str, ...]:
        """The requested tasks, in TASKS order."""
        return tuple(self.task.split(","))

    def output_settings(self) -> dict:
        """What shapes the output's bytes, as JSON values: recorded in every shard's stats, checked on resume."""
        return {name: list(v) if isinstance(v := getattr(self, name), tuple) else v for name in OUTPUT_SETTINGS}


def parse_tasks(spec: str | typing.Sequence[str]) -> tuple[str, ...]:
    """'hed,canny' (or ['hed', 'canny']) -> ('canny', 'hed'): known task names, each once, in TASKS order (so
    'hed,canny' and 'canny,hed' are one dataset's settings)."""
    spec = spec if isinstance(spec, str) else ",".join(spec)
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:  # worded as tyro words a bad choice of the other flags
        raise ValueError(f"invalid choice {(unknown or [spec])[0]!r} for argument '--task' (choose from "
                         f"{', '.join(TASKS)}, or several comma-separated: canny,hed)")
    return tuple(task for task in TASKS if task in names)


def settings_mismatch(recorded: dict, current: dict) -> list[str]:
    """'resolution 512 -> 256' for each output setting a committed shard was made with otherwise. A neural
    task's shard made before --detect-resolution existed holds the older annotators' maps (MiDaS at 384, the
    ControlNet 1.0 OpenPose drawing): it does not match any value."""
    differences = [f"{name} {recorded[name]!r} -> {current[name]!r}" for name in current
                   if name in recorded and recorded[name] != current[name]]
    neural = any(task in NEURAL_TASKS for task in str(current.get("task", "")).split(","))
    if recorded and neural and "detect_resolution" not in recorded:
        differences.append(f"detect_resolution (made before ControlNet 1.1 parity) -> {current['detect_resolution']!r}")
    if recorded and current.get("latents") and "latents" not in recorded:  # shards without latents beside new ones
        differences.append(f"latents (made before --latents) -> {current['latents']!r}")
    return differences


def weight_hashes(models: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The sha256s of the weights in the actors' model descriptions (the manifest's entries), by where they sit:
    {'annotators.hed.weights.ControlNetHED.pth': hex, 'latents.vae_sha256': hex, ...}. A key ending in sha256
    holds one, as does each entry of a `weights` mapping; versions and settings are not weights."""
    hashes = {}
    for key, value in models.items():
        if isinstance(value, Mapping):
            hashes.update(weight_hashes(value, f"{prefix}{key}."))
        elif isinstance(value, str) and (key.endswith("sha256") or prefix.endswith("weights.")):
            hashes[f"{prefix}{key}"] = value
    return hashes


def weights_mismatch(recorded: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """'annotators.hed.weights.ControlNetHED.pth 1a2b3c4d5e6f -> 9f8e7d6c5b4a' for each hash that differs."""
    return [f"{name} {recorded.get(name, 'none')[:12]} -> {current.get(name, 'none')[:12]}"
            for name in sorted({*recorded, *current}) if recorded.get(name) != current.get(name)]


def parse_config(cls: type, argv: list[str] | None, description: str | None = None, prog: str | None = None):
    """The command line as a `cls`, with tyro (as the trainer's): --help from the field docs, typed choices, and
    tyro's message and exit status 2 for a bad value, or for a value a field check refuses (__post_init__)."""
    from pipeline.format import cli

    return cli(cls, args=argv, description=description, prog=prog)
