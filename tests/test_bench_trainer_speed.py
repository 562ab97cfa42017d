"""bench.trainer_speed's summary: medians per trainer, the speed ratio within each repeat and of the fastest runs;
the runs' environment"""
import os
import subprocess
import sys

import pytest

from bench.trainer_speed import (
    BATCH,
    OUR_RATE,
    OUR_STEP,
    WARMUP_STEPS,
    Timing,
    reported_step_seconds,
    step_times,
    summarize,
    timing_of,
    to_markdown,
    with_bytecode,
)


def timing(s_per_step: float) -> Timing:
    return Timing(first_step_s=10.0, s_per_step=s_per_step, after_last_s=1.0, total_s=20.0, peak_pss_gb=0.5)


def test_the_speed_ratio_is_given_per_repeat_beside_the_ratio_of_medians():
    # the machine slows down in the second repeat: both trainers' steps take longer there
    runs = {"peer": [timing(0.20), timing(0.30), timing(0.22)], "ours": [timing(0.10), timing(0.25), timing(0.20)]}
    ours = next(r for r in summarize(runs, "peer") if r["trainer"] == "ours")
    assert ours["speed_vs_peer"] == 0.22 / 0.20  # medians
    assert ours["speed_vs_peer_per_repeat"] == [0.22 / 0.20, 0.20 / 0.10]  # 2.0x, 1.2x and 1.1x within repeats
    assert ours["speed_vs_peer_fastest"] == 0.20 / 0.10  # each one's least disturbed run
    assert "| 1.10x | 1.10-2.00x | 2.00x |" in to_markdown(summarize(runs, "peer"))


def test_the_runs_write_bytecode_whatever_the_callers_environment_says():
    """The peer's pip compiled its bytecode at install, uv installed ours without: both must be let write it."""
    env = with_bytecode({**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    probe = [sys.executable, "-c", "import sys; print(sys.dont_write_bytecode)"]
    assert subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_too_few_steps_to_time_are_refused_before_any_work(capsys):
    """--steps 1 ran every variant, then divided by zero (no step after the warm-up), and wrote no JSON."""
    from bench.trainer_speed import main

    with pytest.raises(SystemExit) as exit_:
        main(["--steps", "1"])
    assert exit_.value.code == 2 and f"--steps must be at least {WARMUP_STEPS + 2}" in capsys.readouterr().err


def test_our_step_time_is_the_rate_each_step_line_reports_not_when_ray_forwards_the_lines():
    """A Ray worker's output reaches the console in batches: ten step lines with one timestamp read as 0 s/step
    (two of three Ray worker runs said 0.0-0.3 ms/step, 137x the peer's speed)."""
    lines = b"".join(b"(RayTrainWorker pid=1) [r0-ours-ray-worker] step %d/10  loss 1.0%d  %.1f samples/s "
                     b"(5%% waiting for data)\n" % (step, step, BATCH / (0.05 if step % 2 else 0.07))
                     for step in range(1, 11))
    chunks = [(100.0, lines[: len(lines) // 2]), (100.0, lines[len(lines) // 2:])]  # one arrival time for all
    steps = step_times(chunks, OUR_STEP)
    assert sorted(steps) == list(range(1, 11))
    assert timing_of(90.0, 101.0, steps, 10, 0).s_per_step == 0.0  # what the arrival times say
    reported = reported_step_seconds(chunks, OUR_RATE)
    assert [round(reported[step], 3) for step in (1, 2, 10)] == [0.05, 0.07, 0.07]
    timing = timing_of(90.0, 101.0, steps, 10, 0, reported)
    assert timing.s_per_step == pytest.approx(0.07, rel=1e-2)  # steps 6-10: 0.07, 0.05, 0.07, 0.05, 0.07
    assert timing.first_step_s == 10.0 and timing.after_last_s == 1.0  # these stay the console's
