"""reader lists input shards (tar URLs, globs, brace ranges, image folders) and streams their samples"""
from __future__ import annotations

import os
import posixpath
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace

import braceexpand
import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from pipeline import format as fmt
from pipeline.config import TASKS
from pipeline.format import storage_error

# what PIL decodes (its wheels carry libavif); a folder's files of other kinds are passed over, so a kind missing
# here is a folder's images left out without a word
IMAGE_EXTS = ("jpg", "jpeg", "jfif", "png", "webp", "avif", "bmp", "tif", "tiff", "gif", "ppm", "pgm")
UNSAFE_IN_KEYS = re.compile(r"[^A-Za-z0-9_-]")  # output_key's: compiled once, as the driver keys every loose file
# what an output shard holds beside <key>.jpg (pipeline.format): never images of their own
DATASET_MEMBERS = (*(fmt.condition_ext(task) for task in TASKS), fmt.LATENT_EXT)
TAR_EXTS = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")  # a folder's shards (tarfile reads each compression)


@dataclass(frozen=True)
class InputShard:
    """One unit of work: a tar shard, or a batch of loose image files from a folder."""

    name: str  # output shard name
    url: str  # the tar's URL, or the folder's URL for a batch of loose files
    files: tuple[str, ...] = ()  # loose image file URLs (empty for a tar)
    # (output key, source key) of the keys that files of this shard clean to (output_key) which earlier files of
    # the folder, in earlier shards, hold: the worker goes on from them as from a key met earlier in the shard
    keys_taken: tuple[tuple[str, str], ...] = ()


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


def split_tar_member(name: str) -> tuple[str, str]:
    """split_member_name, but what a dataset's own shards hold beside each image (<key>.canny.png, <key>.latent.npy)
    stays with <key>: a dataset's shards given as input (to make another task's maps of its images) read each map
    as a photo of its own, key '<key>.canny' without a caption, and the new dataset held twice the samples."""
    lowered = name.lower()  # once: this runs for every member of every input tar
    for ext in DATASET_MEMBERS:
        if lowered.endswith(f".{ext}") and len(name) > len(ext) + 1:
            return name[: -len(ext) - 1], ext
    return split_member_name(name)


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _shard_name(url: str) -> str:
    return posixpath.basename(url.rstrip("/")).removesuffix(".tar").replace(".", "_")


def _is_image(path: str) -> bool:
    return split_member_name(path)[1] in IMAGE_EXTS


def _is_tar(path: str) -> bool:
    """A shard by its name, in either case: cameras' and Windows' tools write 00000.TAR as they write IMG_1.JPG."""
    return path.lower().endswith(TAR_EXTS)


def _hidden(path: str, root: str) -> bool:
    """Whether a file found under `root` is hidden there (a name or folder starting with a dot): macOS leaves a
    `._x.jpg` beside each photo copied from its disks, which is no image, and a `.cache/` or `.thumbnails/` folder
    holds copies; as in the Hugging Face `imagefolder` loader, such files are left out of folders and globs (a
    hidden file named on its own is read)."""
    relative = path[len(root.rstrip("/")) + 1:] if path.startswith(root.rstrip("/") + "/") else path
    return any(part.startswith(".") for part in relative.split("/"))


def _loose_shards(folder: str, files: list[str], files_per_shard: int) -> list[InputShard]:
    """Loose image files (URLs) under `folder` become shards of `files_per_shard` files, in sorted order, named
    after the folder; their keys are their paths under it."""
    names = sorted(set(files))
    base = _shard_name(folder)
    return [
        InputShard(name=f"{base}-{i // files_per_shard:05d}", url=folder, files=tuple(names[i : i + files_per_shard]))
        for i in range(0, len(names), files_per_shard)
    ]


def _folder_shards(fs: fsspec.AbstractFileSystem, folder: str,
                   files_per_shard: int) -> tuple[list[InputShard], list[str]]:
    """A folder of loose images becomes shards of `files_per_shard` files, in sorted order; and the URLs of the
    folder's files passed over (no image of a kind read here, no caption)."""
    found = [fs.unstrip_protocol(p) for p in _files_under(fs, folder) if not _hidden(p, folder)]
    files = [url for url in found if _is_image(url)]
    return _loose_shards(fs.unstrip_protocol(folder), files, files_per_shard), [u for u in found if _passed_over(u)]


def _passed_over(path: str) -> bool:
    """A file an input folder or glob holds that the job does not read: no image of a kind PIL decodes here, no
    caption beside one, no tar shard, no index or stats beside a dataset's own shards (given as input to make another
    task's maps): an iPhone's .HEIC photos, a camera's .CR2 raws, a .json of metadata."""
    beside_shards = path.endswith((fmt.INDEX_SUFFIX, fmt.STATS_SUFFIX))
    return not (_is_image(path) or _is_tar(path) or split_member_name(path)[1] == "txt" or beside_shards)


def say_passed_over(paths: list[str], say: Callable[[str], None]) -> None:
    """One line naming how many files of which kinds the job leaves out, and one of them, so that photos of a kind
    not read here are not left out without a word; nothing when none is."""
    if paths:
        say(passed_over_line(sorted(set(paths))))


def passed_over_line(paths: list[str]) -> str:
    """The line of say_passed_over for these (sorted, distinct) paths."""
    kinds = Counter("." + (split_member_name(p)[1] or "(no extension)") for p in paths)
    listed = ", ".join(f"{kind} {count}" for kind, count in kinds.most_common(5))
    return (f"passed over {len(paths)} input file(s) that are neither images of a kind read here "
            f"({', '.join(IMAGE_EXTS)}), captions nor tar shards: {listed}{', ...' if len(kinds) > 5 else ''} "
            f"(e.g. {paths[0]})")


def _files_under(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """Every file under `folder`, sorted. On local disk the folders linked in are walked too: fsspec's find lists a
    link to a folder as one entry, no image, so a dataset put together from links to other disks lost those images
    without a word. A link to a folder above `folder` is passed over (it holds the whole tree again), and a folder
    linked twice is walked once, at its first path in sorted order."""
    if not isinstance(fs, LocalFileSystem):
        return fs.find(folder)
    root = os.path.realpath(folder)
    walked, files = set(), []
    for top, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in walked or (real != root and root.startswith(real.rstrip("/") + "/")):
            folders.clear()
            continue
        walked.add(real)
        folders.sort()  # the walk's order decides which path a folder linked twice is read under
        files += [posixpath.join(top, name) for name in names]
    return sorted(files)


def literal_path(url: str) -> bool:
    """Whether `url` names an existing file or folder as written: a folder called 'Album [2019]' or 'set {a,b}' is
    that folder, not a glob or a brace range."""
    if not any(c in url for c in "*?[{"):
        return False
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def glob_root(pattern: str) -> str:
    """The folder a glob's matches lie under: its path up to the first part with a wildcard."""
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if _has_glob(part))
    return "/".join(parts[:fixed]) or "/"


def list_input_shards(specs: list[str], files_per_shard: int = 1000,
                      say: Callable[[str], None] = print) -> list[InputShard]:
    """Expand tar URLs, brace ranges ({00000..00099}), globs and folders into input shards.

    A folder holding .tar files means those shards; a folder of images means loose files; image files named
    directly (or matched by a glob) are loose files too, sharded by their folder.
    Missing inputs and two shards with the same name are errors (the output is named after the input). The files
    a folder or a glob holds that are none of these are passed over, in one line given to `say`.
    """
    shards: list[InputShard] = []
    passed_over: list[str] = []
    loose: dict[str, list[str]] = {}  # folder URL -> the image files named in it (keys are paths under it)
    for spec in specs:
        literal = literal_path(spec)  # once per spec: an existence check is a request on object stores
        for url in [spec] if literal else braceexpand.braceexpand(spec):
            fs, path = fsspec.core.url_to_fs(url)
            if isinstance(fs, LocalFileSystem):  # in/../in/A is in/A: a rerun that spells it otherwise resumes
                path = posixpath.normpath(path)
            root = posixpath.dirname(path)  # where a named image's key starts
            # a URL from a brace range may still name an existing '[...]' file as written
            if _has_glob(path) and not (literal if url == spec else literal_path(url)):
                # photos/* also matches the captions (<stem>.txt), which their images bring along
                root = glob_root(path)  # photos/*/*.jpg: keys cats/001 and dogs/001, as for the folder photos
                globbed = {m: info for m, info in fs.glob(path, detail=True).items() if not _hidden(m, root)}
                # a folder the glob matches is no image nor tar, whatever its name ('photos/*.jpg' over an album.jpg/
                # folder): read as a file, it failed as a storage error the driver waited out, then ended the job
                matches = sorted(m for m, info in globbed.items()
                                 if (_is_image(m) or _is_tar(m)) and info.get("type") != "directory")
                passed_over += [fs.unstrip_protocol(m) for m, info in globbed.items()
                                if info.get("type") == "file" and _passed_over(m)]
                if not matches:
                    say_passed_over(passed_over, say)  # a glob of .HEIC photos alone: why none of them counts
                    raise FileNotFoundError(f"no input matches {url} (tar shards or images)")
            elif fs.isdir(path):
                entries = [e for e in fs.ls(path, detail=True) if not _hidden(e["name"], path)]
                listing = [e["name"] for e in entries if e.get("type") != "directory"]  # a folder old.tar/ is none
                tars = sorted(p for p in listing if _is_tar(p))
                images = [p for p in listing if _is_image(p)]
                if tars and images:  # taking either kind alone would leave the other out without a word
                    raise ValueError(f"{url} holds both tar shards and images ({posixpath.basename(images[0])}): "
                                     f"name the ones to read ('{url.rstrip('/')}/*.tar' or a folder of each)")
                if tars:
                    shards += [InputShard(_shard_name(t), fs.unstrip_protocol(t)) for t in tars]
                    passed_over += [fs.unstrip_protocol(e["name"]) for e in entries
                                    if e.get("type") == "file" and _passed_over(e["name"])]
                else:
                    folder_shards, folder_passed_over = _folder_shards(fs, path, files_per_shard)
                    shards += folder_shards
                    passed_over += folder_passed_over
                continue
            elif fs.exists(path):
                matches = [path]
            else:
                raise FileNotFoundError(f"input not found: {url}")
            for match in matches:
                if _is_image(match):
                    loose.setdefault(fs.unstrip_protocol(root), []).append(fs.unstrip_protocol(match))
                else:
                    shards.append(InputShard(_shard_name(match), fs.unstrip_protocol(match)))
    for folder, files in loose.items():
        shards += _loose_shards(folder, files, files_per_shard)
    shards = list(dict.fromkeys(shards))  # a tar given twice (a glob and a name that both match it) is read once
    shards = settle_loose_keys(shards)
    names = [s.name for s in shards]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        if len({s.url for s in shards if s.name == duplicates[0]}) == 1:  # photos and 'photos/*.jpg' both given
            raise ValueError(f"{shards[names.index(duplicates[0])].url} is given twice, by more than one --input: "
                             "give it once")
        raise ValueError(f"input shards share output names {duplicates}: rename them or run them separately")
    say_passed_over(passed_over, say)
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


class SplitSample(RuntimeError):
    """A sample's members are apart in the tar (GNU tar writes a folder in directory order, not sorted): read
    that tar again with TarSamples(reopen=...), which groups its members by key."""


def member_name(name: str) -> str:
    """A tar member's name as a sample path: './00001.jpg' (`tar -C folder .`) is '00001.jpg', and a leading '../'
    is dropped as tar does when it extracts ('../x.jpg' read as hidden, a name starting with a dot, and its sample
    was left out without a row); bytes that are not UTF-8 (tarfile hands them over as surrogates) are written out
    (valid_utf8)."""
    path = posixpath.normpath(name).lstrip("/")
    while path.startswith("../"):
        path = path[3:]
    return valid_utf8(path)


def valid_utf8(text: str) -> str:
    """`text` with its lone surrogates (a file name's bytes that are not UTF-8, a JSON "\\ud800") written out as
    backslash escapes: a string every writer can store, and two such names stay two."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class InputChanged(RuntimeError):
    """The tar changed between a regroup's two reads (another size, ETag or mtime, or other headers): its samples
    would mix two files, so the shard fails (a retry reads it twice again)."""


# a regroup's first pass keeps the members up to this size that are no image (captions, json: a few hundred bytes a
# sample), so that its second pass hands out each image as it reads it; a larger one holds its image until it comes
SMALL_MEMBER_BYTES = 1 << 20


@dataclass
class _Member:
    """A file member of a tar as its header names it, before its bytes are read."""

    index: int  # its place among the tar's headers (folders and hidden files counted)
    key: str
    ext: str
    name: str
    size: int
    error: str = ""  # a link or over the cap (never read); or, `cut`, the file ending early
    cut: bool = False


@dataclass
class _Pending:
    """A sample of a regroup: the members it holds or will hold, and how many the second pass has still to read."""

    sample: RawSample
    exts: set[str] = field(default_factory=set)
    to_read: int = 0


class TarSamples:
    """Iterates a tar stream's samples (the members sharing a key), in bounded memory.

    WebDataset keeps a sample's members adjacent; a tar that does not (made with `tar -cf x.tar -C folder .`)
    raises SplitSample once a key comes back with other members. Given `reopen` (the same tar opened again, as a
    context manager), the tar is read twice instead and its members grouped by key: the first pass reads the
    headers and the small members that are no image (SMALL_MEMBER_BYTES: captions, json), the second hands out
    each sample as soon as it has read its image (and any larger member), holding only the members of samples
    that wait for another. Regrouped samples come in that order: those the first pass read whole (no image) first,
    then as the second pass completes them, not in the order keys first appear. The second pass must meet the
    headers the first met, else InputChanged. A member named again (a duplicated sample), or a second image under a
    key, is a sample of its own either way, after the one it repeats.
    Only a file whose bytes end early ends the samples quietly: the samples before the cut are yielded, a sample
    cut in half is yielded with its `error` set, `error` says what happened and `truncated` is set. A storage
    error raises InputReadError (retry the shard); an unreadable spot with bytes after it raises CorruptTar. A
    member over `max_member_bytes` is skipped unread and its sample gets an `error`; so does a link (a tar stream
    cannot go back for its target's bytes). Hidden members (`._x.jpg`, `.DS_Store`) are passed over.
    """

    def __init__(self, stream, max_member_bytes: int | None = None,
                 reopen: Callable[[], AbstractContextManager] | None = None):
        self.stream = _CountedStream(stream)
        self.max_member_bytes = max_member_bytes
        self.reopen = reopen
        self.error = ""
        self.truncated = False

    def __iter__(self) -> Iterator[RawSample]:
        return self._regrouped() if self.reopen is not None else refusing_split_samples(self._adjacent_groups())

    def _adjacent_groups(self) -> Iterator[RawSample]:
        current: RawSample | None = None
        for member, data in self._members(self.stream, wanted=lambda member: True):
            if current is not None and member.key != current.key:
                yield current
                current = None
            if current is None:
                current = RawSample(member.key)
            if member.error:
                current.error = member.error if member.cut else current.error or member.error
                continue
            if not _takes(current.members, member.ext):
                # the same member twice in a row (a duplicated sample), or a second image under the key
                # (x.jpg and x.png, two photos of a folder packed by hand): keep it apart
                yield current
                current = RawSample(member.key)
            current.members[member.ext] = data
        if current is not None:
            yield current

    def _regrouped(self) -> Iterator[RawSample]:
        samples_of, read_into, listed = self._first_pass()
        for samples in samples_of.values():
            yield from _completed(samples)
        error, truncated = self.error, self.truncated
        self.error, self.truncated = "", False
        met: list[tuple] = []
        with self.reopen() as stream:
            for member, data in self._members(_CountedStream(stream), lambda m: m.index in read_into, met):
                if member.cut:
                    continue  # the first pass gave the cut to its sample
                if len(met) > len(listed) or met[-1] != listed[len(met) - 1]:
                    raise InputChanged(f"the tar changed between the two reads of its regroup: its member "
                                       f"{member.name} ({member.size} bytes, header {member.index}) is not the one "
                                       "the first read met there")
                pending = read_into.pop(member.index, None)
                if pending is not None:
                    pending.sample.members[member.ext] = data
                    pending.to_read -= 1
                    yield from _completed(samples_of[member.key])
        if met != listed or self.truncated != truncated:  # also the header a cut fell in, which was not yielded
            raise InputChanged(f"the tar changed between the two reads of its regroup: {len(met)} members "
                               f"{'to a cut' if self.truncated else 'to its end'} now, {len(listed)} "
                               f"{'to a cut' if truncated else 'to its end'} before")
        self.error = error  # the first pass's words: the second may meet the cut a member earlier, skipping bytes
        for samples in samples_of.values():  # members the file ends before (its cut) never came
            for pending in samples:
                pending.sample.error = pending.sample.error or f"sample cut off: the file ends early ({error})"
                yield pending.sample

    def _first_pass(self) -> tuple[dict[str, list[_Pending]], dict[int, _Pending], list[tuple]]:
        """Each key's samples (a member that all of them hold, or a second image, starts another: a duplicate)
        with the small members read; the sample each member left to the second pass goes to, by header index; and
        the headers met."""
        samples_of: dict[str, list[_Pending]] = {}
        read_into: dict[int, _Pending] = {}
        listed: list[tuple] = []
        for member, data in self._members(self.stream, _read_in_first_pass, listed):
            samples = samples_of.setdefault(member.key, [_Pending(RawSample(member.key))])
            if member.error:  # a link, a member over the cap, the cut: the key's first sample fails
                samples[0].sample.error = samples[0].sample.error or member.error
                continue
            into = next((p for p in samples if _takes(p.exts, member.ext)), None)
            if into is None:
                samples.append(into := _Pending(RawSample(member.key)))
            into.exts.add(member.ext)
            if data is None:
                read_into[member.index] = into
                into.to_read += 1
            else:
                into.sample.members[member.ext] = data
        return samples_of, read_into, listed

    def _members(self, stream: _CountedStream, wanted: Callable[[_Member], bool],
                 met: list[tuple] | None = None) -> Iterator[tuple[_Member, bytes | None]]:
        """The tar's file members in order, each with its bytes where `wanted` (else None: the stream skips them
        unread); each header goes to `met` when met, before its bytes, so that a member the cut falls in is listed
        too. Where the file ends early, `error` and `truncated` are set and a last member, `cut`, carries the error
        to the sample of the last header met."""
        last: _Member | None = None
        cut = False
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for index, info in enumerate(tar):
                    if not (info.isfile() or info.islnk() or info.issym()):
                        continue  # folders, devices
                    name = member_name(info.name)
                    if _hidden(name, ""):
                        continue  # a Mac's tar adds macOS metadata as ._<name> beside each file, and .DS_Store
                    if met is not None:
                        met.append((index, info.name, info.size, info.mtime))
                    last = _Member(index, *split_tar_member(name), name, info.size, self._unread_because(info, name))
                    data = None
                    if not last.error and wanted(last):
                        data = tar.extractfile(info).read()
                        if len(data) != info.size:
                            raise tarfile.ReadError(f"unexpected end of data in {name}")
                    yield last, data  # one not read is skipped block by block at the next header
                self._check_archive_end(tar, stream)
        except (tarfile.TarError, EOFError, OSError) as e:
            ended = stream.storage_error is None and stream.at_end()
            if stream.storage_error is not None:
                raise InputReadError(f"{type(stream.storage_error).__name__}: {stream.storage_error} "
                                     f"(after {stream.count} bytes)") from e
            if not ended:
                raise CorruptTar(f"{type(e).__name__}: {e} (after {stream.count} bytes; more follow)") from e
            self.error, self.truncated = f"{type(e).__name__}: {e}", True
            cut = True
        except Exception as e:  # a response cut part-way (aiohttp's ClientPayloadError) is no OSError
            if stream.storage_error is None:
                raise
            raise InputReadError(f"{type(e).__name__}: {e} (after {stream.count} bytes)") from e
        if cut and last is not None:
            yield replace(last, error=f"sample cut off: the file ends early ({self.error})", cut=True), None

    def _unread_because(self, info: tarfile.TarInfo, name: str) -> str:
        """Why a member is not read, or "": a link, or over the cap."""
        if not info.isfile():
            kind = "hard link" if info.islnk() else "symbolic link"
            return f"member {name} is a {kind} to {info.linkname}, not a file"
        if self.max_member_bytes is not None and info.size > self.max_member_bytes:
            return f"member {name} is {info.size} bytes, over the cap of {self.max_member_bytes}"
        return ""

    def _check_archive_end(self, tar: tarfile.TarFile, stream: _CountedStream) -> None:
        """tarfile stops quietly at a header it cannot read once past the first: a cut at a member boundary (no
        end-of-archive marker) is a truncated file; data after the stop is a corrupt one."""
        end = tar.offset  # where tarfile met the zero block, or the header it could not read
        if getattr(tar.fileobj, "comptype", "tar") != "tar":
            _check_decompressed_end(tar.fileobj, end)  # offsets are positions in the decompressed data
            return
        if not stream.at_end():
            if stream.storage_error is not None:
                raise stream.storage_error  # reported as a storage error above
            raise CorruptTar(f"tar reading stopped at an unreadable header at byte {end}; over 1 MiB follows")
        if stream.last_nonzero >= end:
            raise CorruptTar(f"tar reading stopped at an unreadable header at byte {end} of {stream.count}")
        if stream.count < end + 2 * tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"the file ends at byte {stream.count}, before the end-of-archive marker")


def _read_in_first_pass(member: _Member) -> bool:
    """Whether a regroup's first pass reads a member: a small one that is no image (a caption, a json)."""
    return member.ext not in IMAGE_EXTS and member.size <= SMALL_MEMBER_BYTES


def _completed(samples: list[_Pending]) -> Iterator[RawSample]:
    """A key's samples that hold all their members, taken from its first on: a duplicate waits for the sample it
    repeats, which the worker keeps (the first occurrence)."""
    while samples and samples[0].to_read == 0:
        yield samples.pop(0).sample


def _check_decompressed_end(stream, end: int, limit: int = 1 << 20) -> None:
    """TarSamples._check_archive_end for a compressed tar, whose bytes say nothing of where tarfile stopped: the
    decompressed data is read on from there (tarfile's _Stream, `pos` counting it). After the end-of-archive marker
    only zeros follow; data means the header there was unreadable; less than the marker's two blocks, a cut."""
    while limit > 0 and (chunk := stream.read(min(limit, 1 << 16))):
        if chunk.strip(b"\0"):
            raise CorruptTar(f"tar reading stopped at an unreadable header at byte {end} of the decompressed data, "
                             "and data follows")
        limit -= len(chunk)
    if stream.pos < end + 2 * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"the decompressed data ends at byte {stream.pos}, before the end-of-archive marker")


def _takes(exts: Iterable[str], ext: str) -> bool:
    """Whether a sample holding the members `exts` takes a member `ext`: not one it holds, nor a second image (one
    sample holds one image, and x.png beside x.jpg is a photo of its own, which the worker fails as a duplicate key,
    as in a folder, rather than drop)."""
    return ext not in exts and not (ext in IMAGE_EXTS and any(e in IMAGE_EXTS for e in exts))


def refusing_split_samples(groups: Iterator[RawSample]) -> Iterator[RawSample]:
    """The groups as they come, until a key comes back with a member it did not have: SplitSample. A key that
    comes back with only members it had, or with another image alone (x.png after x.jpg), is a duplicated sample,
    passed on (the worker fails it)."""
    members_of: dict[str, set[str]] = {}
    for sample in groups:
        earlier = members_of.setdefault(sample.key, set())
        new = set(sample.members) - earlier
        another_image = bool(new) and new.issubset(IMAGE_EXTS) and not earlier.isdisjoint(IMAGE_EXTS)
        if earlier and new and not another_image:
            raise SplitSample(f"the members of sample {sample.key!r} are apart in the tar")
        earlier.update(sample.members)
        yield sample


def output_key(source_key: str) -> str:
    """A key safe for WebDataset: no dots (it splits member names at the first dot), no slashes."""
    return UNSAFE_IN_KEYS.sub("_", source_key) or "_"


def settle_loose_keys(shards: list[InputShard]) -> list[InputShard]:
    """The shards, each loose one told the keys its files clean to that earlier shards of its folder hold
    (InputShard.keys_taken), so that the worker keeps them apart across shards as it does within one: 'photo 1'
    and 'photo_1', or two names in another script ('猫', '犬': '_'), stay two samples, and x.png after x.jpg in
    the next shard is the duplicate it would be in one. Loose images from two input folders that would get one key
    (keys are paths under the folder each was given with: photos/cats and photos/dogs both hold 001.jpg) are
    refused: a dataset with one key twice cannot be split into subsets.

    Memory stays at 8 bytes a file (3M images: 24 MB, where a dict of their keys took ~700 MB): the keys are
    hashed, and only the files whose hash another file shares are looked at again."""
    sizes = np.array([len(shard.files) for shard in shards], dtype=np.int64)
    hashes = np.fromiter((hash(output_key(file_key(shard.url, url))) for shard in shards for url in shard.files),
                         dtype=np.int64, count=int(sizes.sum()))
    order = np.argsort(hashes, kind="stable")
    shared = hashes[order][1:] == hashes[order][:-1]
    candidates = np.union1d(order[1:][shared], order[:-1][shared])  # file positions, in input order
    holder: dict[str, tuple[int, str, str]] = {}  # output key -> (shard index, file, source key) of its first file
    taken: dict[int, dict[str, str]] = {}  # shard index -> {output key: source key} that earlier shards hold
    starts = np.cumsum(sizes) - sizes
    for position in candidates.tolist():
        index = int(np.searchsorted(starts, position, side="right")) - 1
        shard = shards[index]
        url = shard.files[position - starts[index]]
        source = file_key(shard.url, url)
        key = output_key(source)
        first_index, first_file, first_source = holder.setdefault(key, (index, url, source))
        if shards[first_index].url != shard.url:
            raise ValueError(f"{first_file} and {url} would both be sample {key!r} (a loose image's key is its path "
                             "under the folder it was given with): give their common folder, or a quoted glob such "
                             "as 'photos/*/*.jpg', whose keys start below the glob's fixed part")
        if first_index != index:
            taken.setdefault(index, {})[key] = first_source
    return [replace(shard, keys_taken=tuple(sorted(taken[index].items()))) if index in taken else shard
            for index, shard in enumerate(shards)]


def file_key(folder: str, url: str) -> str:
    """A loose image's key: its path under the input folder, without the extension ('cats/001'), so that
    cats/001.jpg and dogs/001.jpg stay two samples."""
    if url.startswith(folder.rstrip("/") + "/"):  # the usual case, both spelled by one filesystem: no parsing
        relative = url[len(folder.rstrip("/")) + 1:]
    else:
        folder_path = fsspec.core.url_to_fs(folder)[1].rstrip("/")
        path = fsspec.core.url_to_fs(url)[1]
        relative = path[len(folder_path) + 1:] if path.startswith(folder_path + "/") else posixpath.basename(path)
    return valid_utf8(split_member_name(relative)[0])


def _caption_file(fs: fsspec.AbstractFileSystem, stem: str, image: str) -> str | None:
    """The caption file beside a loose image: <stem>.txt, or <stem>.TXT beside an image whose extension is upper
    case (IMG_0001.JPG and IMG_0001.TXT, as cameras and Windows tools name them; a tar's members and the listing of
    passed-over files take either case). Looked for by name, one request each, not by listing the folder."""
    names = [stem + ".txt"] + ([stem + ".TXT"] if image.rpartition(".")[2].isupper() else [])
    for caption in names:
        if fs.isfile(caption):  # a folder named a.txt beside a.jpg is no caption (read, it failed as the storage's)
            return caption
    return None


def read_file_samples(files: tuple[str, ...], folder: str | None = None,
                      max_member_bytes: int | None = None) -> Iterator[RawSample]:
    """Loose images as samples, keyed by their path under `folder`; a sibling <stem>.txt (if any) is the caption
    (<stem>.TXT beside an image with an upper-case extension).
    A file that vanished or is over `max_member_bytes` is a failed sample; other storage errors raise
    InputReadError (the shard is retried)."""
    for url in files:
        fs, path = fsspec.core.url_to_fs(url)
        stem, ext = split_member_name(path)
        sample = RawSample(file_key(folder, url) if folder else valid_utf8(posixpath.basename(stem)))
        try:
            size = fs.size(path)
            if max_member_bytes is not None and size is not None and size > max_member_bytes:
                name = valid_utf8(posixpath.basename(path))
                sample.error = f"{name} is {size} bytes, over the cap of {max_member_bytes}"
                yield sample
                continue
            sample.members[ext] = fs.cat_file(path)
            caption = _caption_file(fs, stem, path)
            if caption is not None:
                sample.members["txt"] = fs.cat_file(caption)
        except FileNotFoundError as e:
            sample.error = valid_utf8(f"{type(e).__name__}: {e}")
        except Exception as e:  # the storage's (an OSError, or a response cut part-way, which is none)
            if not storage_error(e):
                raise
            raise InputReadError(f"{url}: {type(e).__name__}: {e}") from e
        yield sample
