"""bench.trainer_speed's summary: medians per trainer, the speed ratio within each repeat and of the fastest runs;
the runs' environment"""
import os
import subprocess
import sys

import pytest

from bench.trainer_speed import Timing, summarize, to_markdown, with_bytecode


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
    from bench.trainer_speed import WARMUP_STEPS, main

    with pytest.raises(SystemExit) as exit_:
        main(["--steps", "1"])
    assert exit_.value.code == 2 and f"--steps must be at least {WARMUP_STEPS + 2}" in capsys.readouterr().err
