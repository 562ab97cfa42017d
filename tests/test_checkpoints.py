"""checkpoints on storage without Ray Train's upload (its local mode): published in Ray Train's layout, complete
only once progress.json is there, pruned to the newest, fetched back; on moto S3 and on a local folder"""
import json
import os
import signal
import subprocess
from pathlib import Path

import fsspec
import pytest

from pipeline import format as fmt
from pipeline.format import StorageOutage
from train.checkpoints import (
    PROGRESS_FILE,
    RAY_STORAGE_MARKER,
    complete_checkpoints,
    damaged_checkpoints,
    fetch,
    file_sizes,
    latest_in_run,
    loadable,
    prune,
    publish,
    publish_from_worker,
    retire_unrecorded,
    scratch_folder,
    unrecorded_checkpoints,
    upload_order,
)


def checkpoint_folder(root: Path, step: int) -> Path:
    folder = root / f"local-{step}"
    (folder / "controlnet").mkdir(parents=True)
    (folder / "controlnet" / "weights.safetensors").write_bytes(bytes([step]) * 100)
    (folder / "state.pt").write_bytes(b"state")
    (folder / PROGRESS_FILE).write_text(json.dumps({"step": step}))
    return folder


def run_folder(where: str, bucket: str, tmp_path: Path, request) -> str:
    """A run's folder on local disk, or in a new bucket of the moto S3 server."""
    if where == "local":
        return str(tmp_path / "runs" / "r")
    request.getfixturevalue("s3_endpoint")
    fsspec.filesystem("s3").mkdir(bucket)
    return f"s3://{bucket}/runs/r"


def test_progress_is_uploaded_last(tmp_path):
    order = upload_order(checkpoint_folder(tmp_path, 1))
    assert order[-1].name == PROGRESS_FILE and len(order) == 3


@pytest.mark.parametrize("where", ["local", "s3"])
def test_published_checkpoints_are_found_pruned_and_fetched(tmp_path, where, request):
    run = run_folder(where, "cnd-checkpoints", tmp_path, request)
    for step in (10, 30, 20):
        publish(checkpoint_folder(tmp_path, step), run, step)
    fs, root = fsspec.core.url_to_fs(run)
    fs.makedirs(f"{root}/checkpoint_step00000040", exist_ok=True)  # a publish cut short: no progress.json
    fs.pipe_file(f"{root}/checkpoint_step00000040/state.pt", b"partial")
    assert latest_in_run(run).endswith("checkpoint_step00000030")
    removed = prune(run, keep=2)
    assert [u.rsplit("_", 1)[1] for u in removed] == ["step00000010"]
    fs.invalidate_cache()
    left = sorted(p.rsplit("/", 1)[1] for p in fs.ls(root))
    assert left == ["checkpoint_step00000020", "checkpoint_step00000030", "checkpoint_step00000040"]
    back = fetch(latest_in_run(run), tmp_path / "back")
    assert (back / "controlnet" / "weights.safetensors").read_bytes() == bytes([30]) * 100
    assert json.loads((back / PROGRESS_FILE).read_text()) == {"step": 30}


IN_SCRATCH = ("import sys, time\nfrom train.checkpoints import scratch_folder\n"
              "with scratch_folder(sys.argv[1], sys.argv[2]) as folder:\n"
              "    (folder / 'state.pt').write_bytes(b'a checkpoint being saved or loaded')\n"
              "    print(folder, flush=True)\n    time.sleep(600)\n")


def in_scratch(python: str, temp: Path, purpose: str, owner: str) -> tuple[subprocess.Popen, Path]:
    """A real process inside its scratch folder (writing a checkpoint into it), and that folder."""
    from tests.conftest import REPO

    process = subprocess.Popen([python, "-c", IN_SCRATCH, purpose, owner], cwd=REPO, env={**os.environ,
                               "TMPDIR": str(temp)}, stdout=subprocess.PIPE, text=True)
    return process, Path(process.stdout.readline().strip())


def killed_in_scratch(python: str, temp: Path, purpose: str, owner: str) -> Path:
    """The scratch folder that a process killed in it (kill -9: no finally runs) left."""
    process, folder = in_scratch(python, temp, purpose, owner)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (folder / "state.pt").exists()
    return folder


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_checkpoint_loads_in_place_or_from_a_scratch_folder_that_a_killed_load_leaves_to_the_next(
        tmp_path, where, request, monkeypatch, python):
    """A resume downloaded the checkpoint into a temp folder of a new name: a process killed while loading (a stop
    mid-resume, a preemption) left it in /tmp, gigabytes at SD scale, each time. A local one loads in place; a
    remote one goes to a scratch folder, which the next load removes as it loads, and every load removes after."""
    import tempfile

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    run = run_folder(where, "cnd-loadable", tmp_path, request)
    url = publish(checkpoint_folder(tmp_path, 10), run, 10)
    left = killed_in_scratch(python, temp, "fetch", f"{run} rank 0")
    with loadable(url, f"{run} rank 0") as folder:
        assert (folder / "controlnet" / "weights.safetensors").read_bytes() == bytes([10]) * 100
        assert (folder / "state.pt").read_bytes() == b"state"
        assert folder == Path(fsspec.core.url_to_fs(url)[1]) if where == "local" else folder.parent == left.parent
    files_left = {p for p in temp.rglob("*") if p.is_file()}
    assert files_left == ({left / "state.pt", left.with_name(left.name + ".lock")} if where == "local" else set())


def test_a_scratch_folder_is_a_new_empty_one_removed_after_its_use_or_a_failure(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with scratch_folder("save", "run rank 0") as first:
        (first / "state.pt").write_bytes(b"saved")
    with pytest.raises(RuntimeError), scratch_folder("save", "run rank 0") as folder:
        assert list(folder.iterdir()) == []
        (folder / "state.pt").write_bytes(b"half")
        raise RuntimeError("the save failed")
    assert list((tmp_path / "controlnet-save").iterdir()) == []  # nor a lock left
    with scratch_folder("save", "run rank 0") as one, scratch_folder("save", "run rank 1") as other:
        assert one != other  # each rank (and run) has its own


def test_what_a_killed_process_left_in_its_scratch_folder_is_removed_by_another_runs_use(tmp_path, python,
                                                                                          monkeypatch):
    """A process killed in its scratch folder (a stop on Ray workers, which Ray Train ends with a kill; an OOM kill;
    kill -9) left a checkpoint's worth there until the same run's same rank saved on that node again: the suite's
    stops had left 98 in this machine's /tmp. Any later use removes what killed processes of this host left; a live
    process's folder, another host's (a temp folder on a shared disk), and the former layout's, of another owner,
    stay."""
    import tempfile

    left = killed_in_scratch(python, tmp_path, "save", "killed rank 0")
    live, kept = in_scratch(python, tmp_path, "save", "live rank 0")
    try:
        elsewhere = left.with_name(f"{left.name.split('@')[0]}@another-host@0123abcd")
        former = left.with_name("0123456789abcdef")  # an owner's hash alone, as folders were named before claims
        for folder in (elsewhere, former):
            folder.mkdir()
        elsewhere.with_name(elsewhere.name + ".lock").touch()
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        with scratch_folder("save", "another run rank 0") as mine:
            claimed = [p.name for f in (mine, kept, elsewhere) for p in (f, f.with_name(f.name + ".lock"))]
            assert sorted(p.name for p in mine.parent.iterdir()) == sorted([*claimed, former.name])
    finally:
        live.kill()
        live.wait()


def test_checkpoints_ray_never_recorded_are_deleted_once_they_age_out_and_no_other(tmp_path):
    """A worker run resumed from a checkpoint Ray Train never recorded (its controller died after the publish)
    went on from it, but Ray's num_to_keep does not know that folder: it stayed on storage for good."""
    run = str(tmp_path / "runs" / "r")
    for step in (2, 4, 6):  # Ray recorded 2 and 4; 6 was published by an attempt that died
        publish(checkpoint_folder(tmp_path, step), run, step)
    unrecorded = unrecorded_checkpoints(run, recorded_step=4)
    assert [u.rsplit("_", 1)[1] for u in unrecorded] == ["step00000006"]
    assert len(unrecorded_checkpoints(run, recorded_step=-1)) == 3  # no record: none of them is Ray's

    publish(checkpoint_folder(tmp_path, 8), run, 8)  # the resumed run goes on
    assert retire_unrecorded(run, unrecorded, keep=2) == unrecorded  # still among the 2 newest
    publish(checkpoint_folder(tmp_path, 10), run, 10)
    assert retire_unrecorded(run, unrecorded, keep=2) == []
    left = sorted(p.name for p in Path(run).iterdir())
    assert left == [f"checkpoint_step{s:08d}" for s in (2, 4, 8, 10)]  # Ray's own (2, 4) are Ray's to delete
    assert retire_unrecorded(run, unrecorded, keep=2) == []  # gone already: forgotten, no error
    # one damaged since it was written (resumes pass over it), Ray's or not: an unrecorded one goes once a newer
    # checkpoint is complete, as prune deletes it in local mode
    damaged = checkpoint_folder(tmp_path / "damaged", 12)
    (damaged / PROGRESS_FILE).write_text(json.dumps({"step": 12, "files": {**file_sizes(damaged), "state.pt": 1}}))
    publish(damaged, run, 12)
    unrecorded = damaged_checkpoints(run)
    assert retire_unrecorded(run, unrecorded, keep=2) == unrecorded  # nothing newer is complete yet
    publish(checkpoint_folder(tmp_path, 14), run, 14)
    assert retire_unrecorded(run, unrecorded, keep=2) == [] and not (Path(run) / "checkpoint_step00000012").exists()


def test_a_worker_that_cannot_see_the_runs_storage_publishes_nothing(tmp_path):
    """A local --storage-path seen from another node: the run's folder there lacks the marker Ray Train's
    controller wrote, and the upload fails (Ray retries the worker) instead of keeping the checkpoint on that node."""
    run = tmp_path / "runs" / "r"
    with pytest.raises(RuntimeError, match="cannot see the run's storage"):
        publish_from_worker(checkpoint_folder(tmp_path, 10), str(run), 10)
    assert not run.exists() or not any(run.iterdir())
    run.mkdir(parents=True, exist_ok=True)
    (run / RAY_STORAGE_MARKER).touch()
    published = publish_from_worker(checkpoint_folder(tmp_path, 20), str(run), 20)
    assert latest_in_run(str(run)) == published


def test_a_checkpoint_published_again_is_incomplete_until_its_new_files_are_all_there(tmp_path, monkeypatch):
    """Step N published a second time (a worker that died after its upload, before Ray recorded it, reaches N again
    on its restart): cut short, the folder must not pass for complete with half of its files from each upload."""
    from fsspec.implementations.local import LocalFileSystem

    run = str(tmp_path / "runs" / "r")
    publish(checkpoint_folder(tmp_path, 10), run, 10)
    assert latest_in_run(run).endswith("checkpoint_step00000010")
    put_file = LocalFileSystem.put_file

    def cut_at_the_weights(self, lpath, rpath, *args, **kwargs):
        if str(rpath).endswith("weights.safetensors"):
            raise ConnectionResetError("connection reset by peer")
        return put_file(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "put_file", cut_at_the_weights)
    again = checkpoint_folder(tmp_path / "again", 10)
    (again / "state.pt").write_bytes(b"other state")
    monkeypatch.setattr(fmt, "PATIENCE_S", 0)  # an outage that outlasts the run's patience
    with pytest.raises(StorageOutage) as failed:
        publish(again, run, 10)
    assert isinstance(failed.value.__cause__, ConnectionResetError)
    assert latest_in_run(run) is None
    monkeypatch.setattr(LocalFileSystem, "put_file", put_file)
    publish(again, run, 10)
    assert (Path(latest_in_run(run).removeprefix("file://")) / "state.pt").read_bytes() == b"other state"


def test_a_prune_cut_short_leaves_no_checkpoint_that_passes_for_complete(tmp_path, monkeypatch):
    """A process killed while it deletes an old checkpoint (the folder's files gone in whatever order the storage
    deletes them) must not leave a folder with progress.json but without its weights: a resume or an export that
    took it for complete would fail on it."""
    from fsspec.implementations.local import LocalFileSystem

    run = str(tmp_path / "runs" / "r")
    for step in (10, 20):
        publish(checkpoint_folder(tmp_path, step), run, step)

    def killed(self, path, recursive=False, maxdepth=None):
        raise KeyboardInterrupt  # before any file of the folder is deleted: the earliest a kill can land

    monkeypatch.setattr(LocalFileSystem, "rm", killed)
    with pytest.raises(KeyboardInterrupt):
        prune(run, keep=1)
    assert list(complete_checkpoints(run).values()) == [20]
    assert (tmp_path / "runs" / "r" / "checkpoint_step00000010" / "state.pt").exists()  # for the next prune:
    monkeypatch.undo()
    publish(checkpoint_folder(tmp_path, 30), run, 30)
    fs, root = fsspec.core.url_to_fs(run)
    fs.makedirs(f"{root}/checkpoint_step00000040")  # a publish under way (or cut short) beyond the newest: kept
    assert sorted(u.rsplit("_", 1)[1] for u in prune(run, keep=1)) == ["step00000010", "step00000020"]
    assert sorted(p.name for p in (tmp_path / "runs" / "r").iterdir()) == ["checkpoint_step00000030",
                                                                         "checkpoint_step00000040"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_checkpoint_damaged_after_it_was_written_is_passed_over(tmp_path, where, request):
    """progress.json lists the checkpoint's files and sizes: one deleted or cut short since (by hand, by a storage
    fault) leaves the checkpoint marked but not whole, and a resume or an export takes the one before it."""
    run = run_folder(where, "cnd-damaged", tmp_path, request)
    for step in (10, 20, 30):
        folder = checkpoint_folder(tmp_path, step)
        (folder / PROGRESS_FILE).write_text(json.dumps({"step": step, "files": file_sizes(folder)}))
        publish(folder, run, step)
    fs, root = fsspec.core.url_to_fs(run)
    assert latest_in_run(run).endswith("checkpoint_step00000030") and damaged_checkpoints(run) == []
    fs.rm_file(f"{root}/checkpoint_step00000030/controlnet/weights.safetensors")
    assert latest_in_run(run).endswith("checkpoint_step00000020")
    fs.pipe_file(f"{root}/checkpoint_step00000020/state.pt", b"stat")  # cut short: another size
    assert latest_in_run(run).endswith("checkpoint_step00000010")
    assert [url.rsplit("_", 1)[1] for url in damaged_checkpoints(run)] == ["step00000020", "step00000030"]
    assert sorted(complete_checkpoints(run).values()) == [10]
    # a progress.json from before it listed files (a run of an older version) says nothing either way: whole
    fs.pipe_file(f"{root}/checkpoint_step00000030/{PROGRESS_FILE}", json.dumps({"step": 30}).encode())
    assert latest_in_run(run).endswith("checkpoint_step00000030")


def test_a_checkpoint_folder_names_its_step():
    from train.checkpoints import checkpoint_name, step_of

    assert step_of(f"s3://b/runs/r/{checkpoint_name(1200)}/") == 1200
    assert step_of("runs/r/checkpoint_step00000040") == 40  # Ray Train's form of the path: no protocol
    assert step_of("runs/r/checkpoint_000003") == -1 and step_of("runs/r/checkpoint_stepx") == -1


def test_a_fetch_cut_short_by_the_storage_is_made_again_whole(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    run = str(tmp_path / "runs" / "r")
    url = publish(checkpoint_folder(tmp_path, 10), run, 10)
    get_file, cuts = LocalFileSystem.get_file, []

    def cut_twice(self, rpath, lpath, *args, **kwargs):
        if str(rpath).endswith("weights.safetensors") and len(cuts) < 2:
            cuts.append(rpath)
            raise ConnectionResetError("connection reset by peer")
        return get_file(self, rpath, lpath, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "get_file", cut_twice)
    monkeypatch.setattr(fmt.time, "sleep", lambda seconds: None)
    folder = fetch(url, tmp_path / "fetched")
    assert len(cuts) == 2 and (folder / "controlnet" / "weights.safetensors").read_bytes() == bytes([10]) * 100
    assert json.loads((folder / PROGRESS_FILE).read_text()) == {"step": 10}
