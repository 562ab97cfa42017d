"""nothing lost, nothing silently wrong: actor faults, reruns with other settings, --overwrite, mistyped commands"""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import format as fmt
from pipeline.build import done_shards, main
from pipeline.config import BuildConfig
from pipeline.reader import list_input_shards
from pipeline.worker import ActorFault, batch_fault, process_shard
from pipeline.writer import ShardWriter
from tests.conftest import own_ray_processes, with_ctrl_c
from tests.corpus import good_jpeg
from tests.tiny_weights.hed import write_tiny_hed


def rows(out: Path) -> list[dict]:
    return [r for p in sorted((out / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


class Failing:
    """An annotator that raises for every image: with `same`, the same error each time (a broken model or
    device), else one error per key (bad samples)."""

    def __init__(self, same: bool):
        self.same = same

    def __call__(self, images, keys):
        raise RuntimeError("CUDA error: an illegal memory access" if self.same or len(keys) > 1 else f"bad {keys[0]}")


def test_a_batch_failing_whole_with_one_error_is_an_actor_fault_and_commits_nothing(sample_shards, tmp_path):
    out = tmp_path / "out"
    cfg = BuildConfig(task="canny", output=str(out), resolution=32, batch_size=4)
    [shard] = list_input_shards([str(sample_shards / "00000.tar")])
    for annotator in (None, Failing(same=True)):  # an actor whose models did not load; a broken device
        with pytest.raises(ActorFault, match="all 4 samples of a batch failed"):
            process_shard(shard, cfg, annotator)
        assert not done_shards(str(out)) and not list((out / "shards" / "_staging").iterdir())
    stats = process_shard(shard, cfg, Failing(same=False))  # each sample its own error: bad data, committed
    assert stats["counts"]["failed"] == 12 and set(done_shards(str(out))) == {"00000"}
    assert batch_fault([ValueError("x")]) == ""  # one sample alone says nothing about the actor


def tiny_hed_job(inputs: Path, out: Path, weights: Path) -> BuildConfig:
    return BuildConfig(task="hed", input=[str(inputs)], output=str(out), weights=str(weights), resolution=32,
                       detect_resolution=64, batch_size=4, num_workers=1, max_retries=0, device="cpu")


def shard_actor_pids() -> list[int]:
    """The processes of this pool's actors (Ray titles them ray::ShardActor...), in this suite's Ray only."""
    return own_ray_processes(b"ray::ShardActor")


def test_replacement_actors_that_cannot_load_commit_nothing_and_a_rerun_finishes(sample_shards, tmp_path,
                                                                               ray_session):
    """The actor is SIGKILLed after its first shard and the weights are gone for its replacements: the shards
    left fail as a whole (said so, nothing all-failed committed); with the weights back a rerun finishes."""
    from pipeline.distributor import run_pool

    weights, away = tmp_path / "weights", tmp_path / "weights-away"
    write_tiny_hed(weights)
    out = tmp_path / "out"
    cfg = tiny_hed_job(sample_shards, out, weights)
    shards = list_input_shards(cfg.input)
    failures = []

    def on_done(stats):
        if not away.exists():
            weights.rename(away)
            for pid in shard_actor_pids():
                os.kill(pid, signal.SIGKILL)

    result = run_pool(shards, cfg, on_done, lambda shard, error, attempt: failures.append(error))
    assert len(result.done) == 1 and len(result.failed) == len(shards) - 1
    assert any("could not load its models" in e for e in result.failed.values()), result.failed
    assert set(done_shards(str(out))) == {result.done[0]["shard"]}  # no shard of failed rows marked done
    assert all(r["status"] == fmt.OK for r in rows(out))

    away.rename(weights)
    assert main(["--task", "hed", "--input", str(sample_shards), "--output", str(out), "--weights", str(weights),
                 "--resolution", "32", "--detect-resolution", "64", "--batch-size", "4", "--num-workers", "1",
                 "--device", "cpu"]) == 0
    index = rows(out)
    assert len(index) == 48 and len({(r["source_key"]) for r in index}) == 48
    assert json.loads((out / fmt.MANIFEST).read_text())["totals"]["ok"] == 48


def test_a_rerun_with_other_output_settings_is_refused_until_overwrite(sample_shards, tmp_path, capsys):
    out = tmp_path / "out"
    first = ["--input", str(sample_shards / "00000.tar"), "--output", str(out), "--resolution", "32"]
    assert main(first) == 0
    capsys.readouterr()
    assert main([*first[:-1], "48", "--seed", "3"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "resolution 32 -> 48" in error and "seed 0 -> 3" in error
    assert main([*first[:-1], "48", "--seed", "3", "--overwrite"]) == 0
    stats = json.loads((out / "shards" / "00000.stats.json").read_text())
    assert stats["settings"]["resolution"] == 48 and {r["width"] for r in rows(out)} == {48}
    assert main([*first[:-1], "48", "--seed", "3", "--batch-size", "3"]) == 0  # batching shapes nothing


def test_an_overwrite_after_images_were_removed_or_recut_leaves_no_shard_of_the_old_cut(tmp_path, capsys):
    """--overwrite, which the refusal of a changed folder recommends, redid the shards the folder still makes and
    kept the ones it no longer made: their images were in the dataset twice (the last, held out for validation,
    trained on too). Another --files-per-shard was refused even with --overwrite."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.jpg").write_bytes(good_jpeg(i))
    out = tmp_path / "out"
    job = ["--input", str(photos), "--output", str(out), "--resolution", "32", "--files-per-shard", "1"]
    assert main(job) == 0
    (photos / "0.jpg").unlink()  # the folder now makes 2 shards, of 1.jpg and 2.jpg
    assert main(job) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*job, "--overwrite"]) == 0
    assert "removing 1 shard(s) these inputs made before but no longer make" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "shards").glob("*.stats.json")) == [
        "photos-00000.stats.json", "photos-00001.stats.json"]
    assert sorted(r["key"] for r in rows(out)) == ["1", "2"]
    assert json.loads((out / fmt.MANIFEST).read_text())["totals"]["ok"] == 2
    recut = [*job[:-1], "2"]
    assert main(recut) == 2 and "files_per_shard 1 -> 2" in capsys.readouterr().err
    assert main([*recut, "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "photos-00000.parquet", "photos-00000.stats.json", "photos-00000.tar"]
    assert sorted(r["key"] for r in rows(out)) == ["1", "2"]


def test_a_rerun_over_a_changed_folder_of_images_is_refused_until_overwrite(tmp_path, capsys):
    """A folder of loose images is cut into shards by sorted name: a file added, removed or renamed since shifts
    images between shards, so skipping the done ones would lose some images and repeat others."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.jpg").write_bytes(good_jpeg(i))
    job = ["--input", str(photos), "--output", str(tmp_path / "out"), "--resolution", "32"]
    assert main(job) == 0 and main(job) == 0  # unchanged: the rerun skips the done shard
    assert "1 done, 0 to do" in capsys.readouterr().out
    (photos / "1.jpg").rename(photos / "1b.jpg")  # the same count, first and last name: only the list differs
    assert main(job) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "input files of 1 done shards changed" in error and "photos-00000" in error
    assert main([*job, "--overwrite"]) == 0
    assert sorted(r["key"] for r in rows(tmp_path / "out")) == ["0", "1b", "2"]
    assert main(job) == 0
    # spelled another way, the same folder resumes; and so does a shard recorded before paths were normalised
    dotted = ["--input", f"{tmp_path}/elsewhere/../photos/.", *job[2:]]
    assert main(dotted) == 0 and "1 done, 0 to do" in capsys.readouterr().out
    stats_file = tmp_path / "out" / "shards" / "photos-00000.stats.json"
    stats = json.loads(stats_file.read_text())
    spelled = {k: stats["input"][k].replace(str(photos), f"{tmp_path}/./photos") for k in ("url", "first", "last")}
    stats_file.write_text(json.dumps({**stats, "input": {**stats["input"], **spelled, "files_sha256": "other"}}))
    assert main(job) == 0 and "1 done, 0 to do" in capsys.readouterr().out


def test_storage_that_refuses_the_jobs_setup_is_one_line(tmp_path, python, s3_endpoint, capsys, ray_session):
    """A file where the output folder goes, and object storage without credentials: one line and exit status 2,
    before Ray starts, instead of a traceback (after every shard failed, for the first). A manifest that storage
    refused after the shards were done was a traceback too."""
    (tmp_path / "photo.jpg").write_bytes(good_jpeg(0))
    (tmp_path / "taken").write_text("a file, not a folder")
    assert main(["--input", str(tmp_path / "photo.jpg"), "--output", str(tmp_path / "taken")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "NotADirectoryError" in error
    # an output bucket that is not there: each shard failed after its work, and the manifest's write made the bucket
    assert main(["--input", str(tmp_path / "photo.jpg"), "--output", "s3://cnd-no-such-bucket/out"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --output s3://cnd-no-such-bucket/out cannot be written (") and "\n" not in error
    import fsspec

    assert not fsspec.filesystem("s3").exists("cnd-no-such-bucket")
    # storage that refuses the manifest once the shards are done: one line, and the same command writes it
    out = tmp_path / "out"
    (out / f"{fmt.MANIFEST}.tmp-{os.getpid()}").mkdir(parents=True)  # where the manifest is written first
    assert main(["--input", str(tmp_path / "photo.jpg"), "--output", str(out), "--resolution", "32"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert "the shards are committed" in error and "the same command writes it" in error
    assert len(fmt.committed_shards(str(out))) == 1 and not (out / fmt.MANIFEST).exists()
    (out / f"{fmt.MANIFEST}.tmp-{os.getpid()}").rmdir()
    assert main(["--input", str(tmp_path / "photo.jpg"), "--output", str(out), "--resolution", "32"]) == 0
    assert json.loads((out / fmt.MANIFEST).read_text())["totals"]["ok"] == 1
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    run = subprocess.run([python, "-m", "pipeline.build", "--input", "s3://cnd-nocreds/x.tar", "--output",
                          str(tmp_path / "o")], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr[-2000:]
    assert "NoCredentialsError" in run.stderr and "Ray" not in run.stdout + run.stderr


def test_overwrite_uncommits_the_old_shard_before_publishing_the_new_one(sample_shards, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert main(["--input", str(sample_shards / "00000.tar"), "--output", str(out), "--resolution", "32"]) == 0
    writer = ShardWriter(str(out), "00000")
    published = []

    def publish_then_crash(local, target):
        published.append(target)
        if target.endswith(fmt.INDEX_SUFFIX):
            raise OSError("the node died here")
        os.replace(local, target)

    monkeypatch.setattr(writer, "_publish", publish_then_crash)
    with pytest.raises(OSError):
        writer.commit([], {"shard": "00000"})
    assert published[0].endswith(fmt.TAR_SUFFIX)  # the new (empty) tar is out, beside the old parquet
    assert "00000" not in done_shards(str(out))  # ... but the shard no longer counts as done: a rerun redoes it


BIG_BUFFER = 1 << 17  # open()'s buffer on Python 3.14 (128 KiB); st_blksize where a disk reports more (CephFS: 4 MiB)


def photo_samples() -> dict[str, dict[str, bytes]]:
    return {f"k{i}": {"jpg": good_jpeg(i, 256, 256)} for i in range(8)}  # ~100 KB of tar


def whole_tar(samples: dict[str, dict[str, bytes]]) -> bytes:
    """The bytes of the tar that holds `samples`, end-of-archive marker included (the writer's are the same)."""
    import io

    buffer = io.BytesIO()
    with fmt.SampleTarWriter(buffer) as tar:
        for key, members in samples.items():
            tar.write(key, members)
    return buffer.getvalue()


def test_a_committed_tar_is_whole_whatever_the_buffer_of_its_staged_file(tmp_path, python, s3_endpoint, monkeypatch):
    """The staged tar was published while still open: its tail (the last samples, the end-of-archive marker) sat in
    Python's write buffer, 4 KiB here but 128 KiB on Python 3.14 and more on disks with a big st_blksize. An object
    store was sent the tar without it under a stats.json; a local shard was short until the file was closed, for
    good when the actor was killed first."""
    import fsspec

    import pipeline.writer

    # local: an actor SIGKILLed as its commit returns (the writer not yet collected, so its file not yet closed)
    out = tmp_path / "out"
    child = ("import functools, os, signal, sys; import pipeline.writer as w; "
             "from tests.test_faults import photo_samples; "
             f"w.open = functools.partial(open, buffering={BIG_BUFFER}); "
             "writer = w.ShardWriter(sys.argv[1], 's'); "
             "[writer.write(k, m) for k, m in photo_samples().items()]; writer.commit([], {'shard': 's'}); "
             "os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([python, "-c", child, str(out)], cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert killed.returncode == -signal.SIGKILL and done_shards(str(out)) == {"s": str(out / "shards/s.stats.json")}
    assert (out / "shards" / "s.tar").read_bytes() == whole_tar(photo_samples())

    # an object store: what is uploaded is the staged file as the disk holds it
    fsspec.filesystem("s3").mkdir("cnd-whole-tar")
    monkeypatch.setattr(pipeline.writer, "open", partial(open, buffering=BIG_BUFFER), raising=False)
    writer = ShardWriter("s3://cnd-whole-tar/out", "s")
    for key, members in photo_samples().items():
        writer.write(key, members)
    writer.commit([], {"shard": "s"})
    assert fsspec.filesystem("s3").cat_file("cnd-whole-tar/out/shards/s.tar") == whole_tar(photo_samples())


def test_a_sample_whose_resize_cannot_be_allocated_is_its_own_failed_row():
    """prepare's contract: every outcome is a row. OpenCV failing to allocate the resized image (the cap on
    --resolution keeps a job from asking; a node short of memory may still refuse) fails that sample alone."""
    from pipeline.reader import RawSample
    from pipeline.worker import prepare

    cfg = BuildConfig(output="unused", resolution=64)
    object.__setattr__(cfg, "resolution", 1_000_000)  # past the cap: 3 TB, which no node has
    prepared = prepare(RawSample("a", {"jpg": good_jpeg()}), "a", "00000", cfg)
    assert prepared.row["status"] == fmt.FAILED and prepared.image is None
    assert "Insufficient memory" in prepared.row["error"] and "\n" not in prepared.row["error"]


@pytest.mark.parametrize("mode, kept", [("source", True), ("auto", True), ("none", False), ("blip", False)])
def test_a_source_caption_is_recorded_only_where_the_caption_rule_may_keep_it(mode, kept):
    """--caption none (or blip): a row that failed before captioning kept the source's caption, marked 'source',
    and an ok row the warning about a caption the dataset does not hold."""
    from pipeline.reader import RawSample
    from pipeline.worker import prepare

    cfg = BuildConfig(output="unused", resolution=64, caption=mode)
    broken = prepare(RawSample("a", {"jpg": b"no jpeg", "txt": b"a red car"}), "a", "00000", cfg)
    assert broken.row["status"] == fmt.FAILED
    assert (broken.row["caption"], broken.row["caption_source"]) == (("a red car", "source") if kept else ("", "none"))
    ok = prepare(RawSample("b", {"jpg": good_jpeg(), "txt": b"caf\xe9"}), "b", "00000", cfg)
    assert ok.image is not None and bool(ok.meta["warnings"]) == kept  # the latin-1 caption's warning


@pytest.mark.parametrize("args, message", [(["--task", "cany", "--dry-run"], "invalid choice 'cany'"),
                                           (["--caption", "foo"], "invalid choice 'foo'"),
                                           (["--resolution", "4"], "--resolution must be from 8 to 4096"),
                                           (["--resolution", "100000"], "--resolution must be from 8 to 4096"),
                                           (["--detect-resolution", "100000"],
                                            "--detect-resolution must be from 64 to 4096"),
                                           (["--jpeg-quality", "101"], "--jpeg-quality must be from 0 to 100"),
                                           (["--canny-low", "150", "50"], "--canny-low is a range LOW HIGH"),
                                           (["--batch-size", "0"], "--batch-size must be at least 1"),
                                           (["--files-per-shard", "0"], "--files-per-shard must be at least 1"),
                                           (["--max-aspect", "nan"], "--max-aspect must not be negative"),
                                           (["--min-keypoint-fraction", "2"], "--min-keypoint-fraction must be"),
                                           (["--latents", "some/base", "--resolution", "100"],
                                            "--resolution must be a multiple of 8 with --latents")])
def test_bad_values_are_refused_as_the_trainer_refuses_them(tmp_path, args, message, capsys):
    """One command-line style (tyro) for the dataset job and the trainer: a bad value is tyro's message naming
    it and the choices, exit status 2, no traceback, whichever command it was given to."""
    from train.config import parse_args

    with pytest.raises(SystemExit) as exit_:
        main(["--output", str(tmp_path / "o"), *args])
    assert exit_.value.code == 2
    err = " ".join(capsys.readouterr().err.split())  # tyro wraps its message in a box
    assert message in err and "Traceback" not in err
    for flag in ("--mode", "--preset"):
        with pytest.raises(SystemExit) as exit_:
            parse_args([flag, "foo"])
        trainer = " ".join(capsys.readouterr().err.split())
        assert exit_.value.code == 2 and f"invalid choice 'foo' for argument '{flag}'" in trainer


@pytest.mark.parametrize("args, message", [(["--epoch-samples", "3"], "--epoch-samples must be at least one batch"),
                                           (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
                                           (["--grad-accum", "0"], "--grad-accum must be at least 1"),
                                           (["--max-steps", "0"], "--max-steps must be at least 1"),
                                           (["--resolution", "100"], "--resolution must be a multiple of 8"),
                                           (["--lr", "-1"], "--lr must be positive"),
                                           (["--lr", "nan"], "--lr must be positive"),
                                           (["--lr", "inf"], "--lr must be positive and finite"),
                                           (["--max-grad-norm", "nan"], "--max-grad-norm must be finite and not"),
                                           (["--weight-decay", "inf"], "--weight-decay must be finite and not"),
                                           (["--num-workers", "-1"], "--num-workers must be finite and not negative"),
                                           (["--data-workers", "-1"], "--data-workers must be finite and not"),
                                           (["--guidance-scales", "9", "nan"], "--guidance-scales must be finite"),
                                           (["--validation-timeout-min", "0"],
                                            "--validation-timeout-min must be positive and finite"),
                                           (["--validation-timeout-min", "nan"],
                                            "--validation-timeout-min must be positive and finite"),
                                           (["--run-name", ".."], "--run-name names one folder"),
                                           (["--run-name", ""], "--run-name names one folder"),
                                           (["--run-name", "a/b"], "--run-name names one folder"),
                                           (["--log-every", "0"], "--log-every must be at least 1"),
                                           (["--keep-checkpoints", "0"], "--keep-checkpoints must be at least 1"),
                                           (["--prompt-dropout", "1.5"], "--prompt-dropout is a fraction"),
                                           (["--validate-every", "5", "--guidance-scales"],
                                            "--guidance-scales needs at least one value while validating"),
                                           (["--validate-every", "5", "--prompt-modes"],
                                            "--prompt-modes needs at least one value"),
                                           (["--validate-every", "5", "--validation-samples", "0"],
                                            "--validation-samples must be at least 1 while validating"),
                                           (["--validate-every", "5", "--validation-steps", "0"],
                                            "--validation-steps must be at least 1")])
def test_the_trainer_refuses_values_it_could_only_fail_on_later(args, message, capsys):
    """Each of these ran until a worker had loaded the base model (some after Ray started), then ended in a
    traceback: a division by zero, an index error, torch's or Ray's own check."""
    from train.config import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["--batch-size", "4", *args])
    err = " ".join(capsys.readouterr().err.replace("│", " ").split())
    assert exit_.value.code == 2 and message in err and "Traceback" not in err


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then let go)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_addresses_that_name_no_cluster_are_told_apart():
    import socket

    from pipeline.format import ray_address_refusal

    assert "Connection refused" in ray_address_refusal(f"127.0.0.1:{closed_port()}")
    assert "is not HOST:PORT" in ray_address_refusal("head-node")
    with socket.socket() as listening:  # a head's port that takes connections: ray.init is left to it
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert ray_address_refusal(f"127.0.0.1:{listening.getsockname()[1]}") is None
    assert all(ray_address_refusal(a) is None for a in (None, "", "auto", "local", "ray://head:10001"))


def test_an_unreachable_ray_address_is_one_line_from_each_driver(python, sample_shards, canny64, tmp_path):
    """RAY_ADDRESS naming a port nothing listens on: ray.init waited on it for good (over 5 minutes here, its GCS
    client logging a warning every 30 s); now both drivers say so in one line, exit 2, before any work."""
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{closed_port()}"}
    commands = {"dataset job": [python, "-m", "pipeline.build", "--input", str(sample_shards),
                                "--output", str(tmp_path / "o")],
                "trainer": [python, "train/run.py", "--data", str(canny64), "--num-workers", "1", "--run-name", "t",
                            "--storage-path", str(tmp_path / "runs")]}
    for driver, command in commands.items():
        run = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env,
                             cwd=Path(__file__).resolve().parent.parent)
        last = run.stderr.strip().splitlines()[-1]
        assert run.returncode == 2 and last.startswith(f"error: RAY_ADDRESS={env['RAY_ADDRESS']}: "), \
            (driver, run.stderr[-2000:])
        assert "no Ray cluster answers there" in last and "Traceback" not in run.stderr, (driver, run.stderr[-2000:])


def test_the_preset_choices_are_the_presets():
    import typing

    from train.config import PRESETS, PresetName, parse_args

    assert set(typing.get_args(PresetName)) == set(PRESETS)
    assert parse_args(["--preset", "toy", "--lr", "0.5"]).preset == "toy"


def test_the_trainer_checks_its_data_before_ray_starts(python, tmp_path):
    run = subprocess.run([python, "train/run.py", "--data", str(tmp_path / "typo"), "--run-name", "t"],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 2 and run.stderr.strip() == f"error: --data {tmp_path / 'typo'}: no such dataset " \
        "folder", run.stderr[-2000:]
    assert run.stderr.strip().count("\n") == 0 and "Ray" not in run.stdout + run.stderr


def test_data_that_is_no_dataset_and_a_missing_validation_folder_are_named_before_training(sample_shards, canny64,
                                                                                          tmp_path, capsys):
    """The dataset job's input shards (no condition maps) loaded the model, then failed in the loop ("no usable
    validation sample", or 1000 bad samples in a row); a missing --validation-data was named as --data."""
    from train.run import main as train

    for condition in ([], ["--condition", "canny"]):
        assert train(["--data", str(sample_shards / "*.tar"), *condition, "--run-name", "t",
                      "--storage-path", str(tmp_path)]) == 2
        error = capsys.readouterr().err.strip()
        assert error.endswith("its shards hold no condition maps (<key>.<task>.png); train on a dataset that "
                              "python -m pipeline.build made") and "\n" not in error, error
    assert train(["--data", str(canny64), "--validation-data", str(tmp_path / "typo"), "--run-name", "t",
                  "--storage-path", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --validation-data {tmp_path / 'typo'}: no such dataset folder"


def test_the_trainer_checks_a_local_base_model_before_ray_starts(python, tmp_path):
    run = subprocess.run([python, "train/run.py", "--base-model", str(tmp_path / "typo"), "--run-name", "t"],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 2 and run.stderr.strip().startswith(f"error: --base-model {tmp_path / 'typo'}: no "
                                                                 "model_index.json"), run.stderr[-2000:]
    assert run.stderr.strip().count("\n") == 0 and "Ray" not in run.stdout + run.stderr


def test_a_local_base_missing_a_part_the_trainer_loads_is_one_line(tmp_path, capsys, monkeypatch):
    """A base with model_index.json but no unet/ (or no weights in it) passed the check: the run failed in the
    workers with diffusers' 'no file named config.json' for the base folder, once per restart."""
    from train.run import main as train
    from train.tiny_sd import build_tiny_sd

    base = build_tiny_sd(tmp_path / "base")
    capsys.readouterr()
    for part, removed, message in (("vae", "config.json", "vae/: no config.json"),
                                   ("unet", "diffusion_pytorch_model.safetensors", "unet/: no weights"),
                                   ("unet", None, "no unet/ folder")):
        shutil.rmtree(base / part) if removed is None else (base / part / removed).unlink()
        assert train(["--base-model", str(base), "--run-name", "t", "--storage-path", str(tmp_path / "runs")]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"error: --base-model {base}: ") and message in error and "\n" not in error
    # given relative to here without ./ (it was taken for a hub id), and with a model_index.json that is no JSON
    monkeypatch.chdir(tmp_path)
    assert train(["--base-model", "base", "--run-name", "t", "--storage-path", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --base-model base: no unet/ folder")
    (base / "model_index.json").write_text("{'unet': ")
    assert train(["--base-model", "base", "--run-name", "t", "--storage-path", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --base-model base: model_index.json is not JSON (")
    # a typo in a folder that is here: 'org/name' to the loader, which asked the hub for ~30 s, then a traceback
    assert train(["--base-model", "base/typo", "--run-name", "t", "--storage-path", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --base-model base/typo: no model_index.json there")


def test_a_local_base_predicting_another_target_is_one_line_before_ray_starts(tmp_path, capsys):
    """prediction_type "sample" (x0) trained against the noise; refused in the workers, after Ray started."""
    from train.run import main as train
    from train.tiny_sd import build_tiny_sd

    base = build_tiny_sd(tmp_path / "base")
    config = base / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "sample"}))
    capsys.readouterr()
    assert train(["--base-model", str(base), "--run-name", "t", "--storage-path", str(tmp_path / "runs")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: --base-model {base}: its scheduler/ predicts 'sample'") and "\n" not in error


def test_a_local_base_with_a_weight_file_cut_short_is_one_line_before_ray_starts(python, tmp_path):
    """A UNet file cut short (a download stopped) passed the check, which looks at the folders: the workers failed
    loading it, in a traceback, and Ray Train loaded the base again --max-failures times before the failed line."""
    from train.tiny_sd import build_tiny_sd

    base = build_tiny_sd(tmp_path / "base")
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    run = subprocess.run([python, "train/run.py", "--base-model", str(base), "--run-name", "t", "--storage-path",
                          str(tmp_path / "runs")], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 2 and run.stderr.strip().startswith(
        f"error: --base-model {base}: unet/diffusion_pytorch_model.safetensors does not read ("), run.stderr[-2000:]
    assert run.stderr.strip().count("\n") == 0 and "Ray" not in run.stdout + run.stderr


def test_a_local_base_whose_weights_lack_tensors_or_do_not_read_is_one_line(tmp_path, capsys):
    """Found from the files' headers (safetensors) or their zip index (a .bin), against the tensors of a model built
    from the component's config.json on the meta device: nothing of the weights is read."""
    import torch
    from safetensors.torch import load_file, save_file

    from train.run import main as train
    from train.tiny_sd import build_tiny_sd

    def refused(base: Path) -> str:
        assert train(["--base-model", str(base), "--run-name", "t", "--storage-path", str(tmp_path / "runs")]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"error: --base-model {base}: ") and "\n" not in error, error
        return error

    base = build_tiny_sd(tmp_path / "base")
    capsys.readouterr()
    vae = base / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(vae)
    save_file({k: v for k, v in tensors.items() if not k.startswith("decoder.conv_out.")}, vae)
    assert "vae/: its weights lack 2 of the AutoencoderKL's tensors (e.g. ['decoder.conv_out.bias', " \
           "'decoder.conv_out.weight'])" in refused(base)
    save_file(tensors, vae)
    # a text encoder saved as pytorch_model.bin: its zip index read (mmap, on the meta device), its tensors not
    encoder = base / "text_encoder" / "model.safetensors"
    tensors = load_file(encoder)
    encoder.unlink()
    bin_file = base / "text_encoder" / "pytorch_model.bin"
    torch.save({k: v for k, v in tensors.items() if "final_layer_norm" not in k}, bin_file)
    assert "text_encoder/: its weights lack 2 of the CLIPTextModel's tensors" in refused(base)
    torch.save(tensors, bin_file)
    bin_file.write_bytes(bin_file.read_bytes()[:-100])
    assert "text_encoder/pytorch_model.bin does not read (" in refused(base)
    torch.save(tensors, bin_file)
    # the whole base, with its text encoder as .bin, passes the check (the run then stops at the missing --data)
    assert train(["--base-model", str(base), "--data", str(tmp_path / "typo"), "--run-name", "t",
                  "--storage-path", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --data {tmp_path / 'typo'}: no such dataset folder"


def test_a_local_base_holding_nan_ends_the_run_at_its_first_attempt(canny64, tmp_path, capsys, worker_errors):
    """NaN is found where the workers load the base (the driver reads no tensor): raised there, the refusal failed
    the worker group, which Ray Train restarted --max-failures times, each loading the base again, then a traceback
    and a failed line; now every rank returns it, and the command says it in one line, exit 2."""
    from safetensors.torch import load_file, save_file

    from train.run import main as train
    from train.tiny_sd import build_tiny_sd

    base = build_tiny_sd(tmp_path / "base")
    unet = base / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(unet)
    tensors["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(tensors, unet)
    capsys.readouterr()
    assert train(["--preset", "debug", "--base-model", str(base), "--data", str(canny64), "--run-name", "nan",
                  "--storage-path", str(tmp_path / "runs"), "--wandb", "off", "--max-steps", "2",
                  "--num-workers", "1", "--max-failures", "2"]) == 2
    error = capsys.readouterr().err.strip()
    assert "Traceback" not in error and error.splitlines()[-1].startswith(f"error: --base-model {base} is not the "
                                                                          "unet/ (UNet2DConditionModel)"), error
    assert "NaN or inf in 1 of its" in error
    assert not worker_errors.exists(), worker_errors.read_text()  # no attempt failed: none was retried


def test_storage_that_cannot_be_written_is_one_line_before_training(canny64, s3_endpoint, tmp_path, capsys):
    """A --storage-path that is a file (or a bucket that does not exist) failed at the first checkpoint, after a
    segment of training, in a traceback."""
    from train.run import main as train

    (tmp_path / "afile").write_text("")
    for storage in (str(tmp_path / "afile"), "s3://cnd-no-such-bucket/runs"):
        assert train(["--data", str(canny64), "--storage-path", storage, "--run-name", "t", "--wandb", "off"]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"error: --storage-path {storage}: the run's folder cannot be written (")
        assert "\n" not in error


def test_a_shard_deleted_from_the_middle_of_a_dataset_is_one_line_before_training(canny64, tmp_path, capsys):
    """Only the first and last shard were looked for: a tar deleted from the middle was read as errors for the
    whole run (or, its stats gone too, passed over on a resume)."""
    from train.run import main as train

    data = Path(shutil.copytree(canny64, tmp_path / "canny"))
    tars = sorted((data / "shards").glob("*.tar"))
    assert len(tars) >= 3
    tars[1].unlink()
    assert train(["--data", str(data), "--storage-path", str(tmp_path / "runs"), "--run-name", "t",
                  "--wandb", "off"]) == 2
    error = capsys.readouterr().err.strip()
    # no subset names it: the hint to make the subsets again is for those
    assert error == f"error: shard {tars[1]} is not there: 1 of the {len(tars)} shards it names are missing"


def test_subsets_move_with_their_dataset_and_one_left_behind_is_one_line_before_training(canny64, tmp_path, capsys):
    """Subsets named their dataset's shards by absolute path: a dataset moved (or copied) whole read nothing (or
    the original's shards), and the run passed the checks, streamed nothing and ended in a traceback."""
    from train.data import resolve_shards
    from train.run import main as train
    from train.subsets import make_subsets

    original = Path(shutil.copytree(canny64, tmp_path / "first" / "canny"))
    make_subsets(str(original), [8])
    [outside] = make_subsets(str(original), [8], out=str(tmp_path / "elsewhere"))  # names the dataset as it is
    moved = shutil.move(str(original), str(tmp_path / "moved"))
    source = resolve_shards(f"{moved}/subsets/8.json")
    assert source.urls and all(url.startswith(f"{moved}/shards/") for url in source.urls)
    assert source.validation == f"{moved}/subsets/validation.json" and len(source.keys) == 8
    capsys.readouterr()
    assert train(["--data", outside["url"], "--storage-path", str(tmp_path / "runs"), "--run-name", "t",
                  "--wandb", "off"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: shard {original}/shards/") and "is not there" in error and "\n" not in error


def test_online_wandb_without_a_key_is_refused_before_ray_starts(python, tmp_path):
    """It ended in wandb's UsageError traceback from the worker, after the base model had loaded."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "netrc"))  # no ~/.netrc with a key either
    run = subprocess.run([python, "train/run.py", "--wandb", "online", "--run-name", "t"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 2 and run.stderr.strip().startswith("error: --wandb online needs a W&B API key")
    assert run.stderr.strip().count("\n") == 0 and "Ray" not in run.stdout + run.stderr


def test_a_run_submitted_again_with_other_experiment_settings_is_refused_before_ray_starts(canny64, tmp_path,
                                                                                           capsys):
    """Resuming spliced two experiments into one history and curve, and the optimizer's saved state overrode a new
    --lr without a word; operational settings (steps, workers, logging) may change."""
    from train.config import debug, parse_args, resume_mismatch
    from train.run import checkpoint_to_resume, prepare_base_model, with_absolute_paths
    from train.run import main as train

    common = ["--data", str(canny64), "--storage-path", str(tmp_path), "--run-name", "r", "--wandb", "off"]
    started = with_absolute_paths(prepare_base_model(parse_args(common)))  # as build_trainer saves it
    checkpoint = tmp_path / "r" / "checkpoint_step00000002"  # what a run's first checkpoint holds of its config
    checkpoint.mkdir(parents=True)
    (checkpoint / "train_config.json").write_text(json.dumps(dataclasses.asdict(started)))
    (checkpoint / "progress.json").write_text(json.dumps({"step": 2}))
    assert train([*common, "--lr", "1e-3", "--resolution", "32"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "resolution 64 -> 32; lr 0.0001 -> 0.001" in error
    operational = parse_args([*common, "--max-steps", "9", "--num-workers", "2", "--log-every", "5"])
    assert resume_mismatch(dataclasses.asdict(started), with_absolute_paths(prepare_base_model(operational))) == []
    assert resume_mismatch({"lr": 0.5}, debug()) == ["lr 0.5 -> 0.0001"] and resume_mismatch({}, debug()) == []
    # other ranks or loader workers draw other samples: allowed, said (0 and 1 of either are one stream)
    assert checkpoint_to_resume(with_absolute_paths(prepare_base_model(operational))) is not None
    assert capsys.readouterr().err.startswith("note: --num-workers 0 -> 2 since the checkpoint of step 2: ")
    same_stream = parse_args([*common, "--num-workers", "1", "--data-workers", "1"])
    assert checkpoint_to_resume(with_absolute_paths(prepare_base_model(same_stream))) is not None
    assert capsys.readouterr().err == ""


def test_a_validation_free_run_takes_any_validation_settings():
    from train.config import parse_args

    cfg = parse_args(["--validate-every", "0", "--guidance-scales", "--validation-samples", "0"])
    assert cfg.validate_every == 0 and cfg.guidance_scales == [] and cfg.validation_samples == 0


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_staging_left_by_killed_processes_is_cleared_and_a_live_ones_kept(sample_shards, tmp_path, s3_endpoint,
                                                                         capsys):
    """An object store's shards are staged in the node's temp folder: a rerun (its actors and its driver) clears
    what killed processes of this host left there, and leaves a live process's folder alone."""
    import socket

    import fsspec

    from pipeline.writer import clear_staging, staging_root

    out = "s3://cnd-faults/out"
    fsspec.filesystem("s3").mkdir("cnd-faults")
    root = staging_root(out)
    assert root.parent == Path(tempfile.gettempdir())
    host = socket.gethostname()
    dead = root / f"00000@{host}@{dead_pid()}@x1"
    live = root / f"00001@{host}@{os.getpid()}@x2"
    for folder in (dead, live):
        folder.mkdir(parents=True)
        (folder / "shard.tar").write_bytes(b"\0" * 4096)
    assert main(["--input", str(sample_shards / "00000.tar"), "--output", out, "--resolution", "32"]) == 0
    assert f"staged on each node in {root}" in capsys.readouterr().out
    assert not dead.exists() and live.exists()
    live_gone = dead_pid()
    live.rename(root / f"00001@{host}@{live_gone}@x2")
    assert clear_staging(out) == [f"00001@{host}@{live_gone}@x2"] and not root.exists()


@pytest.fixture
def twelve_shards(sample_shards, tmp_path) -> Path:
    """12 input shards (each sample shard in 3 copies), so that a fault lands part-way through a job."""
    import shutil

    inputs = tmp_path / "in"
    inputs.mkdir()
    for copy in range(3):
        for tar in sorted(sample_shards.glob("*.tar")):
            shutil.copy(tar, inputs / f"c{copy}-{tar.name}")
    return inputs


def job(python, inputs, out, *extra) -> list[str]:
    return [python, "-m", "pipeline.build", "--input", str(inputs), "--output", str(out), "--resolution", "128",
            "--num-workers", "1", "--batch-size", "2", *extra]


def wait_for(condition, timeout: float = 120.0, every: float = 0.05) -> None:
    import time

    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(every)


def assert_every_sample_once(index: list[dict], tars: list[Path]) -> None:
    import webdataset as wds

    assert len(index) == 144 and all(r["status"] == fmt.OK for r in index)
    assert len({(r["source_key"], r["key"]) for r in index}) == 48  # each photo in 3 copies of its shard
    written = [s["__key__"] for tar in tars for s in wds.WebDataset(str(tar), shardshuffle=False,
                                                                      empty_check=False)]
    assert len(written) == 144


def test_an_actor_killed_in_the_middle_of_a_shard_loses_nothing(twelve_shards, tmp_path, python, ray_session):
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_session}
    driver = subprocess.Popen(job(python, twelve_shards, out), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    staging = out / "shards" / "_staging"
    # the actor is writing a shard: its staged tar has samples in it, its stats are not out yet
    wait_for(lambda: any(t.stat().st_size > 0 for t in staging.glob("*/shard.tar")) if staging.exists() else False)
    victims = shard_actor_pids()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    printed, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0 and victims and "attempt 1 failed" in printed, printed[-3000:]
    assert_every_sample_once(rows(out), sorted((out / "shards").glob("*.tar")))
    assert not staging.exists()


def test_two_drivers_on_one_output_corrupt_nothing_and_count_nothing_twice(twelve_shards, tmp_path, python,
                                                                          ray_session):
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_session}
    drivers = [subprocess.Popen(job(python, twelve_shards, out), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    for driver in drivers:
        printed, _ = driver.communicate(timeout=300)
        assert driver.returncode == 0, printed[-3000:]
    index = rows(out)
    assert_every_sample_once(index, sorted((out / "shards").glob("*.tar")))
    for stats in (out / "shards").glob("*.stats.json"):  # each shard's tar, index and stats agree
        name = stats.name.removesuffix(fmt.STATS_SUFFIX)
        import webdataset as wds

        in_tar = {s["__key__"] for s in wds.WebDataset(str(out / "shards" / f"{name}.tar"), shardshuffle=False,
                                                        empty_check=False)}
        in_index = {r["key"] for r in pq.read_table(out / "shards" / f"{name}.parquet").to_pylist()}
        assert in_tar == in_index and json.loads(stats.read_text())["counts"]["ok"] == len(in_tar)
    assert json.loads((out / fmt.MANIFEST).read_text())["totals"]["ok"] == 144


def started_on_s3(bucket: str, command_for, env: dict[str, str], **streams) -> subprocess.Popen:
    """A dataset job writing s3://<bucket>/out (a new bucket on the moto server), once its first shard is committed:
    command_for(out) is its command line."""
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir(bucket)
    driver = subprocess.Popen(command_for(f"s3://{bucket}/out"), env=env, text=True, **streams)

    def committed() -> int:
        fs.invalidate_cache()
        return len(fs.glob(f"{bucket}/out/shards/*.stats.json"))

    wait_for(lambda: committed() >= 1, every=0.2)
    return driver


def shards_from_s3(bucket: str, local: Path) -> Path:
    """s3://<bucket>/out's shards copied into local/shards/, to read back as a local dataset; `local`."""
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    (local / "shards").mkdir(parents=True)
    for path in fs.find(f"{bucket}/out/shards"):
        fs.get_file(path, str(local / "shards" / path.rsplit("/", 1)[1]))
    return local


def test_object_storage_going_away_mid_job_is_waited_out(twelve_shards, tmp_path, python, ray_session, s3_server):
    """The endpoint gone for 20 s mid-job, longer than botocore's own retries in the actors: the shards in flight
    fail on the storage, and the driver waits the outage out once for all of them (pipeline.format.Outage) instead of
    spending their --max-retries, so the run itself finishes. Before, it ended with failed shards for a rerun."""
    import tempfile
    import time

    env = {**os.environ, "RAY_ADDRESS": ray_session}
    driver = started_on_s3("cnd-outage", lambda out: job(python, twelve_shards, out, "--max-retries", "0"), env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # no retry left to spend on an outage
    s3_server.stop()  # the endpoint goes away mid-job: uploads and reads fail
    time.sleep(20)
    s3_server.start()
    printed, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0 and "the job's storage" in printed and "trying again" in printed, printed[-3000:]

    local = shards_from_s3("cnd-outage", tmp_path / "out")
    assert len(list((local / "shards").glob("*.stats.json"))) == 12
    assert_every_sample_once(rows(local), sorted((local / "shards").glob("*.tar")))
    staging = Path(tempfile.gettempdir()) / "controlnet-data-staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_object_storage_down_past_the_patience_ends_the_job_in_one_line(twelve_shards, tmp_path, python, ray_session,
                                                                        s3_server):
    """Past CONTROLNET_STORAGE_PATIENCE_S the storage is down, not the shards: the job ends in one line. Before, every
    shard left was tried --max-retries times more through it, each try paying botocore's own retries: 24 shards took
    12 min to end against a refused endpoint, and a try took ~7 min against one that never answers."""
    import time

    out = "s3://cnd-down/out"
    env = {**os.environ, "RAY_ADDRESS": ray_session, "CONTROLNET_STORAGE_PATIENCE_S": "5"}
    driver = started_on_s3("cnd-down", partial(job, python, twelve_shards), env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    s3_server.stop()
    try:
        _, stderr = driver.communicate(timeout=120)
    finally:
        s3_server.start()
    last = stderr.strip().splitlines()[-1]
    assert driver.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert last.startswith("error: the job's storage: the storage failed for ") and last.endswith(
        "the shards committed before it are kept, and the same command resumes with the rest once the storage "
        "answers"), last
    assert "attempt 2 failed" not in stderr  # no shard's retries spent on the outage

    time.sleep(1)
    rerun = subprocess.run(job(python, twelve_shards, out), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    local = shards_from_s3("cnd-down", tmp_path / "out")
    assert len(list((local / "shards").glob("*.stats.json"))) == 12
    assert_every_sample_once(rows(local), sorted((local / "shards").glob("*.tar")))


def test_ctrl_c_during_an_outage_is_the_stop_line_not_the_storage_error(twelve_shards, python, ray_session, s3_server):
    """The stop's line counted the committed shards on the storage: stopped in an outage (often why a user stops),
    the count's connection error ended the job in a traceback and exit 1, and an endpoint that accepts and never
    answers held the stop for 7 min (past the SIGKILL that follows a pod's SIGTERM)."""
    import re
    import time

    out = "s3://cnd-stop-outage/out"
    env = {**os.environ, "RAY_ADDRESS": ray_session}
    driver = started_on_s3("cnd-stop-outage", lambda out: with_ctrl_c(job(python, twelve_shards, out)), env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    s3_server.stop()
    try:
        time.sleep(1)
        stopped = time.monotonic()
        driver.send_signal(signal.SIGINT)
        _, stderr = driver.communicate(timeout=120)
        took = time.monotonic() - stopped
    finally:
        s3_server.start()
    assert driver.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert re.fullmatch(r"interrupted: the shards committed so far kept \(the storage did not answer to count them\) "
                        rf"in {re.escape(out)}; the same command resumes with the rest",
                        stderr.strip().splitlines()[-1]), stderr[-1000:]
    assert took < 60


def test_an_actors_report_of_a_connection_an_outage_broke_is_dropped_and_other_errors_are_kept(caplog):
    """aiohttp's write of a request an outage cut, in s3fs's loop, ended in asyncio's "Task exception was never
    retrieved" with its traceback, forwarded from the actor to the job's terminal (a fresh-clone CI run here): the
    error itself reaches the shard's read or upload, which the driver retries or waits out in one line."""
    import asyncio
    import logging

    from aiohttp.client_exceptions import ClientConnectionResetError

    from pipeline.distributor import drop_broken_connection_reports

    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addFilter(drop_broken_connection_reports)
    loop = asyncio.new_event_loop()
    try:
        for error in (ClientConnectionResetError("Cannot write to closing transport"), ValueError("a bug")):
            loop.call_exception_handler({"message": "Task exception was never retrieved", "exception": error})
    finally:
        loop.close()
        asyncio_log.removeFilter(drop_broken_connection_reports)
    assert [r.exc_info[0] for r in caplog.records if r.name == "asyncio"] == [ValueError]


def test_the_task_choices_are_the_registered_annotators():
    from annotate import ANNOTATORS
    from pipeline.config import TASKS

    assert set(TASKS) == set(ANNOTATORS)


def test_every_actor_of_a_pool_is_checked_and_one_that_cannot_load_or_loads_other_weights_is_dropped(
        tmp_path, ray_session):
    """The second actor cannot load its weights, and the third loads other ones (a node whose weights folder holds
    other files), while the first loads the job's: the pool goes on with the first only. An actor started later
    with other weights refuses every shard (an ActorFault: it is replaced, and commits no shard of mixed maps)."""
    import dataclasses

    import ray

    from pipeline.config import weight_hashes
    from pipeline.distributor import ShardActor, loaded_actors
    from pipeline.reader import InputShard

    weights, other_weights = tmp_path / "weights", tmp_path / "other-weights"
    write_tiny_hed(weights)
    write_tiny_hed(other_weights, seed=1)
    good = tiny_hed_job(tmp_path, tmp_path / "out", weights)
    bad = dataclasses.replace(good, weights=str(tmp_path / "no-weights-here"))
    other = dataclasses.replace(good, weights=str(other_weights))
    first, second, third = (ShardActor.options(num_cpus=0.5).remote(cfg) for cfg in (good, bad, other))
    loaded, models, errors = loaded_actors([first, second, third])
    assert loaded == [first] and models["annotator"]["name"] == "hed" and len(errors) == 2
    assert "no-weights-here" in errors[0] or "ControlNetHED" in errors[0], errors
    assert errors[1].startswith("loaded other weights than the first actor: annotator.weights.ControlNetHED.pth ")
    late = ShardActor.options(num_cpus=0.5).remote(other)
    with pytest.raises(ActorFault, match="other weights than the job's: annotator.weights.ControlNetHED.pth "):
        ray.get(late.process.remote(InputShard("00000", str(tmp_path / "00000.tar")), weight_hashes(models)))
    ray.kill(first)
    ray.kill(late)


def test_an_actor_that_reserved_no_gpu_runs_its_models_on_the_cpu(tmp_path, ray_session):
    """Ray narrows CUDA_VISIBLE_DEVICES to the GPU an actor reserved, and leaves it alone for one that reserved none
    (--gpus-per-worker 0, the default): that one sees every GPU of its node, and "cuda when there is one" put the
    models of every such actor on the node's first GPU. --device still decides where it is given."""
    import ray

    from pipeline.distributor import ShardActor
    from pipeline.models import models_device

    write_tiny_hed(tmp_path / "weights")
    cfg = dataclasses.replace(tiny_hed_job(tmp_path, tmp_path / "out", tmp_path / "weights"), device=None)
    assert models_device(cfg, []) == "cpu" and models_device(cfg, ["3"]) == "cuda"
    assert models_device(dataclasses.replace(cfg, device="cuda:1"), []) == "cuda:1"
    actor = ShardActor.options(num_cpus=0.5).remote(cfg)
    assert ray.get(actor.describe.remote())["annotator"]["device"] == "cpu"
    ray.kill(actor)
    # the driver says so where the cluster has GPUs the job's networks leave idle
    from pipeline.distributor import idle_gpus_note

    note = idle_gpus_note(dataclasses.replace(cfg, caption="blip"), {"CPU": 64, "GPU": 8})
    assert note.startswith("the cluster has 8 GPU(s)") and "hed, blip run on the CPU" in note and "--gpus-per" in note
    assert idle_gpus_note(cfg, {"CPU": 64}) is None
    assert idle_gpus_note(dataclasses.replace(cfg, gpus_per_worker=0.25), {"CPU": 64, "GPU": 8}) is None
    assert idle_gpus_note(dataclasses.replace(cfg, task="canny"), {"CPU": 64, "GPU": 8}) is None


def test_neural_shards_made_before_detect_resolution_are_not_resumed_into():
    """Their maps came from the older annotators: mixing them with ControlNet 1.1 maps is refused."""
    from pipeline.config import settings_mismatch

    legacy = {"task": "midas", "resolution": 512}
    assert settings_mismatch(legacy, {"task": "midas", "resolution": 512, "detect_resolution": 512}) == [
        "detect_resolution (made before ControlNet 1.1 parity) -> 512"]
    assert settings_mismatch({"task": "canny", "resolution": 512},  # Canny has no network: nothing changed
                             {"task": "canny", "resolution": 512, "detect_resolution": 512}) == []


class _NoRoomForReplacements:
    """ShardActor whose first `placed` actors are placed as usual and whose later ones (the replacements of actors
    that died) ask for a resource no node has: a node lost, and the cluster without room for them."""

    def __init__(self, actor_class, placed: int):
        self.actor_class, self.placed = actor_class, placed

    def options(self, **options):
        self.placed -= 1
        return self.actor_class.options(**options, **({} if self.placed >= 0 else {"resources": {"lost_node": 1}}))


def test_a_lost_actor_whose_replacement_cannot_be_placed_leaves_its_shard_to_the_others(tmp_path, monkeypatch,
                                                                                    ray_session):
    """A node lost mid-job: its actor's shard is retried, and the replacement actor finds no room (the survivors'
    actors hold every CPU). The shard went to that replacement and the job waited on it for good, at 99%, its other
    actors idle; it now goes to a survivor. With no actor left at all the job says what it waits for."""
    import threading

    import pipeline.distributor as distributor
    from pipeline.sample_data import write_shards

    write_shards(tmp_path / "in", num_shards=6)
    cfg = BuildConfig(task="canny", input=[str(tmp_path / "in")], output=str(tmp_path / "out"), resolution=32,
                      num_workers=2, cpus_per_worker=0.5, max_retries=1)
    shards = list_input_shards(cfg.input)

    def lose(count):
        def on_done(stats):
            for pid in shard_actor_pids()[:count] if not lost else ():
                os.kill(pid, signal.SIGKILL)
                lost.append(pid)
        return on_done

    lost, outcome = [], {}
    monkeypatch.setattr(distributor, "ShardActor", _NoRoomForReplacements(distributor.ShardActor, 2))
    pool = threading.Thread(target=lambda: outcome.update(result=distributor.run_pool(shards, cfg, lose(1))),
                            daemon=True)
    pool.start()
    pool.join(timeout=30)
    assert not pool.is_alive(), "the job waited on a replacement the cluster had no room for"
    assert lost and not outcome["result"].failed
    assert sorted(s["shard"] for s in outcome["result"].done) == sorted(done_shards(str(tmp_path / "out"))) == \
        [s.name for s in shards]

    class Stopped(Exception):
        pass

    def stop(note):
        notes.append(note)
        raise Stopped  # as a Ctrl-C would: the pool's actors, pending ones included, are killed on the way out

    lost, notes = [], []
    monkeypatch.setattr(distributor, "ACTOR_WAIT_NOTE_S", 0.5)
    monkeypatch.setattr(distributor, "ShardActor", _NoRoomForReplacements(distributor.ShardActor.actor_class, 2))
    with pytest.raises(Stopped):
        distributor.run_pool(shards, dataclasses.replace(cfg, output=str(tmp_path / "out2")), lose(2), on_note=stop)
    assert notes[0].startswith("waiting for the cluster to place 2 actor(s) (0.5 CPU, 0 GPU each) in place of "
                               "those lost (a node gone?): "), notes
    assert "the same command resumes it" in notes[0]


def test_an_actor_lost_before_it_started_is_started_again(tmp_path, monkeypatch, ray_session):
    """A node lost in the job's first seconds, its actor dead before it answered: the pool went on without it for
    the whole job, and said that it 'could not load its models'. It is started again, as one lost later is."""
    import ray

    import pipeline.distributor as distributor
    from pipeline.sample_data import write_shards

    class LoseTheSecond:
        def __init__(self, actor_class):
            self.actor_class, self.made = actor_class, 0

        def options(self, **options):
            self.made += 1
            actor = self.actor_class.options(**options)
            if self.made == 2:  # it never answers: killed as its node would take it
                actor = actor.remote
                return type("Lost", (), {"remote": staticmethod(lambda cfg: lose(actor(cfg)))})
            return actor

    def lose(actor):
        ray.kill(actor, no_restart=True)
        return actor

    write_shards(tmp_path / "in", num_shards=4)
    cfg = BuildConfig(task="canny", input=[str(tmp_path / "in")], output=str(tmp_path / "out"), resolution=32,
                      num_workers=2, cpus_per_worker=0.5, max_retries=0)
    monkeypatch.setattr(distributor, "ShardActor", LoseTheSecond(distributor.ShardActor))
    notes = []
    result = distributor.run_pool(list_input_shards(cfg.input), cfg, on_note=notes.append)
    assert len(result.done) == 4 and not result.failed
    assert notes == [notes[0]] and notes[0].startswith("1 of 2 actors did not start: 1 died starting (died starting: ")
    assert notes[0].endswith("going on with 1, and 1 started again"), notes
    assert distributor.ShardActor.made == 3
