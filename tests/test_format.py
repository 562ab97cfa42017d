"""the shard contract's one lister: only committed shards (stats.json written last) are read, by every reader"""
import json
import shutil
from pathlib import Path

import pytest

from pipeline import format as fmt
from pipeline.preview import status_counts
from tests.conftest import copy_dataset
from train.data import resolve_shards
from train.subsets import read_samples


@pytest.fixture(scope="module")
def dataset(canny64, tmp_path_factory) -> Path:
    """The suite's Canny dataset plus the leftovers of a shard that was never committed (tar and parquet, no
    stats.json), as a killed job leaves them."""
    out = copy_dataset(canny64, tmp_path_factory, "format")
    first = fmt.committed_shards(str(out))[0]
    for member in (first.tar, first.index):
        shutil.copy(member, out / "shards" / ("zz-uncommitted" + Path(member).name[len(first.name):]))
    return out


def test_uncommitted_shards_are_invisible_to_every_reader(dataset):
    shards = fmt.committed_shards(str(dataset))
    assert len(shards) == 4 and not any(s.name.startswith("zz") for s in shards)
    assert all(Path(s.tar).exists() and Path(s.index).exists() and s.stats.endswith(".stats.json") for s in shards)
    stats = fmt.read_stats(shards)
    ok = sum(st["counts"]["ok"] for st in stats)
    assert sorted(st["shard"] for st in stats) == [s.name for s in shards]
    assert status_counts(str(dataset))["ok"] == ok  # the preview counted the stray parquet before
    assert len(read_samples(str(dataset))) == ok
    source = resolve_shards(str(dataset))
    assert source.urls == [s.tar for s in shards] and source.counts["samples"] == ok
    assert fmt.read_manifest(str(dataset))["task"] == "canny" and fmt.read_manifest(str(dataset / "none")) == {}


def test_committed_shards_on_s3_keep_the_url_form(dataset, s3_endpoint):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("cnd-format")
    fs.put(str(dataset), "cnd-format/canny", recursive=True)
    shards = fmt.committed_shards("s3://cnd-format/canny")
    assert [s.name for s in shards] == [s.name for s in fmt.committed_shards(str(dataset))]
    assert all(s.tar.startswith("s3://cnd-format/canny/shards/") for s in shards)
    assert sum(st["counts"]["ok"] for st in fmt.read_stats(shards)) == json.loads(
        (dataset / "manifest.json").read_text())["totals"]["ok"]
    assert fmt.read_index(shards[0], ["status"])["status"]
