"""Make the controlnet_aux parity fixtures (tests/parity/controlnet_aux_*.npz). A tool, not run by CI.

controlnet_aux 0.0.10 holds the ControlNet 1.1 annotators that users run at inference (diffusers' docs, ComfyUI,
the A1111 extension's code). It is not a project dependency: make a separate virtualenv for it, e.g.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.13.0 controlnet_aux==0.0.10 torchvision
    # the registry's torchvision for CPU torch is a CUDA build whose import fails until the two op schemas it
    # registers fake kernels for exist: put this in /tmp/ref/lib/python3.*/site-packages/sitecustomize.py
    #   import torch
    #   _lib = torch.library.Library("torchvision", "DEF")
    #   _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    #   _lib.define("qnms(Tensor qdets, Tensor qscores, float dets_scale, float scores_scale, "
    #               "float iou_threshold) -> Tensor")
    PYTHONPATH=. /tmp/ref/bin/python tests/parity/make_fixtures.py [hed] [midas] [openpose]

It writes pseudo-random weights in the official file layouts (tests/parity/weights.py: each tensor a function of
its name), runs controlnet_aux's HED, MiDaS and OpenPose on photos, one thread, and records every stage: the
network's input (sha256), its raw outputs, the decoded keypoints, and the final map (HED: the photo and the map).
"""
from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from pipeline.preprocess import center_crop_resize  # noqa: E402
from pipeline.sample_data import load_photo  # noqa: E402
from tests.parity.weights import openpose_state, pseudo_random_state, write_state  # noqa: E402

OUT = Path(__file__).resolve().parent
# (photo, side): the dataset job hands the annotators square crops at the dataset's resolution
MIDAS_IMAGES = (("astronaut", 512), ("coffee", 640))
OPENPOSE_IMAGES = (("astronaut", 512), ("chelsea", 512), ("coffee", 640))
# HED: a grey photo, a side below and one above the detect resolution, one that is no multiple of 64's rounding
HED_IMAGES = (("astronaut", 512), ("camera", 512), ("rocket", 384), ("coffee", 640))
DETECT_RESOLUTION = 512  # controlnet_aux's default
SEED = 0


def tensor_sha256(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().float().contiguous().numpy().tobytes()).hexdigest()


class Recorder:
    """A forward hook keeping a module's last input and output."""

    def __init__(self, module: torch.nn.Module):
        self.input = self.output = None
        module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.input, self.output = args[0], output


def midas_fixture(folder: Path) -> dict[str, np.ndarray]:
    from controlnet_aux.midas import MidasDetector
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    shapes = [(k, tuple(v.shape)) for k, v in DPTDepthModel(path=None, backbone="vitb_rn50_384",
                                                             non_negative=True).state_dict().items()]
    write_state(pseudo_random_state(shapes, SEED), folder / "dpt_hybrid-midas-501f0c75.pt")
    detector = MidasDetector.from_pretrained(str(folder))
    recorder = Recorder(detector.model)
    out: dict[str, np.ndarray] = {}
    for name, side in MIDAS_IMAGES:
        image = center_crop_resize(load_photo(name), side)
        depth_map = detector(image, detect_resolution=DETECT_RESOLUTION, image_resolution=side, output_type="np")
        out[f"{name}_image_sha256"] = np.array(hashlib.sha256(image.tobytes()).hexdigest())
        out[f"{name}_image"] = image  # the input itself: OpenCV 4.13 upscales (INTER_CUBIC) to other bytes
        out[f"{name}_input_sha256"] = np.array(tensor_sha256(recorder.input))
        out[f"{name}_raw"] = recorder.output[0].float().numpy()  # (h, w) relative inverse depth
        out[f"{name}_map"] = depth_map[:, :, 0]  # the three channels are equal
    return out


def hed_fixture(folder: Path) -> dict[str, np.ndarray]:
    from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector

    shapes = [(k, tuple(v.shape)) for k, v in ControlNetHED_Apache2().state_dict().items()]
    write_state(pseudo_random_state(shapes, SEED), folder / "ControlNetHED.pth")
    detector = HEDdetector.from_pretrained(str(folder))
    out: dict[str, np.ndarray] = {}
    for name, side in HED_IMAGES:
        image = center_crop_resize(load_photo(name), side)
        edges = detector(image, detect_resolution=DETECT_RESOLUTION, image_resolution=side, safe=False,
                         output_type="np")
        out[f"{name}_image"] = image
        out[f"{name}_map"] = edges[:, :, 0]  # the three channels are equal
    return out


def openpose_fixture(folder: Path) -> dict[str, np.ndarray]:
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import Body
    from controlnet_aux.open_pose.model import bodypose_model

    # the published file names layers without their stage prefix ('conv1_1.weight', not 'model0.conv1_1.weight')
    shapes = [(k.split(".", 1)[1], tuple(v.shape)) for k, v in bodypose_model().state_dict().items()]
    write_state(openpose_state(shapes, SEED), folder / "body_pose_model.pth")
    body = Body(str(folder / "body_pose_model.pth"))
    recorder = Recorder(body.model)
    decoded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    original_call = Body.__call__

    def recording_call(self, image):
        decoded["last"] = original_call(self, image)
        return decoded["last"]

    Body.__call__ = recording_call
    detector = OpenposeDetector(body)
    out: dict[str, np.ndarray] = {}
    for name, side in OPENPOSE_IMAGES:
        image = center_crop_resize(load_photo(name), side)
        pose_map = detector(image, detect_resolution=DETECT_RESOLUTION, image_resolution=side, output_type="np")
        candidate, subset = decoded["last"]
        pafs, heatmaps = recorder.output
        out[f"{name}_image_sha256"] = np.array(hashlib.sha256(image.tobytes()).hexdigest())
        out[f"{name}_image"] = image  # the input itself: OpenCV 4.13 upscales (INTER_CUBIC) to other bytes
        out[f"{name}_input_sha256"] = np.array(tensor_sha256(recorder.input))
        out[f"{name}_pafs"] = pafs[0].numpy()  # (38, h/8, w/8)
        out[f"{name}_heatmaps"] = heatmaps[0].numpy()  # (19, h/8, w/8)
        out[f"{name}_candidate"] = np.asarray(candidate, np.float64).reshape(-1, 4)  # x, y, score, id
        out[f"{name}_subset"] = np.asarray(subset, np.float64).reshape(-1, 20)  # per person: 18 ids, score, count
        out[f"{name}_map"] = pose_map  # (H, W, 3) RGB
    return out


def main() -> None:
    import controlnet_aux

    torch.set_num_threads(1)  # one thread: the parity tests compare at 1e-4 and below
    with tempfile.TemporaryDirectory() as tmp:
        tasks = sys.argv[1:] or ["hed", "midas", "openpose"]
        for task, make in (("hed", hed_fixture), ("midas", midas_fixture), ("openpose", openpose_fixture)):
            if task not in tasks:
                continue
            arrays = make(Path(tmp))
            arrays["controlnet_aux_version"] = np.array(getattr(controlnet_aux, "__version__", "0.0.10"))
            arrays["torch_version"] = np.array(torch.__version__)
            arrays["cv2_version"] = np.array(cv2.__version__)
            path = OUT / f"controlnet_aux_{task}.npz"
            np.savez_compressed(path, **arrays)
            print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
