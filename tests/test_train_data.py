"""the trainer's input stream over shards the real dataset job wrote: local, subset, ranks, bad samples, moto S3"""
import dataclasses
import io
import itertools
import json
import tarfile
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import format as fmt
from pipeline.build import main
from tests.corpus import bomb_png
from train.config import debug
from train.data import (
    DECODE,
    MISSING,
    READ,
    SIZE,
    TOO_LARGE,
    DataSource,
    make_dataset,
    make_loader,
    resolve_images,
    resolve_shards,
    shard_split,
)
from train.loop import Trainer, epoch_lengths, every_rank, segment_batches
from train.tiny_sd import build_tiny_sd

pytestmark = pytest.mark.usefixtures("ray_session")

SAMPLES = 48  # the sample shards: 4 tars of 12 photos' crops and flips


@pytest.fixture(scope="module")
def dataset(sample_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train-data") / "canny"
    assert main(["--input", str(sample_shards), "--output", str(out), "--resolution", "64"]) == 0
    return out


def stream(source, **kw) -> list[dict]:
    args = {"resolution": 64, "batch_size": 4, "seed": 0, "epoch_samples": None, **kw}
    return list(make_dataset(source, **args))


def keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def first_sample(dataset: Path) -> dict[str, bytes]:
    """The members of the dataset's first sample, by extension."""
    with tarfile.open(next((dataset / "shards").glob("*.tar"))) as tar:
        first = tar.getmembers()[0].name.split(".")[0]
        return {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar if m.name.startswith(first + ".")}


def test_a_batch_has_the_trainers_shapes_and_ranges(dataset):
    batch = stream(str(dataset), epoch_samples=8)[0]
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["pixel_values"].dtype == torch.float32
    assert -1.0 <= batch["pixel_values"].min() < 0 < batch["pixel_values"].max() <= 1.0
    cond = batch["conditioning_pixel_values"]
    assert cond.shape == (4, 3, 64, 64) and cond.dtype == torch.float32
    assert set(cond.unique().tolist()) <= {0.0, 1.0} and cond.max() == 1.0  # Canny edges, 0/255 stored
    assert torch.equal(cond[:, 0], cond[:, 1]) and torch.equal(cond[:, 0], cond[:, 2])  # 1 channel repeated
    assert len(batch["caption"]) == 4 and all(isinstance(c, str) for c in batch["caption"])
    assert len(batch["key"]) == 4 and batch["skipped"] == {}
    for resolution in (32, 96):  # stored at 64: resized both ways
        b = stream(str(dataset), epoch_samples=4, resolution=resolution)[0]
        assert b["pixel_values"].shape == b["conditioning_pixel_values"].shape == (4, 3, resolution, resolution)
        assert b["pixel_values"].abs().max() <= 1.0 and b["conditioning_pixel_values"].min() >= 0.0


def test_resolve_folder_manifest_glob_list_and_braces(dataset):
    folder = resolve_shards(str(dataset))
    tars = sorted(str(p) for p in (dataset / "shards").glob("*.tar"))
    assert folder.urls == tars and folder.task == "canny" and folder.keys is None
    assert folder.counts == {"shards": 4, "samples": SAMPLES}
    assert resolve_shards(str(dataset / fmt.MANIFEST)).urls == tars
    for spec in (str(dataset / "shards" / "*.tar"), tars, str(dataset / "shards" / "{00000..00003}.tar")):
        source = resolve_shards(spec)
        assert source.urls == tars and source.task == "canny"  # task read from the <key>.canny.png members
        assert source.counts == {"shards": 4}
    assert sorted(keys(stream(folder))) == sorted(keys(stream(tars)))
    assert len(keys(stream(folder))) == SAMPLES


def test_datasets_streamed_as_one_must_be_made_alike_where_the_trainer_reads_one_manifest(dataset, tmp_path):
    """`--data A B` took the Canny settings and stored latents of A's manifest for both: B's held-out samples were
    scored with A's thresholds, and latents stored in A alone had every B sample skipped as missing one."""
    import shutil

    def another(name: str, change) -> str:
        copy = Path(shutil.copytree(dataset, tmp_path / name))
        manifest = json.loads((copy / fmt.MANIFEST).read_text())
        change(manifest)
        (copy / fmt.MANIFEST).write_text(json.dumps(manifest))
        return str(copy)

    alike = another("alike", lambda m: m["config"].update(weights="/elsewhere", output="/elsewhere"))
    merged = resolve_shards([str(dataset), alike])
    assert len(merged.urls) == 8 and merged.task == "canny"
    thresholds = another("thresholds", lambda m: m["config"].update(canny_low=[100, 200]))
    with pytest.raises(ValueError, match=r"--data's datasets .*canny.* were made with other canny settings"):
        resolve_shards([str(dataset), thresholds])
    assert len(resolve_images([str(dataset), thresholds]).urls) == 8  # base pretraining reads the images alone
    latents = another("latents", lambda m: m.update(latents={"vae_sha256": "ab" * 32}))
    with pytest.raises(ValueError, match="other stored latents \\(none; the VAE sha256 abababababab"):
        resolve_shards([str(dataset), latents])
    with pytest.raises(ValueError, match="--validation-data's datasets"):
        resolve_shards([latents, str(dataset)], flag="--validation-data")


def test_a_subset_manifest_passes_only_its_keys(dataset):
    all_keys = sorted(keys(stream(str(dataset))))
    chosen = all_keys[::10]  # 5 keys, spread over the shards
    shards = sorted({f"../{dataset.name}/shards/{k[:5]}.tar" for k in chosen})  # relative to the subset file
    subset = dataset.parent / "subsets" / "5.json"
    subset.parent.mkdir()
    subset.write_text(json.dumps(fmt.subset_manifest(shards, chosen, "canny")))

    source = resolve_shards(str(subset))
    assert source.keys == frozenset(chosen) and source.task == "canny"
    assert source.counts == {"shards": len(shards), "samples": 5}
    assert sorted(keys(stream(source, batch_size=1))) == chosen  # one pass: each listed key exactly once
    resampled = keys(stream(source, batch_size=5, epoch_samples=40))
    assert len(resampled) == 40 and set(resampled) == set(chosen)


def test_ranks_get_disjoint_shards_in_one_pass_and_different_samples_when_resampled(dataset):
    source = resolve_shards(str(dataset))
    parts = [shard_split(source.urls, 0, 0, rank, 2, 0, 1) for rank in range(2)]
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == source.urls
    seen = [keys(stream(source, rank=rank, world_size=2)) for rank in range(2)]
    assert len(seen[0]) == len(seen[1]) == SAMPLES // 2 and not set(seen[0]) & set(seen[1])
    assert {k[:5] for k in seen[0]} == {Path(u).stem for u in parts[0]}  # the keys of its own shards

    def sequence(rank: int, seed: int = 0) -> list[str]:
        return keys(stream(source, rank=rank, world_size=2, epoch_samples=24, seed=seed))

    first = sequence(0)
    assert first == sequence(0)  # reproducible from (seed, rank, worker, epoch)
    assert first != sequence(1) and first != sequence(0, seed=1)


def test_epoch_length_is_exact_and_epochs_differ(dataset):
    ds = make_dataset(str(dataset), resolution=64, batch_size=4, seed=0, epoch_samples=22)
    assert ds.batches_per_epoch == 5
    epochs = [list(ds) for _ in range(2)]
    assert [len(e) for e in epochs] == [5, 5] and all(len(b["key"]) == 4 for e in epochs for b in e)
    assert keys(epochs[0]) != keys(epochs[1])
    ds.set_epoch(0)
    assert keys(list(ds)) == keys(epochs[0])

    loader = make_loader(str(dataset), resolution=64, batch_size=4, seed=0, epoch_samples=20, num_workers=2)
    loader_epochs = [keys(list(loader)) for _ in range(2)]  # 5 batches dealt out 3 + 2 over the workers
    assert [len(e) for e in loader_epochs] == [20, 20] and loader_epochs[0] != loader_epochs[1]


def counting_reads(monkeypatch) -> list[str]:
    """The keys of the raw samples read from the shards by streams built after this call, in this process."""
    read, shard_samples = [], fmt.shard_samples

    def counted(*args, **kwargs):
        for sample in shard_samples(*args, **kwargs):
            read.append(sample["__key__"])
            yield sample

    monkeypatch.setattr(fmt, "shard_samples", counted)
    return read


def test_a_resampled_epoch_reads_the_samples_it_yields_and_no_more(dataset, tmp_path, monkeypatch):
    read = counting_reads(monkeypatch)
    ds = make_dataset(str(dataset), resolution=64, batch_size=4, seed=0, epoch_samples=40, shuffle_buffer=16)
    for _ in range(2):  # the first epoch and the next
        read.clear()
        batches = list(ds)
        assert len(batches) == 10 and len(read) == 40  # webdataset's shuffle alone read 56 here
        assert sorted(keys(batches)) == sorted(read)  # every sample read is trained on
    assert keys(batches) != read  # and shuffled

    # a bad sample is replaced by the next one in the stream: the epoch stays full, one more read per bad sample
    good = first_sample(dataset)
    _write_tar(tmp_path / "some-bad.tar", {f"s{i:02d}": good if i % 3 else {**good, "jpg": b"not a jpeg"}
                                           for i in range(30)})
    read.clear()
    ds = make_dataset(DataSource([str(tmp_path / "some-bad.tar")], task="canny"), resolution=64, batch_size=4,
                      seed=0, epoch_samples=12, shuffle_buffer=8)
    batches = list(ds)
    bad = ds.skips.counts[DECODE]
    assert len(batches) == 3 and all(len(b["key"]) == 4 for b in batches) and bad > 0
    assert len(read) == 12 + bad


def test_the_trainers_stream_reads_what_each_segment_trains_on(dataset, tmp_path, monkeypatch):
    """The stream restarts at every checkpoint (a resume replays nothing): its last epoch ends with the segment."""
    cfg = dataclasses.replace(debug(), base_model=str(build_tiny_sd(tmp_path / "tiny-sd")), resolution=64,
                              batch_size=4, epoch_samples=20, checkpoint_every=7, max_steps=10)
    assert [segment_batches(step, cfg) for step in (0, 3, 7, 10)] == [7, 4, 3, 0]
    assert segment_batches(3, dataclasses.replace(cfg, grad_accum=2)) == 8
    assert list(itertools.islice(epoch_lengths(7, 20, 4), 4)) == [20, 8, 20, 20]  # 5 + 2 batches, then on

    trainer = Trainer(cfg, 0, 1, torch.device("cpu"))
    read, source = counting_reads(monkeypatch), resolve_shards(str(dataset))
    for start, steps in ((0, 7), (7, 3)):
        trainer.state.step = start
        read.clear()
        stream = trainer.batches(source)
        taken = [next(stream) for _ in range(steps)]
        assert len(read) == 4 * steps and sorted(keys(taken)) == sorted(read)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_restarted_at_every_checkpoint_reads_its_shard_to_the_end_and_resumes_there(
        dataset, tmp_path, workers):
    """sd15's cadence on 10,000-sample shards, in small: a checkpoint every 4 steps of 4 samples (two epochs in
    each) on one 40-sample shard. Every restart goes on where the one before stopped, so each loader worker reads
    the whole shard before it starts another (restarted at the shard's start, it read the first 16 / 8 again and
    again). A trainer resumed from a checkpoint reads on exactly as the uninterrupted one does."""
    shard = tmp_path / "big.tar"
    _write_tar(shard, {f"s{i:02d}": first_sample(dataset) for i in range(40)})
    source = DataSource([str(shard)], task="canny")
    ds = make_dataset(source, resolution=64, batch_size=4, seed=0, epoch_samples=8)  # its own epochs go on too
    assert sorted(k for _ in range(5) for k in keys(list(ds))) == [f"s{i:02d}" for i in range(40)]
    cfg = dataclasses.replace(debug(), base_model=str(build_tiny_sd(tmp_path / "tiny-sd")), resolution=64,
                              batch_size=4, epoch_samples=8, checkpoint_every=4, max_steps=100, data_workers=workers)
    trainer = Trainer(cfg, 0, 1, torch.device("cpu"))

    def train_segment(t: Trainer) -> list[str]:
        stream = t.batches(source)
        taken = [key for _ in range(segment_batches(t.state.step, cfg)) for key in next(stream)["key"]]
        t.state.step += cfg.checkpoint_every
        return taken

    readers = max(workers, 1)
    seen = [key for _ in range(3 * readers) for key in train_segment(trainer)]  # each reader: 48 samples
    assert Counter(seen[:40 * readers]) == {f"s{i:02d}": readers for i in range(40)}  # the shard, whole, each
    assert len(trainer.cursors) == readers and all(at and at[0] == str(shard) for at in trainer.cursors)  # 8 in

    trainer.state.stream = every_rank(trainer.cursors, None)  # what the loop saves at a checkpoint
    trainer.save(tmp_path / "checkpoint")
    resumed = Trainer(cfg, 0, 1, torch.device("cpu"))
    resumed.load(tmp_path / "checkpoint")
    assert resumed.cursors == trainer.cursors and resumed.state.step == trainer.state.step
    assert train_segment(resumed) == train_segment(trainer)


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_prompt_dropout_rate(dataset, p):
    n = 2000 if p == 0.5 else 200
    batches = stream(str(dataset), batch_size=100, epoch_samples=n, prompt_dropout=p)
    captions = [c for b in batches for c in b["caption"]]
    assert len(captions) == n
    dropped = sum(c == "" for c in captions) / n
    assert abs(dropped - p) < 0.05  # 0.5 +- 4.5 sigma at n=2000; exact at 0 and 1 (all source captions are set)


def _png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((size, size), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_bad_samples_and_shards_are_skipped_and_counted(dataset, tmp_path):
    good = first_sample(dataset)
    _write_tar(tmp_path / "bad.tar", {
        "good0": good,
        "brokenjpg": {**good, "jpg": good["jpg"][: len(good["jpg"]) // 3]},  # truncated JPEG
        "good1": good,
        "nopng": {k: v for k, v in good.items() if k != "canny.png"},
        "mismatch": {**good, "canny.png": _png(32)},  # 64 px image, 32 px condition: no resize aligns them
        "huge": {**good, "canny.png": bytes(fmt.MAX_MEMBER_BYTES + 1)},  # over the read cap: never read
        "bomb": {**good, "jpg": bomb_png(5000)},  # 25 Mpx in a few KB: refused from its header
        "good2": good,
    })
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar file" * 100)
    urls = [str(tmp_path / name) for name in ("bad.tar", "garbage.tar", "missing.tar")]
    ds = make_dataset(DataSource(urls, task="canny"), resolution=64, batch_size=2, seed=0, epoch_samples=None)
    batches = list(ds)
    assert sorted(keys(batches)) == ["good0", "good1", "good2"]
    expected = {DECODE: 1, MISSING: 1, SIZE: 1, TOO_LARGE: 2, READ: 2}
    assert ds.skips.counts == expected and ds.skips.total == 7
    assert sum((Counter(b["skipped"]) for b in batches), Counter()) == expected  # what workers would report

    never = make_dataset(DataSource(urls[1:], task="canny"), resolution=64, batch_size=2, seed=0, epoch_samples=4)
    with pytest.raises(RuntimeError, match="gave no sample"):  # resampling unreadable shards stops, never spins
        list(never)


def test_streams_from_s3(dataset, s3_endpoint):
    fs = fsspec.filesystem("s3")
    fs.mkdir("cnd-train")
    fs.put(str(dataset), "cnd-train/canny", recursive=True)
    source = resolve_shards("s3://cnd-train/canny")
    assert source.urls == [f"s3://cnd-train/canny/shards/{i:05d}.tar" for i in range(4)]
    assert source.task == "canny" and source.counts["samples"] == SAMPLES
    assert resolve_shards("s3://cnd-train/canny/shards/{00000..00003}.tar").urls == source.urls
    assert resolve_shards("s3://cnd-train/canny/shards/*.tar").urls == source.urls
    assert len(keys(stream(source))) == SAMPLES
    loader = make_loader(source, resolution=64, batch_size=4, seed=0, epoch_samples=16, num_workers=2)
    batches = list(loader)  # workers open their own s3fs clients after the fork
    assert len(batches) == 4 and batches[0]["pixel_values"].shape == (4, 3, 64, 64)
    whole = list(fmt.shard_samples([{"url": source.urls[0]}]))  # a stream going on mid-shard: one ranged read
    rest = list(fmt.shard_samples([{"url": source.urls[0], "offset": whole[4][fmt.NEXT_OFFSET]}]))
    assert [s["__key__"] for s in rest] == [s["__key__"] for s in whole[5:]] and rest[-1][fmt.NEXT_OFFSET] is None


def test_several_subsets_in_one_data_keep_each_their_own_keys_in_their_own_shards():
    """`--data a.json b.json`: one subset's keys were applied to the other's shards (two datasets made from the
    same photos share keys: samples of neither subset trained), and a shard both named streamed twice."""
    from train.data import SkipCounter, _merge, keep_keys

    first = DataSource(["a/0.tar", "a/1.tar"], "canny", keys=frozenset({"k1", "k2"}), dataset="a", weights=(1, 1))
    nested = DataSource(["a/1.tar"], "canny", keys=frozenset({"k2"}), dataset="a", weights=(1,))
    other = DataSource(["b/0.tar"], "canny", keys=frozenset({"k3"}), dataset="b", weights=(1,))
    merged = _merge([first, nested, other])
    assert merged.urls == ["a/0.tar", "a/1.tar", "b/0.tar"] and merged.weights == (1, 1, 1)
    assert merged.counts["samples"] == 3
    samples = [{"__key__": key, "__url__": url} for url in ("a/0.tar", "a/1.tar", "b/0.tar")
               for key in ("k1", "k2", "k3")]
    kept = [(s["__url__"], s["__key__"]) for s in keep_keys(samples, merged.key_filter, SkipCounter(100))]
    assert kept == [("a/0.tar", "k1"), ("a/0.tar", "k2"), ("a/1.tar", "k1"), ("a/1.tar", "k2"), ("b/0.tar", "k3")]
