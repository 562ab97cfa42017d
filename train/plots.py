"""plots of fidelity curves (PIL, no plotting library): one run's curves, as train.tracking writes them beside its
results, and a sweep's sizes overlaid, as train.report writes them"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

# tab10: distinguishable lines for up to 10 sizes, then it repeats
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def curves_of(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> curve (steps, scores, detection, mauc) of a run's results.json."""
    return (results.get("fidelity") or {}).get("curves") or {}


def nice_ticks(lo: float, hi: float, target: int = 5, integer: bool = False) -> list[float]:
    """About `target` round tick values (1, 2, 2.5 or 5 times a power of ten apart) within [lo, hi]."""
    raw = (hi - lo) / max(target - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    step = max(1.0, round(step)) if integer else step  # steps are whole numbers: no 2.5 between 2 and 3
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def plot_curves(curves: Sequence[tuple[str, Sequence[float], Sequence[float], float | None]], title: str,
                y_label: str, size: tuple[int, int] = (900, 540)) -> Image.Image:
    """A line plot: (legend label, steps, scores, convergence step or None) per curve; dashed verticals mark
    detected convergence. Scores of fidelity curves lie in [0, 1]; the y range widens if they do not."""
    width, height = size
    longest = max((len(label) for label, *_ in curves), default=10)
    left, right, top, bottom = 70, max(170, 7 * longest + 60), 40, 60  # margins: tick labels left, legend right
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    xs = [x for _, steps, _, _ in curves for x in steps] or [0.0, 1.0]
    ys = [y for _, _, scores, _ in curves for y in scores]
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_lo, y_hi = min([0.0, *ys]), max([1.0, *ys])

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * (width - left - right),
                height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom))

    for y in nice_ticks(y_lo, y_hi):  # grid and y tick labels
        _, py = px(x_lo, y)
        draw.line([(left, py), (width - right, py)], fill="#e5e5e5")
        draw.text((left - 8, py), f"{y:.2f}", fill="black", font=font, anchor="rm")
    for x in nice_ticks(x_lo, x_hi, integer=True):
        qx, _ = px(x, y_lo)
        draw.line([(qx, height - bottom), (qx, height - bottom + 4)], fill="black")
        draw.text((qx, height - bottom + 8), f"{x:g}", fill="black", font=font, anchor="mt")
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    draw.text(((left + width - right) / 2, height - 20), "step", fill="black", font=font, anchor="mm")
    draw.text((8, top - 22), y_label, fill="black", font=font)
    draw.text(((left + width - right) / 2, 12), title, fill="black", font=font, anchor="mt")
    for i, (label, steps, scores, converged_at) in enumerate(curves):
        color = PALETTE[i % len(PALETTE)]
        points = [px(x, y) for x, y in zip(steps, scores, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for qx, qy in points:
            draw.ellipse([qx - 3, qy - 3, qx + 3, qy + 3], fill=color)
        if converged_at is not None:
            cx, _ = px(converged_at, y_lo)
            for y0 in range(top, height - bottom, 8):  # dashed vertical
                draw.line([(cx, y0), (cx, min(y0 + 4, height - bottom))], fill=color)
        ly = top + 10 + 18 * i
        draw.line([(width - right + 15, ly), (width - right + 40, ly)], fill=color, width=3)
        draw.text((width - right + 46, ly), label, fill="black", font=font, anchor="lm")
    if any(c[3] is not None for c in curves):
        draw.text((width - right + 15, top + 10 + 18 * len(curves)), "dashed: convergence", fill="#555555",
                  font=font, anchor="lm")
    return image


def run_plot(results: dict[str, Any]) -> Image.Image:
    """One run's fidelity curves (every prompt mode and scale), detected convergence dashed."""
    primary = (results.get("fidelity") or {}).get("primary")
    curves = [(name.removeprefix("fidelity/") + (" (primary)" if name == primary else ""), c["steps"], c["scores"],
               c.get("step") if c.get("converged") else None) for name, c in curves_of(results).items()]
    config = results.get("config", {})
    return plot_curves(curves, f"condition fidelity: {config.get('run_name', '')}", primary or "fidelity",
                       size=(1000, 540))
