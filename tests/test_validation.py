"""the validation set (distinct keys, one pass, chosen by key), the fidelity annotator's settings, the curve state"""
import dataclasses
import io
import json
import tarfile
from pathlib import Path

import pytest

from annotate import annotator_params, build_annotator
from pipeline.build import main as build_dataset
from pipeline.format import key_hash
from pipeline.toy_shapes import write_shards
from train.data import job_settings, lowest_key_hashes, resolve_shards
from train.validate import FidelityTracker

pytestmark = pytest.mark.usefixtures("ray_session")

CANNY = ["--canny-low", "80", "120", "--canny-high-gap", "60", "100", "--seed", "5"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shards(root / "in", 36, 3)
    out = root / "canny"
    assert build_dataset(["--input", str(root / "in"), "--output", str(out), "--resolution", "32",
                          "--jpeg-quality", "100", *CANNY]) == 0
    return out


def members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as f:
        return {m.name: f.extractfile(m).read() for m in f}


def ok_keys(dataset: Path) -> list[str]:
    return sorted({name.split(".")[0] for tar in (dataset / "shards").glob("*.tar") for name in members(tar)})


def test_validation_samples_are_distinct_and_chosen_by_key_whatever_the_shard_order(dataset):
    source = resolve_shards(str(dataset))
    chosen = [s["key"] for s in lowest_key_hashes(source, 8, 32)]
    assert chosen == sorted(ok_keys(dataset), key=key_hash)[:8]  # lowest hashes first, each once
    reordered = dataclasses.replace(source, urls=source.urls[::-1])
    assert [s["key"] for s in lowest_key_hashes(reordered, 8, 32)] == chosen
    twice = dataclasses.replace(source, urls=source.urls + source.urls)  # every key seen twice: still taken once
    assert [s["key"] for s in lowest_key_hashes(twice, 8, 32)] == chosen
    one = dataclasses.replace(source, keys=frozenset(chosen[3:4]))
    assert [s["key"] for s in lowest_key_hashes(one, 4, 32)] == chosen[3:4]  # one key: one sample, not 4 copies
    first = lowest_key_hashes(source, 2, 32)[0]
    assert first["caption"] and first["pixel_values"].shape == (3, 32, 32)  # captions kept (no prompt dropout)


def test_a_broken_validation_sample_gives_way_to_the_next_key(dataset, tmp_path):
    source = resolve_shards(str(dataset))
    chosen = [s["key"] for s in lowest_key_hashes(source, 4, 32)]
    broken = tmp_path / "broken.tar"
    with tarfile.open(broken, "w") as out:
        for url in source.urls:
            for name, data in members(Path(url)).items():
                data = b"not a jpeg" if name == f"{chosen[0]}.jpg" else data
                info = tarfile.TarInfo(name)
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    again = [s["key"] for s in lowest_key_hashes(resolve_shards(str(broken)), 4, 32)]
    assert again == chosen[1:] + [sorted(ok_keys(dataset), key=key_hash)[4]]


def test_the_fidelity_annotator_redraws_the_datasets_own_canny_thresholds(dataset):
    source = resolve_shards(str(dataset))
    settings = job_settings(source)
    params = annotator_params("canny", settings)
    assert (params["seed"], params["low_range"], params["high_gap"]) == (5, (80, 120), (60, 100))
    annotator, default = build_annotator("canny", **params), build_annotator("canny")
    samples = lowest_key_hashes(source, 6, 32)
    recorded = {}
    for url in source.urls:
        for name, data in members(Path(url)).items():
            if name.endswith(".json"):
                recorded[name.split(".")[0]] = json.loads(data)["params"]
    images = [s["pixel_values"].permute(1, 2, 0).add(1).mul(127.5).round().byte().numpy() for s in samples]
    keys = [s["key"] for s in samples]
    assert [a.params for a in annotator(images, keys)] == [recorded[k] for k in keys]
    assert [a.params for a in default(images, keys)] != [recorded[k] for k in keys]
    # a subset manifest and a bare shard URL find the same dataset settings
    assert job_settings(resolve_shards(source.urls[0])) == settings


def test_curves_continue_from_the_state():
    name = "fidelity/caption/cfg1/edge_f1"
    state = {"primary": name, "curves": {name: {"steps": [0, 50, 100], "scores": [0.2, 0.25, 0.6]}}}
    tracker = FidelityTracker.restore("canny", None, ["caption"], [1.0], state)
    assert tracker.primary == name and tracker.has(100) and not tracker.has(150)
    assert tracker.latest() == (100, 0.6)
    summary = tracker.summary()
    assert summary["primary"] == name and summary["curves"][name]["steps"] == [0, 50, 100]
    assert summary["curves"][name]["mauc"] == pytest.approx((0.225 * 50 + 0.425 * 50) / 100)
