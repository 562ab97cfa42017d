"""preview: a contact sheet of random samples (image | condition | caption) and the dataset's status counts"""
from __future__ import annotations

import io
import json
import random
import textwrap
from dataclasses import dataclass
from pathlib import Path

import tyro
from PIL import Image, ImageDraw, ImageFont

from pipeline import format as fmt

TILE = 256
TEXT_WIDTH = 320


def status_counts(dataset: str) -> dict[str, int]:
    """Counts by status from the committed shards' parquet indexes (one column; never the tars)."""
    counts = dict.fromkeys(fmt.STATUSES, 0)
    for shard in fmt.committed_shards(dataset):
        for status in fmt.read_index(shard, ["status"])["status"]:
            counts[status] = counts.get(status, 0) + 1
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


def _condition_member(sample: dict) -> str:
    return next(k for k in sample if k.endswith(".png"))


def render_row(sample: dict, font: ImageFont.ImageFont) -> Image.Image:
    """One row: target image | condition map | caption and parameters."""
    row = Image.new("RGB", (2 * TILE + TEXT_WIDTH, TILE), "white")
    image = Image.open(io.BytesIO(sample[fmt.IMAGE_EXT])).convert("RGB").resize((TILE, TILE))
    condition = Image.open(io.BytesIO(sample[_condition_member(sample)])).convert("RGB").resize((TILE, TILE))
    row.paste(image, (0, 0))
    row.paste(condition, (TILE, 0))
    meta = json.loads(sample.get(fmt.META_EXT, b"{}"))
    caption = sample.get(fmt.CAPTION_EXT, b"").decode("utf-8", "replace") or "(no caption)"
    params = textwrap.wrap(json.dumps(meta.get("params", {})), 40)[:4]
    text = "\n".join([sample["__key__"], *textwrap.wrap(caption, 40)[:8], "", *params])
    ImageDraw.Draw(row).multiline_text((2 * TILE + 8, 8), text, fill="black", font=font, spacing=3)
    return row


def contact_sheet(samples: list[dict], counts: dict[str, int], title: str) -> Image.Image:
    font = ImageFont.load_default()
    header = 28
    sheet = Image.new("RGB", (2 * TILE + TEXT_WIDTH, header + TILE * len(samples)), "white")
    summary = f"{title}   " + "   ".join(f"{k}: {v}" for k, v in counts.items())
    ImageDraw.Draw(sheet).text((8, 8), summary, fill="black", font=font)
    for i, sample in enumerate(samples):
        sheet.paste(render_row(sample, font), (0, header + i * TILE))
    return sheet


@dataclass
class PreviewArgs:
    """A contact sheet of random samples (image | condition | caption) and the dataset's status counts."""

    dataset: tyro.conf.Positional[str]
    """Dataset folder or URL (what pipeline.build wrote)."""
    samples: int = 8
    """Rows in the sheet."""
    seed: int = 0
    """Seed for picking the samples."""
    out: str | None = None
    """PNG path (default: <dataset name>-preview.png here)."""


def main(argv: list[str] | None = None) -> None:
    args = tyro.cli(PreviewArgs, args=argv, prog="python -m pipeline.preview")
    counts = status_counts(args.dataset)
    samples = pick_samples(args.dataset, args.samples, args.seed)
    if not samples:
        raise SystemExit(f"error: no written samples in {args.dataset} (counts: {counts})")
    out = Path(args.out or f"{Path(args.dataset.rstrip('/')).name}-preview.png")
    contact_sheet(samples, counts, args.dataset).save(out)
    print("  ".join(f"{k}: {v}" for k, v in counts.items()))
    print(f"wrote {out} ({len(samples)} samples)")


if __name__ == "__main__":
    main()
