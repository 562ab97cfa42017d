"""synthesised scribbles: per-sample randomness keyed by (seed, key), recorded, on tiny HED weights"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from annotate import build_annotator
from annotate.canny import sample_rng
from annotate.scribble import MORPH_OPS, ScribbleAnnotator, drop_strokes, morph, nms, thicken
from tests.tiny_weights.hed import write_tiny_hed

RANDOM_PARAMS = {"threshold", "drop_fraction", "morph_op", "morph_kernel"}


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 RGB: a rectangle and a disc on a noisy background, so edges exist."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), rng.integers(150, 230), np.uint8)
    cv2.rectangle(image, (width // 8, height // 8), (width // 2, height // 2), (30, 80, 160), -1)
    cv2.circle(image, (2 * width // 3, 2 * height // 3), min(height, width) // 4, (250, 30, 30), -1)
    return (image + rng.integers(0, 25, image.shape)).clip(0, 255).astype(np.uint8)


def three_strokes(size: int = 64) -> np.ndarray:
    """(size, size) {0, 255} with three separate horizontal bars."""
    strokes = np.zeros((size, size), np.uint8)
    for row in (10, 30, 50):
        strokes[row : row + 4, 8:56] = 255
    return strokes


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hed_weights")
    write_tiny_hed(folder)
    return folder


@pytest.fixture(scope="module")
def scribble(weights_dir: Path) -> ScribbleAnnotator:
    return ScribbleAnnotator(seed=7, weights=str(weights_dir), device="cpu", detect_resolution=64)


def test_nms_thins_a_soft_line_to_its_ridge() -> None:
    rows, cols = np.mgrid[0:40, 0:40].astype(np.float32)
    # a 5 px wide vertical edge, slightly brighter downwards: the reference nms keeps a pixel that is the
    # max along ANY of its 4 directions, so a perfectly constant line would survive at full width
    soft = 200 * np.exp(-((cols - 20) ** 2) / 8) * (1 + rows / 400)
    ridge = nms(soft, threshold=50, sigma=1.0)
    assert set(np.unique(ridge)) == {0, 255}
    assert np.array_equal(np.flatnonzero(ridge[5:35].any(axis=0)), [20])  # thinned to the centre column
    assert nms(soft, threshold=250, sigma=1.0).max() == 0  # above the peak: nothing survives


def test_thicken_widens_ridges() -> None:
    ridge = np.zeros((40, 40), np.uint8)
    ridge[:, 20] = 255
    assert (thicken(ridge, 3.0) > 0).sum() > 3 * (ridge > 0).sum()


def test_drop_strokes_erases_whole_components() -> None:
    strokes = three_strokes()
    kept, n, dropped = drop_strokes(strokes, 0.0, np.random.default_rng(0))
    assert (n, dropped) == (3, 0) and np.array_equal(kept, strokes)
    kept, n, dropped = drop_strokes(strokes, 1 / 3, np.random.default_rng(0))
    assert (n, dropped) == (3, 1)
    assert cv2.connectedComponents(kept, connectivity=8)[0] - 1 == 2
    assert (kept > 0).sum() == 2 * (strokes > 0).sum() // 3  # a whole bar went, nothing else
    assert drop_strokes(strokes, 1.0, np.random.default_rng(0))[0].max() == 0


def test_morph_ops() -> None:
    strokes = three_strokes()
    area = (strokes > 0).sum()
    assert (morph(strokes, "dilate", 3) > 0).sum() > area > (morph(strokes, "erode", 3) > 0).sum()
    assert morph(strokes, "none", 5) is strokes
    with pytest.raises(ValueError, match="unknown morphological op"):
        morph(strokes, "open", 3)


def test_shapes_values_and_recorded_params(scribble: ScribbleAnnotator) -> None:
    images = [synthetic_image(64, 64), synthetic_image(72, 100, seed=1)]
    out = scribble(images, ["a", "b"])
    assert [a.condition.shape for a in out] == [(64, 64), (72, 100)]
    for a in out:
        assert a.condition.dtype == np.uint8 and a.keep
        assert set(np.unique(a.condition)) <= {0, 255}
        assert RANDOM_PARAMS | {"n_strokes", "n_dropped", "detect_resolution"} == set(a.params)
        lo, hi = scribble.threshold_range
        assert lo <= a.params["threshold"] <= hi
        assert 0.0 <= a.params["drop_fraction"] <= scribble.max_drop
        assert a.params["morph_op"] in MORPH_OPS and a.params["morph_kernel"] in scribble.morph_kernels
        json.dumps(a.params)  # goes into the sample's json as is


def test_same_seed_and_key_same_map_and_params(scribble: ScribbleAnnotator, weights_dir: Path) -> None:
    image = synthetic_image(64, 96)
    first = scribble([image], ["sample-1"])[0]
    again = ScribbleAnnotator(seed=7, weights=str(weights_dir), device="cpu", detect_resolution=64)(
        [image], ["sample-1"])[0]
    np.testing.assert_array_equal(first.condition, again.condition)
    assert first.params == again.params


def test_different_keys_or_seeds_draw_different_params(scribble: ScribbleAnnotator) -> None:
    image = synthetic_image(64, 64)
    params = [scribble([image], [key])[0].params for key in ("a", "b", "c", "d")]
    random_parts = {tuple(p[k] for k in sorted(RANDOM_PARAMS)) for p in params}
    assert len(random_parts) == 4
    assert sample_rng(7, "a").random() != sample_rng(8, "a").random()


def test_batched_equals_one_at_a_time(scribble: ScribbleAnnotator) -> None:
    images = [synthetic_image(64, 64, seed=s) for s in range(3)]
    keys = ["x", "y", "z"]
    batched = scribble(images, keys)
    for a, image, key in zip(batched, images, keys, strict=True):
        single = scribble([image], [key])[0]
        assert {k: a.params[k] for k in RANDOM_PARAMS} == {k: single.params[k] for k in RANDOM_PARAMS}
        assert (a.condition != single.condition).mean() < 0.01  # HED may differ by 1 level across batches


def test_describe_and_registry(scribble: ScribbleAnnotator, weights_dir: Path) -> None:
    described = scribble.describe()
    assert described["name"] == "scribble"
    assert described["weights"] == scribble.hed.describe()["weights"]
    assert len(described["weights"]["ControlNetHED.pth"]) == 64
    built = build_annotator("scribble", weights=str(weights_dir), device="cpu")
    assert isinstance(built, ScribbleAnnotator) and (built.name, built.channels) == ("scribble", 1)
