"""one job, many conditions: `--task canny,hed,midas,openpose --caption blip` decodes and captions each image once,
writes every map with a status per task, resumes, and the trainer, subsets and preview pick one condition"""
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from annotate import annotator_params
from pipeline import format as fmt
from pipeline.build import main as build_dataset
from pipeline.preview import main as preview
from tests.conftest import tar_members
from tests.tiny_weights.blip import write_tiny_blip
from tests.tiny_weights.hed import write_tiny_hed
from tests.tiny_weights.midas import write_tiny_dpt
from tests.tiny_weights.openpose import write_tiny_openpose
from train.data import make_loader, resolve_images, resolve_shards
from train.run import main as train_main
from train.subsets import SubsetError, make_subsets
from train.tiny_sd import build_tiny_sd

pytestmark = pytest.mark.usefixtures("ray_session")

TASKS = ["canny", "hed", "midas", "openpose"]
SMALL = ["--resolution", "64", "--detect-resolution", "64", "--batch-size", "4", "--num-workers", "1"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("weights")
    for write in (write_tiny_hed, write_tiny_openpose, write_tiny_dpt, write_tiny_blip):
        write(folder)
    return folder


PER_SHARD = 5  # photos per input shard; two shards


@pytest.fixture(scope="module")
def inputs(sample_shards, tmp_path_factory) -> Path:
    """Two input shards of PER_SHARD photos each, cut from the sample shards (all four tasks run on CPU)."""
    folder = tmp_path_factory.mktemp("inputs")
    for name in ("00001.tar", "00002.tar"):
        with tarfile.open(sample_shards / name) as source, tarfile.open(folder / name, "w") as target:
            members = source.getmembers()
            keys = sorted({m.name.split(".", 1)[0] for m in members})[:PER_SHARD]
            for member in members:
                if member.name.split(".", 1)[0] in keys:
                    target.addfile(member, source.extractfile(member))
    return folder


def build(tasks: str, inputs: Path, out: Path, weights: Path, *extra: str) -> int:
    return build_dataset(["--task", tasks, "--input", str(inputs), "--output", str(out), "--caption", "blip",
                          "--weights", str(weights), *SMALL, *extra])


@pytest.fixture(scope="module")
def multi(inputs, weights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multi") / "all"
    assert build("openpose,hed,canny,midas", inputs, out, weights) == 0  # any order: stored in one canonical order
    return out


def index_rows(dataset: Path) -> list[dict]:
    return [r for p in sorted((dataset / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def tar_samples(dataset: Path) -> dict[str, dict[str, bytes]]:
    return {k: m for tar in sorted((dataset / "shards").glob("*.tar")) for k, m in tar_members(tar).items()}


def test_every_map_in_one_sample_with_a_status_per_task(multi, inputs, weights, tmp_path):
    manifest = json.loads((multi / fmt.MANIFEST).read_text())
    assert manifest["format_version"] == fmt.FORMAT_VERSION == 2 and manifest["tasks"] == TASKS
    assert set(manifest["annotators"]) == set(TASKS) and manifest["captioner"]["name"] == "blip"
    rows = index_rows(multi)
    assert len(rows) == 2 * PER_SHARD == manifest["samples"]
    samples = tar_samples(multi)
    for row in rows:
        assert row["caption_source"] == "blip"  # one caption per image, shared by every map
        kept = samples.get(row["key"], {})
        for task in TASKS:
            status = row[fmt.task_status_column(task)]
            # a map is stored exactly when its task kept the sample; another task's rule drops only its own map
            assert (f"{task}.png" in kept) == (status == fmt.OK), (row["key"], task, status)
            assert (row[fmt.task_error_column(task)] == "") == (status == fmt.OK)
        assert (row["status"] == fmt.OK) == bool(kept)
        if kept:
            assert kept["txt"].decode() == row["caption"]
            assert set(json.loads(kept["json"])["params"]) == set(TASKS)  # parameters by task
    # each network's --detect-resolution and weights are recorded per task, and handed back to the trainer's scorer
    for task in ("hed", "midas", "openpose"):
        assert manifest["annotators"][task]["detect_resolution"] == 64
        assert annotator_params(task, manifest["config"])["detect_resolution"] == 64
        assert all(json.loads(m["json"])["params"][task]["detect_resolution"] == 64 for m in samples.values())
    assert re.search(r"\b[0-9a-f]{64}\b", json.dumps(manifest["annotators"]["openpose"]))  # the weights' sha256
    assert all("keypoint_fraction" in json.loads(r["params"])["openpose"] for r in rows if r["status"] != "failed")
    filtered = [r for r in rows if r["status_openpose"] == fmt.FILTERED]
    assert filtered and all("30%" in r["error_openpose"] for r in filtered)  # tiny OpenPose finds no person
    assert any(r["status"] == fmt.OK for r in filtered)  # ... and those images keep their other maps
    for task in TASKS:  # counted by task in the manifest, as the index says
        counts = manifest["totals_by_task"][task]
        assert counts[fmt.OK] == sum(r[fmt.task_status_column(task)] == fmt.OK for r in rows)
        assert sum(counts.values()) == 2 * PER_SHARD
    # webdataset reads every member back
    decoded = list(wds.WebDataset(str(multi / "shards" / "00001.tar"), shardshuffle=False).decode("rgb8"))
    assert decoded and all(s["hed.png"].shape == (64, 64, 3) and s["canny.png"].shape == (64, 64, 3)
                           for s in decoded)


@pytest.fixture(scope="module")
def single(inputs, weights, tmp_path_factory) -> Path:
    """The same photos as a Canny dataset of its own (captions from the source: BLIP is not needed for it)."""
    out = tmp_path_factory.mktemp("single") / "canny"
    assert build_dataset(["--input", str(inputs), "--output", str(out), *SMALL]) == 0
    return out


def test_a_single_task_job_writes_what_it_did_and_the_same_maps(multi, single):
    manifest = json.loads((single / fmt.MANIFEST).read_text())
    assert manifest["task"] == "canny" and manifest["tasks"] == ["canny"] and "annotator" in manifest
    assert "status_canny" not in pq.read_schema(single / "shards" / "00001.parquet").names
    alone, together = tar_samples(single), tar_samples(multi)
    assert set(alone) <= set(together)
    for key, members in alone.items():
        assert set(members) == {"jpg", "canny.png", "txt", "json"}
        assert members["canny.png"] == together[key]["canny.png"] and members["jpg"] == together[key]["jpg"]


def test_resume_redoes_only_the_missing_shard_and_other_weights_or_a_new_task_are_refused(multi, inputs, weights,
                                                                                          tmp_path, capsys):
    copy = tmp_path / "resume"
    shutil.copytree(multi, copy)
    before = {p.name: p.read_bytes() for p in (copy / "shards").glob("00002.*")}
    (copy / "shards" / "00002.stats.json").unlink()  # a job killed before it committed this shard
    # the rest made with other HED weights would mix two datasets: refused in one line, before any shard starts
    other = tmp_path / "other-weights"
    shutil.copytree(weights, other)
    write_tiny_hed(other, seed=1)
    assert build("canny,hed,midas,openpose", inputs, copy, other) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar of the actors' start
    assert last.startswith("error: ") and "built with other weights: annotators.hed.weights.ControlNetHED.pth " in last
    assert "(1 shards); run with those weights" in last
    assert not (copy / "shards" / "00002.stats.json").exists()
    assert build("canny,hed,midas,openpose", inputs, copy, weights) == 0
    assert "2 input shards, 1 done, 1 to do" in capsys.readouterr().out
    after = {p.name: p.read_bytes() for p in (copy / "shards").glob("00002.*")}
    assert after["00002.tar"] == before["00002.tar"]  # the same bytes again: nothing lost, nothing mixed
    assert pq.read_table(copy / "shards" / "00002.parquet").equals(pq.read_table(multi / "shards" / "00002.parquet"))
    manifest = json.loads((copy / fmt.MANIFEST).read_text())
    assert manifest["totals_by_task"] == json.loads((multi / fmt.MANIFEST).read_text())["totals_by_task"]
    # with nothing left to do no actor loads the other weights to compare: the manifest named them all the same, and
    # the trainer's fidelity annotator would load them
    assert build("canny,hed,midas,openpose", inputs, copy, other) == 0
    assert json.loads((copy / fmt.MANIFEST).read_text())["config"]["weights"] == str(weights)
    # adding a task to written shards is refused in one line (it would rewrite every tar)
    assert build("canny,hed,midas,openpose,scribble", inputs, copy, weights) == 2
    error = capsys.readouterr().err.strip()
    assert "task 'canny,hed,midas,openpose' -> 'canny,hed,scribble,midas,openpose'" in error
    assert "tasks are fixed" in error and len(error.splitlines()) == 1


def test_the_trainer_streams_one_condition(multi, tmp_path, capsys):
    source = resolve_shards(str(multi), "hed")
    assert source.task == "hed" and source.conditions == tuple(TASKS)
    assert source.counts["samples"] == sum(r["status_hed"] == fmt.OK for r in index_rows(multi))
    samples = tar_samples(multi)
    batch = next(iter(make_loader(source, resolution=64, batch_size=4, seed=0, epoch_samples=None)))
    for key, condition in zip(batch["key"], batch["conditioning_pixel_values"], strict=True):
        stored = np.array(Image.open(io.BytesIO(samples[key]["hed.png"])).convert("RGB"))
        assert torch.equal(condition, torch.from_numpy(stored).permute(2, 0, 1).float() / 255)
    # no condition named: one line listing them; a condition no sample kept: one line
    base = build_tiny_sd(tmp_path / "tiny-sd")
    common = ["--preset", "debug", "--data", str(multi), "--base-model", str(base), "--storage-path",
              str(tmp_path / "runs"), "--max-steps", "2", "--checkpoint-every", "2", "--validate-every", "0",
              "--wandb", "off"]
    assert train_main(common) == 2
    assert "holds the conditions canny, hed, midas, openpose: choose one with --condition" in capsys.readouterr().err
    assert train_main([*common, "--condition", "openpose"]) == 2
    assert "no usable openpose samples" in capsys.readouterr().err
    assert train_main([*common, "--condition", "hed", "--run-name", "hed"]) == 0
    results = json.loads((tmp_path / "runs" / "hed" / "results.json").read_text())
    assert [h["step"] for h in results["history"]][-1] == 2
    capsys.readouterr()
    assert train_main([*common, "--condition", "hed", "--run-name", "hed"]) == 0  # submitted again when finished
    assert "finished hed: already at step 2 of 2, nothing left to train" in capsys.readouterr().out
    assert json.loads((tmp_path / "runs" / "hed" / "results.json").read_text()) == results  # not written again:
    # it said the run resumed at step 2 and lost its end time


def test_a_stream_passes_over_samples_without_the_chosen_map(tmp_path):
    """Shards without a manifest: the conditions are read off the first sample; hed streams hed's samples only."""
    tar = tmp_path / "mixed.tar"
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png, format="PNG")
    jpg = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(jpg, format="JPEG")
    with wds.TarWriter(str(tar)) as writer:
        for i in range(6):
            maps = {"canny.png": png.getvalue(), **({"hed.png": png.getvalue()} if i % 3 == 0 else {})}
            writer.write({"__key__": f"k{i}", "jpg": jpg.getvalue(), "txt": b"x", **maps})
    with pytest.raises(ValueError, match="choose one with --condition"):
        resolve_shards(str(tar))
    source = resolve_shards(str(tar), "hed")
    batches = list(make_loader(source, resolution=8, batch_size=2, seed=0, epoch_samples=None))
    assert sorted(k for b in batches for k in b["key"]) == ["k0", "k3"]
    assert all(not b["skipped"] for b in batches)  # the index's choice, not bad samples
    assert len(list(make_loader(resolve_shards(str(tar), "canny"), resolution=8, batch_size=2, seed=0,
                                epoch_samples=None))) == 3
    assert resolve_images(str(tar)).task == "canny"  # base pretraining needs the images only: any condition serves


def test_subsets_rank_per_condition_and_old_datasets_still_read(multi, single, tmp_path, capsys):
    written = make_subsets(str(multi), [2, 4], holdout_shards=1, condition="hed")
    assert written[0]["url"].startswith(str(multi / "subsets" / "hed"))
    hed_ok = {r["key"] for r in index_rows(multi) if r["status_hed"] == fmt.OK}
    small, large = (json.loads(Path(w["url"]).read_text()) for w in written)
    assert small["task"] == "hed" and set(small["keys"]) <= set(large["keys"]) <= hed_ok
    source = resolve_shards(written[1]["url"])
    assert source.task == "hed" and source.keys == frozenset(large["keys"])
    with pytest.raises(SubsetError, match="larger than the dataset.s 0 ok samples for openpose"):
        make_subsets(str(multi), [1], holdout_shards=0, condition="openpose")
    with pytest.raises(ValueError, match="choose one with --condition"):
        make_subsets(str(multi), [1])
    # a version 1 dataset (one task, "task" in its manifest, no "tasks") reads as before
    old = tmp_path / "v1"
    shutil.copytree(single, old)
    manifest = json.loads((old / fmt.MANIFEST).read_text())
    manifest.pop("tasks")
    (old / fmt.MANIFEST).write_text(json.dumps({**manifest, "format_version": 1}))
    source = resolve_shards(str(old))
    assert source.task == "canny" and source.conditions == ("canny",) and source.counts["samples"] == 2 * PER_SHARD
    assert make_subsets(str(old), [3], holdout_shards=1)[0]["size"] == 3
    # the preview shows every condition of the multi-task dataset side by side
    preview([str(multi), "--samples", "2", "--out", str(tmp_path / "sheet.png")])
    assert "hed ok" in capsys.readouterr().out
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.width == (1 + len(TASKS)) * 256 + 320
