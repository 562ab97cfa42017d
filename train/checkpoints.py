"""finding a run's checkpoints on storage (local or s3://): for resume messages and for export"""
from __future__ import annotations

import json

import fsspec

from train.loop import PROGRESS_FILE


def latest_in_run(run_url: str) -> str | None:
    """The URL of the run's checkpoint with the highest step (complete ones only: progress.json is written
    last), or None when the run has none."""
    fs, root = fsspec.core.url_to_fs(run_url)
    fs.invalidate_cache()
    found = fs.glob(f"{root.rstrip('/')}/checkpoint_*/{PROGRESS_FILE}")
    if not found:
        return None
    best = max(found, key=lambda p: json.loads(fs.cat_file(p))["step"])
    return fs.unstrip_protocol(best.rsplit("/", 1)[0])


def latest_checkpoint(storage_path: str, run_name: str) -> str | None:
    return latest_in_run(f"{storage_path.rstrip('/')}/{run_name}")
