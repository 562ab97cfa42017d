"""HED annotator: the real loader on tiny random weights in the published ControlNetHED.pth layout"""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from annotate import build_annotator
from annotate.hed import WEIGHT_FILE, ControlNetHED_Apache2, HEDAnnotator, load_hed, logit_to_map
from annotate.resize import to_detection
from annotate.weights import MissingWeightsError
from tests.tiny_weights.hed import tiny_hed_state_dict, write_tiny_hed


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 RGB: a rectangle and a disc on a noisy background, so edges exist."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), rng.integers(150, 230), np.uint8)
    cv2.rectangle(image, (width // 8, height // 8), (width // 2, height // 2), (30, 80, 160), -1)
    cv2.circle(image, (2 * width // 3, 2 * height // 3), min(height, width) // 4, (250, 30, 30), -1)
    return (image + rng.integers(0, 25, image.shape)).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hed_weights")
    write_tiny_hed(folder)
    return folder


@pytest.fixture(scope="module")
def hed(weights_dir: Path) -> HEDAnnotator:
    return HEDAnnotator(weights=str(weights_dir), device="cpu", detect_resolution=64)  # 512 is slow on a CPU


def test_loader_expects_exactly_the_published_keys_and_shapes() -> None:
    written = {k: tuple(v.shape) for k, v in tiny_hed_state_dict().items()}
    expected = {k: tuple(v.shape) for k, v in ControlNetHED_Apache2().state_dict().items()}
    assert written == expected
    assert len(expected) == 1 + 2 * (2 + 2 + 3 + 3 + 3) + 2 * 5  # norm, convs, projections


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_a_missing_or_extra_key_fails_loudly(tmp_path: Path, change: str) -> None:
    state = tiny_hed_state_dict()
    if change == "missing":
        del state["block3.convs.2.weight"]
        name = "block3.convs.2.weight"
    else:
        state["block6.projection.weight"] = torch.zeros(1, 512, 1, 1)
        name = "block6.projection.weight"
    path = tmp_path / WEIGHT_FILE
    torch.save(state, path)
    with pytest.raises(ValueError, match=name) as err:
        load_hed(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)  # one line, as the job prints it


class RunsCode:
    """A pickled call of a blocked module's function (os.getpid: harmless, were it ever run), as a malicious .pth
    holds os.system."""

    def __reduce__(self):
        import os

        return (os.getpid, ())


@pytest.mark.parametrize("damage", ["cut short", "wrong shape", "not a dict", "pickled object", "pickled code"])
def test_a_damaged_weight_file_is_one_line_naming_it(tmp_path: Path, damage: str) -> None:
    """torch's own messages run over many lines (load_state_dict lists every key); the job prints one. A file
    holding more than tensors is refused unread, without torch's advice to load it with weights_only=False."""
    path = write_tiny_hed(tmp_path)
    if damage == "cut short":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "wrong shape":
        state = tiny_hed_state_dict()
        state["block1.projection.weight"] = torch.zeros(1, 3, 1, 1)
        torch.save(state, path)
    elif damage == "pickled object":
        torch.save({**tiny_hed_state_dict(), "extra": Path("x")}, path)
    elif damage == "pickled code":
        torch.save({**tiny_hed_state_dict(), "extra": RunsCode()}, path)
    else:
        torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError) as err:
        load_hed(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    if damage == "pickled object":
        assert "holds more than tensors, refused unread: Unsupported global" in str(err.value)
        assert "weights_only" not in str(err.value)
    if damage == "pickled code":  # torch words this refusal otherwise: its advice first, what it found last
        assert "holds more than tensors, refused unread: Trying to load unsupported GLOBAL" in str(err.value)
        assert "getpid" in str(err.value)  # posix.getpid (nt. on Windows)
        assert "weights_only" not in str(err.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused_in_one_line(tmp_path: Path, value: float) -> None:
    """They loaded, and every map came out blank yet marked ok."""
    state = tiny_hed_state_dict()
    state["block2.convs.1.weight"][0, 0, 0, 0] = value
    path = tmp_path / WEIGHT_FILE
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"NaN or inf in 1 of its 37 tensors.*block2\.convs\.1\.weight") as err:
        load_hed(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_folder_named_as_the_weight_file_is_one_line(tmp_path: Path) -> None:
    """It was an IsADirectoryError from hashing, before the loader's check."""
    (tmp_path / WEIGHT_FILE).mkdir()
    with pytest.raises(ValueError, match=f"{WEIGHT_FILE} is not a readable") as err:
        HEDAnnotator(weights=str(tmp_path), device="cpu")
    assert "\n" not in str(err.value)


def test_fp32_files_load_too(tmp_path: Path) -> None:
    path = write_tiny_hed(tmp_path, dtype=torch.float32)
    model = load_hed(path)
    assert model.norm.dtype == torch.float32
    written = tiny_hed_state_dict(dtype=torch.float32)["block1.projection.weight"]
    assert torch.equal(model.block1.projection.weight, written)


def test_missing_weight_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """...without asking the hub for the published file when --weights named a folder: a folder lacking it is the
    user's mistake to name, and offline the hub's retries took ~46 s before the error."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))  # a real cached file must not leak in
    downloads = []  # never the network from a test: a download asked for is recorded, not made
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *args, **kwargs: downloads.append(args))
    with pytest.raises(MissingWeightsError, match=WEIGHT_FILE):
        HEDAnnotator(weights=str(tmp_path), device="cpu")
    assert downloads == []


def test_shapes_and_dtypes_for_mixed_sizes(hed: HEDAnnotator) -> None:
    images = [synthetic_image(64, 64), synthetic_image(72, 100, seed=1), synthetic_image(64, 64, seed=2)]
    out = hed(images, ["a", "b", "c"])
    assert [a.condition.shape for a in out] == [(64, 64), (72, 100), (64, 64)]
    assert all(a.condition.dtype == np.uint8 and a.keep and a.params == {"detect_resolution": 64} for a in out)
    assert out[0].condition.std() > 0  # not a constant map
    assert hed([], []) == []


def test_same_input_same_map(hed: HEDAnnotator) -> None:
    image = synthetic_image(64, 96)
    first, second = hed([image], ["k"])[0], hed([image.copy()], ["other"])[0]
    np.testing.assert_array_equal(first.condition, second.condition)


def test_batched_equals_one_at_a_time(weights_dir: Path) -> None:
    hed = HEDAnnotator(weights=str(weights_dir), device="cpu", max_batch=2, detect_resolution=64)  # 2 + 1 images
    images = [synthetic_image(64, 80, seed=s) for s in range(3)]
    batched = [a.condition for a in hed(images, ["a", "b", "c"])]
    single = [hed([image], [key])[0].condition for image, key in zip(images, "abc", strict=True)]
    for b, s in zip(batched, single, strict=True):
        assert np.abs(b.astype(int) - s.astype(int)).max() <= 1  # float reassociation across batch sizes


def test_matches_the_reference_postprocessing(hed: HEDAnnotator) -> None:
    """The reference (controlnet_aux) resizes the image to its detection size, each projection back to it with cv2,
    then the uint8 map to the image's size; we resize the projections batched in torch."""
    image = synthetic_image(72, 100)
    detected = to_detection(image, hed.detect_resolution)  # (64, 64): shorter side 64, sides multiples of 64
    x = torch.from_numpy(detected).permute(2, 0, 1)[None].float()
    with torch.inference_mode():
        projections = hed.model(x)
    h, w = detected.shape[:2]
    edges = [cv2.resize(p[0, 0].numpy(), (w, h), interpolation=cv2.INTER_LINEAR) for p in projections]
    at_detection = logit_to_map(np.mean(np.stack(edges, axis=2), axis=2))
    reference = cv2.resize(at_detection, (100, 72), interpolation=cv2.INTER_LINEAR)
    ours = hed([image], ["k"])[0].condition
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1
    assert (ours != reference).mean() < 0.01


def test_describe_names_the_weight_sha256(hed: HEDAnnotator, weights_dir: Path) -> None:
    digest = hashlib.sha256((weights_dir / WEIGHT_FILE).read_bytes()).hexdigest()
    described = hed.describe()
    assert described["name"] == "hed"
    assert described["weights"] == {WEIGHT_FILE: digest}


def test_the_registry_builds_it(weights_dir: Path) -> None:
    annotator = build_annotator("hed", seed=3, weights=str(weights_dir), device="cpu")
    assert isinstance(annotator, HEDAnnotator)
    assert (annotator.name, annotator.channels) == ("hed", 1)
