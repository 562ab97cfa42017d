"""toy_shapes writes img2dataset-style input shards of coloured shapes with captions, for `make repro`"""
from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline import format as fmt

# six pure colours for the shape, and backgrounds that differ from every one of them in some channel
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
    "yellow": (255, 255, 0), "cyan": (0, 255, 255), "magenta": (255, 0, 255),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "star")


def polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a square, triangle or 5-point star of circumradius r, rotated by `angle` (radians)."""
    if shape == "star":
        radii = [r if i % 2 == 0 else r * 0.45 for i in range(10)]
        angles = [angle + i * np.pi / 5 for i in range(10)]
    else:
        n = {"square": 4, "triangle": 3}[shape]
        radii, angles = [r] * n, [angle + i * 2 * np.pi / n for i in range(n)]
    return [(cx + a * np.sin(t), cy - a * np.cos(t)) for a, t in zip(radii, angles, strict=True)]


def draw(shape: str, colour: str, background: str, cx: float, cy: float, r: float, angle: float,
         size: int = 32) -> np.ndarray:
    """(size, size, 3) uint8: one flat shape, no anti-aliasing (pure colours only, so edges are clean)."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[colour])
    else:
        pen.polygon(polygon(shape, cx, cy, r, angle), fill=COLOURS[colour])
    return np.asarray(image)


def sample(seed: int, index: int, size: int = 32) -> tuple[np.ndarray, str]:
    """Sample `index` of the data set: its image and caption, a pure function of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    r = rng.uniform(0.2, 0.38) * size  # circumradius: from a small shape to most of the image
    cx, cy = rng.uniform(r, size - r, size=2)
    angle = rng.uniform(0, 2 * np.pi) if shape != "circle" else 0.0
    image = draw(shape, colour, background, cx, cy, r, angle, size)
    return image, f"a {colour} {shape} on a {background} background"


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")  # lossless: JPEG would smear the pure colours
    return buf.getvalue()


def write_shards(out: Path, samples: int, num_shards: int, seed: int = 0, size: int = 32) -> list[Path]:
    """Samples dealt round-robin into `num_shards` tars 00000.tar ...; members <key>.png, .txt, .json."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(num_shards):
        path = out / f"{shard:05d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with open(tmp, "wb") as file, fmt.SampleTarWriter(file) as tar:
            for i, index in enumerate(range(shard, samples, num_shards)):
                image, caption = sample(seed, index, size)
                key = f"{shard:05d}{i:04d}"
                meta = {"key": key, "caption": caption, "width": size, "height": size, "index": index}
                tar.write(key, {"png": png(image), "txt": caption.encode(), "json": json.dumps(meta).encode()})
        tmp.rename(path)
        paths.append(path)
    return paths


@dataclass
class ShapesArgs:
    """Synthetic shapes with captions, as input shards for the toy reproduction."""

    output: str = "data/toy/shards"
    """Folder for the tar shards."""
    samples: int = 6000
    """Images in all."""
    num_shards: int = 12
    """Shards they are split into."""
    seed: int = 0
    """Seed of the shapes."""
    size: int = 32
    """Image side in pixels."""


def main(argv: list[str] | None = None) -> None:
    from pipeline.format import cli

    args = cli(ShapesArgs, args=argv, prog="python -m pipeline.toy_shapes")
    if not 1 <= args.num_shards <= args.samples or args.size < 8:  # empty shards, or shapes too small to draw
        print(f"error: need 1 <= --num-shards <= --samples and --size >= 8, not --samples {args.samples} "
              f"--num-shards {args.num_shards} --size {args.size}", file=sys.stderr)
        raise SystemExit(2)
    paths = write_shards(Path(args.output), args.samples, args.num_shards, args.seed, args.size)
    print(f"wrote {args.samples} samples in {len(paths)} shards to {args.output}")


if __name__ == "__main__":
    main()
