"""reader lists input shards (tar URLs, globs, brace ranges, image folders) and streams their samples"""
from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import braceexpand
import fsspec

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm")


@dataclass(frozen=True)
class InputShard:
    """One unit of work: a tar shard, or a batch of loose image files from a folder."""

    name: str  # output shard name
    url: str  # the tar's URL, or the folder's URL for a batch of loose files
    files: tuple[str, ...] = ()  # loose image file URLs (empty for a tar)


@dataclass
class RawSample:
    """A sample's members as read: extension -> bytes. `error` is set when the read was cut short."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    error: str = ""


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'). Splits at the LAST dot, so a dotted key such as
    'img.v2.jpg' keeps its members together (WebDataset's first-dot rule would make key 'img')."""
    stem, dot, ext = name.rpartition(".")
    return (stem, ext.lower()) if dot and "/" not in ext else (name, "")


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _shard_name(url: str) -> str:
    return posixpath.basename(url.rstrip("/")).removesuffix(".tar").replace(".", "_")


def _folder_shards(fs: fsspec.AbstractFileSystem, folder: str, files_per_shard: int) -> list[InputShard]:
    """A folder of loose images becomes shards of `files_per_shard` files, in sorted order."""
    names = sorted(p for p in fs.find(folder) if split_member_name(p)[1] in IMAGE_EXTS)
    base = _shard_name(folder)
    return [
        InputShard(
            name=f"{base}-{i // files_per_shard:05d}",
            url=fs.unstrip_protocol(folder),
            files=tuple(fs.unstrip_protocol(p) for p in names[i : i + files_per_shard]),
        )
        for i in range(0, len(names), files_per_shard)
    ]


def list_input_shards(specs: list[str], files_per_shard: int = 1000) -> list[InputShard]:
    """Expand tar URLs, brace ranges ({00000..00099}), globs and folders into input shards.

    A folder holding .tar files means those shards; a folder of images means loose files.
    Missing inputs and two shards with the same name are errors (the output is named after the input).
    """
    shards: list[InputShard] = []
    for spec in specs:
        for url in braceexpand.braceexpand(spec):
            fs, path = fsspec.core.url_to_fs(url)
            if _has_glob(path):
                matches = sorted(fs.glob(path))
                if not matches:
                    raise FileNotFoundError(f"no input matches {url}")
                shards += [InputShard(_shard_name(m), fs.unstrip_protocol(m)) for m in matches]
            elif fs.isdir(path):
                tars = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
                if tars:
                    shards += [InputShard(_shard_name(t), fs.unstrip_protocol(t)) for t in tars]
                else:
                    shards += _folder_shards(fs, path, files_per_shard)
            elif fs.exists(path):
                shards.append(InputShard(_shard_name(path), fs.unstrip_protocol(path)))
            else:
                raise FileNotFoundError(f"input not found: {url}")
    names = [s.name for s in shards]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"input shards share output names {duplicates}: rename them or run them separately")
    if not shards:
        raise FileNotFoundError(f"no input shards in {specs}")
    return shards


class TarSamples:
    """Iterates a tar stream's samples (consecutive members sharing a key).

    Reading stops at the first error (a truncated or corrupt tar): the samples before the cut are
    yielded, a sample cut in half is yielded with its `error` set, and `self.error` says what happened.
    """

    def __init__(self, stream):
        self.stream = stream
        self.error = ""

    def __iter__(self) -> Iterator[RawSample]:
        current: RawSample | None = None
        try:
            with tarfile.open(fileobj=self.stream, mode="r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, ext = split_member_name(info.name)
                    if current is not None and key != current.key:
                        yield current
                        current = None
                    if current is None:
                        current = RawSample(key)
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"unexpected end of data in {info.name}")
                    if ext in current.members:
                        # the same member twice in a row: a duplicated sample; keep it apart
                        yield current
                        current = RawSample(key)
                    current.members[ext] = data
        except (tarfile.TarError, EOFError, OSError) as e:
            self.error = f"{type(e).__name__}: {e}"
            if current is not None:
                current.error = f"sample cut off by a tar read error ({self.error})"
                yield current
            return
        if current is not None:
            yield current


def read_file_samples(files: tuple[str, ...]) -> Iterator[RawSample]:
    """Loose images as samples; a sibling <stem>.txt (if any) is the caption."""
    for url in files:
        fs, path = fsspec.core.url_to_fs(url)
        stem, ext = split_member_name(path)
        sample = RawSample(posixpath.basename(stem))
        try:
            sample.members[ext] = fs.cat_file(path)
            if fs.exists(stem + ".txt"):
                sample.members["txt"] = fs.cat_file(stem + ".txt")
        except OSError as e:
            sample.error = f"{type(e).__name__}: {e}"
        yield sample
