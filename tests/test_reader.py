import shutil

import pytest

from pipeline.reader import TarSamples, list_input_shards, read_file_samples, split_member_name
from tests.corpus import good_jpeg, write_bad_inputs, write_tar


def test_member_names_split_at_the_last_dot():
    assert split_member_name("000123.jpg") == ("000123", "jpg")
    assert split_member_name("img.v2.JPG") == ("img.v2", "jpg")
    assert split_member_name("dir.d/file") == ("dir.d/file", "")


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


def test_a_folder_of_images_becomes_shards_of_n_files(tmp_path):
    for i in range(5):
        (tmp_path / f"img{i}.jpg").write_bytes(good_jpeg(i))
    (tmp_path / "img0.txt").write_text("a caption")
    shards = list_input_shards([str(tmp_path)], files_per_shard=2)
    assert [len(s.files) for s in shards] == [2, 2, 1]
    first = list(read_file_samples(shards[0].files))
    assert [s.key for s in first] == ["img0", "img1"]
    assert first[0].members["txt"] == b"a caption" and "txt" not in first[1].members


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
