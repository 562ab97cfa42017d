"""OpenPose body annotator: the CMU body model -> 18 COCO keypoints per person, drawn as ControlNet skeletons"""
from __future__ import annotations

import math
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from annotate.base import Annotation
from annotate.device import inference, pick_device, precision
from annotate.resize import DETECT_RESOLUTION, to_detection, to_output
from annotate.weights import (
    check_keys,
    load_state_dict_file,
    one_line,
    require_finite,
    require_tensors,
    resolve_weight,
    sha256_file,
)

WEIGHT_FILE = "body_pose_model.pth"
HUB_REPO = "lllyasviel/Annotators"
NUM_KEYPOINTS = 18
STRIDE = 8  # the network's output is 1/8 of its input

# The 18 COCO body parts, in the model's heatmap order (channel 18 is the background).
KEYPOINT_NAMES = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
    "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip

# (part A, part B) of each limb, 0-based. The order is the reference's and matters: people are assembled
# by walking limbs in this order, and only the first 17 are drawn (the last two join ears to shoulders).
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17),
)  # fmt: skip
# The (x, y) channels of each limb's part affinity field in the 38-channel PAF output.
PAF_CHANNELS = (
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9),
    (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27),
)  # fmt: skip
NUM_DRAWN_LIMBS = 17

# The reference draw_bodypose colours, one per keypoint; limb i takes colour i. RGB in the condition map.
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip


# ---------------------------------------------------------------------------------------------- network

# VGG-19 front (model0): (name, in, out, kernel) convs and 2x2 max pools, as published by CMU.
_FRONT: list[tuple[str, int, int, int] | str] = [
    ("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), "pool1_stage1",
    ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3), "pool2_stage1",
    ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3),
    "pool3_stage1",
    ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3), ("conv4_3_CPM", 512, 256, 3), ("conv4_4_CPM", 256, 128, 3),
]  # fmt: skip


def _branch_layers(stage: int, branch: int) -> list[tuple[str, int, int, int]]:
    """Convs of one stage's branch: L1 predicts the 38 PAF channels, L2 the 19 heatmaps."""
    out = 38 if branch == 1 else 19
    if stage == 1:
        names = [f"conv5_{i}_CPM_L{branch}" for i in range(1, 6)]
        shapes = [(128, 128, 3), (128, 128, 3), (128, 128, 3), (128, 512, 1), (512, out, 1)]
    else:
        names = [f"Mconv{i}_stage{stage}_L{branch}" for i in range(1, 8)]
        shapes = [(185, 128, 7)] + [(128, 128, 7)] * 4 + [(128, 128, 1), (128, out, 1)]
    return [(name, *shape) for name, shape in zip(names, shapes, strict=True)]


def _sequential(layers: Sequence[tuple[str, int, int, int] | str], relu_last: bool) -> nn.Sequential:
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    for i, layer in enumerate(layers):
        if isinstance(layer, str):
            modules[layer] = nn.MaxPool2d(kernel_size=2, stride=2)
            continue
        name, cin, cout, k = layer
        modules[name] = nn.Conv2d(cin, cout, k, stride=1, padding=k // 2)
        if i < len(layers) - 1 or relu_last:
            modules["relu_" + name] = nn.ReLU(inplace=True)
    return nn.Sequential(modules)


class BodyPoseNet(nn.Module):
    """The CMU body pose model: a VGG front and 6 refinement stages of two branches (PAFs, heatmaps)."""

    def __init__(self) -> None:
        super().__init__()
        self.model0 = _sequential(_FRONT, relu_last=True)
        for stage in range(1, 7):
            for branch in (1, 2):
                # The reference's no-ReLU list names Mconv7_stage6_L1 twice and misses Mconv7_stage6_L2, so
                # its final heatmaps pass a ReLU; we keep that, since the published weights were used so.
                relu_last = (stage, branch) == (6, 2)
                self.add_module(f"model{stage}_{branch}", _sequential(_branch_layers(stage, branch), relu_last))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 3, H, W) BGR in [-0.5, 0.5) -> PAFs (B, 38, H/8, W/8), heatmaps (B, 19, H/8, W/8)."""
        features = self.model0(x)  # (B, 128, H/8, W/8)
        out = features
        for stage in range(1, 7):
            pafs = getattr(self, f"model{stage}_1")(out)
            heatmaps = getattr(self, f"model{stage}_2")(out)
            out = torch.cat([pafs, heatmaps, features], 1)  # (B, 38 + 19 + 128 = 185, H/8, W/8)
        return pafs, heatmaps


def published_key(module_key: str) -> str:
    """'model0.conv1_1.weight' -> 'conv1_1.weight': the published file names layers without their stage."""
    return module_key.split(".", 1)[1]


def load_body_pose_net(path: str | Path) -> BodyPoseNet:
    """The network with the published weights at `path` (strict: every key present, none extra)."""
    with torch.device("meta"):  # no random init of 52M parameters that the file replaces anyway
        net = BodyPoseNet()
    published = load_state_dict_file(path, WEIGHT_FILE)
    to_module = {published_key(key): key for key in net.state_dict()}
    what = f"the CMU body pose model ({WEIGHT_FILE})"
    check_keys(path, what, set(to_module), set(published))
    require_tensors(published, path, what)
    state = {module_key: published[key].float() for key, module_key in to_module.items()}
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # the keys are right: a shape is not
        raise ValueError(f"{path} is not {what}: {one_line(err)}") from None
    require_finite(net, path, what)
    return net.eval()


# --------------------------------------------------------------------------------------- pre/post-process


def smart_resize(x: np.ndarray, height: float, width: float) -> np.ndarray:
    """ControlNet 1.1's resize of images and network maps (controlnet_aux's open_pose.util.smart_resize): area
    averaging when the sides shrink in sum, Lanczos otherwise; sizes truncated to whole pixels. The reference
    resizes maps of more than 3 channels one channel at a time; OpenCV's Lanczos gives the same numbers for all
    channels at once (the parity tests' bit-exact maps check it), 2.5x faster. Its area averaging takes at most
    4 channels: wider maps shrink one channel at a time."""
    ho, wo = x.shape[:2]
    k = float(height + width) / float(ho + wo)
    interpolation = cv2.INTER_AREA if k < 1 else cv2.INTER_LANCZOS4
    if interpolation == cv2.INTER_AREA and x.ndim == 3 and x.shape[2] > 4:
        return np.stack([smart_resize(x[:, :, i], height, width) for i in range(x.shape[2])], axis=2)
    return cv2.resize(np.ascontiguousarray(x), (int(width), int(height)), interpolation=interpolation)


def smart_resize_by(x: np.ndarray, factor: float) -> np.ndarray:
    """smart_resize to `factor` times the size (the reference's smart_resize_k with fx = fy)."""
    return smart_resize(x, x.shape[0] * factor, x.shape[1] * factor)


def network_input(image_bgr: np.ndarray, scale: float) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W, 3) uint8 BGR -> (3, h, w) float32 in [-0.5, 0.5), padded right/down to a multiple of 8, and the
    (h, w) before padding. The reference pads with 128, which is 0 after normalising."""
    resized = smart_resize_by(image_bgr, scale)
    h, w = resized.shape[:2]
    padded = np.zeros((3, -(-h // STRIDE) * STRIDE, -(-w // STRIDE) * STRIDE), np.float32)
    padded[:, :h, :w] = resized.transpose(2, 0, 1).astype(np.float32) / 256 - 0.5
    return padded, (h, w)


def to_image_size(maps: np.ndarray, unpadded: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(C, h/8, w/8) network maps -> (H, W, C): upsampled by the stride, the padding dropped, resized to the
    image."""
    up = smart_resize_by(np.ascontiguousarray(maps.transpose(1, 2, 0)), STRIDE)
    return smart_resize(up[: unpadded[0], : unpadded[1]], size[0], size[1])


def decode_peaks(heatmaps: np.ndarray, thre1: float = 0.1, sigma: float = 3.0) -> list[np.ndarray]:
    """(H, W, >=18) heatmaps -> per part, an (n, 4) array of peaks: x, y, score, id (ids run over all parts).

    A peak is a local maximum (>= its 4 neighbours, zero outside the map) of the Gaussian-smoothed heatmap above
    thre1 (scipy's gaussian_filter of the map in float64, as the reference); its score is the unsmoothed value there.
    """
    peaks, next_id = [], 0
    for part in range(NUM_KEYPOINTS):
        heatmap = np.ascontiguousarray(heatmaps[:, :, part])
        ys, xs = local_maxima_above(smoothed_where_peaks_can_be(heatmap, thre1, sigma), thre1)
        ids = np.arange(next_id, next_id + len(xs))
        peaks.append(np.stack([xs, ys, heatmap[ys, xs].astype(np.float64), ids], axis=1).astype(np.float64))
        next_id += len(xs)
    return peaks


def local_maxima_above(smooth: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns, in row-major order, of the values above `threshold` that are >= each of their 4
    neighbours (0 beyond the edges)."""
    ys, xs = np.nonzero(smooth > threshold)
    values = smooth[ys, xs]
    height, width = smooth.shape
    is_peak = np.ones(len(ys), bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
        neighbour = np.where(inside, smooth[ny.clip(0, height - 1), nx.clip(0, width - 1)], 0.0)
        is_peak &= values >= neighbour
    return ys[is_peak], xs[is_peak]


PEAK_CELL = 8  # px: the grid on which smoothed_where_peaks_can_be finds the blobs of a map


def smoothed_where_peaks_can_be(heatmap: np.ndarray, thre1: float, sigma: float) -> np.ndarray:
    """gaussian_filter(heatmap as float64, sigma), bit for bit, wherever it or a 4-neighbour can exceed thre1; 0
    elsewhere.

    A smoothed value is a weighted mean (positive weights) of the values within the kernel's radius, so it exceeds
    thre1 only within that radius of a value that does. Only windows around those are filtered: each blob of values
    above thre1 (less a margin for rounding, and found on a PEAK_CELL grid, which only widens it), widened by the
    radius and one pixel for the neighbours, plus the radius again for what the filter reads there: the numbers are
    then the whole map's (the same taps in the same order; at the map's edges the same reflection). Filtering all 18
    maps whole at the image's size was most of OpenPose's time, where a photo's keypoints cover a small part of
    each."""
    from scipy.ndimage import gaussian_filter

    height, width = heatmap.shape
    above = heatmap > thre1 * (1 - 1e-4)
    if not above.any():
        return np.zeros((height, width), np.float64)
    rows, cols = -(-height // PEAK_CELL), -(-width // PEAK_CELL)
    grid = np.zeros((rows * PEAK_CELL, cols * PEAK_CELL), np.uint8)
    grid[:height, :width] = above
    cells = np.ascontiguousarray(grid.reshape(rows, PEAK_CELL, cols, PEAK_CELL).max(axis=(1, 3)))
    radius = int(4.0 * sigma + 0.5)  # gaussian_filter's (truncate=4)
    exact, reach = radius + 1, 2 * radius + 1
    windows = []
    for x, y, w, h in (cv2.connectedComponentsWithStats(cells, connectivity=8)[2][1:, :4] * PEAK_CELL).tolist():
        windows.append((max(0, y - reach), min(height, y + h + reach), max(0, x - reach), min(width, x + w + reach),
                        max(0, y - exact), min(height, y + h + exact), max(0, x - exact), min(width, x + w + exact)))
    if sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1, *_ in windows) >= height * width // 2:  # one call is cheaper
        return gaussian_filter(heatmap.astype(np.float64), sigma)
    smooth = np.zeros((height, width), np.float64)
    for y0, y1, x0, x1, ey0, ey1, ex0, ex1 in windows:
        window = gaussian_filter(heatmap[y0:y1, x0:x1].astype(np.float64), sigma)
        smooth[ey0:ey1, ex0:ex1] = window[ey0 - y0:ey1 - y0, ex0 - x0:ex1 - x0]
    return smooth


def score_limbs(
    peaks: list[np.ndarray], pafs: np.ndarray, thre2: float = 0.05, mid_num: int = 10
) -> list[np.ndarray | None]:
    """Per limb, the chosen connections as an (n, 5) array: id A, id B, score, index in A, index in B;
    None where one end has no peaks.

    A candidate pair (a, b) is scored by the PAF sampled at mid_num points on the segment, projected on its
    direction, plus a penalty for segments longer than half the image height; it needs > 80% of the samples
    above thre2 and a positive score. Pairs are then taken greedily by score, each peak used at most once.
    """
    height = pafs.shape[0]
    out: list[np.ndarray | None] = []
    for (part_a, part_b), channels in zip(LIMBS, PAF_CHANNELS, strict=True):
        cand_a, cand_b = peaks[part_a], peaks[part_b]
        if len(cand_a) == 0 or len(cand_b) == 0:
            out.append(None)
            continue
        a, b = cand_a[:, None, :2], cand_b[None, :, :2]  # (nA, 1, 2), (1, nB, 2) as x, y
        vec = b - a  # (nA, nB, 2)
        norm = np.maximum(np.sqrt((vec**2).sum(-1)), 0.001)  # (nA, nB)
        unit = vec / norm[..., None]
        start, end = np.broadcast_arrays(a, b)
        points = np.rint(segment_points(start, end, mid_num)).astype(int)  # (mid_num, nA, nB, 2)
        field_xy = pafs[points[..., 1], points[..., 0]][..., list(channels)]  # (mid_num, nA, nB, 2)
        along = (field_xy * unit).sum(-1)  # (mid_num, nA, nB)
        total = np.zeros(along.shape[1:])
        for sample in along:  # summed left to right, as the reference's sum(): the last bits decide ties
            total = total + sample
        score = total / mid_num + np.minimum(0.5 * height / norm - 1, 0)
        ok = ((along > thre2).sum(0) > 0.8 * mid_num) & (score > 0)
        ia, ib = np.nonzero(ok)
        order = np.argsort(-score[ia, ib], kind="stable")  # ties keep the reference's (i, j) loop order
        chosen: list[list[float]] = []
        used_a: set[int] = set()
        used_b: set[int] = set()
        for i, j in zip(ia[order], ib[order], strict=True):
            if i in used_a or j in used_b:
                continue
            chosen.append([cand_a[i, 3], cand_b[j, 3], score[i, j], i, j])
            used_a.add(i)
            used_b.add(j)
            if len(chosen) >= min(len(cand_a), len(cand_b)):
                break
        out.append(np.array(chosen, np.float64).reshape(-1, 5))
    return out


def segment_points(start: np.ndarray, end: np.ndarray, num: int) -> np.ndarray:
    """np.linspace(start, end, num) computed as it is for one pair of scalars: with arrays, linspace switches
    every element to another rounding as soon as one segment has zero length."""
    step = (end - start) / (num - 1)
    points = np.arange(num, dtype=np.float64).reshape(-1, *([1] * start.ndim)) * step + start
    points[-1] = end
    return points


def assemble_people(
    candidates: np.ndarray, connections: list[np.ndarray | None], min_parts: int = 4, min_mean_score: float = 0.4
) -> np.ndarray:
    """Join limb connections into people: an (n, 20) array per person, columns 0-17 the candidate id of each
    part (-1 where missing), 18 the total score, 19 the part count. candidates: (N, 4) x, y, score, id.

    Walks limbs in order: a connection touching one person extends it, one touching two disjoint people
    merges them, one touching none starts a person (not for the last two, ear-shoulder, limbs).
    People with fewer than min_parts parts or a mean score below min_mean_score are dropped.
    """
    people: list[np.ndarray] = []
    for k, conn in enumerate(connections):
        if conn is None:
            continue
        index_a, index_b = LIMBS[k]
        for id_a, id_b, limb_score, _, _ in conn:
            found = [n for n, p in enumerate(people) if p[index_a] == id_a or p[index_b] == id_b][:2]
            if len(found) == 1 or (len(found) == 2 and _overlap(people[found[0]], people[found[1]])):
                person = people[found[0]]
                if person[index_b] != id_b or len(found) == 2:
                    person[index_b] = id_b
                    person[-1] += 1
                    person[-2] += candidates[int(id_b), 2] + limb_score
            elif len(found) == 2:  # two disjoint people that this limb joins: merge the second into the first
                first, second = people[found[0]], people.pop(found[1])
                first[:-2] += second[:-2] + 1  # -1 + id + 1 = id where only `second` has the part
                first[-2:] += second[-2:]
                first[-2] += limb_score
            elif k < NUM_DRAWN_LIMBS:
                person = -np.ones(NUM_KEYPOINTS + 2)
                person[index_a], person[index_b] = id_a, id_b
                person[-1] = 2
                person[-2] = candidates[int(id_a), 2] + candidates[int(id_b), 2] + limb_score
                people.append(person)
    kept = [p for p in people if p[-1] >= min_parts and p[-2] / p[-1] >= min_mean_score]
    return np.array(kept, np.float64).reshape(-1, NUM_KEYPOINTS + 2)


def _overlap(p: np.ndarray, q: np.ndarray) -> bool:
    """Whether two people share a part slot (then they are not merged)."""
    return bool(((p[:NUM_KEYPOINTS] >= 0) & (q[:NUM_KEYPOINTS] >= 0)).any())


def people_keypoints(candidates: np.ndarray, people: np.ndarray) -> list[np.ndarray]:
    """Per person, an (18, 2) array of pixel x, y with NaN for missing parts."""
    out = []
    for person in people:
        ids = person[:NUM_KEYPOINTS].astype(int)
        xy = np.full((NUM_KEYPOINTS, 2), np.nan)
        xy[ids >= 0] = candidates[ids[ids >= 0], :2]
        out.append(xy)
    return out


def decode_people(heatmaps: np.ndarray, pafs: np.ndarray, thre1: float = 0.1,
                  thre2: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 19) heatmaps and (H, W, 38) PAFs -> candidates (N, 4: x, y, score, id; row i has id i) and people
    (n, 20: 18 candidate ids, score, part count), as the reference's Body returns them."""
    peaks = decode_peaks(heatmaps, thre1)
    candidates = np.concatenate(peaks, axis=0)
    return candidates, assemble_people(candidates, score_limbs(peaks, pafs, thre2))


def decode_pose(heatmaps: np.ndarray, pafs: np.ndarray, thre1: float = 0.1, thre2: float = 0.05) -> list[np.ndarray]:
    """(H, W, 19) heatmaps and (H, W, 38) PAFs at image size -> per person, (18, 2) pixel x, y (NaN: missing)."""
    return people_keypoints(*decode_people(heatmaps, pafs, thre1, thre2))


# ------------------------------------------------------------------------------------- drawing and rule


def draw_skeleton(people: list[np.ndarray], height: int, width: int, stickwidth: int = 4) -> np.ndarray:
    """(H, W, 3) uint8 RGB on black, as ControlNet 1.1's draw_bodypose: person after person, its limbs as
    ellipses at 60% of their colour, then its keypoints as filled circles of radius 4. Coordinates go through
    the reference's normalisation (x / W, then x * W) so that they truncate to the same pixels."""
    canvas = np.zeros((height, width, 3), np.uint8)
    for xy in people:
        normalised = xy / np.array([float(width), float(height)])
        for limb in range(NUM_DRAWN_LIMBS):
            ends = normalised[list(LIMBS[limb])]  # (2, 2) x, y
            if np.isnan(ends).any():
                continue
            xs, ys = ends[:, 0] * float(width), ends[:, 1] * float(height)
            length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
            centre = (int(np.mean(xs)), int(np.mean(ys)))
            polygon = cv2.ellipse2Poly(centre, (int(length / 2), stickwidth), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, [int(float(c) * 0.6) for c in COLORS[limb]])
        for part in range(NUM_KEYPOINTS):
            x, y = normalised[part]
            if not np.isnan(x):
                cv2.circle(canvas, (int(x * width), int(y * height)), 4, COLORS[part], thickness=-1)
    return canvas


def num_keypoints(xy: np.ndarray) -> int:
    """How many of the 18 keypoints one person (18, 2) has."""
    return int(np.isfinite(xy[:, 0]).sum())


def keypoint_fraction(xy: np.ndarray) -> float:
    """Fraction of the 18 keypoints that one person (18, 2) has."""
    return num_keypoints(xy) / NUM_KEYPOINTS


def min_keypoints(fraction: float) -> int:
    """Fewest keypoints meeting `fraction` of 18: 30% of 18 is 5.4, so 6 (the epsilon absorbs float error
    in products that are whole numbers, e.g. 1/3 * 18)."""
    return math.ceil(fraction * NUM_KEYPOINTS - 1e-9)


def pose_annotation(people: list[np.ndarray], height: int, width: int, min_fraction: float = 0.3) -> Annotation:
    """The skeleton drawing, the keep decision of the paper's rule (some person has >= min_fraction of the 18
    keypoints) and the params: best fraction, people count, each person's keypoints as [x/W, y/H] or None."""
    best = max((num_keypoints(xy) for xy in people), default=0)
    keep = best >= min_keypoints(min_fraction)
    reason = ""
    if not keep:
        reason = f"no person with >= {min_fraction:.0%} of {NUM_KEYPOINTS} keypoints (best {best}/{NUM_KEYPOINTS})"
    keypoints = [
        [None if math.isnan(x) else [round(x / width, 5), round(y / height, 5)] for x, y in xy.tolist()]
        for xy in people
    ]
    params = {
        "keypoint_fraction": best / NUM_KEYPOINTS,
        "num_keypoints": best,
        "num_people": len(people),
        "keypoints": keypoints,
    }
    return Annotation(draw_skeleton(people, height, width), keep=keep, reason=reason, params=params)


# ------------------------------------------------------------------------------------------- annotator


@dataclass
class PoseStages:
    """One image through the annotator, stage by stage (OpenPoseAnnotator.stages)."""

    network_input: np.ndarray  # (1, 3, h, w) float32 BGR in [-0.5, 0.5), padded to a multiple of 8
    pafs: np.ndarray  # (38, h/8, w/8) raw network output at the first scale
    heatmaps: np.ndarray  # (19, h/8, w/8)
    candidates: np.ndarray  # (N, 4) x, y, score, id of every peak, at the detection size
    people: np.ndarray  # (n, 20) per person: 18 candidate ids (-1: missing), total score, part count
    condition: np.ndarray  # (H, W, 3) uint8 RGB: the skeletons at the image's size


@dataclass(eq=False)
class OpenPoseAnnotator:
    """OpenPose body skeletons; samples where no person has min_keypoint_fraction of 18 keypoints are filtered.

    An image is scaled so that its height is boxsize * scale for each scale (the reference: 368 * 0.5),
    and the maps are averaged over scales at the image's size before decoding.
    """

    seed: int = 0  # unused: decoding is deterministic; accepted so every task builds alike
    weights: str | None = None  # folder or URL holding body_pose_model.pth; None: the Hugging Face hub cache
    device: str | None = None  # None or "auto": cuda when available
    min_keypoint_fraction: float = 0.3
    detect_resolution: int = DETECT_RESOLUTION  # the shorter side the network's image has (controlnet_aux's 512)
    # exact fp32 on CUDA too, as on the CPU: keypoints are maxima above thresholds, and fp16 rounding changed 1.2% of
    # one photo's map on an H200, while the network was a small part of the time (batch 32 ran 1.13x one at a time)
    fp16: bool = False
    # images of a batch decoded at once (keypoint decoding, on the CPU, is most of this annotator's time; scipy's
    # smoothing and OpenCV's resizes release the GIL); 0: one per CPU torch was given (a dataset actor gives it
    # --cpus-per-worker). Each holds its maps at the detection size: ~130 MB at 512 px
    decode_threads: int = 0
    boxsize: int = 368
    scales: tuple[float, ...] = (0.5,)
    thre1: float = 0.1  # heatmap peak threshold
    thre2: float = 0.05  # PAF threshold along a limb
    name: str = "openpose"
    channels: int = 3
    _net: BodyPoseNet = field(init=False, repr=False)
    _weight_path: Path = field(init=False, repr=False)
    _device: torch.device = field(init=False, repr=False)
    _sha256: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.scales = tuple(self.scales)
        self._device = pick_device(self.device)
        self._weight_path = resolve_weight(WEIGHT_FILE, source=self.weights, hub_repo=HUB_REPO)
        self._net = load_body_pose_net(self._weight_path).to(self._device)

    def __call__(self, images: list[np.ndarray], keys: list[str]) -> list[Annotation]:
        if len(images) != len(keys):
            raise ValueError(f"{len(images)} images but {len(keys)} keys")
        detected = [to_detection(np.ascontiguousarray(image), self.detect_resolution) for image in images]
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(detected):
            by_size[image.shape[:2]].append(i)
        out: dict[int, Annotation] = {}
        with ThreadPoolExecutor(self._decode_threads(len(images))) as pool:
            for size, indices in by_size.items():
                outputs = [self._forward([detected[i] for i in indices], scale) for scale in self.scales]
                annotate = partial(self._annotation, outputs, size, [images[i].shape[:2] for i in indices])
                out.update(zip(indices, pool.map(annotate, range(len(indices))), strict=True))
        return [out[i] for i in range(len(images))]

    def _annotation(self, outputs, size: tuple[int, int], image_sizes: list[tuple[int, int]], n: int) -> Annotation:
        """Image n of a batch's network outputs -> its skeleton map at its image's size, and whether it is kept."""
        keypoints = self._decode(outputs, n, size)[2]
        annotation = pose_annotation(keypoints, size[0], size[1], self.min_keypoint_fraction)
        annotation.condition = to_output(annotation.condition, image_sizes[n])
        annotation.params["detect_resolution"] = self.detect_resolution
        return annotation

    def _decode_threads(self, images: int) -> int:
        return max(1, min(images, self.decode_threads or torch.get_num_threads()))

    def stages(self, image: np.ndarray) -> PoseStages:
        """Every stage for one image (the parity tests compare each with the reference's): the network's input and
        raw outputs at the first scale, the peaks and people decoded, and the final map."""
        detected = to_detection(np.ascontiguousarray(image), self.detect_resolution)
        size = detected.shape[:2]
        outputs = [self._forward([detected], scale) for scale in self.scales]
        candidates, people, keypoints = self._decode(outputs, 0, size)
        condition = draw_skeleton(keypoints, size[0], size[1])
        inputs = network_input(np.ascontiguousarray(detected[:, :, ::-1]), self._factor(detected, self.scales[0]))
        return PoseStages(inputs[0][None], outputs[0][0][0], outputs[0][1][0], candidates, people,
                          to_output(condition, image.shape[:2]))

    def _decode(self, outputs, n: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Image n of a batch: the maps averaged over scales at the detection size -> candidates (N, 4), people
        (n, 20), and each person's (18, 2) keypoints."""
        # maps at image size are big (H * W * 57 floats): built one image at a time
        heatmaps = sum(to_image_size(heat[n], unpadded, size) for _, heat, unpadded in outputs) / len(outputs)
        pafs = sum(to_image_size(paf[n], unpadded, size) for paf, _, unpadded in outputs) / len(outputs)
        candidates, people = decode_people(heatmaps, pafs, self.thre1, self.thre2)
        return candidates, people, people_keypoints(candidates, people)

    def _factor(self, image: np.ndarray, scale: float) -> float:
        return scale * self.boxsize / image.shape[0]

    def _forward(self, images: list[np.ndarray], scale: float) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """Same-size RGB images -> PAFs (B, 38, h/8, w/8), heatmaps (B, 19, h/8, w/8), unpadded (h, w)."""
        factor = self._factor(images[0], scale)
        # the network was trained on BGR (Caffe) input
        inputs = [network_input(np.ascontiguousarray(image[:, :, ::-1]), factor) for image in images]
        batch = torch.from_numpy(np.stack([x for x, _ in inputs])).to(self._device)
        with inference(self._device, self.fp16):
            pafs, heatmaps = self._net(batch)
        return pafs.float().cpu().numpy(), heatmaps.float().cpu().numpy(), inputs[0][1]

    def describe(self) -> dict[str, Any]:
        if self._sha256 is None:  # hashing 200 MB takes a moment: once, and only when asked
            self._sha256 = sha256_file(self._weight_path)
        return {
            "name": self.name,
            "min_keypoint_fraction": self.min_keypoint_fraction,
            "detect_resolution": self.detect_resolution,
            "precision": precision(self._device, self.fp16),
            "boxsize": self.boxsize,
            "scales": list(self.scales),
            "thre1": self.thre1,
            "thre2": self.thre2,
            "weights": {WEIGHT_FILE: self._sha256},
        }
