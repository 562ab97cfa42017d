import bz2
import gzip
import io
import lzma
import shutil
import tarfile
from functools import partial

import fsspec
import pytest

from pipeline.reader import (
    SMALL_MEMBER_BYTES,
    CorruptTar,
    InputChanged,
    InputReadError,
    InputShard,
    SplitSample,
    TarSamples,
    list_input_shards,
    read_file_samples,
    split_member_name,
)
from pipeline.worker import input_identity, open_samples
from tests.corpus import good_jpeg, write_bad_inputs, write_tar


def test_member_names_split_at_the_last_dot():
    assert split_member_name("000123.jpg") == ("000123", "jpg")
    assert split_member_name("img.v2.JPG") == ("img.v2", "jpg")
    assert split_member_name("dir.d/file") == ("dir.d/file", "")



def test_a_datasets_own_shard_as_input_keeps_its_maps_and_latents_with_their_image(tmp_path):
    """A dataset's shards given as --input (another task's maps of the same images) read <key>.canny.png as a photo
    of its own, key '<key>.canny' without a caption: the new dataset held every sample twice, half of them maps."""
    own = {"jpg": good_jpeg(), "canny.png": b"map", "hed.png": b"map", "latent.npy": b"npy", "txt": b"a cat",
           "json": b"{}"}
    tar = write_tar(tmp_path / "00000.tar", [("000000000", own), ("000000001", own), ("img.v2", {"jpg": good_jpeg()})])
    with open(tar, "rb") as f:
        samples = list(TarSamples(f))
    assert [s.key for s in samples] == ["000000000", "000000001", "img.v2"]  # dotted keys still split at the last dot
    assert set(samples[0].members) == set(own) and not samples[0].error

def test_inputs_expand_from_lists_globs_braces_and_folders(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"{i:05d}.tar", [("a", {"jpg": b"x"})])
    as_list = list_input_shards([str(tmp_path / "00000.tar"), str(tmp_path / "00002.tar")])
    as_glob = list_input_shards([str(tmp_path / "*.tar")])
    as_brace = list_input_shards([str(tmp_path / "{00000..00002}.tar")])
    as_folder = list_input_shards([str(tmp_path)])
    assert [s.name for s in as_list] == ["00000", "00002"]
    assert [s.name for s in as_glob] == [s.name for s in as_brace] == [s.name for s in as_folder]
    assert [s.name for s in as_glob] == ["00000", "00001", "00002"]


def test_missing_inputs_and_name_clashes_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        list_input_shards([str(tmp_path / "nope.tar")])
    with pytest.raises(FileNotFoundError, match="no input matches"):
        list_input_shards([str(tmp_path / "*.tar")])
    (tmp_path / "x").mkdir()
    write_tar(tmp_path / "a.tar", [])
    write_tar(tmp_path / "x" / "a.tar", [])
    with pytest.raises(ValueError, match="share output names"):
        list_input_shards([str(tmp_path / "a.tar"), str(tmp_path / "x" / "a.tar")])


def test_hidden_files_are_left_out_of_folders_and_globs_and_a_shard_given_twice_is_read_once(tmp_path):
    """A photo folder copied from a Mac (or tarred on one) holds a `._<name>` beside each image, which is no image:
    each became a failed row. The same tar matched by a glob and named again was refused with "rename them"."""
    (tmp_path / "tars").mkdir()
    write_tar(tmp_path / "tars" / "a.tar", [("a", {"jpg": b"x"})])
    (tmp_path / "tars" / "._a.tar").write_bytes(b"\0" * 4096)
    photos = tmp_path / "photos"
    (photos / ".thumbnails").mkdir(parents=True)
    for name in ["x.jpg", "._x.jpg", ".thumbnails/x.jpg", "y.png"]:
        (photos / name).write_bytes(good_jpeg(0))
    assert [s.url.rsplit("/", 1)[1] for s in list_input_shards([str(tmp_path / "tars")])] == ["a.tar"]
    mac_tar = write_tar(tmp_path / "mac.tar", [("photos/._x", {"jpg": b"\0\5\26\7"}), ("photos/x", {"jpg": b"x"}),
                                               ("photos/.DS_Store", {"": b"\0"})])  # bsdtar on a Mac
    with open(mac_tar, "rb") as f:
        assert [s.key for s in TarSamples(f)] == ["photos/x"]
    assert list_input_shards([str(tmp_path / "tars" / "*.tar"), str(tmp_path / "tars" / "a.tar")]) == \
        list_input_shards([str(tmp_path / "tars")])
    for spec in [photos, photos / "*", tmp_path / "p*" / "*"]:
        [shard] = list_input_shards([str(spec)])
        assert [f.rsplit("/", 1)[1] for f in shard.files] == ["x.jpg", "y.png"], spec
    [named] = list_input_shards([str(photos / "._x.jpg")])  # named on its own, it is read
    assert named.files[0].endswith("/._x.jpg")
    with pytest.raises(ValueError, match="photos is given twice"):  # two cuts of one folder into shards
        list_input_shards([str(photos), str(photos / "x.jpg")])


def test_a_folder_of_images_becomes_shards_of_n_files(tmp_path):
    for i in range(5):
        (tmp_path / f"img{i}.jpg").write_bytes(good_jpeg(i))
    (tmp_path / "img0.txt").write_text("a caption")
    shards = list_input_shards([str(tmp_path)], files_per_shard=2)
    assert [len(s.files) for s in shards] == [2, 2, 1]
    first = list(read_file_samples(shards[0].files, shards[0].url))
    assert [s.key for s in first] == ["img0", "img1"]
    assert first[0].members["txt"] == b"a caption" and "txt" not in first[1].members



def test_an_upper_case_caption_beside_an_upper_case_image_is_its_caption(tmp_path):
    """IMG_0001.JPG and IMG_0001.TXT (a camera's or Windows' names): a tar's members of either case were one sample,
    but in a folder the .TXT was neither read as the caption nor named among the files passed over."""
    (tmp_path / "IMG_0001.JPG").write_bytes(good_jpeg(1))
    (tmp_path / "IMG_0001.TXT").write_text("upper caption")
    (tmp_path / "img_0002.jpg").write_bytes(good_jpeg(2))
    (tmp_path / "img_0002.txt").write_text("lower caption")
    [shard] = list_input_shards([str(tmp_path)], say=pytest.fail)
    samples = list(read_file_samples(shard.files, shard.url))
    assert [(s.key, s.members.get("txt")) for s in samples] == [("IMG_0001", b"upper caption"),
                                                               ("img_0002", b"lower caption")]

def test_files_of_kinds_not_read_are_named_in_one_line_not_passed_over_without_a_word(tmp_path):
    """An iPhone's export holds .HEIC photos, a camera's card .CR2 raws: PIL reads neither here, and the folder
    reader left them out without a word (or, with nothing else there, said only 'no input shards')."""
    photos = tmp_path / "photos"
    (photos / "trip").mkdir(parents=True)
    (photos / "a.jpg").write_bytes(good_jpeg(0))
    (photos / "a.txt").write_text("a caption")  # a caption: read with its image, not passed over
    for name in ["IMG_1.HEIC", "trip/IMG_2.HEIC", "trip/raw.cr2", ".hidden.heic"]:
        (photos / name).write_bytes(b"\0" * 16)
    said = []
    [shard] = list_input_shards([str(photos)], say=said.append)
    assert [f.rsplit("/", 1)[1] for f in shard.files] == ["a.jpg"]
    [line] = said
    assert "passed over 3 input file(s)" in line and ".heic 2" in line and ".cr2 1" in line, line
    said.clear()
    list_input_shards([str(photos / "*")], say=said.append)  # a glob: the folder 'trip' is no file passed over
    assert len(said) == 1 and "passed over 1 input file(s)" in said[0] and ".heic 1" in said[0], said
    said.clear()
    list_input_shards([str(photos / "a.jpg")], say=said.append)  # an image named on its own: nothing to say
    assert said == []
    (tmp_path / "iphone").mkdir()
    (tmp_path / "iphone" / "IMG_3.HEIC").write_bytes(b"\0" * 16)
    for spec in [tmp_path / "iphone", tmp_path / "iphone" / "*"]:
        said.clear()
        with pytest.raises(FileNotFoundError):
            list_input_shards([str(spec)], say=said.append)
        assert len(said) == 1 and ".heic 1" in said[0], (spec, said)
    tars = tmp_path / "tars"
    tars.mkdir()
    write_tar(tars / "00000.tar", [("a", {"jpg": good_jpeg(0)})])
    (tars / "00001.tar.zst").write_bytes(b"\0" * 16)  # a compression tarfile does not read
    for beside in ["00000.parquet", "00000.stats.json"]:  # a dataset's own shards, given as input: no notice
        (tars / beside).write_bytes(b"{}")
    said.clear()
    assert [s.name for s in list_input_shards([str(tars)], say=said.append)] == ["00000"]
    assert len(said) == 1 and ".zst 1" in said[0], said


def test_folders_linked_into_an_image_folder_are_read_and_a_link_up_the_tree_is_not_followed(tmp_path):
    """fsspec's find lists a link to a folder as one entry, no image: a dataset put together from links to other
    disks lost those images without a word. A link above the folder would hold the whole tree again."""
    (tmp_path / "disk2" / "dogs").mkdir(parents=True)
    (tmp_path / "disk2" / "dogs" / "001.jpg").write_bytes(good_jpeg(1))
    photos = tmp_path / "photos"
    (photos / "cats").mkdir(parents=True)
    (photos / "cats" / "001.jpg").write_bytes(good_jpeg(0))
    (photos / "dogs").symlink_to(tmp_path / "disk2" / "dogs")
    (photos / "loop").symlink_to(tmp_path)  # holds photos/ again, and disk2/ once more
    [shard] = list_input_shards([str(photos)])
    assert [s.key for s in read_file_samples(shard.files, shard.url)] == ["cats/001", "dogs/001"]


def test_avif_images_in_a_folder_or_a_tar_are_read(tmp_path):
    """AVIF (what browsers and phones save now) was no image extension: a folder's .avif files were left out of
    the job without a word, and a tar's were failed as samples without an image, though PIL decodes them."""
    from PIL import Image, features

    from pipeline.config import BuildConfig
    from pipeline.preprocess import decode_image
    from pipeline.worker import prepare
    from tests.corpus import encode, photo

    if not features.check("avif"):
        pytest.skip("this PIL is built without AVIF")
    (tmp_path / "a.jpg").write_bytes(good_jpeg(0))
    (tmp_path / "b.avif").write_bytes(encode(Image.fromarray(photo(96, 64)), "AVIF"))
    [shard] = list_input_shards([str(tmp_path)])
    [_, avif] = read_file_samples(shard.files, shard.url)
    assert avif.key == "b" and list(avif.members) == ["avif"]
    image, size = decode_image(avif.members["avif"], resolution=32, max_pixels=10**6)
    assert size == (96, 64) and image.shape == (64, 96, 3)
    prepared = prepare(avif, "b", shard.name, BuildConfig(resolution=32))  # a tar's sample, as a folder's
    assert prepared.image is not None and not prepared.row["error"]


def test_a_glob_over_a_photo_folder_takes_the_images_with_their_captions_and_dotted_paths_are_one_folder(tmp_path):
    """'photos/*' matched the captions too, and each <stem>.txt was read as a tar shard that failed; a rerun that
    spelled the folder another way ('in/../photos') was refused as changed input."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        (photos / f"p{i}.jpg").write_bytes(good_jpeg(i))
        (photos / f"p{i}.txt").write_text("caption")
    [shard] = list_input_shards([str(photos / "*")])
    assert [f.rsplit("/", 1)[1] for f in shard.files] == ["p0.jpg", "p1.jpg"]
    assert [s.members["txt"] for s in read_file_samples(shard.files, shard.url)] == [b"caption"] * 2
    with pytest.raises(FileNotFoundError, match="no input matches"):
        list_input_shards([str(photos / "*.txt")])
    assert list_input_shards([str(tmp_path / "in" / ".." / "photos" / ".")]) == list_input_shards([str(photos)])


def test_truncated_tar_yields_the_samples_before_the_cut(tmp_path):
    shards = write_bad_inputs(tmp_path)
    with open(shards["truncated"], "rb") as f:
        reader = TarSamples(f)
        samples = list(reader)
    complete = [s for s in samples if not s.error]
    assert 1 <= len(complete) < 6
    assert [s.key for s in complete] == [f"s{i}" for i in range(len(complete))]
    assert reader.error


@pytest.mark.parametrize("name", ["notatar", "zerobytes"])
def test_unreadable_files_give_no_samples_and_an_error(tmp_path, name):
    shards = write_bad_inputs(tmp_path)
    with open(shards[name], "rb") as f:
        reader = TarSamples(f)
        assert list(reader) == []
    assert reader.error


def test_empty_tar_is_fine_and_duplicates_are_kept_apart(tmp_path):
    shards = write_bad_inputs(tmp_path)
    with open(shards["empty"], "rb") as f:
        reader = TarSamples(f)
        assert list(reader) == [] and reader.error == ""
    with open(shards["dup"], "rb") as f:
        assert [s.key for s in TarSamples(f)] == ["a", "b", "a"]
    shutil.rmtree(tmp_path)


def six_samples() -> bytes:
    """A tar of samples s0..s5 (a 3000-byte jpg and a txt each), end-of-archive marker and padding included."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(6):
            for ext, size in (("jpg", 3000), ("txt", 10)):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = size
                tar.addfile(info, io.BytesIO(bytes([i + 1]) * size))
    return buffer.getvalue()


SAMPLE_BYTES = 512 + 3072 + 512 + 512  # two headers, the jpg's data blocks, the txt's block


def read(data: bytes, **kwargs) -> tuple[list[tuple[str, bool]], TarSamples]:
    reader = TarSamples(io.BytesIO(data), **kwargs)
    return [(s.key, bool(s.error)) for s in reader], reader


def test_a_file_cut_at_a_member_boundary_is_truncated_not_complete():
    """tarfile stops quietly where the bytes end between members; the missing end-of-archive marker gives it away."""
    samples, reader = read(six_samples()[: 2 * SAMPLE_BYTES])
    assert samples == [("s0", False), ("s1", True)]  # s1's members may go on past the cut: a failed sample
    assert reader.truncated and "end-of-archive" in reader.error
    whole, reader = read(six_samples())
    assert [k for k, _ in whole] == [f"s{i}" for i in range(6)] and not reader.truncated and not reader.error


def test_a_corrupt_header_with_bytes_after_it_fails_the_shard_instead_of_dropping_the_rest():
    data = bytearray(six_samples())
    data[3 * SAMPLE_BYTES: 3 * SAMPLE_BYTES + 100] = b"x" * 100  # s3's header
    with pytest.raises(CorruptTar, match="unreadable header"):
        read(bytes(data))


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_a_compressed_tar_with_a_corrupt_header_or_cut_between_members_is_told_from_a_whole_one(compress):
    """In a .tar.gz (.bz2, .xz) tarfile stops as quietly at an unreadable header, or where the data ends between
    members, and the checks of the file's bytes do not apply (its offsets are positions in the decompressed data):
    the samples after a bad header were dropped without a word, and a cut one committed as complete."""
    data = bytearray(six_samples())
    data[3 * SAMPLE_BYTES: 3 * SAMPLE_BYTES + 100] = b"x" * 100  # s3's header
    with pytest.raises(CorruptTar, match="unreadable header"):
        read(compress(bytes(data)))
    samples, reader = read(compress(six_samples()[: 2 * SAMPLE_BYTES]))
    assert samples == [("s0", False), ("s1", True)] and reader.truncated and "end-of-archive" in reader.error
    whole, reader = read(compress(six_samples()))
    assert [k for k, _ in whole] == [f"s{i}" for i in range(6)] and not reader.truncated and not reader.error


class ResetAfter(io.BytesIO):
    """Object storage that fails with `error` (the connection reset) once `limit` bytes have been read."""

    def __init__(self, data: bytes, limit: int, error: Exception | None = None):
        super().__init__(data)
        self.limit = limit
        self.error = error or ConnectionResetError("connection reset by peer")

    def read(self, size=-1):
        if self.tell() >= self.limit:
            raise self.error
        return super().read(size)


def test_a_storage_error_mid_stream_raises_to_retry_the_shard_rather_than_commit_it_short():
    """A response cut part-way is no OSError (aiohttp's ClientPayloadError, botocore's ResponseStreamingError):
    it went up as it was, and the job counted it as a failed attempt instead of waiting the storage out."""
    from tests.test_storage import cut_responses

    for error in [ConnectionResetError("connection reset by peer"), *cut_responses()]:
        reader = TarSamples(ResetAfter(six_samples(), 2 * SAMPLE_BYTES, error))
        with pytest.raises(InputReadError, match=type(error).__name__):
            list(reader)


def test_members_over_the_cap_fail_their_sample_unread_and_the_rest_is_read():
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for name, size in (("a.jpg", 100), ("big.jpg", 5000), ("big.txt", 5), ("c.jpg", 100)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(b"\1" * size))
    reader = TarSamples(io.BytesIO(data.getvalue()), max_member_bytes=1000)
    samples = {s.key: s for s in reader}
    assert "over the cap" in samples["big"].error and "jpg" not in samples["big"].members
    assert samples["a"].members["jpg"] == b"\1" * 100 and samples["c"].members["jpg"] == b"\1" * 100
    assert not reader.error


def test_image_files_named_directly_or_by_a_glob_are_loose_files_sharded_by_their_folder(tmp_path):
    """`--input photos/a.jpg` or `--input 'photos/*.jpg'`: the files are images, not tars (they were read as tars,
    and every shard failed with 'invalid header')."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("b.jpg", "a.jpg", "c.png"):
        (photos / name).write_bytes(good_jpeg(0))
    write_tar(tmp_path / "s.tar", [("t", {"jpg": good_jpeg(1)})])
    [one] = list_input_shards([str(photos / "a.jpg")])
    assert one.name == "photos-00000" and [f.rsplit("/", 1)[1] for f in one.files] == ["a.jpg"]
    globbed = list_input_shards([str(photos / "*.jpg"), str(tmp_path / "s.tar")], files_per_shard=1)
    assert [(s.name, len(s.files)) for s in globbed] == [("s", 0), ("photos-00000", 1), ("photos-00001", 1)]
    assert [f.rsplit("/", 1)[1] for s in globbed[1:] for f in s.files] == ["a.jpg", "b.jpg"]  # sorted, each once
    samples = list(read_file_samples(globbed[1].files, globbed[1].url))
    assert [s.key for s in samples] == ["a"] and not samples[0].error


def test_loose_images_are_keyed_by_their_path_under_the_folder(tmp_path):
    for animal in ("cats", "dogs"):
        (tmp_path / animal).mkdir()
        (tmp_path / animal / "001.jpg").write_bytes(good_jpeg(0))
    (tmp_path / "dogs" / "002.jpg").write_bytes(b"x" * 2000)
    [shard] = list_input_shards([str(tmp_path)])
    samples = list(read_file_samples(shard.files, shard.url, max_member_bytes=1500))
    assert [s.key for s in samples] == ["cats/001", "dogs/001", "dogs/002"]
    assert "over the cap" in samples[2].error and not samples[0].error


def test_a_sample_whose_members_are_apart_is_refused_streaming_and_merged_when_regrouped():
    """GNU tar writes a folder in directory order: a.txt, b.jpg, a.jpg, b.txt. Streaming groups only adjacent
    members, so the reader says so (SplitSample) and the worker reads the tar again, regrouped."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("./a.txt", "./b.jpg", "./a.jpg", "./b.txt", "./b.jpg"):  # the last: b's jpg again
            info = tarfile.TarInfo(name)
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))
    with pytest.raises(SplitSample, match="'a' are apart"):
        list(TarSamples(io.BytesIO(buffer.getvalue())))
    regrouped = list(TarSamples(io.BytesIO(buffer.getvalue()), reopen=lambda: io.BytesIO(buffer.getvalue())))
    # each sample as its image is read the second time (b's first), the repeat a duplicate after the sample it repeats
    assert [(s.key, sorted(s.members)) for s in regrouped] == [("b", ["jpg", "txt"]), ("a", ["jpg", "txt"]),
                                                               ("b", ["jpg"])]
    assert regrouped[0].members == {"txt": b"./b.txt", "jpg": b"./b.jpg"}



def test_a_second_image_under_one_key_is_a_sample_of_its_own_not_dropped():
    """x.jpg and x.png in a tar (a folder of photos packed by hand) were one sample whose png was never read nor
    recorded; in a folder the png is a duplicate key that the worker fails, and in a tar it is now the same."""
    def tar_of(names):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name in names:
                info = tarfile.TarInfo(name)
                info.size = len(name)
                tar.addfile(info, io.BytesIO(name.encode()))
        return buffer.getvalue()

    def samples(data, **kwargs):
        return [(s.key, sorted(s.members)) for s in TarSamples(io.BytesIO(data), **kwargs)]

    assert samples(tar_of(["x.jpg", "x.png", "y.jpg"])) == [("x", ["jpg"]), ("x", ["png"]), ("y", ["jpg"])]
    with_caption = tar_of(["x.jpg", "x.png", "x.txt", "y.jpg"])  # sorted: the caption comes after the png
    with pytest.raises(SplitSample):
        samples(with_caption)
    regrouped = samples(with_caption, reopen=lambda: io.BytesIO(with_caption))
    assert regrouped == [("x", ["jpg", "txt"]), ("x", ["png"]), ("y", ["jpg"])]  # as each image is read


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def regrouped(data: bytes, **kwargs) -> tuple[list[tuple[str, bool]], TarSamples]:
    return read(data, reopen=lambda: io.BytesIO(data), **kwargs)


def test_a_regroup_holds_an_image_or_two_at_a_time_not_the_whole_tar(tmp_path):
    """GNU tar over a folder may write every image first and every caption last: the regroup held the whole tar in
    memory before its first sample (here 15 MB; a shard at scale 1-10 GB, in each actor of a node). Now its first
    read keeps the captions alone and its second hands out each image as it reads it."""
    import tracemalloc

    images, image_bytes = 60, 256 << 10
    path = tmp_path / "apart.tar"
    path.write_bytes(tar_of([(f"./{i:03d}.jpg", bytes([i]) * image_bytes) for i in range(images)]
                            + [(f"./{i:03d}.txt", f"caption {i}".encode()) for i in range(images)]))
    with open(path, "rb") as f, pytest.raises(SplitSample):
        list(TarSamples(f))
    read_back = 0
    tracemalloc.start()
    try:
        with open(path, "rb") as f:
            for sample in TarSamples(f, reopen=partial(open, path, "rb")):
                i = int(sample.key)
                assert sample.members == {"txt": f"caption {i}".encode(), "jpg": bytes([i]) * image_bytes}
                read_back += 1
                del sample  # the worker drops each sample once encoded
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert read_back == images
    assert peak < 6 * image_bytes, f"{peak / 2**20:.1f} MiB held at once, of {images * image_bytes / 2**20} MiB"


def test_a_regroup_holds_an_image_until_its_sample_is_whole_and_a_large_member_is_read_second():
    """A member over SMALL_MEMBER_BYTES that is no image is left to the second read, as images are: the sample it
    belongs to waits for it, the others do not."""
    big = b"\2" * (SMALL_MEMBER_BYTES + 1)
    data = tar_of([("a.jpg", b"a"), ("b.jpg", b"b"), ("b.txt", b"cap b"), ("a.npy", big), ("a.txt", b"cap a")])
    reader = TarSamples(io.BytesIO(data), reopen=lambda: io.BytesIO(data))
    samples = list(reader)
    assert [s.key for s in samples] == ["b", "a"]  # b whole at its image; a once its npy was read
    assert samples[1].members == {"jpg": b"a", "npy": big, "txt": b"cap a"} and not reader.error


def test_a_regrouped_tar_that_is_cut_corrupt_or_reset_ends_as_a_streamed_one():
    samples, reader = regrouped(six_samples()[: 2 * SAMPLE_BYTES])
    assert samples == [("s0", False), ("s1", True)] and reader.truncated and "end-of-archive" in reader.error
    samples, reader = regrouped(six_samples()[: 2 * SAMPLE_BYTES + 512 + 1000])  # in s2's jpg
    assert samples == [("s0", False), ("s1", False), ("s2", True)] and reader.truncated
    whole, reader = regrouped(six_samples())
    assert whole == [(f"s{i}", False) for i in range(6)] and not reader.truncated and not reader.error
    corrupt = bytearray(six_samples())
    corrupt[3 * SAMPLE_BYTES: 3 * SAMPLE_BYTES + 100] = b"x" * 100  # s3's header
    with pytest.raises(CorruptTar, match="unreadable header"):
        regrouped(bytes(corrupt))
    with pytest.raises(InputReadError, match="ConnectionResetError"):  # in the first read, then in the second
        list(TarSamples(ResetAfter(six_samples(), 2 * SAMPLE_BYTES), reopen=lambda: io.BytesIO(six_samples())))
    with pytest.raises(InputReadError, match="ConnectionResetError"):
        list(TarSamples(io.BytesIO(six_samples()), reopen=lambda: ResetAfter(six_samples(), 2 * SAMPLE_BYTES)))
    capped = tar_of([("a.jpg", b"\1" * 100), ("big.jpg", b"\1" * 5000), ("a.txt", b"a"), ("big.txt", b"big")])
    samples = {s.key: s for s in TarSamples(io.BytesIO(capped), 1000, reopen=lambda: io.BytesIO(capped))}
    assert "over the cap" in samples["big"].error and samples["big"].members == {"txt": b"big"}
    assert samples["a"].members == {"jpg": b"\1" * 100, "txt": b"a"} and not samples["a"].error


def test_a_tar_that_changes_between_the_two_reads_of_a_regroup_fails_rather_than_mix_them(tmp_path):
    """The second read must read the bytes the first read listed: samples put together from two versions of a
    tar (uploaded again meanwhile) would pair one's captions with the other's images."""
    first = tar_of([("a.txt", b"cap a"), ("b.jpg", b"b"), ("a.jpg", b"a"), ("b.txt", b"cap b")])
    for second in (tar_of([("a.txt", b"cap a"), ("c.jpg", b"c"), ("a.jpg", b"a"), ("b.txt", b"cap b")]),
                   tar_of([("a.txt", b"cap a"), ("b.jpg", b"bb"), ("a.jpg", b"a"), ("b.txt", b"cap b")]),
                   first[: 4 * 1024] + tar_of([("d.jpg", b"d")]),  # a member more (4 members of 1 KiB each)
                   first[: 4 * 1024]):  # cut short
        with pytest.raises(InputChanged, match="changed between the two reads"):
            list(TarSamples(io.BytesIO(first), reopen=lambda second=second: io.BytesIO(second)))
    # the worker's second read checks the file's size, ETag and mtime against those it recorded before the first
    path = tmp_path / "apart.tar"
    path.write_bytes(first)
    shard = InputShard("apart", str(path))
    identity = input_identity(shard)
    path.write_bytes(first + bytes(10240))  # the same members, more padding: the same headers, another file
    with (open_samples(shard, None, regroup=True, identity=identity) as (samples, _),
          pytest.raises(InputChanged, match=r"changed between the two reads of its regroup \(size 10240 -> 20480")):
        list(samples)
    with open_samples(shard, None, regroup=True) as (samples, reader):  # read twice as it is now
        assert sorted((s.key, sorted(s.members)) for s in samples) == [("a", ["jpg", "txt"]), ("b", ["jpg", "txt"])]


def test_a_regroup_on_s3_opens_the_tar_again_and_tells_an_upload_between_the_reads_by_its_etag(s3_endpoint):
    """On object storage the second read is a second GET; an object uploaded again between the two reads, the
    same size (another caption of as many bytes), is told by its ETag."""
    first = tar_of([("a.txt", b"cap a"), ("b.jpg", b"b"), ("a.jpg", b"a"), ("b.txt", b"cap b")])
    fs = fsspec.filesystem("s3")
    fs.mkdir("cnd-regroup")
    fs.pipe_file("cnd-regroup/apart.tar", first)
    shard = InputShard("apart", "s3://cnd-regroup/apart.tar")
    with open_samples(shard, None, regroup=True) as (samples, reader):
        assert sorted((s.key, s.members["txt"]) for s in samples) == [("a", b"cap a"), ("b", b"cap b")]
    identity = input_identity(shard)
    fs.pipe_file("cnd-regroup/apart.tar", first.replace(b"cap b", b"cap B"))
    with (open_samples(shard, None, regroup=True, identity=identity) as (samples, _),
          pytest.raises(InputChanged, match="etag")):
        list(samples)


def test_a_member_named_above_the_tar_is_read_not_taken_for_a_hidden_one():
    """'../up.jpg' (a tar written by a script from a relative path) began with a dot, as a Mac's '._x.jpg' does: its
    sample was passed over without a row. tar drops a leading '../' when it extracts; so does the reader."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("../up.jpg", "../../two/up.jpg", "._up.jpg", "a/../b.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))
    assert [s.key for s in TarSamples(io.BytesIO(buffer.getvalue()))] == ["up", "two/up", "b"]


def test_a_folder_a_glob_matches_is_not_read_as_an_image_or_a_tar(tmp_path):
    """'photos/*.jpg' over a folder named album.jpg (or 'in/*.tar', or a folder of tars, over a folder x.tar) took the
    folder for a file: reading it failed as a storage error, which the job waited out for two minutes and then ended
    on (a folder of tars beside a folder album.jpg was refused as holding both tars and images)."""
    (tmp_path / "a.jpg").write_bytes(good_jpeg(1))
    (tmp_path / "album.jpg").mkdir()
    (tmp_path / "album.jpg" / "b.jpg").write_bytes(good_jpeg(2))
    (tmp_path / "x.tar").mkdir()
    [shard] = list_input_shards([str(tmp_path / "*.jpg")], say=pytest.fail)
    assert [s.key for s in read_file_samples(shard.files, shard.url)] == ["a"]
    (tmp_path / "a.txt").mkdir()  # nor is a folder named like a.jpg's caption its caption
    assert [s.members for s in read_file_samples(shard.files, shard.url)] == [{"jpg": good_jpeg(1)}]
    with pytest.raises(FileNotFoundError, match="no input matches"):
        list_input_shards([str(tmp_path / "*.tar")])
    shards = tmp_path / "shards"  # a folder of tars beside a folder named like one
    shards.mkdir()
    write_tar(shards / "a.tar", [("k", {"jpg": good_jpeg(3)})])
    (shards / "old.tar").mkdir()
    (shards / "album.jpg").mkdir()
    assert [s.name for s in list_input_shards([str(shards)], say=pytest.fail)] == ["a"]


def test_globs_key_by_their_fixed_folder_and_existing_paths_are_taken_as_written(tmp_path):
    photos = tmp_path / "photos"
    for animal in ("cats", "dogs"):
        (photos / animal).mkdir(parents=True)
        (photos / animal / "000.jpg").write_bytes(good_jpeg(0))
    [shard] = list_input_shards([str(photos / "*" / "*.jpg")])
    assert [s.key for s in read_file_samples(shard.files, shard.url)] == ["cats/000", "dogs/000"]
    for name in ("Album [2019]", "set {a,b}"):  # a folder with glob or brace characters in its name
        (tmp_path / name).mkdir()
        (tmp_path / name / "p.jpg").write_bytes(good_jpeg(1))
        [shard] = list_input_shards([str(tmp_path / name)])
        assert len(shard.files) == 1
    # each URL of a brace range, too: 'x[1].jpg' is that file (as a glob, it would match x1.jpg only)
    for folder in ("a", "b"):
        (tmp_path / "ranged" / folder).mkdir(parents=True)
        for name in ("x[1].jpg", "y[1].jpg"):
            (tmp_path / "ranged" / folder / name).write_bytes(good_jpeg(3))
    [shard] = list_input_shards([str(tmp_path / "ranged" / "a" / "{x,y}[1].jpg")])
    assert [s.key for s in read_file_samples(shard.files, shard.url)] == ["x[1]", "y[1]"]
    # images named in two folders are keyed under each: one key twice in the dataset, refused before any work
    with pytest.raises(ValueError, match=r"a/x\[1\].jpg and .*b/x\[1\].jpg would both be sample 'x_1_'"):
        list_input_shards([str(tmp_path / "ranged" / "{a,b}" / "x[1].jpg")])
    assert len(list_input_shards([str(tmp_path / "ranged")])) == 1  # their folder: keys a/x[1] and b/x[1]
    gz = tmp_path / "gz"
    gz.mkdir()
    with tarfile.open(gz / "00000.tar.gz", "w:gz") as tar:
        tar.add(photos / "cats" / "000.jpg", "k.jpg")
    [shard] = list_input_shards([str(gz)])
    with fsspec.open(shard.url, "rb") as f:
        assert [s.key for s in TarSamples(f)] == ["k"]
    shutil.copy(gz / "00000.tar.gz", gz / "00001.TAR")  # a name in capitals is a shard too, in a folder or a glob
    assert [s.url.rsplit("/", 1)[1] for s in list_input_shards([str(gz)])] == ["00000.tar.gz", "00001.TAR"]
    assert len(list_input_shards([str(gz / "*")])) == 2
    (gz / "stray.jpg").write_bytes(good_jpeg(2))  # taking the tars alone dropped it without a word
    with pytest.raises(ValueError, match="holds both tar shards and images"):
        list_input_shards([str(gz)])
