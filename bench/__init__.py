"""Benchmarks (`make bench`): each prints a table and writes its figures as JSON."""
from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, path: str | Path) -> None:
    """The benchmark's figures as JSON at `path` (its folder made), and where they went."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
