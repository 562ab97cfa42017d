"""sample_data writes img2dataset-style input shards from the photos scikit-image ships (no download)"""
from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import format as fmt

# photo name in skimage.data -> a caption, as a web alt-text would describe it
PHOTOS = {
    "astronaut": "a portrait of an astronaut in a white space suit in front of an american flag",
    "chelsea": "a tabby cat sitting and looking to the side",
    "coffee": "a cup of coffee on a saucer with a spoon, seen from above",
    "rocket": "a rocket standing on a launch pad under a blue sky",
    "stereo_motorcycle": "a red motorcycle parked in a garage",
    "retina": "a photograph of a human retina with blood vessels",
    "camera": "a black and white photo of a man with a camera on a tripod",
    "hubble_deep_field": "a deep field image of many distant galaxies",
    "immunohistochemistry": "a microscope image of stained tissue",
    "coins": "a black and white photo of old coins on a table",
    "colorwheel": "a colour wheel showing the hue spectrum",
    "moon": "a black and white photo of the surface of the moon",
}


def load_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB, whatever layout skimage returns."""
    import skimage.data

    image = getattr(skimage.data, name)()
    image = image[0] if isinstance(image, tuple) else image  # stereo pairs
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def variants(image: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """Crops and flips of one photo, so a dozen photos make a few dozen distinct samples."""
    h, w = image.shape[:2]
    side = min(h, w) * 3 // 4
    yield "full", image
    yield "flipped", image[:, ::-1]
    yield "crop top left", image[:side, :side]
    yield "crop bottom right", image[h - side :, w - side :]


def samples() -> Iterator[tuple[str, bytes, dict]]:
    for photo, caption in PHOTOS.items():
        for variant, image in variants(load_photo(photo)):
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(image)).save(buf, format="JPEG", quality=92)
            meta = {"url": f"skimage://data/{photo}#{variant.replace(' ', '-')}", "caption": caption,
                    "width": image.shape[1], "height": image.shape[0]}
            yield caption, buf.getvalue(), meta


def write_shards(out: Path, num_shards: int = 4) -> list[Path]:
    """Round-robin the samples into `num_shards` tars named 00000.tar ...; img2dataset's key layout."""
    out.mkdir(parents=True, exist_ok=True)
    items = list(samples())
    paths = []
    for shard in range(num_shards):
        path = out / f"{shard:05d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with open(tmp, "wb") as file, fmt.SampleTarWriter(file) as tar:
            for i, (caption, jpeg, meta) in enumerate(items[shard::num_shards]):
                key = f"{shard:05d}{i:04d}"
                tar.write(key, {"jpg": jpeg, "txt": caption.encode(),
                                "json": json.dumps({**meta, "key": key}).encode()})
        tmp.rename(path)
        paths.append(path)
    return paths


@dataclass
class SampleArgs:
    """Input shards made from the photos scikit-image ships (the embedded default input)."""

    output: str = "data/sample/shards"
    """Folder for the tar shards."""
    num_shards: int = 4
    """Shards to write."""


def main(argv: list[str] | None = None) -> None:
    from pipeline.format import cli

    args = cli(SampleArgs, args=argv, prog="python -m pipeline.sample_data")
    paths = write_shards(Path(args.output), args.num_shards)
    print(f"wrote {len(PHOTOS) * 4} samples in {len(paths)} shards to {args.output}")


if __name__ == "__main__":
    main()
