"""finding a run's checkpoints on storage (local or s3://) so a re-submitted run resumes"""
from __future__ import annotations

import fsspec

from train.loop import PROGRESS_FILE


def latest_checkpoint(storage_path: str, run_name: str) -> str | None:
    """The URL of the run's checkpoint with the highest step (only complete ones: progress.json is written
    last), or None for a new run."""
    import json

    fs, root = fsspec.core.url_to_fs(f"{storage_path.rstrip('/')}/{run_name}")
    fs.invalidate_cache()
    found = fs.glob(f"{root}/checkpoint_*/{PROGRESS_FILE}")
    if not found:
        return None
    best = max(found, key=lambda p: json.loads(fs.cat_file(p))["step"])
    return fs.unstrip_protocol(best.rsplit("/", 1)[0])
