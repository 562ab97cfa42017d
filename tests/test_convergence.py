"""sudden-convergence detection and mAUCC on synthetic fidelity curves with known answers"""
from __future__ import annotations

import numpy as np
import pytest

from train.convergence import common_max_step, detect_sudden_convergence, mauc, smooth

STEPS = np.arange(0, 1201, 25)  # evaluated every 25 steps, as the feasibility run advises
EVERY = 25


def s_curve(seed: int = 0, noise: float = 0.02, mid: float = 600, width: float = 40) -> np.ndarray:
    """Flat at 0.2, then a sigmoid rise to 0.8 centred on `mid`, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    return 0.2 + 0.6 / (1 + np.exp(-(STEPS - mid) / width)) + rng.normal(0, noise, STEPS.shape)


# ------------------------------------------------------------------------------------------------ smooth


def test_smooth_is_a_centred_mean_shrunk_at_the_ends():
    y = np.array([0.0, 3.0, 6.0, 9.0, 12.0])
    assert np.allclose(smooth(y, 1), y)
    assert np.allclose(smooth(y, 3), [1.5, 3.0, 6.0, 9.0, 10.5])  # a ramp stays in place: no lag
    assert np.allclose(smooth(np.full(7, 0.4), 5), 0.4)
    with pytest.raises(ValueError, match="odd"):
        smooth(y, 2)


# ------------------------------------------------------------------------------------------------ detect


@pytest.mark.parametrize("seed", range(10))
def test_s_curve_step_is_found_near_the_midpoint(seed):
    found = detect_sudden_convergence(STEPS, s_curve(seed))
    assert found["converged"] and abs(found["step"] - 600) <= EVERY
    assert found["start"] == pytest.approx(0.2, abs=0.05) and found["plateau"] == pytest.approx(0.8, abs=0.05)
    assert found["threshold"] == pytest.approx((found["start"] + found["plateau"]) / 2)
    assert isinstance(found["step"], int) and found["reason"]


@pytest.mark.parametrize("seed", range(10))
def test_noisier_or_sharper_s_curves_stay_within_two_evaluations(seed):
    assert abs(detect_sudden_convergence(STEPS, s_curve(seed, noise=0.05))["step"] - 600) <= 2 * EVERY
    assert abs(detect_sudden_convergence(STEPS, s_curve(seed, width=8))["step"] - 600) <= 2 * EVERY


@pytest.mark.parametrize("seed", range(10))
def test_flat_noisy_curve_has_not_converged(seed):
    flat = 0.2 + np.random.default_rng(seed).normal(0, 0.03, STEPS.shape)
    found = detect_sudden_convergence(STEPS, flat)
    assert not found["converged"] and found["step"] is None and "below the minimum" in found["reason"]


def test_slow_rise_is_not_converged_or_late():
    small = detect_sudden_convergence(STEPS, np.linspace(0.2, 0.35, len(STEPS)))
    assert not small["converged"]
    slow = detect_sudden_convergence(STEPS, np.linspace(0.2, 0.8, len(STEPS)))
    assert slow["step"] >= 575  # no jump: only the halfway point of a steady climb


def test_a_single_spike_before_the_rise_is_not_taken_for_it():
    curve = s_curve(1)
    curve[STEPS == 300] = 0.9  # far above the threshold, for one evaluation
    assert abs(detect_sudden_convergence(STEPS, curve)["step"] - 600) <= EVERY
    # without smoothing, confirmation alone rejects it ...
    assert abs(detect_sudden_convergence(STEPS, curve, window=1, confirm=2)["step"] - 600) <= EVERY
    # ... and without confirmation it would have been the answer
    assert detect_sudden_convergence(STEPS, curve, window=1, confirm=0)["step"] == 300


def test_a_two_evaluation_burst_survives_smoothing_but_not_confirmation():
    curve = s_curve(2)
    curve[(STEPS == 300) | (STEPS == 325)] = 0.9
    assert abs(detect_sudden_convergence(STEPS, curve)["step"] - 600) <= EVERY
    assert detect_sudden_convergence(STEPS, curve, confirm=1)["step"] == 300


def test_immediate_rise_is_found_at_the_first_evaluations():
    found = detect_sudden_convergence(STEPS, 0.8 - 0.6 * np.exp(-STEPS / 40))
    assert found["converged"] and found["step"] <= STEPS[3]


def test_crossing_at_the_very_end_is_not_confirmed():
    curve = np.full(len(STEPS), 0.2)
    curve[-2:] = 0.9  # the plateau is the last 3 evaluations: (0.2 + 0.9 + 0.9) / 3
    found = detect_sudden_convergence(STEPS, curve, window=1)
    assert not found["converged"] and "never stayed above" in found["reason"]


def test_falling_curve_and_short_curves_have_not_converged():
    assert not detect_sudden_convergence(STEPS, 0.8 - s_curve(0) + 0.2)["converged"]
    short = detect_sudden_convergence([0, 25, 50], [0.1, 0.9, 0.9])
    assert not short["converged"] and "too few" in short["reason"]
    with pytest.raises(ValueError, match="increasing"):
        detect_sudden_convergence([0, 50, 25, 75, 100, 125], [0.2] * 6)


def test_result_is_json_ready():
    import json

    for curve in (s_curve(0), np.full(len(STEPS), 0.2)):
        found = detect_sudden_convergence(STEPS, curve)
        assert set(found) == {"converged", "step", "start", "plateau", "threshold", "reason"}
        json.dumps(found)


# -------------------------------------------------------------------------------------------------- mauc


def test_mauc_of_a_constant_curve_is_the_constant():
    assert mauc(STEPS, np.full(len(STEPS), 0.37)) == pytest.approx(0.37)
    assert mauc([100], [0.5]) == 0.5


def test_mauc_is_the_mean_of_the_trapezoids():
    assert mauc([0, 100, 200], [0.0, 1.0, 1.0]) == pytest.approx(0.75)
    assert mauc([0, 100, 300], [0.0, 1.0, 1.0]) == pytest.approx((50 + 200) / 300)  # uneven spacing


def test_earlier_rise_has_larger_mauc():
    early, late = s_curve(0, noise=0, mid=300), s_curve(0, noise=0, mid=800)
    assert mauc(STEPS, early) > mauc(STEPS, s_curve(0, noise=0)) > mauc(STEPS, late)


def test_mauc_over_a_common_max_step():
    assert mauc([0, 100, 200], [0.0, 1.0, 1.0], max_step=100) == pytest.approx(0.5)
    assert mauc([0, 100, 200], [0.0, 1.0, 1.0], max_step=50) == pytest.approx(0.25)  # interpolated end
    # a longer run that rises later would win on its own span; over the common span the early riser wins
    short_steps, long_steps = STEPS[STEPS <= 800], np.arange(0, 3001, 25)
    early = 0.2 + 0.6 / (1 + np.exp(-(short_steps - 300) / 40))
    late = 0.2 + 0.6 / (1 + np.exp(-(long_steps - 700) / 40))
    assert mauc(long_steps, late) > mauc(short_steps, early)
    end = common_max_step(short_steps, long_steps)
    assert end == 800
    assert mauc(short_steps, early, max_step=end) > mauc(long_steps, late, max_step=end)
    with pytest.raises(ValueError, match="past the last evaluation"):
        mauc(short_steps, early, max_step=3000)
