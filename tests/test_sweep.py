"""dataset-size sweeps: one run per nested subset on Ray, skip finished, resume interrupted, and the report"""
import csv
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import (
    REPO,
    copy_dataset,
    own_output,
    sigterm_whose_handler_has_not_run,
    stopped_while_ray_starts,
    wandb_logged_steps,
    wandb_run_ids,
    with_ctrl_c,
)
from train.plots import nice_ticks, plot_curves
from train.report import curve_text, load_runs, table, to_markdown, write_report
from train.sweep import main as sweep

pytestmark = pytest.mark.usefixtures("ray_session")

# 4 steps, fidelity scored at 2 and 4 on one prompt mode and one CFG scale (keeps each run to seconds on CPU)
# W&B off while training (its start-up costs seconds a run); the last, skip-only invocation turns it on for the report
TRAIN = ["--checkpoint-every", "2", "--validate-every", "2", "--prompt-modes", "caption", "--guidance-scales", "9"]


@pytest.fixture(scope="module")
def dataset(canny64, tmp_path_factory) -> Path:
    return copy_dataset(canny64, tmp_path_factory, "sweep")


def run_sweep(dataset: Path, storage: Path, sizes: str, *extra: str, max_steps: int = 4, wandb: str = "off") -> int:
    return sweep(["--dataset", str(dataset), "--sizes", sizes, "--preset", "debug", "--run-prefix", "abl",
                  "--storage-path", str(storage), *extra, "--", "--max-steps", str(max_steps), *TRAIN,
                  "--wandb", wandb])


def results(storage: Path, name: str) -> dict:
    return json.loads((storage / name / "results.json").read_text())


def test_sweep_resumes_an_interrupted_size_skips_finished_ones_and_reports(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    storage = tmp_path / "runs"
    # an interrupted size: its run (same name) stopped at step 2 of 4
    assert run_sweep(dataset, storage, "8", "--no-report", max_steps=2) == 0
    assert results(storage, "abl-8")["final_step"] == 2
    capsys.readouterr()

    assert run_sweep(dataset, storage, "8,16") == 0
    out = capsys.readouterr().out
    plan = {line.split(":")[0]: line for line in out.splitlines() if line.startswith("[sweep] abl-")}
    assert plan["[sweep] abl-8"].startswith("[sweep] abl-8: 8 samples from")
    assert plan["[sweep] abl-8"].endswith("to resume from its last checkpoint")
    assert plan["[sweep] abl-16"].startswith("[sweep] abl-16: 16 samples") and plan["[sweep] abl-16"].endswith(
        "to train from step 0")
    small, large = results(storage, "abl-8"), results(storage, "abl-16")
    assert small["resumed_from"] == 2 and small["final_step"] == 4
    assert large["resumed_from"] is None and large["final_step"] == 4
    for run, size in ((small, 8), (large, 16)):  # identical settings but the data
        assert run["config"]["dataset_size"] == size and run["config"]["wandb_group"] == "abl"
        assert run["config"]["data"] == [str(dataset / "subsets" / f"{size}.json")]
    assert {k: v for k, v in small["config"].items() if k not in ("data", "run_name", "dataset_size")} == \
        {k: v for k, v in large["config"].items() if k not in ("data", "run_name", "dataset_size")}
    # one held-out validation set scores every size, and none of its samples is in any subset
    assert small["config"]["validation_data"] == [str(dataset / "subsets" / "validation.json")]
    assert small["validation"] == large["validation"] and len(set(small["validation"]["keys"])) == 2
    for size in (8, 16):
        subset = json.loads((dataset / "subsets" / f"{size}.json").read_text())
        assert not set(subset["keys"]) & set(small["validation"]["keys"])

    rows = list(csv.DictReader(io.StringIO((storage / "abl-report.csv").read_text())))
    assert [(r["size"], r["run"], r["steps"]) for r in rows] == [("8", "abl-8", "4"), ("16", "abl-16", "4")]
    assert all(0.0 <= float(r["final_fidelity"]) <= 1.0 and r["mauc"] and r["mauc_max_step"] == "4.0000"
               for r in rows)
    # what each size cost: abl-8's samples summed over its two segments; CPU, so no GPU-hours
    assert [r["samples_seen"] for r in rows] == [str(4 * small["config"]["batch_size"])] * 2
    assert all(float(r["wall_minutes"]) > 0 and r["gpu_hours"] == "" for r in rows)
    markdown = (storage / "abl-report.md").read_text()
    assert "`fidelity/caption/cfg9/edge_f1`" in markdown and "| 8 | abl-8 | 4 |" in markdown
    assert "| 16 | abl-16 | 4 |" in markdown and markdown in out
    with Image.open(storage / "abl-report.png") as png:
        assert png.size == (900, 540)

    stamps = {n: (storage / n / "results.json").stat().st_mtime_ns for n in ("abl-8", "abl-16")}
    assert run_sweep(dataset, storage, "8,16", wandb="offline") == 0  # re-run: nothing left to train
    out = capsys.readouterr().out
    assert "abl-8: finished at step 4, skipped" in out and "abl-16: finished at step 4, skipped" in out
    assert stamps == {n: (storage / n / "results.json").stat().st_mtime_ns for n in ("abl-8", "abl-16")}
    assert list((tmp_path / "wandb").rglob("offline-run-*-abl-report"))  # the table went to a W&B report run
    # the same sweep with another learning rate reported the finished runs (trained at the first) as its own
    assert sweep(["--dataset", str(dataset), "--sizes", "8,16", "--preset", "debug", "--run-prefix", "abl",
                  "--storage-path", str(storage), "--", "--max-steps", "4", *TRAIN, "--lr", "1e-3"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: run abl-8 was started with other settings: lr 0.0001 -> 0.001")
    assert "another --run-prefix" in error and "\n" not in error
    # ... and a size added to the group at another rate trained, and was reported beside them as one experiment
    assert sweep(["--dataset", str(dataset), "--sizes", "24", "--preset", "debug", "--run-prefix", "abl",
                  "--storage-path", str(storage), "--", "--max-steps", "4", *TRAIN, "--lr", "1e-3"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: run abl-16 of the sweep abl was trained with other settings: lr 0.0001 -> 0.001")
    assert not (storage / "abl-24").exists() and "\n" not in error


def test_a_size_that_fails_after_a_stop_reached_it_ends_the_sweep_as_stopped(dataset, tmp_path, monkeypatch,
                                                                               capsys):
    """SIGTERM to the process group of a sweep that started its own cluster stops its raylet too: a size's run
    could fail before the sweep's handler ran, and the sweep said it failed, then started the next size."""
    import train.sweep as sweep_module

    trained = []

    def failing_on_the_stopped_cluster(cfg):
        trained.append(cfg.run_name)
        sigterm_whose_handler_has_not_run()
        raise RuntimeError("the Ray Train controller died")

    monkeypatch.setattr(sweep_module, "train", failing_on_the_stopped_cluster)
    assert run_sweep(dataset, tmp_path / "runs", "8,16", "--no-report") == 143
    err = capsys.readouterr().err
    assert trained == ["abl-8"] and "failed" not in err, err
    assert err.strip().splitlines()[-1].startswith("[sweep] stopped: the same command resumes")


def test_a_size_stopped_in_local_mode_logs_each_step_to_its_wandb_run_once(dataset, tmp_path, monkeypatch, capsys):
    """With --num-workers 0 a size trains in the sweep's own process: a stop left its W&B run open to W&B's exit
    hook, with no record of the last step it held, so the resumed size logged again the steps after its checkpoint
    (two points a step in the curve). Ctrl-C stands here as a KeyboardInterrupt once step 3 is logged."""
    from train.tracking import RunLogger

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    progress = RunLogger.progress

    def ctrl_c_once_step_3_is_logged(logger, step, *args, **kwargs):
        progress(logger, step, *args, **kwargs)
        if step == 3:
            raise KeyboardInterrupt

    args = ["--dataset", str(dataset), "--sizes", "8", "--preset", "debug", "--run-prefix", "once",
            "--storage-path", str(tmp_path / "runs"), "--no-report", "--", "--max-steps", "4", "--checkpoint-every",
            "2", "--validate-every", "0", "--log-every", "1", "--num-workers", "0", "--wandb", "offline"]
    monkeypatch.setattr(RunLogger, "progress", ctrl_c_once_step_3_is_logged)
    assert sweep(args) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("[sweep] stopped: the same command resumes")
    monkeypatch.setattr(RunLogger, "progress", progress)
    assert sweep(args) == 0 and results(tmp_path / "runs", "once-8")["resumed_from"] == 2
    segments = sorted((tmp_path / "wandb").rglob("offline-run-*"))
    assert len(segments) == 2 and len(wandb_run_ids(segments)) == 1  # one W&B run, resumed
    logged = [wandb_logged_steps(segment, "train/loss") for segment in segments]
    assert all(code is not None for _, code in logged) and \
        sorted(step for steps, _ in logged for step in steps) == [1, 2, 3, 4], logged


def test_sweep_refuses_bad_requests_in_one_line(dataset, tmp_path, capsys):
    assert run_sweep(dataset, tmp_path, "8,49") == 2
    assert capsys.readouterr().err.strip() == \
        "error: size 49 is larger than the dataset's 36 ok samples (12 more are held out for validation)"
    assert sweep(["--dataset", str(dataset), "--sizes", "8", "--", "--data", "x"]) == 2
    assert "--data is set by the sweep" in capsys.readouterr().err
    assert sweep(["--dataset", str(dataset), "--sizes", "8", "--concurrent", "-1"]) == 2  # it trained, exit 0
    assert "--concurrent must be 0" in capsys.readouterr().err
    # the trainer's own checks, before any size trains: a size trained up to its first checkpoint, or loaded the base
    # model, and the sweep then ended in a traceback from its report of no runs
    (tmp_path / "a file").write_text("")
    for overrides, message in ((["--base-model", str(tmp_path)], "no model_index.json"),
                               (["--controlnet", str(tmp_path)], "--controlnet"),  # passed through to each size
                               (["--storage-path", str(tmp_path / "a file")], "NotADirectoryError")):
        assert sweep(["--dataset", str(dataset), "--sizes", "8", "--subsets-out", str(tmp_path / "subsets"), "--",
                      *overrides]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: ") and message in error and "\n" not in error, error
    with pytest.raises(SystemExit):
        sweep(["--help"])
    usage = capsys.readouterr().out
    assert "--no-report" in usage and "--no-no-report" not in usage


# ---------------------------------------------------------------- the report on made-up results


def fake_run(storage: Path, name: str, size: int | None, group: str | None, steps: list[int], scores: list[float],
             converged_at: int | None = None) -> None:
    config = {"dataset_size": size, "wandb_group": group, "prompt_modes": ["caption"], "guidance_scales": [9.0],
              "wandb": "off"}
    curve = {"converged": converged_at is not None, "step": converged_at, "steps": steps, "scores": scores}
    other = {"converged": False, "step": None, "steps": steps, "scores": [0.0] * len(steps)}
    fidelity = {"primary": "fidelity/caption/cfg9/edge_f1",
                "curves": {"fidelity/empty/cfg9/edge_f1": other, "fidelity/caption/cfg9/edge_f1": curve}}
    (storage / name).mkdir(parents=True)
    (storage / name / "results.json").write_text(json.dumps(
        {"config": config, "final_step": steps[-1], "history": [], "fidelity": fidelity}))


def test_report_table_compares_over_the_common_steps(tmp_path, capsys):
    fake_run(tmp_path, "abl-10k", 10_000, "abl", [0, 100, 200, 300], [0.1, 0.6, 0.7, 0.7], converged_at=100)
    (tmp_path / "abl-100k" / "checkpoint_000001").mkdir(parents=True)  # still training: no results.json yet
    fake_run(tmp_path, "abl-1k", 1000, "abl", [0, 100, 200, 300, 400, 500], [0.1, 0.1, 0.1, 0.5, 0.7, 0.7],
             converged_at=300)
    fake_run(tmp_path, "abl-2-1k", 1000, "abl-2", [0, 100], [0.1, 0.2])  # another sweep's run: not ours
    runs = load_runs(str(tmp_path), "abl")
    assert sorted(runs) == ["abl-10k", "abl-1k"]
    rows, common = table(runs)
    assert common == 300  # the last step both runs reached
    assert [(r["size"], r["steps"], r["convergence_step"], r["final_fidelity"]) for r in rows] == \
        [(1000, 500, 300, 0.7), (10_000, 300, 100, 0.7)]
    assert rows[0]["mauc"] == pytest.approx((0.1 * 200 + 0.3 * 100) / 300)  # only up to step 300
    assert rows[1]["mauc"] == pytest.approx((0.35 * 100 + 0.65 * 100 + 0.7 * 100) / 300)
    markdown = to_markdown(rows, "abl", "fidelity/caption/cfg9/edge_f1", common)
    assert "| 1000 | abl-1k | 500 | 300 | — | — | 0.7000 | 0.1667 |" in markdown and "mAUCC (to step 300)" in markdown
    report = write_report("abl", str(tmp_path))
    assert [r["run"] for r in report["rows"]] == ["abl-1k", "abl-10k"]
    assert capsys.readouterr().err.strip() == f"[report] {tmp_path / 'abl-100k'} has no results.json yet: left out"
    assert all((tmp_path / f"abl-report.{ext}").exists() for ext in ("md", "csv", "png"))
    assert not list(tmp_path.rglob("wandb"))  # the runs had W&B off: so has the report
    with pytest.raises(FileNotFoundError, match="no run of abl has the curve 'bogus'; theirs: fidelity/"):
        write_report("abl", str(tmp_path), curve="bogus")  # it wrote a table of dashes


def test_report_without_fidelity_and_the_plot_helpers(tmp_path):
    (tmp_path / "abl-8").mkdir()
    (tmp_path / "abl-8" / "results.json").write_text(json.dumps(
        {"config": {"dataset_size": 8, "wandb_group": "abl"}, "final_step": 4, "fidelity": {}}))
    rows, common = table(load_runs(str(tmp_path), "abl"))
    assert common is None and rows == [{"size": 8, "run": "abl-8", "steps": 4, "convergence_step": None,
                                        "start": None, "plateau": None, "final_fidelity": None, "mauc": None}]
    assert nice_ticks(2, 4, integer=True) == [2, 3, 4] and nice_ticks(0, 1) == [0, 0.25, 0.5, 0.75, 1.0]
    image = plot_curves([("n=8", [2, 4], [0.2, 0.4], None), ("n=16", [2, 4, 6], [0.1, 0.5, 0.9], 4)], "t", "f1")
    assert image.size == (900, 540) and len(image.getcolors(1 << 16)) > 3  # lines drawn in several colours
    with pytest.raises(FileNotFoundError):
        write_report("nothing", str(tmp_path))


@pytest.mark.parametrize("evaluations", [2, 7, 12, 30])
def test_the_terminal_curve_spans_the_whole_run(evaluations):
    steps = [50 * i for i in range(evaluations)]
    scores = [min(0.9, 0.2 + 0.05 * i) for i in range(evaluations)]
    curve = {"steps": steps, "scores": scores, "converged": False, "reason": "too short", "mauc": 0.5}
    text = curve_text({"fidelity": {"primary": "fidelity/caption/cfg1/edge_f1",
                                    "curves": {"fidelity/caption/cfg1/edge_f1": curve}}})
    rows = [line.split() for line in text.splitlines()[2:-1]]
    assert rows[0] == ["0", f"{scores[0]:.3f}"] and rows[-1] == [str(steps[-1]), f"{scores[-1]:.3f}"]
    assert len(rows) == min(evaluations, 16)
    assert text.splitlines()[-1] == "sudden convergence: not detected (too short), mAUCC 0.500"
    # the detected step is always a row, even where the even spread passes it by (make repro's 13 at 300)
    detected = {**curve, "converged": True, "step": steps[evaluations // 2 + 1 if evaluations > 2 else 1],
                "start": 0.2, "plateau": 0.9}
    text = curve_text({"fidelity": {"primary": "p", "curves": {"p": detected}}})
    assert str(detected["step"]) in [line.split()[0] for line in text.splitlines()[2:-1]]
    assert text.splitlines()[-1] == (f"sudden convergence: start 0.200, plateau 0.900, detected step "
                                     f"{detected['step']}, mAUCC 0.500")


@pytest.mark.parametrize("stop, concurrent", [(signal.SIGINT, 2), (signal.SIGTERM, 1)],
                         ids=["ctrl-c-concurrent", "sigterm-one-at-a-time"])
def test_a_stop_ends_sizes_training_concurrently_or_in_turn(dataset, tmp_path, ray_session, python, stop, concurrent):
    """Ctrl-C reached the sweep's main thread only: the sizes training in its threads went on to the end (a second
    Ctrl-C left the process joining them at exit). Now it stops them, says so in one line, and exits. One size at
    a time on a Ray worker, SIGTERM (`ray job stop`) ended the sweep with code 1 (Ray's get() makes the driver's
    SystemExit(15) a SystemExit(1)), then aborted it (134) in the interpreter's last collection. With room for two
    1-CPU runs on the suite's 2-CPU cluster, both sizes train at once: each has a checkpoint of a run that does not
    end by itself."""
    storage = tmp_path / "runs"
    command = [python, "train/sweep.py", "--dataset", str(dataset), "--sizes", "8,16", "--preset", "debug",
               "--run-prefix", "stop", "--storage-path", str(storage), "--subsets-out", str(tmp_path / "subsets"),
               "--no-report", "--concurrent", str(concurrent), "--", "--max-steps", "10000", "--num-workers", "1",
               "--cpus-per-worker", "1", "--checkpoint-every", "2", "--validate-every", "0", "--wandb", "off"]
    sweep_process = subprocess.Popen(with_ctrl_c(command), env={**os.environ, "RAY_ADDRESS": ray_session}, cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    training = (8, 16) if concurrent > 1 else (8,)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and sweep_process.poll() is None and not all(
                list((storage / f"stop-{size}").glob("checkpoint_*/progress.json")) for size in training):
            time.sleep(0.1)
        assert sweep_process.poll() is None, sweep_process.communicate()[1][-3000:]
        sweep_process.send_signal(stop)
        out, err = sweep_process.communicate(timeout=60)  # it hung here, both runs training on
    finally:
        sweep_process.kill()
    assert ("[sweep] 2 size(s) at once: each run reserves 1 CPU, 0 GPU" in out) == (concurrent > 1)
    assert sweep_process.returncode == 128 + stop and "Traceback" not in own_output(err), err[-3000:]
    assert err.strip().splitlines()[-1] == \
        "[sweep] stopped: the same command resumes each unfinished size from its last checkpoint"


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_while_the_sweep_starts_its_cluster_is_its_stopped_line_and_leaves_none_of_it(dataset, tmp_path, python,
                                                                                             stop):
    """Stopped inside ray.init (the sweep starts its own cluster when RAY_ADDRESS is unset), Ctrl-C ended the sweep
    in a KeyboardInterrupt traceback (exit 1), SIGTERM with code 15 and no line: Ray was started outside the sweep's
    stop handling. And its cluster's agents ran on for good (pipeline.format.join_ray)."""
    command = [python, "train/sweep.py", "--dataset", str(dataset), "--sizes", "8", "--preset", "debug",
               "--run-prefix", "init-stop", "--storage-path", str(tmp_path / "runs"), "--subsets-out",
               str(tmp_path / "subsets"), "--no-report", "--", "--max-steps", "4", "--num-workers", "1",
               "--cpus-per-worker", "1", "--validate-every", "0", "--wandb", "off"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    code, stderr, left = stopped_while_ray_starts(command, env, stop)
    assert code == 128 + stop and "Traceback" not in own_output(stderr), stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == \
        "[sweep] stopped: the same command resumes each unfinished size from its last checkpoint"
    assert not left, left


def test_concurrent_runs_fit_the_free_resources():
    from train.sweep import concurrent_runs

    assert concurrent_runs({"CPU": 1, "GPU": 0}, {"CPU": 2}, runs=5) == 2
    assert concurrent_runs({"CPU": 8, "GPU": 8}, {"CPU": 64, "GPU": 16}, runs=5) == 2  # GPUs bound it
    assert concurrent_runs({"CPU": 4, "GPU": 0}, {"CPU": 2}, runs=3) == 1  # no room: in turn (Ray waits)
    assert concurrent_runs({"CPU": 1, "GPU": 0}, {"CPU": 16}, runs=3, limit=2) == 2
