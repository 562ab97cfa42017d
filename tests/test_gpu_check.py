"""make gpu-check's script, at toy sizes on the CPU (--smoke), in a process where Ray, W&B, s3fs and tyro
cannot be imported (the GPU machine has none of them, and `make gpu-wheels` carries none): every section runs and
reports"""
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.gpu_check import LEVER_ROUNDS

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ["environment", "parity", "amp", "toy", "sd15", "levers", "data", "annotators"]
ABSENT = ["ray", "wandb", "s3fs", "moto", "tyro"]  # what `make gpu-wheels` does not carry


def test_smoke_runs_every_section_without_ray_and_writes_the_tables(tmp_path):
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        f"for name in {ABSENT!r}:\n"
        "    sys.modules[name] = None  # `import name` now raises ImportError, as where it is not installed\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{REPO}", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert list(report["sections"]) == SECTIONS
    assert all(s["status"] == "ok" for s in report["sections"].values()), report["sections"]
    sd = report["sections"]["sd15"]
    assert {(r["model"], r["grad_checkpointing"]) for r in sd["rows"]} == {
        ("ControlNet", False), ("ControlNet", True), ("ControlNet, stored latents", False), ("UNet fine-tuning", False)}
    assert all(r["samples_per_s"] > 0 and r["tflop_per_step"] > 0 and r["mfu"] > 0 for r in sd["rows"])
    assert sd["overhead"] and sd["overhead"][0]["time"] > 0
    phases = [r["phase"] for r in report["sections"]["toy"]["rows"]]
    assert phases[0].startswith("base pretraining") and phases[1].startswith("ControlNet")
    annotators = report["sections"]["annotators"]["rows"]
    assert {r["task"] for r in annotators if r["batch"] == "summary"} == {"hed", "midas", "blip"}
    levers = report["sections"]["levers"]
    assert [r["lever"] for r in levers["rows"]] == ["trainer default", "cuDNN autotuning",
                                                   "channels-last weights"]  # not --compile: minutes on a CPU
    assert all(r["s_per_step"] > 0 for r in levers["rows"]) and levers["notes"] == ["--compile: not run (--smoke)"]
    # timed in turn: each row's per-round medians, one per round
    assert all(len(r["rounds_s"].split("-")) == LEVER_ROUNDS for r in levers["rows"])
    assert levers["rows"][0]["speed_vs_default"] == 1.0
    parity = {r["task"] for r in report["sections"]["parity"]["rows"]}
    assert {"openpose", "openpose fp16 autocast", "openpose raw"} <= parity
    data = report["sections"]["data"]  # the trainer's real stream, from a loader worker, against sd15's rate
    assert [(r["stream"], r["loader_workers"]) for r in data["rows"]] == [("images decoded", 1), ("stored latents", 1)]
    assert all(r["samples_per_s"] > 0 and r["short_batches"] == 0 and r["vs_training"] > 0 for r in data["rows"])
    table = (out / "gpu_check.md").read_text()
    assert "## Checks" in table and "| parity | openpose: heatmaps and PAFs" in table and table in done.stdout


def test_a_section_that_does_not_fit_is_skipped_and_says_so(tmp_path):
    from bench.gpu_check import ESTIMATE_S, Budget, Context, Sizes, run_section

    ctx = Context(None, Sizes.of(smoke=False), Budget(5), tmp_path, smoke=False)
    result = run_section("sd15", lambda c: {"never": "run"}, ctx)
    assert result["status"] == "skipped" and f"needs ~{ESTIMATE_S['sd15']} s" in result["reason"]
