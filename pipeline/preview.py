"""preview: a contact sheet of random samples (image | each condition | caption) and the dataset's status counts"""
from __future__ import annotations

import io
import json
import random
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import fsspec
import tyro
from PIL import Image, ImageDraw, ImageFont

from pipeline import format as fmt

TILE = 256
TEXT_WIDTH = 320
MAX_SHOWN_PIXELS = 4096 * 4096  # larger images are not decoded (the dataset job writes them at its resolution)


def status_counts(dataset: str, tasks: list[str] | None = None) -> dict[str, int]:
    """Counts by status from the committed shards' parquet indexes (never the tars); with several tasks, also
    each task's ok and filtered maps ("hed ok") from its status column."""
    several = tasks if tasks and len(tasks) > 1 else []
    counts = dict.fromkeys(fmt.STATUSES, 0)
    for shard in fmt.committed_shards(dataset):
        index = fmt.read_index(shard, ["status", *(fmt.task_status_column(t) for t in several)])
        for status in index["status"]:
            counts[status] = counts.get(status, 0) + 1
        for task in several:
            for status in index[fmt.task_status_column(task)]:
                counts[f"{task} {status}"] = counts.get(f"{task} {status}", 0) + 1
    return counts


def pick_samples(dataset: str, count: int, seed: int) -> list[dict]:
    """`count` random samples, read from as few committed shards as possible: shards are picked first, then
    samples."""
    tars = [shard.tar for shard in fmt.committed_shards(dataset)]
    rng = random.Random(seed)
    rng.shuffle(tars)
    picked: list[dict] = []
    for tar in tars:
        grouped = list(fmt.shard_samples([{"url": tar}]))
        picked += rng.sample(grouped, min(len(grouped), count - len(picked)))
        if len(picked) >= count:
            break
    return picked


def sample_tasks(samples: list[dict]) -> list[str]:
    """The condition tasks the samples hold maps of (<key>.<task>.png), in order of first appearance."""
    return list(dict.fromkeys(k.removesuffix(".png") for s in samples for k in s if k.endswith(".png")))


def tile(data: bytes | None, note: str, font: ImageFont.ImageFont) -> Image.Image:
    """A member's image as a tile, or a grey tile with `note` (or why it cannot be shown): a sheet of a damaged
    dataset still renders, and shows where."""
    if data is not None:
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height <= MAX_SHOWN_PIXELS:
                    return im.convert("RGB").resize((TILE, TILE))
                note = f"{im.width}x{im.height} px:\ntoo large to show"
        except Exception as e:  # PIL raises many types for corrupt data
            note = f"unreadable\n({type(e).__name__})"
    blank = Image.new("RGB", (TILE, TILE), "lightgrey")
    ImageDraw.Draw(blank).text((8, 8), note, fill="black", font=font)
    return blank


def sample_meta(sample: dict) -> dict:
    """The sample's json, or {} where it is absent or not a JSON object."""
    try:
        meta = json.loads(sample.get(fmt.META_EXT, b"{}"))
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def render_row(sample: dict, tasks: list[str], font: ImageFont.ImageFont) -> Image.Image:
    """One row: target image | one condition map per task (a grey tile naming the task where it kept none) |
    caption and parameters."""
    row = Image.new("RGB", ((1 + len(tasks)) * TILE + TEXT_WIDTH, TILE), "white")
    row.paste(tile(sample.get(fmt.IMAGE_EXT), "no image", font), (0, 0))
    for i, task in enumerate(tasks, start=1):
        row.paste(tile(sample.get(fmt.condition_ext(task)), f"no {task} map\n(filtered or failed)", font),
                  (i * TILE, 0))
    meta = sample_meta(sample)
    caption = sample.get(fmt.CAPTION_EXT, b"").decode("utf-8", "replace") or "(no caption)"
    params = textwrap.wrap(json.dumps(meta.get("params", {})), 40)[: 4 * max(1, len(tasks))]
    text = "\n".join([sample["__key__"], *textwrap.wrap(caption, 40)[:8], "", *params])
    ImageDraw.Draw(row).multiline_text(((1 + len(tasks)) * TILE + 8, 8), text, fill="black", font=font, spacing=3)
    return row


def contact_sheet(samples: list[dict], counts: dict[str, int], title: str, tasks: list[str] | None = None
                  ) -> Image.Image:
    """`tasks`: the condition columns (default: every task the samples hold maps of)."""
    tasks = tasks or sample_tasks(samples)
    font = ImageFont.load_default()
    header = 28
    sheet = Image.new("RGB", ((1 + len(tasks)) * TILE + TEXT_WIDTH, header + TILE * len(samples)), "white")
    summary = f"{title}   " + "   ".join(f"{k}: {v}" for k, v in counts.items())
    ImageDraw.Draw(sheet).text((8, 8), summary, fill="black", font=font)
    for i, sample in enumerate(samples):
        sheet.paste(render_row(sample, tasks, font), (0, header + i * TILE))
    return sheet


@dataclass
class PreviewArgs:
    """A contact sheet of random samples (image | each condition map | caption) and the dataset's status counts."""

    dataset: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="DATASET")]
    """Dataset folder or URL (what pipeline.build wrote)."""
    samples: int = 8
    """Rows in the sheet."""
    seed: int = 0
    """Seed for picking the samples."""
    out: str | None = None
    """PNG path (default: <dataset name>-preview.png here)."""


def refuse(message: str) -> SystemExit:
    """One line on stderr, and the exit status 2 of the other commands' refusals (a bare SystemExit(text) is 1)."""
    print(f"error: {message}", file=sys.stderr)
    return SystemExit(2)


def check_args(args: PreviewArgs) -> str:
    """The dataset folder to read (a manifest.json's folder), or SystemExit(2) with one line for what cannot
    work."""
    dataset = args.dataset.removesuffix(f"/{fmt.MANIFEST}")
    if dataset.endswith(".json"):
        raise refuse(f"{dataset}: preview reads a dataset folder (a materialized subset's folder is one), "
                     "not a subset manifest")
    fs, path = fsspec.core.url_to_fs(dataset)
    if not fs.exists(path):
        raise refuse(f"{dataset}: no such dataset folder")
    if args.samples < 1:
        raise refuse(f"--samples must be at least 1, not {args.samples}")
    if args.out and "://" in args.out:
        raise refuse(f"--out {args.out}: the sheet is written locally; copy it afterwards")
    if args.out and (Path(args.out).is_dir() or not writes_images(args.out)):  # PIL's ValueError, after the reading
        raise refuse(f"--out {args.out}: give the sheet a file name with an image extension (sheet.png)")
    return dataset


def writes_images(path: str) -> bool:
    """Whether PIL saves an image to `path` by its extension (.png, .jpg, ...)."""
    Image.init()
    return Image.registered_extensions().get(Path(path).suffix.lower()) in Image.SAVE


def main(argv: list[str] | None = None) -> None:
    args = fmt.cli(PreviewArgs, args=argv, prog="python -m pipeline.preview")
    try:
        with fmt.refusing_storage_failures("storage"):  # an endpoint that refuses, storage gone
            preview(args)
    except fmt.StorageFailed as e:
        raise refuse(str(e)) from None


def preview(args: PreviewArgs) -> None:
    args.dataset = check_args(args)
    tasks = fmt.dataset_tasks(fmt.read_manifest(args.dataset))
    counts = status_counts(args.dataset, tasks)
    samples = pick_samples(args.dataset, args.samples, args.seed)
    if not samples and not fmt.committed_shards(args.dataset):
        raise refuse(f"{args.dataset}: not a dataset (no committed shards/<name>.stats.json): preview reads what "
                     "python -m pipeline.build wrote")
    if not samples:
        raise refuse(f"no written samples in {args.dataset} (counts: {counts})")
    out = Path(args.out or f"{Path(args.dataset.rstrip('/')).name}-preview.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(samples, counts, args.dataset, tasks or None).save(out)
    print("  ".join(f"{k}: {v}" for k, v in counts.items()))
    print(f"wrote {out} ({len(samples)} samples)")


if __name__ == "__main__":
    main()
