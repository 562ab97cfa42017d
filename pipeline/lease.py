"""Jobs that share an output must make the same dataset: each job holds a lease there while it writes.

Two drivers of one job (a job submitted twice, a retry started while the first still runs) write the same bytes,
and may share an output. Two jobs with other settings (another --seed, --resolution, --weights) both wrote every
shard, each publishing its tar, index and stats in turn: the output ended up with some shards of each, under one
manifest, and a shard could hold one job's tar beside the other's index. Their settings only reached the shards
with each job's first commit, minutes after both had started. So each job holds `<output>/job-<token>.json` (its
host, process, settings; pipeline.format.folder_lease) while it runs, and a job that finds a live lease with other
settings is refused in one line. A training run holds one in its run folder (train.run.run_lease), unshared.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pipeline.format import STALE_S, describe, folder_lease


class OutputBusy(RuntimeError):
    """A live job writes the output with other settings."""


def differences(theirs: dict[str, Any], mine: dict[str, Any]) -> str:
    changed = [f"{name} {theirs.get(name)!r} -> {mine.get(name)!r}" for name in {**theirs, **mine}
               if theirs.get(name) != mine.get(name)]
    return "; ".join(sorted(changed))


def output_lease(output: str, settings: dict[str, Any], clock: Callable[[], float] = time.time):
    """The dataset job's lease on `output` (OutputBusy where a live job writes it with other settings); it yields
    the live jobs sharing the output."""

    def refusal(busy: dict[str, Any], now: float) -> OutputBusy:
        return OutputBusy(f"another dataset job is writing {output} with other settings "
                          f"({differences(busy['settings'], settings)}): {describe(busy, now)}; wait for it to end or "
                          f"stop it, or give another --output (a job that is gone no longer counts: at once on its "
                          f"own host, elsewhere once its lease is {STALE_S:.0f} s old)")

    return folder_lease(output, settings, refusal, clock=clock)
