"""fidelity: agreement between an input condition map and the one the task's annotator finds on a generated image"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity

from annotate.base import Annotation, Annotator

EDGE_TASKS = ("canny", "hed", "scribble")

# task -> the one number a run is judged by; every primary is higher-is-better (depth: correlation, not error)
PRIMARY: dict[str, str] = {
    "canny": "edge_f1",
    "hed": "edge_f1",
    "scribble": "edge_f1",
    "midas": "depth_corr",
    "openpose": "pck",
}

Person = Sequence[Sequence[float] | None]  # 18 entries, [x/W, y/H] or None, as OpenPoseAnnotator records them


def to_gray(condition: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3) map -> (H, W) float64 in the map's own units (0..255 for uint8).

    Training reads single-channel conditions replicated to 3 channels, so the mean gives the map back.
    """
    array = np.asarray(condition, dtype=np.float64)
    if array.ndim == 3:
        array = array.mean(axis=-1)
    if array.ndim != 2:
        raise ValueError(f"expected an (H, W) or (H, W, C) map, got shape {np.shape(condition)}")
    return array


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"maps differ in size: {a.shape} vs {b.shape}")


# ------------------------------------------------------------------------------------------------- edges


def _within(edges: np.ndarray, reference: np.ndarray, tolerance: int) -> np.ndarray:
    """Which `edges` pixels have a `reference` edge in the (2t+1)^2 square around them (chessboard distance,
    so a 1-px diagonal shift is within tolerance 1, as a 1-px horizontal one is)."""
    if tolerance > 0:
        kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
        reference = cv2.dilate(reference.astype(np.uint8), kernel).astype(bool)
    return edges & reference


def edge_f1(pred: np.ndarray, target: np.ndarray, tolerance: int = 1) -> dict[str, float]:
    """Edge precision, recall and F1 with a pixel tolerance; maps are binarised at > 127.

    precision: fraction of predicted edge pixels with a target edge within `tolerance` px; recall: the same
    the other way round. Matching is not one-to-one (a thick predicted edge along a thin target edge is all
    "correct"; recall still catches what it misses). tolerance=0 is the plain pixelwise F1.
    Degenerate cases: both maps empty -> 1.0 everywhere (nothing to draw, nothing drawn); exactly one empty ->
    0.0 everywhere (sklearn's zero_division=0), so a blank generation never scores by default.
    """
    p, t = to_gray(pred) > 127, to_gray(target) > 127
    _same_shape(p, t)
    n_pred, n_target = int(p.sum()), int(t.sum())
    if n_pred == 0 and n_target == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    if n_pred == 0 or n_target == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    precision = _within(p, t, tolerance).sum() / n_pred
    recall = _within(t, p, tolerance).sum() / n_target
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two uint8 maps (data_range 255), in [-1, 1]; 1 for identical maps.

    A secondary metric: on sparse edge maps the shared black background dominates (a blank map still scores
    ~0.6 against a Canny map of two shapes), which is why edge F1 is the primary one.
    """
    x, y = to_gray(a), to_gray(b)
    _same_shape(x, y)
    side = min(x.shape)
    win = min(7, side if side % 2 else side - 1)  # skimage's default 7, shrunk (odd) for maps under 7 px
    if win < 3:
        raise ValueError(f"maps of shape {x.shape} are too small for SSIM")
    return float(structural_similarity(x, y, data_range=255.0, win_size=win))


# ------------------------------------------------------------------------------------------------- depth


def _unit_range(depth: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map (no depth information) becomes zeros, as depth_to_map does."""
    depth = to_gray(depth)
    span = depth.max() - depth.min()
    return np.zeros_like(depth) if span <= 1e-12 else (depth - depth.min()) / span


def scale_shift_invariant_error(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean |s * pred + t - target| after the least-squares (s, t), both maps min-max normalised to [0, 1].

    MiDaS depth is relative (inverse depth up to an unknown scale and shift), so only the fitted residual
    means anything. The scale is kept >= 0, so an inverted map scores like an uninformative one rather than
    perfectly. 0 is a perfect match; unrelated maps score around the target's mean absolute deviation.
    Lower is better.
    """
    p, t = _unit_range(pred), _unit_range(target)
    _same_shape(p, t)
    design = np.stack([p.ravel(), np.ones(p.size)], axis=1)  # (HW, 2): columns for s and t
    (scale, shift), *_ = np.linalg.lstsq(design, t.ravel(), rcond=None)
    if scale < 0:  # near and far swapped is wrong, not a match: the best s >= 0 is then s = 0, t = mean
        scale, shift = 0.0, t.mean()
    return float(np.abs(scale * p + shift - t).mean())


def depth_correlation(pred: np.ndarray, target: np.ndarray) -> float:
    """Pearson correlation of two depth maps (invariant to scale and shift, like the error above).

    Correlation is undefined for a constant map: both constant -> 1.0 (they agree), one constant -> 0.0.
    """
    p, t = to_gray(pred).ravel(), to_gray(target).ravel()
    _same_shape(p, t)
    flat_p, flat_t = np.ptp(p) <= 1e-12, np.ptp(t) <= 1e-12
    if flat_p or flat_t:
        return 1.0 if flat_p and flat_t else 0.0
    return float(np.corrcoef(p, t)[0, 1])


# -------------------------------------------------------------------------------------------------- pose


def _person_array(person: Person) -> np.ndarray:
    """18 entries [x, y] or None -> (18, 2) float with NaN for missing keypoints."""
    return np.array([[np.nan, np.nan] if kp is None else kp[:2] for kp in person], dtype=np.float64).reshape(-1, 2)


def pck(pred_people: Sequence[Person], target_people: Sequence[Person], threshold: float = 0.1) -> float:
    """Percentage of correct keypoints: the fraction of target keypoints whose predicted keypoint lies within
    `threshold` (Euclidean, in normalised image units, i.e. a fraction of the image side) of it.

    People are matched one-to-one (Hungarian, maximising correct keypoints), so one predicted person cannot
    stand in for two targets; unmatched target people and keypoints missing from the prediction count as
    wrong, and predicted keypoints absent from the target are ignored (PCK is recall-like).
    No target keypoint at all: 1.0 if the prediction has none either, else 0.0.
    """
    targets = [_person_array(p) for p in target_people]
    preds = [_person_array(p) for p in pred_people]
    total = sum(int((~np.isnan(t[:, 0])).sum()) for t in targets)
    if total == 0:
        return 1.0 if all(np.isnan(p).all() for p in preds) else 0.0
    if not preds:
        return 0.0
    correct = np.zeros((len(targets), len(preds)))  # (T, P) correct keypoints per pairing
    for i, t in enumerate(targets):
        for j, p in enumerate(preds):
            distance = np.linalg.norm(p - t, axis=1)  # NaN where either side is missing -> not correct
            correct[i, j] = np.sum(distance <= threshold)
    rows, cols = linear_sum_assignment(correct, maximize=True)
    return float(correct[rows, cols].sum() / total)


# ----------------------------------------------------------------------------------------------- batches


def _keypoints(params: Sequence[dict[str, Any]] | None, side: str) -> list[list[Person]]:
    if params is None:
        raise ValueError(f"openpose fidelity needs {side} (Annotation.params with 'keypoints')")
    return [p.get("keypoints", []) for p in params]


def score_maps(
    task: str,
    generated_conditions: Sequence[np.ndarray],
    input_conditions: Sequence[np.ndarray],
    params_generated: Sequence[dict[str, Any]] | None = None,
    params_input: Sequence[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Batch means of the task's fidelity metrics between re-annotated and input conditions.

    canny/hed/scribble: edge_f1, edge_precision, edge_recall (1 px tolerance), ssim; midas: depth_si_error
    (lower is better), depth_corr; openpose: pck, from the keypoints in the annotators' params (the input's
    from the sample's json, the generated image's from the annotator run on it).
    The metrics compare condition maps only, never colours: a sample generated from the empty prompt, whose
    colours are random by design, is not penalised for them.
    """
    if len(generated_conditions) != len(input_conditions):
        raise ValueError(f"{len(generated_conditions)} generated conditions but {len(input_conditions)} inputs")
    if not len(input_conditions):
        raise ValueError("no conditions to score")
    rows: list[dict[str, float]] = []
    if task in EDGE_TASKS:
        for gen, ref in zip(generated_conditions, input_conditions, strict=True):
            edges = edge_f1(gen, ref)
            rows.append({
                "edge_f1": edges["f1"], "edge_precision": edges["precision"], "edge_recall": edges["recall"],
                "ssim": ssim(gen, ref),
            })
    elif task == "midas":
        for gen, ref in zip(generated_conditions, input_conditions, strict=True):
            rows.append({
                "depth_si_error": scale_shift_invariant_error(gen, ref), "depth_corr": depth_correlation(gen, ref),
            })
    elif task == "openpose":
        generated = _keypoints(params_generated, "params_generated")
        given = _keypoints(params_input, "params_input")
        if len(generated) != len(given) or len(given) != len(input_conditions):
            raise ValueError("openpose params must come one per condition")
        rows = [{"pck": pck(gen, ref)} for gen, ref in zip(generated, given, strict=True)]
    else:
        raise ValueError(f"no fidelity metric for task {task!r}; choose one of {', '.join(sorted(PRIMARY))}")
    return {name: float(np.mean([row[name] for row in rows])) for name in rows[0]}


def score_images(
    task: str,
    annotator: Annotator,
    images: Sequence[np.ndarray],
    input_conditions: Sequence[np.ndarray],
    keys: Sequence[str],
    params_input: Sequence[dict[str, Any]] | None = None,
) -> tuple[dict[str, float], list[Annotation]]:
    """Re-annotate generated (N, H, W, 3) uint8 images and score them; the annotations come back for grids.

    Pass the validation samples' own keys: Canny then redraws the thresholds it used for each input map.
    """
    annotations = annotator(list(images), list(keys))
    maps = [a.condition if a.condition is not None else np.zeros(images[i].shape[:2], np.uint8)
            for i, a in enumerate(annotations)]
    scores = score_maps(task, maps, input_conditions, [a.params for a in annotations], params_input)
    return scores, annotations
