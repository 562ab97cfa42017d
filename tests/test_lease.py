"""jobs that share an output make the same dataset: a job with other settings than a live one writing the output is
refused; a gone job's lease does not count (two drivers of one job: test_faults). A training run is leased to one
driver."""
import dataclasses
import json
import os
import socket
import subprocess
import time

import pytest

from pipeline import format as fmt
from pipeline.build import main
from pipeline.config import BuildConfig, parse_config
from pipeline.format import STALE_S, gone, read_leases, rival
from pipeline.lease import OutputBusy, output_lease

HOST = socket.gethostname()


def lease_of(pid: int, settings: dict, host: str = HOST, renewed_s_ago: float = 0.0, token: str = "theirs") -> dict:
    now = time.time()
    return {"host": host, "pid": pid, "token": token, "started_at": now - 100, "renewed_at": now - renewed_s_ago,
            "settings": settings}


def gone_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


def test_a_lease_counts_while_its_job_lives_and_only_with_other_settings():
    now, mine = time.time(), {"token": "mine", "settings": {"seed": 1}}
    assert gone(lease_of(gone_pid(), {}), now, HOST)  # killed on this host: gone at once
    assert not gone(lease_of(os.getpid(), {}), now, HOST)
    started = fmt.process_start_ticks(os.getpid())
    assert not gone({**lease_of(os.getpid(), {}), "pid_start_ticks": started}, now, HOST)
    assert gone({**lease_of(os.getpid(), {}), "pid_start_ticks": started - 1}, now, HOST)  # the pid taken since
    # another container on this host's network: its pids cannot be looked up here, so only its renewals count
    elsewhere = {**lease_of(gone_pid(), {}, renewed_s_ago=5), "pid_namespace": "pid:[1]"}
    assert not gone(elsewhere, now, HOST) and gone({**elsewhere, "renewed_at": now - STALE_S - 1}, now, HOST)
    assert not gone({**lease_of(os.getpid(), {}), "pid_namespace": fmt.pid_namespace()}, now, HOST)
    assert not gone(lease_of(12345, {}, host="other-node", renewed_s_ago=5), now, HOST)  # cannot be looked up
    assert gone(lease_of(12345, {}, host="other-node", renewed_s_ago=STALE_S + 1), now, HOST)
    same, other = lease_of(os.getpid(), {"seed": 1}), lease_of(os.getpid(), {"seed": 2})
    assert rival(mine, [same], now, HOST) is None and rival(mine, [same, other], now, HOST) is other
    assert rival(mine, [lease_of(gone_pid(), {"seed": 2})], now, HOST) is None


def test_what_a_process_named_for_its_pid_left_is_a_gone_ones_once_the_pid_is_another_process_s(tmp_path,
                                                                                                monkeypatch):
    """A shard's staging and an export's temp sibling are named for their host and pid, and cleared once that
    process is gone; a restarted container's processes take the killed ones' pids, which then ran, and what the
    killed ones left was kept for good. A path is a gone process's when its pid started after the path last
    changed; a folder a live process set aside (renamed: an export's previous one, written long before) is not."""
    left = tmp_path / "left"
    left.mkdir()
    set_aside = tmp_path / "previous-export"
    set_aside.mkdir()
    os.utime(set_aside, (0, 0))  # its files written long ago
    monkeypatch.setattr(fmt, "PID_REUSE_SLACK_S", 1.0)
    time.sleep(2.1)  # past the slack, and psutil's start times' whole-second boot time
    with subprocess.Popen(["sleep", "60"]) as later:
        assert fmt.left_by_a_gone_process(left, later.pid)  # the pid another process's now
        assert not fmt.left_by_a_gone_process(left, os.getpid())  # the process that made it runs
        set_aside = set_aside.rename(tmp_path / "previous-export.old")  # by a process started before the rename
        assert not fmt.left_by_a_gone_process(set_aside, later.pid)
        later.kill()
    assert fmt.left_by_a_gone_process(left, gone_pid())


def test_a_lease_is_renewed_while_held_and_removed_however_the_job_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(fmt, "RENEW_S", 0.05)
    output = str(tmp_path)
    with output_lease(output, {"seed": 1}):
        (held,) = read_leases(output).values()
        with output_lease(output, {"seed": 1}):  # a second driver of the same job shares the output
            assert len(read_leases(output)) == 2
        refused = (rf"^another dataset job is writing {tmp_path} with other settings \(seed 1 -> 2\): "
                   rf"pid {os.getpid()} on {HOST}, started ")
        with pytest.raises(OutputBusy, match=refused), output_lease(output, {"seed": 2}):
            pass
        time.sleep(0.3)
        assert [lease["token"] for lease in read_leases(output).values()] == [held["token"]]  # the refused one's gone
        assert next(iter(read_leases(output).values()))["renewed_at"] > held["renewed_at"]
    assert read_leases(output) == {}
    with pytest.raises(KeyboardInterrupt), output_lease(output, {}):
        raise KeyboardInterrupt
    assert read_leases(output) == {}
    (tmp_path / "job-cut.json").write_text('{"host": "vm", "pid"')  # cut short by a kill: passed over
    with output_lease(output, {"seed": 3}):
        pass


def test_a_job_with_other_settings_than_a_live_one_on_its_output_is_refused_and_a_killed_ones_passed_over(
        sample_shards, tmp_path, capsys, ray_session):
    """Started together, --seed 1 and --seed 2 on one output each wrote every shard: the output held shards of both
    under the last one's manifest (the settings reach the shards with a job's first commit, minutes in)."""
    output = tmp_path / "canny"
    output.mkdir()
    args = ["--task", "canny", "--input", str(sample_shards / "00000.tar"), "--output", str(output),
            "--resolution", "64"]
    cfg = parse_config(BuildConfig, [*args, "--seed", "1"], prog="test")
    settings = {**cfg.output_settings(), "weights": cfg.weights}
    (output / "job-live.json").write_text(json.dumps(lease_of(os.getpid(), settings, token="live")))
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: another dataset job is writing {output} with other settings (seed 1 -> 0): "
                            f"pid {os.getpid()} on {HOST}, started ")
    assert error.count("\n") == 0 and not list((output / "shards").glob("*"))
    (output / "job-live.json").write_text(json.dumps(lease_of(gone_pid(), settings, token="live")))  # kill -9'd
    assert main(args) == 0
    assert (output / "shards" / "00000.stats.json").exists() and read_leases(str(output)) == {}


def test_staging_another_host_left_beside_the_shards_is_cleared_by_a_job_alone_on_the_output(sample_shards, tmp_path,
                                                                                             ray_session):
    """A local output stages beside its shards: on a file system hosts share (NFS, EFS), what a host that never
    came back left stayed there for good (a job cleared only what its own host's killed processes left). A job
    alone on the output clears it; one sharing the output with a live job (a second driver, maybe on that host)
    leaves it."""
    output = tmp_path / "canny"
    args = ["--task", "canny", "--input", str(sample_shards / "00000.tar"), "--output", str(output),
            "--resolution", "32"]
    cfg = parse_config(BuildConfig, args, prog="test")
    staged = output / "shards" / "_staging" / "00000@another-host@4242@x1"
    staged.mkdir(parents=True)
    (staged / "shard.tar").write_bytes(b"\0" * 4096)
    theirs = lease_of(4242, {**cfg.output_settings(), "weights": cfg.weights}, host="another-host")
    (output / "job-theirs.json").write_text(json.dumps(theirs))  # the same job, renewed just now on that host
    assert main(args) == 0 and staged.exists()
    (output / "job-theirs.json").unlink()  # it ended
    assert main(args) == 0 and not staged.exists()  # nothing left to do: only the staging cleared


def test_a_second_driver_of_a_run_in_training_is_refused_and_a_killed_ones_lease_passed_over(canny64, tmp_path,
                                                                                              capsys):
    """Two drivers of one run (the command started twice, a job submitted again while the first still ran) both
    trained it, from the same checkpoint, and published their checkpoints and W&B steps over each other's. The second
    is refused in one line, before it starts Ray or writes anything of the run; the lease of a driver that was
    killed does not hold the run."""
    from train.config import debug
    from train.run import main as train
    from train.run import run_lease

    storage, name = tmp_path / "runs", "twice"
    args = ["--data", str(canny64), "--storage-path", str(storage), "--run-name", name, "--max-steps", "1",
            "--validate-every", "0", "--wandb", "off", "--num-workers", "0"]
    with run_lease(dataclasses.replace(debug(), storage_path=str(storage), run_name=name)):  # this process drives it
        assert train(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: run {name} is being trained by another driver (pid {os.getpid()} on {HOST}, "
                          "started ") and "\n" not in err, err
    assert not list((storage / name).iterdir())  # nothing of the run written; both leases removed
    (storage / name / "job-killed.json").write_text(json.dumps(lease_of(gone_pid(), {"run_name": name})))
    # a driver whose pid another process has taken since (a restarted container's driver has its old pid): the pid
    # runs, but not the process that wrote the lease
    with subprocess.Popen(["sleep", "60"]) as other:
        reused = {**lease_of(other.pid, {"run_name": name}), "pid_start_ticks": fmt.process_start_ticks(other.pid) - 1}
        (storage / name / "job-reused.json").write_text(json.dumps(reused))
        assert train(args) == 0
        other.kill()
    assert (storage / name / "results.json").exists() and not list((storage / name).glob("job-*.json"))
