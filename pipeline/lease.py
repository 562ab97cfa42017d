"""Jobs that share an output must make the same dataset: each job holds a lease there while it writes.

Two drivers of one job (a job submitted twice, a retry started while the first still runs) write the same bytes,
and may share an output. Two jobs with other settings (another --seed, --resolution, --weights) both wrote every
shard, each publishing its tar, index and stats in turn: the output ended up with some shards of each, under one
manifest, and a shard could hold one job's tar beside the other's index. Their settings only reached the shards
with each job's first commit, minutes after both had started. So each job writes `<output>/job-<token>.json`
(its host, process, settings), renewed while it runs and removed when it ends, and a job that finds a live lease
with other settings is refused in one line. A lease whose job is gone (killed, its node lost) does not count: at
once on the host it ran on (its process is not there), elsewhere once not renewed for STALE_S. Each job writes
its own lease before it reads the others', so of two jobs that start together at least one sees the other (both
may back off, never both go on).

A training run holds one in its run folder (train.run), unshared: two drivers of one run would both train it and
publish checkpoints over each other's.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import Any

import fsspec

from pipeline import format as fmt

RENEW_S = 10.0  # how often a job rewrites its lease
STALE_S = 60.0  # a lease not renewed for this long is a gone job's (several renewals missed, storage hiccups too)
RELEASE_WAIT_S = 3.0  # how long the job's end waits for its lease's removal


class OutputBusy(RuntimeError):
    """A live job writes the output with other settings."""


def lease_url(output: str, token: str) -> str:
    return f"{output.rstrip('/')}/job-{token}.json"


def new_lease(settings: dict[str, Any], now: float) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex, "started_at": now,
            "renewed_at": now, "settings": settings}


def gone(lease: dict[str, Any], now: float, host: str, alive: Callable[[int], bool] = fmt.process_alive) -> bool:
    """Whether a lease's job is gone: its process is no longer running on this host, or it was not renewed for
    STALE_S (another host's, whose processes cannot be looked up from here)."""
    if lease.get("host") == host and not alive(int(lease.get("pid", -1))):
        return True
    return now - float(lease.get("renewed_at", 0)) > STALE_S


def rival(mine: dict[str, Any], others: list[dict[str, Any]], now: float, host: str,
          alive: Callable[[int], bool] = fmt.process_alive, shared: bool = True) -> dict[str, Any] | None:
    """A live job's lease whose settings differ from `mine`'s, or None: jobs of the same settings share an output
    (`shared`); unshared, any live job's lease."""
    return next((lease for lease in others if (not shared or lease.get("settings") != mine["settings"])
                 and not gone(lease, now, host, alive)), None)


def describe(lease: dict[str, Any], now: float) -> str:
    started = datetime.fromtimestamp(float(lease.get("started_at", 0))).strftime("%Y-%m-%d %H:%M:%S")
    return (f"pid {lease.get('pid')} on {lease.get('host')}, started {started}, last renewed "
            f"{max(now - float(lease.get('renewed_at', 0)), 0):.0f} s ago")


def differences(theirs: dict[str, Any], mine: dict[str, Any]) -> str:
    changed = [f"{name} {theirs.get(name)!r} -> {mine.get(name)!r}" for name in {**theirs, **mine}
               if theirs.get(name) != mine.get(name)]
    return "; ".join(sorted(changed))


def read_leases(output: str) -> dict[str, dict[str, Any]]:
    """The leases in `output`, by path in its filesystem; one that does not parse was cut short by a kill, and is
    passed over."""
    fs, root = fsspec.core.url_to_fs(output)
    leases = {}
    for path in fs.glob(f"{root.rstrip('/')}/job-*.json"):
        with suppress(FileNotFoundError, ValueError):  # removed since the listing; cut short
            lease = json.loads(fs.cat_file(path))
            if isinstance(lease, dict):
                leases[path] = lease
    return leases


def output_lease(output: str, settings: dict[str, Any], clock: Callable[[], float] = time.time):
    """The dataset job's lease on `output` (OutputBusy where a live job writes it with other settings); it yields
    the live jobs sharing the output."""

    def refusal(busy: dict[str, Any], now: float) -> OutputBusy:
        return OutputBusy(f"another dataset job is writing {output} with other settings "
                          f"({differences(busy['settings'], settings)}): {describe(busy, now)}; wait for it to end or "
                          f"stop it, or give another --output (a job that is gone no longer counts: at once on its "
                          f"own host, elsewhere once its lease is {STALE_S:.0f} s old)")

    return lease(output, settings, refusal, clock=clock)


@contextmanager
def lease(folder: str, settings: dict[str, Any], refusal: Callable[[dict[str, Any], float], Exception],
          shared: bool = True, clock: Callable[[], float] = time.time) -> Iterator[list[dict[str, Any]]]:
    """Hold a lease on `folder` while the block runs (refusal(their lease, now) raised where a live job holds one
    with other settings, or with any when not `shared`), renewed every RENEW_S by a daemon thread, and removed at
    the end however the block ends (a kill -9 leaves it: see gone). Gone jobs' leases are removed on the way. The
    block gets the leases of the live jobs that share the folder."""
    fs, _ = fsspec.core.url_to_fs(folder)
    mine = new_lease(settings, clock())
    url = lease_url(folder, mine["token"])
    fmt.write_whole(url, json.dumps(mine).encode())  # before reading the others': see the module's docstring
    host, now = socket.gethostname(), clock()
    others = {path: theirs for path, theirs in read_leases(folder).items() if theirs.get("token") != mine["token"]}
    live = []
    for path, theirs in others.items():
        if not gone(theirs, now, host):
            live.append(theirs)
            continue
        with suppress(Exception):
            fs.rm(path)
    busy = rival(mine, list(others.values()), now, host, shared=shared)
    if busy:
        _remove(url)
        raise refusal(busy, now)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(url, mine, stop, clock), daemon=True, name="lease-renewer")
    renewer.start()
    try:
        yield live
    finally:
        stop.set()
        # in a daemon thread, waited for RELEASE_WAIT_S at most: a stop must not wait on a storage that does not
        # answer (a lease left behind is a gone job's at once on this host, and elsewhere once stale)
        releasing = threading.Thread(target=_release, args=(url, renewer), daemon=True, name="lease-release")
        releasing.start()
        releasing.join(RELEASE_WAIT_S)


def _renew(url: str, lease: dict[str, Any], stop: threading.Event, clock: Callable[[], float]) -> None:
    while not stop.wait(RENEW_S):
        with suppress(Exception):  # an outage is the job's to wait out; a missed renewal or two is within STALE_S
            fmt.write_whole(url, json.dumps({**lease, "renewed_at": clock()}).encode())


def _release(url: str, renewer: threading.Thread) -> None:
    renewer.join()  # a renewal under way would write the lease again after its removal
    _remove(url)


def _remove(url: str) -> None:
    with suppress(Exception):
        fs, path = fsspec.core.url_to_fs(url)
        fs.rm(path)
