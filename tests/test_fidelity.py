"""condition-fidelity metrics on known answers, with the real Canny annotator on synthetic shape images"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from annotate import build_annotator
from train.fidelity import (
    PRIMARY,
    depth_correlation,
    edge_f1,
    pck,
    scale_shift_invariant_error,
    score_images,
    score_maps,
    ssim,
)

SIDE = 64


def shapes(colour=(255, 0, 0), background=(255, 255, 255), dx: int = 0, dy: int = 0) -> np.ndarray:
    """(SIDE, SIDE, 3) uint8: a filled rectangle and disc, offset by (dx, dy), well inside the border."""
    image = np.full((SIDE, SIDE, 3), background, np.uint8)
    cv2.rectangle(image, (12 + dx, 14 + dy), (40 + dx, 36 + dy), colour, -1)
    cv2.circle(image, (46 + dx, 46 + dy), 10, colour, -1)
    return image


@pytest.fixture(scope="module")
def canny():
    return build_annotator("canny", seed=0)


@pytest.fixture(scope="module")
def edges(canny) -> np.ndarray:
    return canny([shapes()], ["a"])[0].condition


def random_edges(seed: int = 0, density: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(rng.random((SIDE, SIDE)) < density, 255, 0).astype(np.uint8)


# ------------------------------------------------------------------------------------------------- edges


def test_identical_edges_score_one(edges):
    assert edge_f1(edges, edges) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert edge_f1(edges, edges, tolerance=0)["f1"] == 1.0


@pytest.mark.parametrize("dx, dy", [(1, 0), (0, -1), (1, 1)])
def test_one_pixel_shift_is_within_tolerance_one(edges, dx, dy):
    shifted = np.roll(edges, (dy, dx), axis=(0, 1))
    assert edge_f1(shifted, edges, tolerance=1)["f1"] == 1.0
    assert edge_f1(shifted, edges, tolerance=0)["f1"] < 0.6


def test_shifted_random_and_blank_maps_score_lower_in_order(canny, edges):
    shifted = canny([shapes(dx=3)], ["a"])[0].condition
    f1 = [edge_f1(m, edges)["f1"] for m in (edges, shifted, random_edges(), np.zeros_like(edges))]
    assert f1[0] == 1.0 > f1[1] > f1[2] > f1[3] == 0.0


def test_edge_degenerate_cases(edges):
    blank = np.zeros_like(edges)
    assert edge_f1(blank, blank) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert edge_f1(blank, edges) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert edge_f1(edges, blank) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_edge_maps_binarise_above_127_and_accept_three_channels(edges):
    faint = np.where(edges > 0, 127, 0).astype(np.uint8)  # not an edge at all
    assert edge_f1(faint, edges)["f1"] == 0.0
    assert edge_f1(np.repeat(edges[..., None], 3, axis=-1), edges)["f1"] == 1.0
    with pytest.raises(ValueError, match="differ in size"):
        edge_f1(edges[:-1], edges)


def test_precision_and_recall_are_not_swapped(edges):
    half = edges.copy()
    half[:, SIDE // 2 :] = 0  # predicts only edges that exist: precise, but misses some
    scores = edge_f1(half, edges)
    assert scores["precision"] == 1.0 and scores["recall"] < 1.0


def test_ssim_bounds_and_order(edges):
    assert ssim(edges, edges) == pytest.approx(1.0)
    inverted = 255 - edges
    for other in (random_edges(), np.zeros_like(edges), inverted):
        assert -1.0 <= ssim(other, edges) < 1.0
    assert ssim(inverted, edges) < 0 < ssim(random_edges(), edges) < 1.0


# ------------------------------------------------------------------------------------------------- depth


def depth_map() -> np.ndarray:
    """(SIDE, SIDE) float depth: a tilted plane with a bump."""
    y, x = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    return 0.6 * y + 0.4 * np.exp(-((x - 0.5) ** 2 + (y - 0.4) ** 2) / 0.02)


def test_affine_depth_matches_exactly():
    depth = depth_map()
    assert scale_shift_invariant_error(3.0 * depth + 7.0, depth) == pytest.approx(0.0, abs=1e-9)
    assert depth_correlation(3.0 * depth + 7.0, depth) == pytest.approx(1.0)
    as_map = (depth / depth.max() * 255).astype(np.uint8)  # the uint8 maps the annotator writes
    assert scale_shift_invariant_error((as_map // 2 + 60).astype(np.uint8), as_map) < 0.01
    assert depth_correlation((as_map // 2 + 60).astype(np.uint8), as_map) > 0.999


def test_noise_lowers_depth_agreement_in_order():
    depth, rng = depth_map(), np.random.default_rng(0)
    corr, err = [], []
    for sigma in (0.0, 0.05, 0.2, 1.0):
        noisy = depth + rng.normal(0, sigma, depth.shape)
        corr.append(depth_correlation(noisy, depth))
        err.append(scale_shift_invariant_error(noisy, depth))
    assert corr == sorted(corr, reverse=True) and corr[0] == pytest.approx(1.0) and corr[-1] < 0.5
    assert err == sorted(err) and err[0] == pytest.approx(0.0, abs=1e-9)


def test_inverted_or_flat_depth_is_no_match():
    depth = depth_map()
    flat = np.zeros_like(depth)
    assert depth_correlation(-depth, depth) == pytest.approx(-1.0)
    # near and far swapped must not fit by a negative scale: it scores like a map without information
    assert scale_shift_invariant_error(-depth, depth) == pytest.approx(scale_shift_invariant_error(flat, depth))
    assert scale_shift_invariant_error(flat, depth) > 0.1
    assert depth_correlation(flat, depth) == 0.0 and depth_correlation(flat, flat) == 1.0


# -------------------------------------------------------------------------------------------------- pose


def person(offset: float = 0.0, missing: tuple[int, ...] = ()) -> list[list[float] | None]:
    """18 keypoints on a diagonal, shifted by `offset` in x, None at `missing`."""
    return [None if k in missing else [0.2 + 0.03 * k + offset, 0.1 + 0.04 * k] for k in range(18)]


def test_pck_identical_and_shifted_people():
    assert pck([person()], [person()]) == 1.0
    assert pck([person(0.05)], [person()]) == 1.0  # within 0.1 of the image side
    assert pck([person(0.2)], [person()]) == 0.0
    assert pck([person(0.2)], [person()], threshold=0.25) == 1.0


def test_pck_missing_keypoints():
    # target keypoints missing: only the 14 present ones count
    assert pck([person()], [person(missing=(0, 1, 2, 3))]) == 1.0
    # predicted keypoints missing: those targets are wrong
    assert pck([person(missing=(0, 1, 2, 3))], [person()]) == pytest.approx(14 / 18)
    # nobody found, or nobody to find
    assert pck([], [person()]) == 0.0
    assert pck([], []) == 1.0
    assert pck([person(missing=tuple(range(18)))], []) == 1.0
    assert pck([person()], []) == 0.0


def test_pck_matches_people_one_to_one():
    a, b = person(), person(0.5)
    assert pck([b, a], [a, b]) == 1.0  # order does not matter
    assert pck([a], [a, b]) == 0.5  # one predicted person cannot stand in for two targets
    assert pck([a, b, person(0.25)], [a]) == 1.0  # extra predicted people are not penalised (recall-like)


# ----------------------------------------------------------------------------------------------- batches


def test_primary_metric_is_in_every_task_score():
    assert set(PRIMARY) == {"canny", "hed", "scribble", "midas", "openpose"}
    assert PRIMARY["midas"] == "depth_corr"


def test_score_maps_canny_with_the_real_annotator(canny):
    keys = ["s0", "s1", "s2"]
    inputs = [a.condition for a in canny([shapes(dx=d) for d in (0, 4, -4)], keys)]
    same, _ = score_images("canny", canny, [shapes(dx=d) for d in (0, 4, -4)], inputs, keys)
    assert same == {"edge_f1": 1.0, "edge_precision": 1.0, "edge_recall": 1.0, "ssim": pytest.approx(1.0)}
    moved, annotations = score_images("canny", canny, [shapes(dx=d, dy=3) for d in (3, 7, -1)], inputs, keys)
    blank, _ = score_images("canny", canny, [np.full((SIDE, SIDE, 3), 128, np.uint8)] * 3, inputs, keys)
    assert len(annotations) == 3 and annotations[0].condition.shape == (SIDE, SIDE)
    assert 1.0 > moved["edge_f1"] > blank["edge_f1"] == 0.0
    assert set(same) >= {PRIMARY["canny"]}


def test_score_maps_is_colour_free(canny):
    """Empty-prompt samples have random colours: the same shapes in other colours score as well."""
    keys = ["s0", "s1"]
    inputs = [a.condition for a in canny([shapes(), shapes(dx=5)], keys)]
    recoloured = [shapes((0, 0, 255), (0, 255, 0)), shapes((40, 40, 40), (250, 250, 0), dx=5)]
    scores, _ = score_images("canny", canny, recoloured, inputs, keys)
    assert scores["edge_f1"] >= 0.95


@pytest.mark.parametrize("task", ["hed", "scribble"])
def test_score_maps_edge_tasks(task, edges):
    same = score_maps(task, [edges, edges], [edges, edges])
    worse = score_maps(task, [random_edges(1), np.zeros_like(edges)], [edges, edges])
    assert same["edge_f1"] == 1.0 and same["ssim"] == pytest.approx(1.0)
    assert worse["edge_f1"] < 0.3 and worse["ssim"] < 1.0
    assert set(same) == {"edge_f1", "edge_precision", "edge_recall", "ssim"}


def test_score_maps_midas():
    depth = depth_map()
    as_map = (depth / depth.max() * 255).astype(np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, as_map.shape, dtype=np.uint8)
    same = score_maps("midas", [as_map, as_map], [as_map, as_map])
    mixed = score_maps("midas", [as_map, noise], [as_map, as_map])
    assert same == {"depth_si_error": pytest.approx(0.0, abs=1e-9), "depth_corr": pytest.approx(1.0)}
    assert mixed["depth_corr"] < 0.6 and mixed["depth_si_error"] > same["depth_si_error"]


def test_score_maps_openpose_uses_keypoints():
    skeleton = np.zeros((SIDE, SIDE, 3), np.uint8)  # the drawings are not compared, the keypoints are
    given = [{"keypoints": [person()]}, {"keypoints": [person()]}]
    generated = [{"keypoints": [person()]}, {"keypoints": [person(0.3)]}]
    assert score_maps("openpose", [skeleton] * 2, [skeleton] * 2, generated, given) == {"pck": 0.5}
    with pytest.raises(ValueError, match="params_input"):
        score_maps("openpose", [skeleton], [skeleton], generated[:1], None)


def test_score_maps_rejects_bad_batches(edges):
    with pytest.raises(ValueError, match="no fidelity metric"):
        score_maps("blip", [edges], [edges])
    with pytest.raises(ValueError, match="1 generated conditions but 2"):
        score_maps("canny", [edges], [edges, edges])
