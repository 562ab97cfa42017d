"""the dataset job end to end: real Ray, real tars read back by webdataset, moto S3 on loopback"""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import ray
import webdataset as wds

from pipeline import format as fmt
from pipeline.build import main
from tests.conftest import processes_with_ray_tmpdir, stopped_while_ray_starts, with_ctrl_c
from tests.corpus import bad_corpus, write_bad_inputs

pytestmark = pytest.mark.usefixtures("ray_session")


def rows(out: Path) -> list[dict]:
    return [r for p in sorted((out / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def tar_samples(tar: Path) -> list[dict]:
    return list(wds.WebDataset(str(tar), shardshuffle=False, empty_check=False).decode("rgb8"))


def test_sample_shards_to_a_canny_dataset(sample_shards, tmp_path, capsys):
    out = tmp_path / "canny"
    assert main(["--input", str(sample_shards), "--output", str(out), "--resolution", "128"]) == 0
    summary = capsys.readouterr().out
    assert "ok" in summary and "samples/s" in summary

    manifest = json.loads((out / fmt.MANIFEST).read_text())
    assert manifest["totals"] == {"ok": 48, "filtered": 0, "failed": 0}
    assert manifest["task"] == "canny" and manifest["config"]["resolution"] == 128
    assert manifest["annotator"]["name"] == "canny" and manifest["code_version"]["package"]
    index = {r["key"]: r for r in rows(out)}
    assert len(index) == 48
    for tar in sorted((out / "shards").glob("*.tar")):
        stats = json.loads(tar.with_suffix(".stats.json").read_text())
        samples = tar_samples(tar)
        assert stats["counts"]["ok"] == len(samples) == 12
        for s in samples:
            assert "." not in s["__key__"]
            assert s["jpg"].shape == (128, 128, 3)
            assert s["canny.png"].shape[:2] == (128, 128)
            assert set(s["canny.png"].reshape(-1).tolist()) <= {0, 255}
            row = index[s["__key__"]]
            assert s["txt"] == row["caption"] and s["txt"]
            assert s["json"]["params"] == json.loads(row["params"])
            low, high = s["json"]["params"]["low"], s["json"]["params"]["high"]
            assert 50 <= low <= 150 and low + 50 <= high <= low + 150
            assert s["json"]["source_shard"] == tar.stem

    # the contact sheet a user opens before spending GPU-hours: one row per sample, counts in the header
    from PIL import Image

    from pipeline.preview import main as preview

    preview([str(out), "--samples", "3", "--out", str(tmp_path / "sheet.png")])
    assert "ok: 48" in capsys.readouterr().out
    assert Image.open(tmp_path / "sheet.png").size[1] == 28 + 3 * 256

    # a re-run finds everything done and rewrites nothing
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    assert main(["--input", str(sample_shards), "--output", str(out), "--resolution", "128"]) == 0
    assert "0 to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == mtimes

    # a fresh run, decoding and encoding on threads, gives identical maps: thresholds come from (seed, key)
    again = tmp_path / "again"
    assert main(["--input", str(sample_shards), "--output", str(again), "--resolution", "128",
                 "--decode-threads", "2", "--batch-size", "5"]) == 0
    for tar in (out / "shards").glob("*.tar"):
        first = {s["__key__"]: s["canny.png"] for s in tar_samples(tar)}
        second = {s["__key__"]: s["canny.png"] for s in tar_samples(again / "shards" / tar.name)}
        assert first.keys() == second.keys()
        assert all((first[k] == second[k]).all() for k in first)


def test_bad_inputs_each_land_in_exactly_one_row(tmp_path, capsys):
    shards = write_bad_inputs(tmp_path / "in")
    out = tmp_path / "out"
    code = main(["--input", str(tmp_path / "in"), "--output", str(out), "--resolution", "64",
                 "--max-retries", "1", "--batch-size", "4"])
    printed = capsys.readouterr().out
    assert code == 1  # two shards could not be read at all
    assert "FAILED shard notatar" in printed and "FAILED shard zerobytes" in printed
    assert "the same command tries the 2 failed shard(s) again, and keeps the committed ones" in printed
    assert printed.count("shard notatar attempt") == 2  # tried once, retried once

    done = {p.name.removesuffix(".stats.json") for p in (out / "shards").glob("*.stats.json")}
    assert done == {"bad", "dup", "empty", "truncated"}
    manifest = json.loads((out / fmt.MANIFEST).read_text())
    assert set(manifest["shards"]["failed"]) == {"notatar", "zerobytes"}

    bad = pq.read_table(out / "shards" / "bad.parquet").to_pylist()
    by_source = {r["source_key"]: r for r in bad}
    assert len(bad) == len(by_source) == len(bad_corpus())
    for key, _, expected in bad_corpus():
        status = by_source[key]["status"]
        assert status in ({"ok", "failed"} if expected == "ok_or_failed" else {expected}), (key, by_source[key])
        if status == "failed":
            assert by_source[key]["error"]
    assert "over the cap" in by_source["bomb"]["error"]
    assert by_source["dotted.key.v2"]["key"] == "dotted_key_v2"
    assert by_source["latin1"]["caption"].startswith("caf")
    assert by_source["captionjson"]["caption"] == "from json ✓"
    assert by_source["nocaption"]["caption_source"] == "none"
    assert (by_source["exif"]["original_width"], by_source["exif"]["original_height"]) == (64, 96)
    written = {s["__key__"] for s in tar_samples(out / "shards" / "bad.tar")}
    assert written == {r["key"] for r in bad if r["status"] == "ok"}
    latin1 = next(s for s in tar_samples(out / "shards" / "bad.tar") if s["__key__"] == "latin1")
    assert "UTF-8" in latin1["json"]["warnings"][0]

    dup = pq.read_table(out / "shards" / "dup.parquet").to_pylist()
    assert [(r["key"], r["status"]) for r in dup] == [("a", "ok"), ("b", "ok"), ("a", "failed")]
    assert dup[2]["error"].startswith("duplicate key 'a' in shard dup (a.")  # which file, for loose images
    assert len(tar_samples(out / "shards" / "dup.tar")) == 2

    truncated_stats = json.loads((out / "shards" / "truncated.stats.json").read_text())
    assert truncated_stats["read_error"] and truncated_stats["truncated"]  # its bytes end early: committed short
    assert set(manifest["shards"]["truncated"]) == {"truncated"}
    assert "TRUNCATED input of shard truncated" in printed
    truncated_rows = pq.read_table(out / "shards" / "truncated.parquet").to_pylist()
    assert sum(r["status"] == "ok" for r in truncated_rows) >= 1
    assert json.loads((out / "shards" / "empty.stats.json").read_text())["samples"] == 0
    assert not (out / "shards" / "_staging").exists()
    assert shards  # the corpus files are still there for the next run

    # the unreadable shards are retried by the next run; the finished ones are not
    code = main(["--input", str(tmp_path / "in"), "--output", str(out), "--resolution", "64", "--max-retries", "0",
                 "--dry-run"])
    assert code == 0
    plan = capsys.readouterr().out
    assert "2 to do" in plan and "todo  notatar" in plan and "done  bad" in plan
    # the truncated input given again whole (uploaded again, say): made again, where it was skipped for good
    shutil.copy(tmp_path / "in" / "dup.tar", tmp_path / "in" / "truncated.tar")
    assert main(["--input", str(tmp_path / "in"), "--output", str(out), "--resolution", "64",
                 "--max-retries", "0"]) == 1  # notatar and zerobytes fail again
    assert "redoing 1 shard(s) whose input tar was cut short when they were made and has changed since: " \
        "truncated" in capsys.readouterr().out
    assert not json.loads((out / "shards" / "truncated.stats.json").read_text())["truncated"]
    assert "truncated" not in json.loads((out / fmt.MANIFEST).read_text())["shards"]["truncated"]


def test_a_tar_made_by_hand_keeps_every_sample_and_the_trainer_reads_every_ok_one(tmp_path):
    """A tar made as `tar -cf x.tar -C photos .` writes './a.jpg' in the folder's order, not sorted: keys came out
    '__a' (kept 'ok', but skipped by the trainer's reader), a sample's members apart lost its image as a
    'duplicate key' and its caption silently, 'photo 1' and 'photo_1' became one key, a name that is not UTF-8
    failed the whole shard, and a hard link vanished without a row."""
    import tarfile

    from tests.corpus import add, good_jpeg

    tar_path = tmp_path / "in" / "handmade.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:  # GNU: names as raw bytes
        folder = tarfile.TarInfo("./")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in [("./b.txt", b"caption b"), ("./a.jpg", good_jpeg(1)), ("./b.jpg", good_jpeg(2)),
                           ("./a.txt", b"caption a"), ("./photo 1.jpg", good_jpeg(3)), ("./photo_1.jpg", good_jpeg(4)),
                           ("./caf\udce9.jpg", good_jpeg(5)), ("./caf\udce8.jpg", good_jpeg(6)),
                           ("./j.jpg", good_jpeg(7)), ("./j.json", b'{"caption": "odd \\ud800 text"}')]:
            add(tar, name, data)
        link = tarfile.TarInfo("./c.jpg")
        link.type, link.linkname = tarfile.LNKTYPE, "./a.jpg"
        tar.addfile(link)
    out = tmp_path / "out"
    assert main(["--input", str(tar_path), "--output", str(out), "--resolution", "64"]) == 0
    index = rows(out)
    by_source = {r["source_key"]: r for r in index}
    assert len(index) == len(by_source) == 8  # one row per sample of the tar
    assert by_source["a"]["caption"] == "caption a" and by_source["b"]["caption"] == "caption b"
    assert by_source["c"]["status"] == "failed" and "hard link" in by_source["c"]["error"]
    assert by_source["j"]["caption"] == "odd \\ud800 text"
    ok = {r["key"] for r in index if r["status"] == "ok"}
    assert len(ok) == 7 and by_source["photo 1"]["key"] != by_source["photo_1"]["key"]
    assert not any(key.startswith("__") for key in ok)
    assert json.loads((out / "shards" / "handmade.stats.json").read_text())["regrouped"]
    # the trainer's reader and webdataset's read every ok sample, with its caption
    shard = fmt.committed_shards(str(out))[0]
    read = {s["__key__"]: s for s in fmt.shard_samples(iter([{"url": shard.tar}]))}
    assert set(read) == ok == {s["__key__"] for s in tar_samples(out / "shards" / "handmade.tar")}
    assert read[by_source["a"]["key"]]["txt"] == b"caption a"


def test_a_key_two_input_tars_hold_is_written_twice_and_the_job_ends_saying_so(tmp_path, capsys):
    """Tars packed apart (two cameras' IMG_0001.jpg) hold the same key: the job wrote both samples without a word,
    and train.subsets, which names samples by key, refused the dataset only later. Both are kept (nothing lost);
    the job ends with a warning naming the key, and the manifest counts such keys."""
    import tarfile

    from tests.corpus import add, good_jpeg

    (tmp_path / "in").mkdir()
    for tar_name, keys in [("camera_a", ["IMG_0001", "IMG_0002"]), ("camera_b", ["IMG_0001", "IMG_0003"]),
                           ("camera_c", ["IMG_0004"])]:
        with tarfile.open(tmp_path / "in" / f"{tar_name}.tar", "w") as tar:
            for i, key in enumerate(keys):
                add(tar, f"{key}.jpg", good_jpeg(i + len(tar_name)))
    out = tmp_path / "out"
    assert main(["--input", str(tmp_path / "in"), "--output", str(out), "--resolution", "64"]) == 0
    printed = capsys.readouterr().out
    assert "warning: 1 key(s) name a sample in more than one shard (e.g. 'IMG_0001' in camera_a and camera_b" \
        in printed
    assert json.loads((out / fmt.MANIFEST).read_text())["keys_in_several_shards"] == 1
    written = sorted(s["__key__"] for tar in sorted((out / "shards").glob("*.tar")) for s in tar_samples(tar))
    assert written == ["IMG_0001", "IMG_0001", "IMG_0002", "IMG_0003", "IMG_0004"]
    from train.subsets import SubsetError, rank, read_samples
    with pytest.raises(SubsetError, match="duplicate keys across shards: 'IMG_0001'"):
        rank(read_samples(str(out)))
    # a failed row's key is no sample: a tar whose IMG_0004 is unreadable shares no written sample's key
    with tarfile.open(tmp_path / "in" / "camera_d.tar", "w") as tar:
        add(tar, "IMG_0004.jpg", b"not a jpeg")
    (tmp_path / "in" / "camera_b.tar").unlink()
    for part in fmt.shard_paths(str(out), "camera_b").values():
        Path(part).unlink()
    assert main(["--input", str(tmp_path / "in"), "--output", str(out), "--resolution", "64"]) == 0
    assert "warning" not in capsys.readouterr().out
    assert json.loads((out / fmt.MANIFEST).read_text())["keys_in_several_shards"] == 0


def test_a_rerun_with_nothing_to_do_reuses_the_key_check_and_one_that_adds_a_shard_checks_them_all(tmp_path, capsys):
    """The check for keys in two shards read every committed index at the end of every run, a rerun with nothing to
    do included: ~12 s for 3,000 shards on S3 (bench/manifest_scale.py). The manifest records which shards its
    count covered, and a rerun over those same shards reuses it, warning included (it reads no index: one made
    unreadable goes unnoticed); a rerun that commits a shard checks all of them again, so a key the new shard
    shares with an old one is found."""
    import tarfile

    from tests.corpus import add, good_jpeg

    def tar(name: str, keys: list[str]) -> None:
        with tarfile.open(tmp_path / "in" / f"{name}.tar", "w") as t:
            for i, key in enumerate(keys):
                add(t, f"{key}.jpg", good_jpeg(i + len(name)))

    def job() -> tuple[str, dict]:
        assert main(["--input", str(tmp_path / "in"), "--output", str(out), "--resolution", "64"]) == 0
        return capsys.readouterr().out, json.loads((out / fmt.MANIFEST).read_text())

    (tmp_path / "in").mkdir()
    tar("camera_a", ["IMG_0001", "IMG_0002"])
    tar("camera_b", ["IMG_0003"])
    out = tmp_path / "out"
    printed, manifest = job()
    assert "warning" not in printed and manifest["keys_in_several_shards"] == 0
    checked = manifest["keys_checked"]["shards"]
    index = out / "shards" / "camera_a.parquet"
    kept = index.read_bytes()
    index.write_bytes(b"not a parquet file")  # a check that read it would fail
    printed, manifest = job()
    assert "2 done, 0 to do" in printed and "warning" not in printed
    assert manifest["keys_in_several_shards"] == 0 and manifest["keys_checked"]["shards"] == checked
    index.write_bytes(kept)

    tar("camera_c", ["IMG_0002", "IMG_0004"])  # a new shard holding an old shard's key
    printed, manifest = job()
    warning = "warning: 1 key(s) name a sample in more than one shard (e.g. 'IMG_0002' in camera_a and camera_c"
    assert "2 done, 1 to do" in printed and warning in printed
    assert manifest["keys_in_several_shards"] == 1 and manifest["keys_checked"]["shards"] != checked
    index.write_bytes(b"not a parquet file")
    printed, manifest = job()
    assert "3 done, 0 to do" in printed and warning in printed and manifest["keys_in_several_shards"] == 1


def test_a_folder_cut_into_shards_keeps_names_that_clean_to_one_key_apart_across_shards(tmp_path):
    """Names that clean to one key ('photo 1', 'photo_1'; two names in another script, both '_') were kept apart
    within a shard only: in two shards they were one key twice in the dataset, which train.subsets refuses, and
    x.png after x.jpg in the next shard was a second sample 'x' rather than the duplicate it is within one."""
    from tests.corpus import good_jpeg

    photos = tmp_path / "photos"
    photos.mkdir()
    names = ["photo 1.jpg", "photo_1.jpg", "x.jpg", "x.png", "\u732b.jpg", "\u72ac.jpg"]  # cat, dog
    for i, name in enumerate(names):
        (photos / name).write_bytes(good_jpeg(i))
    out = tmp_path / "out"
    assert main(["--input", str(photos), "--output", str(out), "--resolution", "32", "--files-per-shard", "1"]) == 0
    index = rows(out)
    assert len(index) == len(names) and len({r["key"] for r in index}) == len(names) - 1  # x.png's row shares x's
    by_key = {}
    for row in index:
        by_key.setdefault(row["key"], []).append(row)
    [x, x_png] = by_key["x"]
    assert x["status"] == "ok" and x_png["status"] == "failed" and "duplicate key 'x'" in x_png["error"]
    ok = {r["source_key"]: r["key"] for r in index if r["status"] == "ok"}
    assert sorted(ok) == sorted(["photo 1", "photo_1", "x", "\u732b", "\u72ac"]) and len(set(ok.values())) == 5
    shards = fmt.committed_shards(str(out))
    read = [sample["__key__"] for sample in fmt.shard_samples(iter({"url": shard.tar} for shard in shards))]
    assert len(shards) == 6 and sorted(read) == sorted(ok.values())  # what the trainer reads: each sample once


def test_other_settings_are_refused_over_shards_of_other_inputs_too(sample_shards, tmp_path, capsys):
    """Another input shard under the same --output at another resolution made one dataset of two: the settings
    check read only the shards this run skipped."""
    out = tmp_path / "out"
    assert main(["--input", str(sample_shards / "00000.tar"), "--output", str(out), "--resolution", "64"]) == 0
    capsys.readouterr()
    assert main(["--input", str(sample_shards / "00001.tar"), "--output", str(out), "--resolution", "128"]) == 2
    error = capsys.readouterr().err.strip()
    assert "built with other settings: resolution 64 -> 128 (1 shards)" in error and len(error.splitlines()) == 1
    assert [s.name for s in fmt.committed_shards(str(out))] == ["00000"]


def test_filters_are_recorded_as_filtered(sample_shards, tmp_path):
    out = tmp_path / "out"
    assert main(["--input", str(sample_shards / "00000.tar"), "--output", str(out), "--resolution", "64",
                 "--max-aspect", "1.2"]) == 0
    index = rows(out)
    filtered = [r for r in index if r["status"] == "filtered"]
    assert filtered and all("aspect" in r["error"] for r in filtered)
    assert all(max(r["original_width"], r["original_height"]) / min(r["original_width"], r["original_height"])
               > 1.2 for r in filtered)


def test_folder_of_images(tmp_path, monkeypatch):
    from tests.corpus import good_jpeg

    images = tmp_path / "photos"
    images.mkdir()
    for i in range(5):
        (images / f"p{i}.jpg").write_bytes(good_jpeg(i))
    (images / "p1.txt").write_text("caption one")
    out = tmp_path / "out"
    # relative paths, from a folder other than the one the cluster's actors run in: the actors wrote the shards
    # under their own working directory, where the driver never looked (it wrote a manifest of 0 samples)
    monkeypatch.chdir(tmp_path)
    assert Path(ray.get(ray.remote(lambda: os.getcwd()).remote())) != tmp_path
    assert main(["--input", "photos", "--output", "out", "--resolution", "64", "--files-per-shard", "2"]) == 0
    index = {r["key"]: r for r in rows(out)}
    assert sorted(index) == [f"p{i}" for i in range(5)]
    assert index["p1"]["caption"] == "caption one" and index["p0"]["caption_source"] == "none"
    assert json.loads((out / fmt.MANIFEST).read_text())["samples"] == 5


def test_s3_input_and_output(sample_shards, tmp_path, s3_endpoint):
    fs = fsspec.filesystem("s3")
    fs.mkdir("cnd-test")
    for tar in sorted(sample_shards.glob("*.tar")):
        fs.put_file(str(tar), f"cnd-test/in/{tar.name}")
    args = ["--input", "s3://cnd-test/in/{00000..00003}.tar", "--output", "s3://cnd-test/out", "--resolution", "64"]
    assert main(args) == 0
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("cnd-test/out/shards"))
    assert names == sorted(f"{i:05d}{suffix}" for i in range(4) for suffix in (".parquet", ".stats.json", ".tar"))
    manifest = json.loads(fs.cat_file("cnd-test/out/manifest.json"))
    assert manifest["totals"]["ok"] == 48
    local = tmp_path / "00002.tar"
    fs.get_file("cnd-test/out/shards/00002.tar", str(local))
    assert len(tar_samples(local)) == 12
    assert main(args + ["--dry-run"]) == 0  # done shards are found on S3 too


@pytest.mark.parametrize("stop, group", [(signal.SIGKILL, False), (signal.SIGINT, False), (signal.SIGTERM, False),
                                         (signal.SIGTERM, True)],
                         ids=["killed", "ctrl-c", "ray-job-stop", "sigterm-to-the-group-of-its-own-cluster"])
def test_resume_after_the_driver_is_killed(sample_shards, tmp_path, ray_session, python, stop, group):
    """`group`: the driver starts a cluster of its own, and SIGTERM goes to its whole process group (`kill --
    -PGID`, GNU timeout, systemd), Ray's processes too: the driver aborted (134) with no line, as the C++ handler
    ray.init leaves on SIGTERM took the signal from Python's; later its line came 8.5-8.8 s after the signal, its
    disconnect (ray.shutdown()) waiting on the cluster the same signal was ending. Now it kills its cluster and
    says its line at once, and none of the cluster is left."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for copy in range(3):  # 12 shards, so the kill lands part-way
        for tar in sorted(sample_shards.glob("*.tar")):
            shutil.copy(tar, inputs / f"c{copy}-{tar.name}")
    out = tmp_path / "out"
    command = [python, "-m", "pipeline.build", "--input", str(inputs), "--output", str(out),
               "--resolution", "256", "--num-workers", "1", "--batch-size", "2"]
    env = {**os.environ, "RAY_ADDRESS": ray_session}
    own_cluster = {**{k: v for k, v in env.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": tempfile.mkdtemp(
        prefix="ray", dir="/tmp")}  # Ray's socket paths must stay short
    driver = subprocess.Popen(with_ctrl_c(command), env=own_cluster if group else env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=group)
    deadline = time.time() + 120
    while not list((out / "shards").glob("*.stats.json")) and time.time() < deadline and driver.poll() is None:
        time.sleep(0.02)
    try:
        sent = time.monotonic()
        if group:
            os.killpg(driver.pid, stop)
        else:
            driver.send_signal(stop)  # a real signal to the driver process, mid-job
        _, stderr = driver.communicate(timeout=60)
        if group:  # (0.11-0.14 s here; a scheduler's grace before its SIGKILL is often 10 s)
            assert time.monotonic() - sent < 5, stderr[-2000:]
            deadline = time.monotonic() + 5
            while (left := processes_with_ray_tmpdir(own_cluster["RAY_TMPDIR"])) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not left, left
    finally:
        if group and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        shutil.rmtree(own_cluster["RAY_TMPDIR"], ignore_errors=True)
    finished_before = len(list((out / "shards").glob("*.stats.json")))
    assert 1 <= finished_before < 12
    if stop != signal.SIGKILL:  # Ctrl-C or `ray job stop`: one line, which counts the shards committed, and the
        # shell's code for the signal (SIGTERM exited 15 in silence: Ray's driver handler makes it sys.exit(15))
        assert driver.returncode == 128 + stop and "Traceback" not in stderr, stderr[-2000:]
        line = stderr.strip().splitlines()[-1]
        assert re.fullmatch(rf"interrupted: (\d+) shard\(s\) committed in {re.escape(str(out))}; the same command "
                            "resumes with the rest", line), line
        counted = int(line.split()[1])  # the job's actor, on a cluster this driver only joined, may commit one more
        assert counted in (finished_before, finished_before - 1)  # shard before it dies with the driver's job

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{finished_before} done" in rerun.stdout or f"{finished_before + 1} done" in rerun.stdout
    index = rows(out)
    assert len(index) == 12 * 12
    assert len({(r["source_key"], r["key"]) for r in index}) == 48  # each photo in 3 copies of its shard
    keys_in_tars = [s["__key__"] for tar in sorted((out / "shards").glob("*.tar")) for s in tar_samples(tar)]
    assert len(keys_in_tars) == 144 and all(r["status"] == "ok" for r in index)
    assert not list((out / "shards").glob("*.tmp*")) and not (out / "shards" / "_staging").exists()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_as_the_finished_job_exits_is_no_traceback(sample_shards, tmp_path, ray_session, python, stop):
    """Once the job has printed its summary, Ray's atexit shutdown sleeps 0.5 s: a Ctrl-C or SIGTERM then (a
    kill-and-resume fuzz met it in about one stop in twenty) ended in 'Exception ignored in atexit callback' with
    Ray's traceback and exit 0, or in a segfault. Now the signal ends the finished job as it ends any process."""
    command = [python, "-m", "pipeline.build", "--input", str(sample_shards / "00000.tar"), "--output",
               str(tmp_path / "out"), "--resolution", "32", "--num-workers", "1"]
    env = {**os.environ, "RAY_ADDRESS": ray_session, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(with_ctrl_c(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    for line in driver.stdout:
        if "samples/s" in line:  # the summary's last line: the job is done
            break
    time.sleep(0.2)  # in Ray's atexit shutdown
    driver.send_signal(stop)
    _, stderr = driver.communicate(timeout=60)
    assert driver.returncode in (0, -stop), (driver.returncode, stderr[-2000:])
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-2000:]
    assert len(list((tmp_path / "out" / "shards").glob("*.stats.json"))) == 1


@pytest.mark.parametrize("stop", [signal.SIGTERM], ids=["sigterm"])  # Ctrl-C: in test_train_run (one path)
def test_a_stop_while_the_job_starts_its_cluster_leaves_none_of_it_running(sample_shards, tmp_path, python, stop):
    """Stopped inside ray.init (its Node() waiting for the raylet to register, which Ray's global node is not yet),
    the job said its line and exited, and its cluster's dashboard and runtime-env agents ran on for good."""
    command = [python, "-m", "pipeline.build", "--input", str(sample_shards / "00000.tar"), "--output",
               str(tmp_path / "out"), "--resolution", "32", "--num-workers", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    code, stderr, left = stopped_while_ray_starts(command, env, stop)
    assert code == 128 + stop and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("interrupted: 0 shard(s) committed")
    assert not left, left


def test_a_sigterm_after_ray_starts_is_pythons_to_handle_however_long_the_stop_takes(python, tmp_path):
    """ray.init's core worker puts Ray's C++ failure handler (absl's) in front of Python's SIGTERM handler: a SIGTERM
    it met armed a 3 s alarm that aborted the process (SIGABRT) in the middle of a stop's clean-up, after the line or
    before it. join_ray takes the signal back for Python; a clean-up of 4 s here ends as the script says."""
    script = """
import os, time
from pipeline.format import join_ray
join_ray(None, include_dashboard=False, num_cpus=1, configure_logging=False)
try:
    print("started", flush=True)  # (inside the try: the signal may come before the next line runs)
    time.sleep(120)
except SystemExit as stop:  # ray.init's handler makes SIGTERM sys.exit(15)
    time.sleep(4)  # a stop's clean-up, longer than the alarm's 3 s
    print("cleaned up", stop.code, flush=True)
    os._exit(128 + stop.code)
"""
    code, out, err = sigterm_once_ready(python, script, ready="started")
    assert code == 143 and out == "cleaned up 15\n" and "SIGTERM received" not in err, (code, err[-2000:])


def sigterm_once_ready(python, script: str, ready: str) -> tuple[int, str, str]:
    """Run a driver `script` that starts its own Ray, send it SIGTERM once it prints `ready`: its exit code, the
    rest of its stdout, its stderr."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as ray_tmp:  # Ray's socket paths must stay short
        run = subprocess.Popen([python, "-c", script], env={**env, "RAY_TMPDIR": ray_tmp}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            assert run.stdout.readline() == f"{ready}\n"
            run.send_signal(signal.SIGTERM)
            out, err = run.communicate(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)  # what is left of its cluster
    return run.returncode, out, err


def test_a_sigterm_after_leaving_ray_is_still_pythons_to_handle(python):
    """ray.shutdown() reset the signals Ray's C++ failure handler had taken to their default action, behind Python's
    back (its handler still in place as far as Python knew): a SIGTERM after it (a second stop: `kill PID`, then the
    process group's) killed the driver before the stop's last line, with -15."""
    script = """
import os, time, ray
from pipeline.format import join_ray
join_ray(None, include_dashboard=False, num_cpus=1, configure_logging=False)
try:
    ray.shutdown()
    print("left", flush=True)
    time.sleep(120)
except SystemExit as stop:  # ray.init's handler makes SIGTERM sys.exit(15)
    print("stopped", stop.code, flush=True)
    os._exit(128 + stop.code)
"""
    code, out, err = sigterm_once_ready(python, script, ready="left")
    assert code == 143 and out == "stopped 15\n", (code, err[-2000:])


def test_a_signal_log_hears_each_signal_as_it_comes_outside_the_main_thread():
    """The trainer's driver waits in ray.get, which lets the main thread's handler run only between its checks,
    every 1 s: a stop that must act at once (a cluster started here dying with it) is told by SignalLog's listener."""
    heard, answered = [], threading.Event()

    def hear(signum: int) -> None:
        heard.append((signum, threading.current_thread().name))
        answered.set()

    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: None)  # (a handler: else no wakeup, and death)
    try:
        with fmt.SignalLog(on_signal=hear) as log:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert answered.wait(10)
        assert heard == [(signal.SIGUSR1, "signal-listener")] and log.received() == {signal.SIGUSR1}
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert not any(t.name == "signal-listener" for t in threading.enumerate())  # joined on leaving


def test_a_stop_that_cuts_ray_init_short_cancels_the_alarm_rays_failure_handler_armed(monkeypatch):
    """A SIGTERM inside ray.init, once its core worker exists, meets Ray's C++ failure handler, which arms an alarm
    (absl's, 3 s) that aborts the process before the stop has left the half-started cluster and said its line.
    Here ray.init does what that handler does, and is stopped as Ray's Python handler stops it."""
    import ray

    left = []

    def init_stopped_by_sigterm(**kwargs):
        signal.alarm(100)
        raise SystemExit(15)

    monkeypatch.setattr(ray, "init", init_stopped_by_sigterm)
    monkeypatch.setattr(fmt, "leave_half_started_ray", left.append)  # the suite's own Ray session stays
    monkeypatch.setattr(fmt, "_ray_init_cut_short", False)
    with pytest.raises(SystemExit):
        fmt.join_ray(None)
    pending = signal.alarm(0)
    assert pending == 0 and len(left) == 1 and fmt._ray_init_cut_short  # and the driver ends with end_process


@pytest.mark.parametrize("command, config", [("-m pipeline.build", "pipeline.config:BuildConfig"),
                                             ("train/run.py", "train.config:TrainConfig"),
                                             ("train/sweep.py", "train.sweep:SweepConfig")])
def test_help_flows_a_flags_docstring_as_one_paragraph(command, config, python):
    """tyro 1.0 kept each line break of a field's docstring (its continuation lines, indented, start with a space),
    so --help cut sentences where the source wraps them: 'a folder' and 'of images' on two lines."""
    import importlib

    import docstring_parser

    module, name = config.split(":")
    docs = [p.description for p in docstring_parser.parse_from_object(getattr(importlib.import_module(module), name))
            .params if p.description and "\n" in p.description.strip()]
    run = subprocess.run([python, *command.split(), "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "1000"}, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0 and docs, run.stderr[-2000:]
    for doc in docs:  # the words either side of the docstring's first line break, on one line of the help
        first, second = doc.strip().splitlines()[:2]
        joint = f"{first.split()[-1]} {second.split()[0]}"
        assert any(joint in line for line in run.stdout.splitlines()), (joint, doc)


@pytest.mark.parametrize("command, usage", [("-m pipeline.build", "--task TASK[,TASK...]"),
                                            ("-m train.export", "[OPTIONS] CHECKPOINT"),
                                            ("-m pipeline.preview", "[-h] DATASET")])
def test_help_names_what_a_value_is(command, usage, python):
    """tyro names a str value STR: the positional of export and preview, and --task's comma-separated list, are
    named for what they take."""
    run = subprocess.run([python, *command.split(), "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "1000"}, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0 and usage in run.stdout, run.stdout[-2000:]


def test_cli_help_and_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    help_text = capsys.readouterr().out
    assert exit_.value.code == 0 and "--task" in help_text and "--resolution" in help_text and "brace" in help_text
    assert "--detect-resolution" in help_text
    assert main(["--input", str(tmp_path / "none.tar"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("error: input not found") and "Traceback" not in err


def test_an_output_whose_shards_folder_holds_the_input_is_refused_before_it_overwrites_it(sample_shards, tmp_path,
                                                                                       capsys):
    """--input data/x/shards --output data/x: each input tar's output shard is <out>/shards/<its name>.tar, the input
    itself, which the job replaced with its own output (the input was lost, and a rerun read the output as input)."""
    inputs = tmp_path / "x" / "shards"
    shutil.copytree(sample_shards, inputs)
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    for spec, out in ((inputs, tmp_path / "x"), (inputs / "00001.tar", tmp_path / "x" / ".." / "x")):
        assert main(["--input", str(spec), "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --input ") and "would overwrite its own input" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before  # untouched, nothing added beside them
    assert main(["--input", str(inputs), "--output", str(inputs), "--dry-run"]) == 0  # <out>/shards/ is below them


def test_an_empty_input_is_refused_not_read_as_the_working_directory(tmp_path, monkeypatch, capsys):
    """--input "$INPUT" with INPUT unset named '', which the reader took for the working directory: the job made a
    dataset of whatever images and tars lay there."""
    import numpy as np
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "screenshot.png")
    with pytest.raises(SystemExit) as exit_:
        main(["--input", "", "--output", str(tmp_path / "out"), "--dry-run"])
    err = " ".join(capsys.readouterr().err.replace("│", " ").split())  # tyro wraps its message in a box
    assert exit_.value.code == 2 and "--input must name shards, folders or images, not an empty string" in err
