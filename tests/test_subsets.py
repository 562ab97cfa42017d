"""nested dataset-size subsets: size parsing, ranking, selection, parquet-only reads, s3, and the trainer's stream"""
import json
import random
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline import format as fmt
from pipeline.format import key_hash
from tests.conftest import copy_dataset, tar_members
from train.data import make_dataset, resolve_shards
from train.subsets import (
    Sample,
    SubsetError,
    main,
    make_subsets,
    parse_size,
    parse_sizes,
    rank,
    select,
    size_label,
)

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def dataset(canny64, tmp_path_factory) -> Path:
    return copy_dataset(canny64, tmp_path_factory, "subsets")


def copy_of(dataset: Path, tmp_path: Path) -> Path:
    target = tmp_path / "canny"
    shutil.copytree(dataset, target, ignore=shutil.ignore_patterns("subsets"))
    return target


def index_rows(dataset: Path, skip_last: bool = False) -> dict[str, int]:
    """key -> original pixels of every ok row, straight from the parquet files (all shards, or all but the last,
    which subsets hold out for validation)."""
    rows = {}
    paths = sorted((dataset / "shards").glob("*.parquet"))
    for path in paths[:-1] if skip_last else paths:
        table = pq.read_table(path).to_pylist()
        rows.update({r["key"]: r["original_width"] * r["original_height"] for r in table if r["status"] == "ok"})
    return rows


def load(url: str) -> dict:
    return json.loads(Path(url).read_text())


# ---------------------------------------------------------------- pure functions


def test_sizes_parse_in_the_papers_forms():
    assert [parse_size(s) for s in ("500", "1k", "10K", "50k", "500k", "3m", "1.5k")] == \
        [500, 1000, 10_000, 50_000, 500_000, 3_000_000, 1500]
    assert parse_sizes("3m,1k, 10k,1000") == [1000, 10_000, 3_000_000]
    assert [parse_size(s) for s in ("1.001k", "1.003k", "2.3k", "1.0001m")] == [1001, 1003, 2300, 1_000_100]  # exact
    assert [size_label(n) for n in (500, 1000, 1500, 3_000_000, 2_500_000)] == ["500", "1k", "1500", "3m", "2500k"]
    for bad in ("", "k", "0", "-5", "1.2345k", "1g", "ten"):
        with pytest.raises(ValueError):
            parse_sizes(bad)


def test_ranking_is_by_resolution_then_key_hash_whatever_the_input_order():
    samples = [Sample(f"k{i:03d}", pixels, "a.tar") for i, pixels in enumerate([100, 400, 400, 400, 50, 400, 100])]
    ranked = rank(samples)
    assert [s.pixels for s in ranked] == [400, 400, 400, 400, 100, 100, 50]
    ties = [s.key for s in ranked if s.pixels == 400]
    assert ties == sorted(ties, key=key_hash) == ["k003", "k005", "k002", "k001"]  # hash order, not key order
    for seed in range(5):
        shuffled = samples[:]
        random.Random(seed).shuffle(shuffled)
        assert rank(shuffled) == ranked
    assert key_hash("000010005") == key_hash("000010005") != key_hash("000010006")
    with pytest.raises(SubsetError, match="duplicate keys across shards: 'a' is in y.tar and x.tar"):
        rank([Sample("a", 1, "x.tar"), Sample("a", 2, "y.tar")])


def test_selection_is_exact_nested_and_refuses_too_large():
    ranked = rank(Sample(f"k{i}", i % 7, f"{i % 3}.tar") for i in range(30))
    chosen = select(ranked, [5, 12, 30])
    assert {n: len(c) for n, c in chosen.items()} == {5: 5, 12: 12, 30: 30}
    assert set(chosen[5]) <= set(chosen[12]) <= set(chosen[30])
    with pytest.raises(SubsetError, match="larger than the dataset's 30 ok samples"):
        select(ranked, [5, 31])


# ---------------------------------------------------------------- on a built dataset


def test_subsets_of_a_built_dataset_are_exact_nested_and_the_largest_originals(dataset, tmp_path):
    data = copy_of(dataset, tmp_path)
    written = make_subsets(str(data), [8, 16, 36])
    assert [(w["label"], w["size"]) for w in written] == [("8", 8), ("16", 16), ("36", 36)]
    docs = {w["size"]: load(w["url"]) for w in written}
    assert [w["url"] for w in written] == [str(data / "subsets" / f"{n}.json") for n in (8, 16, 36)]
    keys = {n: set(d["keys"]) for n, d in docs.items()}
    assert {n: len(k) for n, k in keys.items()} == {8: 8, 16: 16, 36: 36}
    assert keys[8] < keys[16] < keys[36]
    pixels = index_rows(data, skip_last=True)
    assert keys[36] == set(pixels)  # every ok sample but the held-out shard's
    for n in (8, 16):  # nothing left out is larger than anything taken
        assert min(pixels[k] for k in keys[n]) >= max(pixels[k] for k in set(pixels) - keys[n])
    doc = docs[8]
    assert doc["task"] == "canny" and doc["dataset"] == ".." and "resolution" in doc["ranking"]
    assert doc["counts"]["samples"] == 8 and doc["counts"]["ok_in_dataset"] == 36
    assert sum(doc["counts"]["per_shard"].values()) == 8 and sorted(doc["counts"]["per_shard"]) == doc["shards"]
    # relative to the manifest's folder, all in the dataset: a copy or move of the dataset keeps its subsets
    assert all(s.startswith("../shards/") and (data / "subsets" / s).is_file() for s in doc["shards"])
    # one validation set for every size: the last shard's ok samples, in no subset
    validation = load(str(data / "subsets" / "validation.json"))
    assert {d["validation"] for d in docs.values()} == {"validation.json"}
    assert set(validation["keys"]) == set(index_rows(data)) - set(pixels) and len(validation["keys"]) == 12
    assert validation["shards"] == [f"../shards/{sorted((data / 'shards').glob('*.tar'))[-1].name}"]
    assert not set(validation["keys"]) & keys[36]
    again = make_subsets(str(data), [16])  # deterministic: a re-run writes the same manifest
    assert load(again[0]["url"]) == docs[16]
    everything = make_subsets(str(data), [48], out=str(tmp_path / "all"), holdout_shards=0)
    assert set(load(everything[0]["url"])["keys"]) == set(index_rows(data)) and everything[0]["validation"] is None


def test_only_the_parquet_indexes_are_read(dataset, tmp_path):
    data = copy_of(dataset, tmp_path)
    for tar in (data / "shards").glob("*.tar"):
        tar.unlink()
    written = make_subsets(str(data), [10], out=str(tmp_path / "elsewhere"))
    assert written[0]["url"] == str(tmp_path / "elsewhere" / "10.json")
    expected = make_subsets(str(dataset), [10], out=str(tmp_path / "reference"))
    assert load(written[0]["url"])["keys"] == load(expected[0]["url"])["keys"]


def test_cli_size_too_large_is_one_line_and_exit_2(dataset, tmp_path, capsys):
    data = copy_of(dataset, tmp_path)
    assert main(["--dataset", str(data), "--sizes", "8,1k"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: size 1k (1000) is larger than the dataset's 36 ok samples (12 more are held out for " \
        "validation)"
    assert not (data / "subsets").exists()  # nothing written for the sizes that would fit either
    assert main(["--dataset", str(data), "--sizes", "8", "--holdout-shards", "-1"]) == 2  # held out nothing, exit 0
    assert "--holdout-shards must not be negative" in capsys.readouterr().err
    assert main(["--dataset", str(tmp_path / "nodata"), "--sizes", "8"]) == 2  # said it had no committed shards
    assert "no such dataset folder" in capsys.readouterr().err
    assert main(["--dataset", str(data), "--sizes", "8", "--materialize", "always", "--samples-per-shard", "0"]) == 2
    assert "--samples-per-shard must be 1 or more, not 0" in capsys.readouterr().err  # it wrote one shard, exit 0
    (tmp_path / "a file").write_text("")
    assert main(["--dataset", str(data), "--sizes", "8", "--out", str(tmp_path / "a file")]) == 2  # a traceback
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "a file" in error and "\n" not in error, error
    assert main(["--dataset", str(data), "--sizes", "8,16", "--json"]) == 0
    assert [w["size"] for w in json.loads(capsys.readouterr().out)] == [8, 16]


def test_s3_dataset(dataset, s3_endpoint):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("cnd-subsets")
    fs.put(str(dataset) + "/", "cnd-subsets/canny", recursive=True)
    written = make_subsets("s3://cnd-subsets/canny", [8, 16])
    assert [w["url"] for w in written] == ["s3://cnd-subsets/canny/subsets/8.json",
                                           "s3://cnd-subsets/canny/subsets/16.json"]
    fs.invalidate_cache()
    doc = json.loads(fs.cat_file("cnd-subsets/canny/subsets/8.json"))
    assert all(s.startswith("../shards/") for s in doc["shards"])
    local = make_subsets(str(dataset), [8], out=str(Path(dataset).parent / "local-subsets"))
    assert doc["keys"] == load(local[0]["url"])["keys"]
    source = resolve_shards("s3://cnd-subsets/canny/subsets/8.json")
    assert source.keys == frozenset(doc["keys"]) and source.task == "canny"
    # materialized on S3: the compact shards go up beside the manifests, and the stream reads them from there
    [copied] = make_subsets("s3://cnd-subsets/canny", [8], out="s3://cnd-subsets/small", materialize_mode="always",
                            samples_per_shard=5)
    fs.invalidate_cache()
    doc = json.loads(fs.cat_file("cnd-subsets/small/8.json"))
    assert doc["shards"] == ["s3://cnd-subsets/small/8/shards/00000.tar", "s3://cnd-subsets/small/8/shards/00001.tar"]
    assert doc["dataset"] == "s3://cnd-subsets/canny"  # subsets outside the dataset name it as it is
    assert fs.exists("cnd-subsets/small/8/shards/00001.stats.json") and copied["materialized"]
    stream = make_dataset(resolve_shards("s3://cnd-subsets/small/8.json"), resolution=64, batch_size=4, seed=0,
                          prompt_dropout=0.0, epoch_samples=None)
    assert sorted(k for batch in stream for k in batch["key"]) == sorted(doc["keys"])


def test_the_trainer_streams_exactly_the_selected_keys(dataset, tmp_path):
    written = make_subsets(str(dataset), [12], out=str(tmp_path))
    selected = set(load(written[0]["url"])["keys"])
    source = resolve_shards(written[0]["url"])
    assert source.keys == selected and source.task == "canny" and source.counts["samples"] == 12
    stream = make_dataset(source, resolution=64, batch_size=4, seed=0, prompt_dropout=0.0, epoch_samples=None)
    seen = [k for batch in stream for k in batch["key"]]
    assert sorted(seen) == sorted(selected)  # every selected key once, nothing else


# ---------------------------------------------------------------- materialized subsets (compact shards of their own)


def test_a_subset_copy_refuses_a_member_over_the_read_cap(dataset, tmp_path, monkeypatch):
    """A copy must hold every member: a sample whose image is over the shard reader's cap is refused by name, not
    copied without its image; the refused copy leaves no staging folder behind in the temp dir."""
    import tempfile

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    data = copy_of(dataset, tmp_path)
    tar = sorted((data / "shards").glob("*.tar"))[0]
    samples = tar_members(tar)
    first = min(samples)
    samples[first]["jpg"] = bytes(fmt.MAX_MEMBER_BYTES + 1)
    with open(tar, "wb") as f, fmt.SampleTarWriter(f) as writer:
        for key in sorted(samples):
            writer.write(key, samples[key])
    every = len(index_rows(data, skip_last=True))  # the whole pool (the last shard is held out): the key is chosen
    with pytest.raises(SubsetError, match=f"{first}'s members {{'jpg': {fmt.MAX_MEMBER_BYTES + 1}}}"):
        make_subsets(str(data), [every], materialize_mode="always")
    assert list(temp.iterdir()) == []


def test_a_subset_copy_takes_the_row_of_the_sample_written_not_of_a_duplicate_the_job_failed(dataset, tmp_path):
    """A shard that named one key twice holds the first sample and a failed row for the second: the copy took the
    last row for the key, so its index called a sample it holds failed."""
    import pyarrow as pa

    data = copy_of(dataset, tmp_path)
    index = sorted((data / "shards").glob("*.parquet"))[0]
    table = pq.read_table(index)
    rows = table.to_pylist()
    first = next(r for r in rows if r["status"] == "ok")
    duplicate = {**first, "status": "failed", "error": f"duplicate key {first['key']!r} (the first occurrence kept)"}
    pq.write_table(pa.Table.from_pylist([*rows, duplicate], schema=table.schema), index)
    every = len(index_rows(data, skip_last=True))
    [copied] = make_subsets(str(data), [every], materialize_mode="always")
    assert copied["materialized"]
    copied_rows = [r for path in sorted((data / "subsets" / str(every) / "shards").glob("*.parquet"))
                   for r in pq.read_table(path).to_pylist()]
    assert [r["status"] for r in copied_rows if r["key"] == first["key"]] == ["ok"]


def test_materialized_subsets_are_exact_nested_copies_in_compact_shards(dataset, tmp_path):
    data = copy_of(dataset, tmp_path)
    written = make_subsets(str(data), [5, 10, 36], materialize_mode="auto", samples_per_shard=4)
    by_size = {w["size"]: w for w in written}
    # auto: the small sizes sit in shards holding > 2x their samples, so they are copied; the whole pool is not
    assert [w["materialized"] for w in written] == [True, True, False]
    assert by_size[5]["read_amplification"] > 2 >= by_size[36]["read_amplification"]
    source = {k: m for tar in (data / "shards").glob("*.tar") for k, m in tar_members(tar).items()}
    source_rows = {r["key"]: r for p in (data / "shards").glob("*.parquet") for r in pq.read_table(p).to_pylist()}
    keys = {}
    for size in (5, 10):
        doc = load(by_size[size]["url"])
        folder = data / "subsets" / str(size)
        tars = sorted((folder / "shards").glob("*.tar"))
        assert doc["shards"] == [f"{size}/shards/{t.name}" for t in tars] and doc["dataset"] == ".."
        assert doc["materialized"]["folder"] == str(size) and "resolution" in doc["ranking"]
        assert [len(tar_members(t)) for t in tars] == [4] * (size // 4) + ([size % 4] if size % 4 else [])
        assert doc["counts"]["per_shard"] == {f"{size}/shards/{t.name}": len(tar_members(t)) for t in tars}
        copied = {k: m for t in tars for k, m in tar_members(t).items()}
        keys[size] = set(copied)
        assert keys[size] == set(doc["keys"]) and len(copied) == size  # exactly the selection, each once
        assert all(copied[k] == source[k] for k in copied)  # every member, byte for byte
        rows = [r for p in sorted((folder / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
        assert sorted(r["key"] for r in rows) == sorted(copied) and all(r == source_rows[r["key"]] for r in rows)
        assert len(list((folder / "shards").glob("*.stats.json"))) == len(tars)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["subset"]["of"] == str(data)
        # its shard counts are its own, not the source's (which named 4 shards done, this folder holding 2 or 3)
        assert manifest["shards"] == {"done": len(tars), "failed": {}, "truncated": {}}
        # webdataset reads the compact shards back, and the subset folder reads as a dataset
        assert sum(1 for _ in wds.WebDataset([str(t) for t in tars], shardshuffle=False)) == size
        assert resolve_shards(str(folder)).counts["samples"] == size
    assert keys[5] < keys[10] < set(load(by_size[36]["url"])["keys"])  # nested, exactly
    stamps = {t: t.stat().st_mtime_ns for t in (data / "subsets").rglob("*.tar")}
    again = make_subsets(str(data), [5, 10, 36], materialize_mode="auto", samples_per_shard=4)
    assert again == written and stamps == {t: t.stat().st_mtime_ns for t in (data / "subsets").rglob("*.tar")}
    plain = make_subsets(str(data), [5, 10], out=str(tmp_path / "plain"))  # never: the same choice, nothing copied
    assert [set(load(w["url"])["keys"]) for w in plain] == [keys[5], keys[10]]
    assert not (tmp_path / "plain" / "5").exists()


def test_training_on_a_materialized_subset_opens_only_its_shards(dataset, tmp_path, monkeypatch):
    import pipeline.format as fmt_module

    data = copy_of(dataset, tmp_path)
    [subset] = make_subsets(str(data), [6], materialize_mode="always", samples_per_shard=4)
    source = resolve_shards(subset["url"])
    assert source.weights == (4, 2)  # each shard drawn by its samples: every sample equally often
    opened = []  # what the stream opens (fsspec.open is one function for every module)
    real_open = fmt_module.fsspec.open
    monkeypatch.setattr(fmt_module.fsspec, "open", lambda url, *a, **k: opened.append(url) or real_open(url, *a, **k))
    stream = make_dataset(source, resolution=64, batch_size=2, seed=0, prompt_dropout=0.0, epoch_samples=60)
    seen = [k for batch in stream for k in batch["key"]]
    assert len(seen) == 60 and set(seen) == set(load(subset["url"])["keys"])
    assert opened and {str(Path(u).parent) for u in opened} == {str(data / "subsets" / "6" / "shards")}


def test_shards_are_drawn_by_the_samples_they_hold():
    from train.data import resampled_shards

    draws = [s["url"] for s, _ in zip(resampled_shards(["a", "b"], (1, 3), seed=0), range(4000), strict=False)]
    assert 0.22 < draws.count("a") / len(draws) < 0.28
    uniform = [s["url"] for s, _ in zip(resampled_shards(["a", "b"], None, seed=0), range(4000), strict=False)]
    assert 0.47 < uniform.count("a") / len(uniform) < 0.53


def test_subsets_of_a_synthetic_index_are_exact_and_nested(tmp_path):
    from tests.synthetic_index import write_synthetic_index

    data = write_synthetic_index(tmp_path / "big", rows=20_000, files=20)
    written = make_subsets(str(data), [1000, 5000, 15_000], holdout_shards=1)
    sets = [set(load(w["url"])["keys"]) for w in written]
    assert [len(s) for s in sets] == [1000, 5000, 15_000] and sets[0] < sets[1] < sets[2]
    indexes = sorted((data / "shards").glob("*.parquet"))[:-1]  # the last shard is held out
    pixels = {r["key"]: r["original_width"] * r["original_height"] for p in indexes
              for r in pq.read_table(p).to_pylist() if r["status"] == "ok"}
    assert min(pixels[k] for k in sets[0]) >= max(pixels[k] for k in set(pixels) - sets[0])
