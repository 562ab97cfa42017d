"""the annotator benchmark: its measurement and its JSON, on canny and full-size random HED at 64 px"""
from __future__ import annotations

import json
from pathlib import Path

from bench.annotators import main, measure_task, photo_crops
from tests.tiny_weights.hed import write_tiny_hed

MODE_KEYS = {"images_per_s", "trials", "peak_gpu_mb"}


def test_measure_task_gives_both_modes_for_canny_and_hed(tmp_path: Path) -> None:
    images = photo_crops(2, 64)
    write_tiny_hed(tmp_path)
    for task, weights in (("canny", None), ("hed", str(tmp_path))):
        row = measure_task(task, images, weights, batch=2, repeats=1, device="cpu", detect_resolution=64)
        assert (row["task"], row["device"], row["batch"], row["images"], row["size"]) == (task, "cpu", 2, 2, [64, 64])
        for mode in ("batched", "single"):
            assert set(row[mode]) == MODE_KEYS
            assert len(row[mode]["trials"]) == 1 and row[mode]["images_per_s"] > 0
            assert row[mode]["peak_gpu_mb"] is None  # CPU: no GPU memory to report
        assert row["ratio"] == row["batched"]["images_per_s"] / row["single"]["images_per_s"]


def test_main_writes_one_row_per_task(tmp_path: Path, capsys) -> None:
    out = tmp_path / "annotators.json"
    argv = ["--tasks", "canny,hed", "--images", "2", "--size", "64", "--repeats", "1", "--batch", "2",
            "--detect-resolution", "64"]
    main([*argv, "--device", "cpu", "--json", str(out)])
    report = json.loads(out.read_text())
    assert {"size", "batch", "repeats", "environment", "notes", "results"} <= report.keys()
    assert [row["task"] for row in report["results"]] == ["canny", "hed"]
    assert report["results"][1]["precision"] == "fp32"
    table = capsys.readouterr().out
    assert "batched/s" in table and "\nhed " in table
