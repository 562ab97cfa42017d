"""the dataset job's typed configuration; its field docs are the command line's --help"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from annotate import NEURAL_TASKS  # the tasks whose networks run at --detect-resolution
from annotate.resize import DETECT_RESOLUTION

SAMPLE_INPUT = "data/sample/shards"
TASKS = ("canny", "hed", "scribble", "midas", "openpose")  # annotate.ANNOTATORS, without importing it here
CAPTION_SOURCES = ("source", "blip", "auto", "none")
# the settings that shape a dataset's bytes: a resume with other values would mix two datasets in one
OUTPUT_SETTINGS = ("task", "resolution", "detect_resolution", "caption", "seed", "canny_low", "canny_high_gap",
                   "min_keypoint_fraction",
                   "caption_beams", "min_size", "max_aspect", "max_pixels", "max_member_mb", "jpeg_quality",
                   "files_per_shard", "latents")


@dataclass
class BuildConfig:
    task: str = field(default="canny", metadata={"help": "annotator", "choices": TASKS})
    input: list[str] = field(
        default_factory=lambda: [SAMPLE_INPUT],
        metadata={"help": "input tar shards: URLs, globs, brace ranges (s3://b/{00000..00999}.tar), "
                  "a folder of .tar files, or a folder of images"},
    )
    output: str = field(default="", metadata={"help": "output dataset folder or URL (default: data/<task>)"})
    resolution: int = field(default=512, metadata={"help": "output side in pixels (shorter side resized, centre crop)"})
    detect_resolution: int = field(
        default=DETECT_RESOLUTION,
        metadata={"help": "hed, scribble, midas, openpose: the shorter side the network sees, rounded to a multiple of "
                          "64; maps are resized back to --resolution (ControlNet 1.1 / controlnet_aux: 512)"},
    )
    caption: str = field(
        default="source", metadata={"help": "caption source: source (from the input shard), blip, auto (source, "
                                    "else blip), none", "choices": CAPTION_SOURCES},
    )
    weights: str | None = field(
        default=None, metadata={"help": "folder or URL holding model weights by their published file names"}
    )
    latents: str | None = field(
        default=None,
        metadata={"help": "base model (diffusers layout: a folder or hub id with vae/) whose VAE encodes each stored "
                          "image: <key>.latent.npy (mean and std, float16), which the trainer uses instead of encoding "
                          "at every step when its base has the same VAE and trains at --resolution"},
    )
    seed: int = field(default=0, metadata={"help": "seed for per-sample randomness (Canny thresholds, ...)"})
    canny_low: tuple[int, int] = field(default=(50, 150), metadata={"help": "range of the low Canny threshold"})
    canny_high_gap: tuple[int, int] = field(
        default=(50, 150), metadata={"help": "high threshold = low + a value drawn from this range"}
    )
    min_keypoint_fraction: float = field(
        default=0.3, metadata={"help": "openpose: keep a sample only if some person has this many keypoints"}
    )
    caption_beams: int = field(default=1, metadata={"help": "blip: beam width (1 = greedy)"})
    min_size: int = field(default=0, metadata={"help": "filter images whose shorter side is below this (0: off)"})
    max_aspect: float = field(default=0.0, metadata={"help": "filter images with a longer aspect ratio (0: off)"})
    max_pixels: int = field(
        default=89_478_485, metadata={"help": "refuse images with more pixels (decompression bombs)"}
    )
    max_member_mb: int = field(
        default=64, metadata={"help": "a tar member or image file over this many MiB is a failed sample, never read"}
    )
    jpeg_quality: int = field(default=95, metadata={"help": "JPEG quality of the stored target image"})
    batch_size: int = field(default=16, metadata={"help": "images per annotator call"})
    decode_threads: int = field(
        default=-1,
        metadata={"help": "threads decoding/encoding beside inference in each worker (0: inline; -1: auto, "
                  "inline for canny, 2 for neural tasks so the GPU is not waiting on JPEG work)"},
    )
    num_workers: int = field(
        default=0, metadata={"help": "actors in the pool (0: one per cpus-per-worker CPUs of the cluster)"}
    )
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs reserved by each actor"})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "GPUs per actor (fractions share a GPU)"})
    device: str | None = field(default=None, metadata={"help": "annotator device: cpu, cuda (default: auto)"})
    max_retries: int = field(default=2, metadata={"help": "retries of a shard that fails as a whole"})
    files_per_shard: int = field(default=1000, metadata={"help": "images per shard for a folder of images"})
    overwrite: bool = field(default=False, metadata={"help": "redo shards that are already done"})
    dry_run: bool = field(default=False, metadata={"help": "print the plan (shards to do, done) and exit"})

    def __post_init__(self) -> None:
        if not self.output:
            self.output = f"data/{self.task}"
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.caption not in CAPTION_SOURCES:
            raise ValueError(f"--caption must be one of {', '.join(CAPTION_SOURCES)}, not {self.caption!r}")
        if self.resolution < 8:
            raise ValueError(f"--resolution must be at least 8, not {self.resolution}")
        if self.latents and "://" not in self.latents and Path(self.latents).is_dir():
            self.latents = str(Path(self.latents).resolve())  # actors may run in another working directory
        if self.detect_resolution < 64:  # sides are rounded to multiples of 64: below 32 that is 0
            raise ValueError(f"--detect-resolution must be at least 64, not {self.detect_resolution}")

    def output_settings(self) -> dict:
        """What shapes the output's bytes, as JSON values: recorded in every shard's stats, checked on resume."""
        return {name: list(v) if isinstance(v := getattr(self, name), tuple) else v for name in OUTPUT_SETTINGS}


def settings_mismatch(recorded: dict, current: dict) -> list[str]:
    """'resolution 512 -> 256' for each output setting a committed shard was made with otherwise. A neural
    task's shard made before --detect-resolution existed holds the older annotators' maps (MiDaS at 384, the
    ControlNet 1.0 OpenPose drawing): it does not match any value."""
    differences = [f"{name} {recorded[name]!r} -> {current[name]!r}" for name in current
                   if name in recorded and recorded[name] != current[name]]
    if recorded and current.get("task") in NEURAL_TASKS and "detect_resolution" not in recorded:
        differences.append(f"detect_resolution (made before ControlNet 1.1 parity) -> {current['detect_resolution']!r}")
    if recorded and current.get("latents") and "latents" not in recorded:  # shards without latents beside new ones
        differences.append(f"latents (made before --latents) -> {current['latents']!r}")
    return differences


def _parser_type(tp: object):
    """argparse `type` and `nargs` for a dataclass field type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return {"type": args[0], "nargs": "+"}
    if origin is tuple:
        return {"type": args[0], "nargs": len(args), "metavar": ("LO", "HI")[: len(args)]}
    if args and type(None) in args:  # X | None
        return {"type": next(a for a in args if a is not type(None))}
    return {"type": tp}


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    """A parser with one --flag per dataclass field; help text and defaults come from the fields."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if hints[f.name] is bool:
            parser.add_argument(flag, action="store_true", help=f.metadata.get("help", ""))
            continue
        choices = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        parser.add_argument(flag, default=default, help=f.metadata.get("help", ""), **_parser_type(hints[f.name]),
                            **choices)
    return parser


def parse_config(cls: type, argv: list[str] | None, description: str):
    args = build_parser(cls, description).parse_args(argv)
    values = {k: tuple(v) if isinstance(v, list) and typing.get_origin(typing.get_type_hints(cls)[k]) is tuple
              else v for k, v in vars(args).items()}
    return cls(**values)
