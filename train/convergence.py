"""convergence: the sudden-convergence step and the mean area under a fidelity-vs-steps curve"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

LEVEL_POINTS = 3  # evaluations averaged for the start level and for the plateau
MIN_GAIN = 0.1  # absolute rise (plateau - start) below which a curve has not converged
MIN_HEADROOM_FRACTION = 0.25  # ... nor if it closes less than this fraction of the gap from start to 1


def _curve(steps: Sequence[float], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(steps, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"steps and scores must be 1-D and of equal length, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("steps and scores must be finite")
    if np.any(np.diff(x) <= 0):
        raise ValueError("steps must be strictly increasing")
    return x, y


def smooth(scores: Sequence[float], window: int) -> np.ndarray:
    """Centred moving average over `window` evaluations (odd; 1 = unchanged), shrunk at both ends.

    Centred rather than an EMA because an EMA lags: it would move every detected step ~window/2 evaluations
    late, and by an amount that depends on the rise's steepness. A centred mean of a symmetric rise crosses
    its halfway level where the raw curve does. The ends average only the neighbours that exist (no padding,
    which would pull the first and last levels toward a made-up value).
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number, got {window}")
    y = np.asarray(scores, dtype=np.float64)
    half = window // 2
    csum = np.concatenate([[0.0], np.cumsum(y)])
    lo = np.clip(np.arange(len(y)) - half, 0, len(y))
    hi = np.clip(np.arange(len(y)) + half + 1, 0, len(y))
    return (csum[hi] - csum[lo]) / (hi - lo)


def _result(
    converged: bool, step: float | None, start: float, plateau: float, threshold: float, reason: str
) -> dict[str, Any]:
    return {
        "converged": converged, "step": None if step is None else int(step), "start": float(start),
        "plateau": float(plateau), "threshold": float(threshold), "reason": reason,
    }


def detect_sudden_convergence(
    steps: Sequence[float], scores: Sequence[float], *, window: int = 3, confirm: int = 2,
    levels: int = LEVEL_POINTS, min_gain: float = MIN_GAIN, min_headroom_fraction: float = MIN_HEADROOM_FRACTION,
) -> dict[str, Any]:
    """The sudden-convergence step of a higher-is-better fidelity curve with a ceiling of 1, or "not converged".

    start / plateau: means of the first / last `levels` raw evaluations; threshold: halfway between them.
    The step is the FIRST evaluation where the smoothed curve (centred mean over `window`) is at or above the
    threshold and stays there for `confirm` further evaluations, so a burst of up to `confirm` noisy
    evaluations is never taken for the jump. Not converged when the rise is too small to be a jump,
    plateau - start < max(min_gain, min_headroom_fraction * (1 - start)) (the absolute floor keeps noise from
    counting near a high start; the relative one asks for a real share of what was left to learn), or when
    no crossing is confirmed before the run ends. Returns converged, step (int or None), start, plateau,
    threshold and a one-line reason.
    """
    x, y = _curve(steps, scores)
    if len(y) < max(2 * levels, confirm + 1):
        nan = float("nan")
        return _result(False, None, nan, nan, nan, f"too few evaluations ({len(y)}) to find a start and a plateau")
    start, plateau = y[:levels].mean(), y[-levels:].mean()
    gain, threshold = plateau - start, (start + plateau) / 2
    needed = max(min_gain, min_headroom_fraction * (1.0 - start))
    if gain < needed:
        return _result(False, None, start, plateau, threshold,
                       f"rise {gain:.3f} below the minimum {needed:.3f} (start {start:.3f}, plateau {plateau:.3f})")
    above = smooth(y, window) >= threshold
    for i in range(len(above) - confirm):
        if above[i : i + confirm + 1].all():
            return _result(True, x[i], start, plateau, threshold,
                           f"crossed {threshold:.3f} at step {int(x[i])} and stayed above for {confirm} evaluations")
    return _result(False, None, start, plateau, threshold,
                   f"never stayed above {threshold:.3f} for {confirm} further evaluations")


def mauc(steps: Sequence[float], scores: Sequence[float], max_step: float | None = None) -> float:
    """Mean area under the convergence curve: the trapezoid area of score over [steps[0], max_step], divided
    by that span, i.e. the time-averaged score (a constant curve c gives c, in the score's own units).

    For equal final fidelity, a run that rises earlier has more area: higher means faster convergence. Compare
    runs over one `max_step` (see common_max_step) and one evaluation start; a max_step between evaluations
    interpolates the curve linearly, and one beyond the last evaluation is an error (the curve is unknown there).
    """
    x, y = _curve(steps, scores)
    if len(x) == 0:
        raise ValueError("an empty curve has no area")
    end = x[-1] if max_step is None else float(max_step)
    if end > x[-1]:
        raise ValueError(f"max_step {end:g} is past the last evaluation ({x[-1]:g}); compare over a common range")
    if end < x[0]:
        raise ValueError(f"max_step {end:g} is before the first evaluation ({x[0]:g})")
    if end == x[0]:
        return float(y[0])
    keep = x < end
    xs = np.append(x[keep], end)
    ys = np.append(y[keep], np.interp(end, x, y))
    area = np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2)  # trapezoids
    return float(area / (end - xs[0]))


def common_max_step(*step_lists: Sequence[float]) -> float:
    """The last step every run reached: the range over which their mauc values compare."""
    if not step_lists or any(len(s) == 0 for s in step_lists):
        raise ValueError("every run needs at least one evaluation")
    return float(min(s[-1] for s in step_lists))
