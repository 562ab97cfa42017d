"""OpenPose: decoding synthetic maps, the 30% rule, the reference drawing, the real loader on tiny weights"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from annotate import build_annotator
from annotate.device import inference, precision
from annotate.openpose import (
    COLORS,
    LIMBS,
    PAF_CHANNELS,
    WEIGHT_FILE,
    OpenPoseAnnotator,
    decode_peaks,
    decode_pose,
    draw_skeleton,
    keypoint_fraction,
    load_body_pose_net,
    min_keypoints,
    pose_annotation,
    published_key,
    smoothed_where_peaks_can_be,
)
from annotate.weights import MissingWeightsError
from tests.tiny_weights.openpose import write_tiny_openpose

# A full 18-keypoint standing person, pixel (x, y), in KEYPOINT_NAMES order; 24 x 110 px, limbs <= 18 px.
PERSON = np.array(
    [
        [30, 20], [30, 35], [18, 36], [14, 52], [12, 66], [42, 36], [46, 52], [48, 66], [24, 70],
        [23, 88], [22, 106], [36, 70], [37, 88], [38, 106], [27, 16], [33, 16], [23, 18], [37, 18],
    ],
    np.float64,
)  # fmt: skip


def skeleton(parts: list[int], dx: float = 0.0) -> np.ndarray:
    """(18, 2) keypoints of PERSON shifted by dx, with only `parts` present (NaN elsewhere)."""
    xy = np.full((18, 2), np.nan)
    xy[parts] = PERSON[parts] + [dx, 0]
    return xy


def synthetic_maps(people: list[np.ndarray], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Ideal network output at image size: Gaussian blobs at the keypoints (H, W, 19) and unit vectors
    along each limb within 2 px of its segment (H, W, 38)."""
    ys, xs = np.mgrid[:height, :width].astype(np.float64)
    heat = np.zeros((height, width, 19), np.float32)
    paf = np.zeros((height, width, 38), np.float32)
    for xy in people:
        for part, (x, y) in enumerate(xy):
            if not np.isnan(x):
                blob = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 2.0**2))
                heat[..., part] = np.maximum(heat[..., part], blob)
        for (a, b), (cx, cy) in zip(LIMBS, PAF_CHANNELS, strict=True):
            if np.isnan(xy[[a, b]]).any():
                continue
            vec = xy[b] - xy[a]
            length = np.hypot(*vec)
            unit = vec / length
            along = (xs - xy[a, 0]) * unit[0] + (ys - xy[a, 1]) * unit[1]
            across = np.abs((xs - xy[a, 0]) * unit[1] - (ys - xy[a, 1]) * unit[0])
            on_limb = (along >= -1) & (along <= length + 1) & (across <= 2)
            paf[on_limb, cx], paf[on_limb, cy] = unit
    return heat, paf


def by_nose_x(people: list[np.ndarray]) -> list[np.ndarray]:
    return sorted(people, key=lambda xy: np.nanmin(xy[:, 0]))


# ------------------------------------------------------------------------------------------- decoding


def test_decode_one_person_gives_its_keypoints_back():
    person = skeleton(list(range(18)))
    people = decode_pose(*synthetic_maps([person], 128, 96))
    assert len(people) == 1
    np.testing.assert_array_equal(people[0], person)


def test_decode_two_people_gives_each_back():
    full = skeleton(list(range(18)))
    partial = skeleton([0, 1, 2, 3, 4, 5, 8, 9, 10, 14], dx=100)  # 10 keypoints: no left arm, leg, ears
    people = by_nose_x(decode_pose(*synthetic_maps([full, partial], 128, 192)))
    assert len(people) == 2
    np.testing.assert_array_equal(people[0], full)
    np.testing.assert_array_equal(people[1], partial)


def test_decode_empty_maps_gives_nobody():
    assert decode_pose(np.zeros((64, 64, 19), np.float32), np.zeros((64, 64, 38), np.float32)) == []


def whole_map_peaks(heatmaps: np.ndarray, thre1: float = 0.1, sigma: float = 3.0) -> list[np.ndarray]:
    """The reference's peak finding, written plainly: every map smoothed whole (float64, scipy's gaussian_filter),
    local maxima >= their 4 neighbours (zeros outside) above thre1, listed row-major, ids over all parts."""
    from scipy.ndimage import gaussian_filter

    peaks, next_id = [], 0
    for part in range(18):
        raw = heatmaps[:, :, part].astype(np.float64)
        smooth = gaussian_filter(raw, sigma)
        padded = np.pad(smooth, 1)
        is_peak = ((smooth >= padded[:-2, 1:-1]) & (smooth >= padded[2:, 1:-1]) & (smooth >= padded[1:-1, :-2])
                   & (smooth >= padded[1:-1, 2:]) & (smooth > thre1))
        ys, xs = np.nonzero(is_peak)
        peaks.append(np.stack([xs, ys, raw[ys, xs], np.arange(next_id, next_id + len(xs))], axis=1).astype(float))
        next_id += len(xs)
    return peaks


def blob_maps(rng: np.random.Generator, height: int, width: int, blobs: int, noise: float) -> np.ndarray:
    """Keypoint-like maps: Gaussian blobs of random size and height (some on the edges, some at the threshold),
    on noise that may be negative, as a network's output."""
    heat = (rng.random((height, width, 19)) - 0.3) * noise
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(blobs):
        part, size = rng.integers(0, 18), rng.uniform(1.5, 12)
        cy, cx = rng.choice([rng.uniform(0, height), rng.choice([0, height - 1])]), rng.uniform(-5, width + 5)
        peak = rng.choice([rng.uniform(0.05, 1.0), 0.1, 0.1000001])
        heat[:, :, part] += peak * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * size**2))
    heat[:, :, 12][:5, :5] = 0.1  # a plateau at the threshold, in a corner
    return heat.astype(np.float32)


@pytest.mark.parametrize("seed", range(6))
def test_peaks_found_in_windows_are_those_of_the_whole_maps_bit_for_bit(seed):
    """decode_peaks smooths only windows around values above thre1 (most of OpenPose's time went to smoothing 18
    whole maps): its peaks, scores and ids must be the whole maps' exactly, on sparse blobs (windows), on dense
    noise (one call per map), at sizes off the window grid, with blobs on the edges and at the threshold."""
    rng = np.random.default_rng(seed)
    height, width = [(64, 64), (97, 131), (250, 171), (512, 683), (40, 300), (123, 77)][seed]
    for blobs, noise in ((0, 0.05), (3, 0.02), (25, 0.05), (8, 0.3)):
        maps = blob_maps(rng, height, width, blobs, noise)
        found, expected = decode_peaks(maps), whole_map_peaks(maps)
        assert len(found) == len(expected) == 18
        for part, (f, e) in enumerate(zip(found, expected, strict=True)):
            assert f.dtype == e.dtype and np.array_equal(f, e), (part, blobs, noise, f[:5], e[:5])
    assert sum(len(p) for p in found), "the last maps had peaks, so the comparison is not of empty lists"


@pytest.mark.parametrize("spike_x", [40, 43, 47])  # at the start, inside and at the end of a cell of the window grid
def test_windowed_smoothing_equals_the_whole_maps_wherever_a_peak_can_be(spike_x):
    """The hardest case for the windows' margins: a plateau just under thre1 (and under the margin that makes a
    value count as above it), with noise so that no reflection can stand in for a value, lifted above thre1 by a
    spike up to ~11 px away. Wherever the whole map's smoothing exceeds thre1, and at those pixels' 4 neighbours,
    the windowed values must be the whole map's, bit for bit."""
    from scipy.ndimage import binary_dilation, gaussian_filter

    rng = np.random.default_rng(spike_x)
    heatmap = (0.1 * (1 - 1.2e-4) + rng.uniform(-1e-7, 1e-7, (192, 256))).astype(np.float32)
    heatmap[96, spike_x] = 1.0
    heatmap[9, 250] = 0.4  # another blob, near an edge
    heatmap[162:192, 2:32] = 0.100005  # a patch a hair above thre1, at the bottom edge: its own window
    whole = gaussian_filter(heatmap.astype(np.float64), 3.0)
    can_be_a_peak = binary_dilation(whole > 0.1)  # (4-connected: the neighbours local_maxima_above compares)
    assert can_be_a_peak.sum() > 300  # the plateau's lift reaches far from the spikes
    windowed = smoothed_where_peaks_can_be(heatmap, 0.1, 3.0)
    assert np.array_equal(windowed[can_be_a_peak], whole[can_be_a_peak])
    assert windowed.sum() < whole.sum() / 2  # windows, not one call on the whole map


# -------------------------------------------------------------------------------------------- 30% rule


def test_min_keypoints_at_the_boundary():
    assert min_keypoints(0.3) == 6  # 30% of 18 = 5.4
    assert min_keypoints(1 / 3) == 6  # exactly 6.0, not 7
    assert keypoint_fraction(skeleton([0, 1, 2, 3, 5])) == 5 / 18


@pytest.mark.parametrize(("parts", "keep"), [([0, 1, 2, 3, 5], False), ([0, 1, 2, 3, 5, 6], True)])
def test_thirty_percent_rule_at_its_boundary(parts, keep):
    height, width = 128, 96
    person = skeleton(parts)
    people = decode_pose(*synthetic_maps([person], height, width))
    ann = pose_annotation(people, height, width, min_fraction=0.3)
    assert ann.keep is keep
    n = len(parts)
    assert ann.reason == ("" if keep else f"no person with >= 30% of 18 keypoints (best {n}/18)")
    assert ann.params["keypoint_fraction"] == n / 18
    assert ann.params["num_keypoints"] == n
    assert ann.params["num_people"] == 1
    expected = [None if np.isnan(x) else [round(x / width, 5), round(y / height, 5)] for x, y in person]
    assert ann.params["keypoints"] == [expected]
    json.dumps(ann.params)  # goes into the sample's json as is


def test_nobody_is_filtered_with_best_zero():
    ann = pose_annotation([], 64, 64)
    assert (ann.keep, ann.reason) == (False, "no person with >= 30% of 18 keypoints (best 0/18)")
    assert ann.params["num_people"] == 0 and ann.params["keypoint_fraction"] == 0.0
    assert ann.condition.shape == (64, 64, 3) and not ann.condition.any()


def test_best_person_decides():
    small, big = skeleton([0, 1, 2, 5]), skeleton([0, 1, 2, 3, 5, 6, 14], dx=60)
    ann = pose_annotation([small, big], 128, 128)
    assert ann.keep and ann.params["keypoint_fraction"] == 7 / 18 and ann.params["num_people"] == 2


# --------------------------------------------------------------------------------------------- drawing


def far_from(points: list[tuple[float, float]], segments, shape, margin: float) -> np.ndarray:
    """Mask of pixels farther than margin from every point and segment."""
    ys, xs = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    near = np.zeros(shape, bool)
    for x, y in points:
        near |= np.hypot(xs - x, ys - y) <= margin
    for (x0, y0), (x1, y1) in segments:
        t = np.clip(((xs - x0) * (x1 - x0) + (ys - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2), 0, 1)
        near |= np.hypot(xs - (x0 + t * (x1 - x0)), ys - (y0 + t * (y1 - y0))) <= margin
    return ~near


def test_isolated_keypoints_are_discs_of_their_reference_colour():
    person = np.full((18, 2), np.nan)
    person[0], person[4] = (20, 20), (60, 40)  # nose and right wrist: no limb joins them
    canvas = draw_skeleton([person], 64, 80)
    assert canvas.shape == (64, 80, 3) and canvas.dtype == np.uint8
    for part, (x, y) in ((0, (20, 20)), (4, (60, 40))):
        for dx, dy in ((0, 0), (3, 0), (0, -3), (2, 2)):  # inside the radius-4 disc
            assert tuple(canvas[y + dy, x + dx]) == COLORS[part]
    assert not canvas[far_from([(20, 20), (60, 40)], [], (64, 80), 5.0)].any()


def blend(under: tuple[int, ...], over: tuple[int, ...]) -> tuple[int, ...]:
    """cv2.addWeighted(canvas, 0.4, limb, 0.6, 0) at one pixel."""
    return tuple(np.round(0.4 * np.array(under) + 0.6 * np.array(over)).astype(int).tolist())


def test_limbs_at_60_percent_of_their_colour_under_the_keypoints():
    """ControlNet 1.1's draw_bodypose: each limb filled at 60% of its colour, then the keypoints on top."""
    person = np.full((18, 2), np.nan)
    person[1], person[2] = (20, 30), (50, 30)  # neck -> right shoulder: limb 0, drawn in COLORS[0]
    canvas = draw_skeleton([person], 64, 80)
    assert tuple(canvas[30, 35]) == tuple(int(c * 0.6) for c in COLORS[0])  # mid-limb
    assert tuple(canvas[30, 20]) == COLORS[1] and tuple(canvas[30, 50]) == COLORS[2]  # the discs, on top
    assert not canvas[far_from([(20, 30), (50, 30)], [((20, 30), (50, 30))], (64, 80), 6.0)].any()


def test_drawing_a_decoded_skeleton_touches_every_keypoint():
    person = skeleton(list(range(18)))
    ann = pose_annotation(decode_pose(*synthetic_maps([person], 128, 96)), 128, 96)
    for x, y in person.astype(int):
        assert ann.condition[y, x].any()
    segments = [(PERSON[a], PERSON[b]) for a, b in LIMBS[:17]]
    assert not ann.condition[far_from(list(map(tuple, PERSON)), segments, (128, 96), 6.0)].any()


# ------------------------------------------------------------------------------ real loader, tiny weights


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    return write_tiny_openpose(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def annotator(tiny_weights) -> OpenPoseAnnotator:
    # boxsize 184: a 92 px high network input, a quarter of the default's work, same code path; maps decoded at
    # 64 px, not the default 512 (the shrinking path: maps larger than the image)
    return OpenPoseAnnotator(weights=str(tiny_weights.parent), device="cpu", boxsize=184, detect_resolution=64)


def test_loader_maps_every_published_key(tiny_weights):
    published = torch.load(tiny_weights, map_location="cpu", weights_only=True)
    net = load_body_pose_net(tiny_weights)
    module_state = net.state_dict()
    assert {published_key(k) for k in module_state} == set(published)
    assert len(module_state) == len(published)
    torch.testing.assert_close(module_state["model0.conv1_1.weight"], published["conv1_1.weight"])
    torch.testing.assert_close(module_state["model6_2.Mconv7_stage6_L2.bias"], published["Mconv7_stage6_L2.bias"])


def test_loader_rejects_a_file_with_a_missing_key(tiny_weights, tmp_path):
    state = torch.load(tiny_weights, map_location="cpu", weights_only=True)
    del state["conv5_5_CPM_L2.weight"]
    torch.save(state, tmp_path / WEIGHT_FILE)
    with pytest.raises(ValueError, match="conv5_5_CPM_L2.weight"):
        load_body_pose_net(tmp_path / WEIGHT_FILE)


def test_loader_names_the_file_for_a_wrong_shape_or_a_value_that_is_no_tensor(tiny_weights, tmp_path):
    """torch's multi-line size-mismatch paragraph, or an AttributeError about a float, named no file."""
    state = torch.load(tiny_weights, map_location="cpu", weights_only=True)
    for name, broken in (("shape", {**state, "conv1_1.weight": state["conv1_1.weight"][:1]}),
                         ("float", {**state, "conv1_1.bias": 0.5})):
        (tmp_path / name).mkdir()
        torch.save(broken, tmp_path / name / WEIGHT_FILE)
        with pytest.raises(ValueError, match=f"{name}/{WEIGHT_FILE} is not the CMU body pose model") as err:
            load_body_pose_net(tmp_path / name / WEIGHT_FILE)
        assert "\n" not in str(err.value)


def test_loader_refuses_nan_or_inf_weights_in_one_line(tiny_weights, tmp_path):
    """They loaded, and every sample came out filtered (no person found)."""
    state = torch.load(tiny_weights, map_location="cpu", weights_only=True)
    state["conv1_1.weight"][0, 0, 0, 0] = float("nan")
    state["Mconv7_stage6_L2.bias"][0] = float("-inf")
    torch.save(state, tmp_path / WEIGHT_FILE)
    with pytest.raises(ValueError, match=f"{WEIGHT_FILE} is not the CMU body pose model.*NaN or inf in 2 of") as err:
        load_body_pose_net(tmp_path / WEIGHT_FILE)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_annotator_batch_is_deterministic_and_equals_one_at_a_time(annotator, monkeypatch):
    """Also with the batch's images decoded in threads, over two size groups: each map is its own image's, in order."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(64, 64, 3), (80, 96, 3)] * 2]
    keys = ["a", "b", "c", "d"]
    monkeypatch.setattr(annotator, "decode_threads", 3)
    batched = annotator(images, keys)
    monkeypatch.setattr(annotator, "decode_threads", 1)
    again = annotator(images, keys)
    singles = [annotator([image], [key])[0] for image, key in zip(images, keys, strict=True)]
    for image, b, a, s in zip(images, batched, again, singles, strict=True):
        assert b.condition.shape == image.shape and b.condition.dtype == np.uint8
        for other in (a, s):
            np.testing.assert_array_equal(b.condition, other.condition)
            assert (b.keep, b.reason, b.params) == (other.keep, other.reason, other.params)
        json.dumps(b.params)
    # random weights on noise still give peaks and limbs, so the comparison above is not of empty maps
    assert any(b.params["num_people"] for b in batched)


def test_registry_builds_it(tiny_weights):
    built = build_annotator("openpose", weights=str(tiny_weights.parent), device="auto")
    assert (built.name, built.channels) == ("openpose", 3)


def test_describe_has_the_weight_sha256(annotator, tiny_weights):
    info = annotator.describe()
    assert info["name"] == "openpose" and info["min_keypoint_fraction"] == 0.3
    assert info["weights"] == {WEIGHT_FILE: hashlib.sha256(tiny_weights.read_bytes()).hexdigest()}
    json.dumps(info)


def test_on_cuda_it_runs_exact_fp32_with_tf32_off_only_while_it_runs(annotator):
    """OpenPose's keypoints are maxima above thresholds: fp16 autocast changed 1.2% of a map on an H200 (make
    gpu-check's parity rows), and cuDNN's default TF32 rounds fp32 convolutions to fp16's mantissa. So on CUDA it runs
    without autocast and with TF32 off, and gives the setting back after each call."""
    cuda = torch.device("cuda")  # a device object: no GPU needed to build the context
    assert precision(cuda, annotator.fp16) == "fp32"
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with inference(cuda, annotator.fp16):
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            assert not torch.is_grad_enabled()
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_missing_weight_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no download attempt from the hub fallback
    with pytest.raises(MissingWeightsError, match=WEIGHT_FILE):
        OpenPoseAnnotator(weights=str(tmp_path))
