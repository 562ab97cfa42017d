"""our HED, MiDaS and OpenPose maps equal those of the ControlNet 1.1 annotators users run at inference (controlnet_aux
0.0.10), stage by stage: network input, raw outputs, keypoints, final map; on pseudo-random weights in the official
layouts, and through the dataset job. Fixtures: tests/parity/make_fixtures.py, run in a separate virtualenv."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.preprocess import center_crop_resize
from pipeline.sample_data import load_photo
from tests.parity.weights import openpose_state, pseudo_random_state, write_state

FIXTURES = Path(__file__).parent / "parity"
MIDAS_IMAGES = (("coffee", 640),)  # the fixture's astronaut (512) runs through the dataset job below; MiDaS is slow
OPENPOSE_IMAGES = (("astronaut", 512), ("chelsea", 512), ("coffee", 640))
HED_IMAGES = ("astronaut", "camera", "rocket", "coffee")  # 512, 512 (grey), 384, 640 px: make_fixtures.HED_IMAGES


def fixture(task: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"controlnet_aux_{task}.npz") as data:
        return {k: data[k] for k in data.files}


def sha256(array: np.ndarray | torch.Tensor) -> str:
    if torch.is_tensor(array):
        array = array.detach().float().contiguous().numpy()
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def photo(name: str, side: int) -> np.ndarray:
    return center_crop_resize(load_photo(name), side)


@pytest.fixture(scope="module")
def one_thread():
    """Parity is compared at 1e-4 and below: one thread, as the fixtures were made."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """The fixtures' pseudo-random weights in the published files, from the tensor names our loaders read."""
    from annotate.midas import ORIGINAL_FILE, dpt_hybrid_config
    from annotate.openpose import WEIGHT_FILE, BodyPoseNet, published_key
    from tests.tiny_weights.midas import original_state_dict

    folder = tmp_path_factory.mktemp("parity-weights")
    with torch.device("meta"):
        from transformers import DPTForDepthEstimation

        config = dpt_hybrid_config()
        hf = DPTForDepthEstimation(config).state_dict()
        pose = BodyPoseNet().state_dict()
    midas_keys = [(k, tuple(v.shape)) for k, v in original_state_dict(hf, config).items()
                  if not k.startswith("pretrained.model.head.")]  # timm's classifier: unused, not loaded
    write_state(pseudo_random_state(midas_keys), folder / ORIGINAL_FILE)
    write_state(openpose_state([(published_key(k), tuple(v.shape)) for k, v in pose.items()]), folder / WEIGHT_FILE)
    from annotate.hed import WEIGHT_FILE as HED_FILE
    from annotate.hed import ControlNetHED_Apache2

    hed = [(k, tuple(v.shape)) for k, v in ControlNetHED_Apache2().state_dict().items()]
    write_state(pseudo_random_state(hed), folder / HED_FILE)
    return folder


# ------------------------------------------------------------------------------------------------------- HED


@pytest.mark.parametrize("name", HED_IMAGES)
def test_hed_matches_controlnet_aux(weights, one_thread, name):
    """The soft edges (safe=False, as ControlNet 1.1's HED) on a grey photo and at sides below and above the detect
    resolution: what the reference drew from the same photo, at most one grey level apart where the network's
    float sums round the other way."""
    from annotate.hed import HEDAnnotator

    ref = fixture("hed")
    image, theirs = ref[f"{name}_image"], ref[f"{name}_map"]
    ours = HEDAnnotator(weights=str(weights), device="cpu")([image], ["k"])[0].condition
    ours = ours if ours.ndim == 2 else ours[:, :, 0]
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert ours.shape == theirs.shape and theirs.std() > 10  # a map with edges, not a blank one
    assert (diff == 0).mean() >= 0.999 and diff.max() <= 1, ((diff == 0).mean(), diff.max())


# ----------------------------------------------------------------------------------------------------- MiDaS


@pytest.fixture(scope="module")
def midas(weights, one_thread):
    from annotate.midas import MidasAnnotator

    return MidasAnnotator(weights=str(weights), device="cpu")


@pytest.mark.parametrize(("name", "side"), MIDAS_IMAGES)
def test_midas_matches_controlnet_aux_stage_by_stage(midas, name, side):
    from annotate.midas import depth_to_map, preprocess

    ref = fixture("midas")
    image = photo(name, side)
    assert sha256(image) == ref[f"{name}_image_sha256"]  # the same photo, the same crop
    x = preprocess([image], midas.detect_resolution)
    assert sha256(x) == ref[f"{name}_input_sha256"]  # the network's input, bit for bit
    raw = midas.predict_depth([image])[0]
    expected = ref[f"{name}_raw"]
    assert raw.shape == expected.shape and np.abs(raw - expected).max() <= 1e-4 * np.abs(expected).max()
    ours = depth_to_map(raw, image.shape[:2])
    theirs = ref[f"{name}_map"]
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert (diff == 0).mean() >= 0.995 and diff.max() <= 1, ((diff == 0).mean(), diff.max())
    # the annotator's own call (its map is this one) runs through the dataset job below


# -------------------------------------------------------------------------------------------------- OpenPose


@pytest.fixture(scope="module")
def openpose(weights, one_thread):
    from annotate.openpose import OpenPoseAnnotator

    return OpenPoseAnnotator(weights=str(weights), device="cpu")


@pytest.mark.parametrize(("name", "side"), OPENPOSE_IMAGES)
def test_openpose_matches_controlnet_aux_stage_by_stage(openpose, name, side):
    ref = fixture("openpose")
    image = ref[f"{name}_image"]  # the photo as the fixture was made from it (photo(name, side) under OpenCV 4.12:
    # 4.13 upscales with INTER_CUBIC to other bytes, so the photo itself cannot be made again here)
    assert sha256(image) == ref[f"{name}_image_sha256"] and image.shape == (side, side, 3)
    stages = openpose.stages(image)
    assert sha256(stages.network_input) == ref[f"{name}_input_sha256"]
    for output in ("pafs", "heatmaps"):
        assert np.abs(getattr(stages, output) - ref[f"{name}_{output}"]).max() <= 1e-4
    # every peak (x, y, score, id) and person (part ids, score, count) the same: positions, ids and counts exactly
    # (whole numbers, so within 1e-5 is equal), scores to float32's rounding of the network's outputs, whose last
    # bits depend on the CPU's kernels (5e-7 apart on an AVX-512 FP16 Xeon); the map below stays bit-exact
    np.testing.assert_allclose(stages.candidates, ref[f"{name}_candidate"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(stages.people, ref[f"{name}_subset"], rtol=0, atol=1e-5)
    assert len(stages.people) > 0  # the fixture's weights find people: decoding and drawing are exercised
    np.testing.assert_array_equal(stages.condition, ref[f"{name}_map"])  # bit-exact
    np.testing.assert_array_equal(openpose([image], ["k"])[0].condition, stages.condition)


# ------------------------------------------------------------------------------------------ the dataset job


def png_shard(path: Path, images: dict[str, np.ndarray]) -> Path:
    """An input shard of lossless photos (a JPEG would change the pixels the fixtures saw)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, image in images.items():
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            info = tarfile.TarInfo(f"{key}.png")
            info.size = buffer.tell()
            buffer.seek(0)
            tar.addfile(info, buffer)
    return path


@pytest.mark.parametrize("task", ["midas", "openpose"])
def test_the_dataset_job_writes_the_reference_maps(task, weights, tmp_path, ray_session):
    import webdataset as wds

    from pipeline.build import main as build_dataset

    ref = fixture(task)
    names = ["astronaut", "chelsea"] if task == "openpose" else ["astronaut"]
    png_shard(tmp_path / "in" / "00000.tar", {name: load_photo(name) for name in names})
    out = tmp_path / "out"
    assert build_dataset(["--task", task, "--input", str(tmp_path / "in"), "--output", str(out), "--weights",
                          str(weights), "--caption", "none", "--min-keypoint-fraction", "0"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["detect_resolution"] == 512  # controlnet_aux's default, recorded
    samples = {s["__key__"]: s for s in wds.WebDataset(str(out / "shards" / "00000.tar"), shardshuffle=False,
                                                       empty_check=False).decode("rgb8")}
    for name in names:
        condition = samples[name][f"{task}.png"]  # decoded as RGB
        theirs = ref[f"{name}_map"]
        theirs = np.repeat(theirs[:, :, None], 3, axis=2) if theirs.ndim == 2 else theirs
        diff = np.abs(condition.astype(int) - theirs.astype(int))
        assert (diff == 0).mean() >= (1.0 if task == "openpose" else 0.995) and diff.max() <= 1
        assert samples[name]["json"]["params"]["detect_resolution"] == 512
