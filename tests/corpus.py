"""a bad-input corpus: every kind of broken or unusual input the dataset job must survive"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def photo(width: int = 96, height: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth colour gradient with a square on it: real edges, reproducible."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.full_like(x, 128)], -1)
    top, left = rng.integers(0, max(height // 2, 1)), rng.integers(0, max(width // 2, 1))
    image[top : top + height // 3, left : left + width // 3] = rng.integers(0, 256, 3)
    return image.astype(np.uint8)


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    """Stored 96 wide x 64 high with orientation 6 (rotate 90 clockwise): displayed 64 wide x 96 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(photo(96, 64)), "JPEG", exif=exif.tobytes())


def mode_images() -> dict[str, bytes]:
    """One image per PIL mode the job must turn into RGB."""
    rgb = Image.fromarray(photo())
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(96, dtype=np.uint8)[None] * 2, (64, 1))))
    sixteen = Image.fromarray(photo()[:, :, 0].astype(np.uint16) * 257)
    return {
        "cmyk": encode(rgb.convert("CMYK"), "JPEG"),
        "grey": encode(rgb.convert("L"), "PNG"),
        "onebit": encode(rgb.convert("1"), "PNG"),
        "palette": encode(rgb.convert("P"), "PNG"),
        "rgba": encode(rgba, "PNG"),
        "sixteenbit": encode(sixteen, "PNG"),
        "la": encode(rgba.convert("LA"), "PNG"),
    }


def bomb_png(side: int = 20000) -> bytes:
    """A tiny file whose header promises side*side pixels (a decompression bomb)."""
    return encode(Image.new("1", (side, side)), "PNG", optimize=True)


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def good_jpeg(seed: int = 0, width: int = 96, height: int = 64) -> bytes:
    return encode(Image.fromarray(photo(width, height, seed)), "JPEG", quality=90)


# key -> (members, expected status); keys are source keys as written in the tar
def bad_corpus() -> list[tuple[str, dict[str, bytes], str]]:
    jpeg = good_jpeg()
    samples = [
        ("good", {"jpg": jpeg, "txt": b"a good photo", "json": b'{"url": "http://x/good.jpg"}'}, "ok"),
        ("corrupt", {"jpg": b"\xff\xd8\xff\xe0 this is not really a jpeg", "txt": b"broken"}, "failed"),
        ("truncatedjpeg", {"jpg": jpeg[: len(jpeg) // 3], "txt": b"cut"}, "ok_or_failed"),
        ("zerobyte", {"jpg": b"", "txt": b"empty"}, "failed"),
        ("exif", {"jpg": exif_rotated_jpeg(), "txt": b"rotated"}, "ok"),
        ("tiny", {"png": encode(Image.fromarray(photo(3, 2)), "PNG")}, "ok"),
        ("strip", {"png": encode(Image.fromarray(photo(2000, 4)), "PNG"), "txt": b"a strip"}, "ok"),
        ("bomb", {"png": bomb_png(), "txt": b"boom"}, "failed"),
        ("nocaption", {"jpg": good_jpeg(1)}, "ok"),
        ("latin1", {"jpg": good_jpeg(2), "txt": "café crème".encode("latin-1")}, "ok"),
        ("captionjson", {"jpg": good_jpeg(3), "json": '{"caption": "from json ✓"}'.encode()}, "ok"),
        ("dotted.key.v2", {"jpg": good_jpeg(4), "txt": b"dots in the key"}, "ok"),
        ("onlytext", {"txt": b"no image here"}, "failed"),
        ("badjson", {"jpg": good_jpeg(5), "json": b"{not json"}, "ok"),
    ]
    samples += [(f"mode_{name}", {"png" if name != "cmyk" else "jpg": data}, "ok")
                for name, data in mode_images().items()]
    return samples


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                add(tar, f"{key}.{ext}", data)
    return path


def write_bad_inputs(folder: Path) -> dict[str, Path]:
    """Shards of the corpus: bad samples, duplicate keys, empty, truncated, not-a-tar, zero bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = bad_corpus()
    shards = {"bad": write_tar(folder / "bad.tar", [(k, m) for k, m, _ in corpus])}
    dup = [("a", {"jpg": good_jpeg(6)}), ("b", {"jpg": good_jpeg(7)}), ("a", {"jpg": good_jpeg(8)})]
    shards["dup"] = write_tar(folder / "dup.tar", dup)
    shards["empty"] = write_tar(folder / "empty.tar", [])
    full = write_tar(folder / "full.tar", [(f"s{i}", {"jpg": good_jpeg(i), "txt": b"x"}) for i in range(6)])
    data = full.read_bytes()
    full.unlink()
    (folder / "truncated.tar").write_bytes(data[: int(len(data) * 0.6)])
    shards["truncated"] = folder / "truncated.tar"
    (folder / "notatar.tar").write_bytes(b"this is a text file, not a tar archive\n" * 50)
    shards["notatar"] = folder / "notatar.tar"
    (folder / "zerobytes.tar").write_bytes(b"")
    shards["zerobytes"] = folder / "zerobytes.tar"
    return shards
