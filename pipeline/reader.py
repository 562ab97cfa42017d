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


def _is_image(path: str) -> bool:
    return split_member_name(path)[1] in IMAGE_EXTS


def _loose_shards(folder: str, files: list[str], files_per_shard: int) -> list[InputShard]:
    """Loose image files (URLs) under `folder` become shards of `files_per_shard` files, in sorted order, named
    after the folder; their keys are their paths under it."""
    names = sorted(set(files))
    base = _shard_name(folder)
    return [
        InputShard(name=f"{base}-{i // files_per_shard:05d}", url=folder, files=tuple(names[i : i + files_per_shard]))
        for i in range(0, len(names), files_per_shard)
    ]


def _folder_shards(fs: fsspec.AbstractFileSystem, folder: str, files_per_shard: int) -> list[InputShard]:
    """A folder of loose images becomes shards of `files_per_shard` files, in sorted order."""
    files = [fs.unstrip_protocol(p) for p in fs.find(folder) if _is_image(p)]
    return _loose_shards(fs.unstrip_protocol(folder), files, files_per_shard)


def list_input_shards(specs: list[str], files_per_shard: int = 1000) -> list[InputShard]:
    """Expand tar URLs, brace ranges ({00000..00099}), globs and folders into input shards.

    A folder holding .tar files means those shards; a folder of images means loose files; image files named
    directly (or matched by a glob) are loose files too, sharded by their folder.
    Missing inputs and two shards with the same name are errors (the output is named after the input).
    """
    shards: list[InputShard] = []
    loose: dict[str, list[str]] = {}  # folder URL -> the image files named in it
    for spec in specs:
        for url in braceexpand.braceexpand(spec):
            fs, path = fsspec.core.url_to_fs(url)
            if _has_glob(path):
                matches = sorted(fs.glob(path))
                if not matches:
                    raise FileNotFoundError(f"no input matches {url}")
            elif fs.isdir(path):
                tars = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
                if tars:
                    shards += [InputShard(_shard_name(t), fs.unstrip_protocol(t)) for t in tars]
                else:
                    shards += _folder_shards(fs, path, files_per_shard)
                continue
            elif fs.exists(path):
                matches = [path]
            else:
                raise FileNotFoundError(f"input not found: {url}")
            for match in matches:
                if _is_image(match):
                    folder = fs.unstrip_protocol(posixpath.dirname(match))
                    loose.setdefault(folder, []).append(fs.unstrip_protocol(match))
                else:
                    shards.append(InputShard(_shard_name(match), fs.unstrip_protocol(match)))
    for folder, files in loose.items():
        shards += _loose_shards(folder, files, files_per_shard)
    names = [s.name for s in shards]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"input shards share output names {duplicates}: rename them or run them separately")
    if not shards:
        raise FileNotFoundError(f"no input shards in {specs}")
    return shards


class InputReadError(RuntimeError):
    """Storage failed while the input was read (a connection reset, a timeout): the shard is retried whole."""


class CorruptTar(RuntimeError):
    """The tar is unreadable part-way while bytes remain after the bad spot: committing the samples before it would
    drop the rest for good, so the shard fails instead (and is reported)."""


class _CountedStream:
    """A read-only stream that counts its bytes, remembers where the last non-zero byte was, and keeps the
    exception the storage itself raised, so that a tar format error (bad bytes) is told apart from a storage
    error (no bytes)."""

    def __init__(self, raw):
        self.raw = raw
        self.count = 0
        self.last_nonzero = -1
        self.storage_error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.raw.read(size)
        except Exception as e:
            self.storage_error = e
            raise
        kept = len(data.rstrip(b"\0"))
        if kept:
            self.last_nonzero = self.count + kept - 1
        self.count += len(data)
        return data

    def at_end(self, limit: int = 1 << 20) -> bool:
        """Reads on (at most `limit` bytes): whether the stream ends there. A storage error is not an end."""
        while limit > 0:
            try:
                chunk = self.read(min(limit, 1 << 16))
            except Exception:
                return False
            if not chunk:
                return True
            limit -= len(chunk)
        return False


class TarSamples:
    """Iterates a tar stream's samples (consecutive members sharing a key), in bounded memory.

    Only a file whose bytes end early ends the samples quietly: the samples before the cut are yielded, a sample
    cut in half is yielded with its `error` set, `error` says what happened and `truncated` is set. A storage
    error raises InputReadError (retry the shard); an unreadable spot with bytes after it raises CorruptTar. A
    member over `max_member_bytes` is skipped unread and its sample gets an `error`.
    """

    def __init__(self, stream, max_member_bytes: int | None = None):
        self.stream = _CountedStream(stream)
        self.max_member_bytes = max_member_bytes
        self.error = ""
        self.truncated = False

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
                    if self.max_member_bytes is not None and info.size > self.max_member_bytes:
                        current.error = current.error or (
                            f"member {info.name} is {info.size} bytes, over the cap of {self.max_member_bytes}")
                        continue  # never read: the stream skips its data block by block
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"unexpected end of data in {info.name}")
                    if ext in current.members:
                        # the same member twice in a row: a duplicated sample; keep it apart
                        yield current
                        current = RawSample(key)
                    current.members[ext] = data
                self._check_archive_end(tar)
        except (tarfile.TarError, EOFError, OSError) as e:
            ended = self.stream.storage_error is None and self.stream.at_end()
            if self.stream.storage_error is not None:
                raise InputReadError(f"{type(self.stream.storage_error).__name__}: {self.stream.storage_error} "
                                     f"(after {self.stream.count} bytes)") from e
            if not ended:
                raise CorruptTar(f"{type(e).__name__}: {e} (after {self.stream.count} bytes; more follow)") from e
            self.error, self.truncated = f"{type(e).__name__}: {e}", True
            if current is not None:
                current.error = f"sample cut off: the file ends early ({self.error})"
                yield current
            return
        if current is not None:
            yield current

    def _check_archive_end(self, tar: tarfile.TarFile) -> None:
        """tarfile stops quietly at a header it cannot read once past the first: a cut at a member boundary (no
        end-of-archive marker) is a truncated file; data after the stop is a corrupt one."""
        if getattr(tar.fileobj, "comptype", "tar") != "tar":
            return  # compressed: offsets are not file positions, and gzip/bz2 report their own early end
        end = tar.offset  # where tarfile met the zero block, or the header it could not read
        if not self.stream.at_end():
            if self.stream.storage_error is not None:
                raise self.stream.storage_error  # reported as a storage error above
            raise CorruptTar(f"tar reading stopped at an unreadable header at byte {end}; over 1 MiB follows")
        if self.stream.last_nonzero >= end:
            raise CorruptTar(f"tar reading stopped at an unreadable header at byte {end} of {self.stream.count}")
        if self.stream.count < end + 2 * tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"the file ends at byte {self.stream.count}, before the end-of-archive marker")


def file_key(folder: str, url: str) -> str:
    """A loose image's key: its path under the input folder, without the extension ('cats/001'), so that
    cats/001.jpg and dogs/001.jpg stay two samples."""
    folder_path = fsspec.core.url_to_fs(folder)[1].rstrip("/")
    path = fsspec.core.url_to_fs(url)[1]
    relative = path[len(folder_path) + 1:] if path.startswith(folder_path + "/") else posixpath.basename(path)
    return split_member_name(relative)[0]


def read_file_samples(files: tuple[str, ...], folder: str | None = None,
                      max_member_bytes: int | None = None) -> Iterator[RawSample]:
    """Loose images as samples, keyed by their path under `folder`; a sibling <stem>.txt (if any) is the caption.
    A file that vanished or is over `max_member_bytes` is a failed sample; other storage errors raise
    InputReadError (the shard is retried)."""
    for url in files:
        fs, path = fsspec.core.url_to_fs(url)
        stem, ext = split_member_name(path)
        sample = RawSample(file_key(folder, url) if folder else posixpath.basename(stem))
        try:
            size = fs.size(path)
            if max_member_bytes is not None and size is not None and size > max_member_bytes:
                sample.error = f"{posixpath.basename(path)} is {size} bytes, over the cap of {max_member_bytes}"
                yield sample
                continue
            sample.members[ext] = fs.cat_file(path)
            if fs.exists(stem + ".txt"):
                sample.members["txt"] = fs.cat_file(stem + ".txt")
        except FileNotFoundError as e:
            sample.error = f"{type(e).__name__}: {e}"
        except OSError as e:
            raise InputReadError(f"{url}: {type(e).__name__}: {e}") from e
        yield sample
