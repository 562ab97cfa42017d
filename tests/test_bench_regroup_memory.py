"""the regroup memory benchmark: its JSON, and a regroup that costs what streaming costs"""
from __future__ import annotations

import json
from pathlib import Path

from bench.regroup_memory import main


def test_a_regrouped_tar_peaks_near_a_streamed_one_not_at_its_size(tmp_path: Path, capsys) -> None:
    out = tmp_path / "regroup_memory.json"
    main(["--images", "40", "--image-kb", "1024", "--out", str(out)])  # 40 MiB of images
    report = json.loads(out.read_text())
    peak = {run["mode"]: run["peak_rss_mb"] for run in report["runs"]}
    assert peak["regroup"] < peak["stream"] + 20, peak  # the whole-tar regroup held all 40 MiB
    assert "| regroup |" in capsys.readouterr().out
