"""annotate: pure image -> condition-map functions and models (no Ray, no storage, no shards)"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any

from annotate.base import Annotation, Annotator, Captioner


def _lazy(path: str) -> Callable[..., Any]:
    """A factory that imports `module:Class` on first use, so `canny` never pulls in torch models."""
    module, cls = path.split(":")

    def factory(**kwargs: Any) -> Any:
        return getattr(import_module(module), cls)(**kwargs)

    factory.__qualname__ = path
    return factory


# task name -> factory taking keyword arguments: seed, weights (folder/URL or None), device, task params.
ANNOTATORS: dict[str, Callable[..., Annotator]] = {
    "canny": _lazy("annotate.canny:CannyAnnotator"),
    "hed": _lazy("annotate.hed:HEDAnnotator"),
    "scribble": _lazy("annotate.scribble:ScribbleAnnotator"),
    "midas": _lazy("annotate.midas:MidasAnnotator"),
    "openpose": _lazy("annotate.openpose:OpenPoseAnnotator"),
}

NEURAL_TASKS = ("hed", "scribble", "midas", "openpose")  # networks run at a detect resolution (annotate.resize)

# caption source name -> factory taking keyword arguments: weights, device, generation params.
CAPTIONERS: dict[str, Callable[..., Captioner]] = {
    "blip": _lazy("annotate.blip:BlipCaptioner"),
}


def build_annotator(task: str, **kwargs: Any) -> Annotator:
    """Build the annotator registered under `task`; unknown names are a clear error."""
    if task not in ANNOTATORS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(sorted(ANNOTATORS))}")
    return ANNOTATORS[task](**kwargs)


def annotator_params(task: str, job_config: Mapping[str, Any]) -> dict[str, Any]:
    """An annotator's keyword arguments (but the device) from the dataset job's settings: its config as given, or
    as a dataset's manifest records it. One mapping, so that the trainer's fidelity scorer re-annotates generated
    images exactly as the dataset was annotated (same Canny ranges and seed, same weights)."""
    params: dict[str, Any] = {"seed": job_config.get("seed", 0), "weights": job_config.get("weights")}
    if task == "canny":
        named = {"canny_low": "low_range", "canny_high_gap": "high_gap"}
        params |= {name: tuple(job_config[key]) for key, name in named.items() if job_config.get(key) is not None}
    elif task == "openpose" and job_config.get("min_keypoint_fraction") is not None:
        params["min_keypoint_fraction"] = job_config["min_keypoint_fraction"]
    if task in NEURAL_TASKS and job_config.get("detect_resolution") is not None:
        params["detect_resolution"] = job_config["detect_resolution"]
    return params


def build_captioner(name: str, **kwargs: Any) -> Captioner:
    if name not in CAPTIONERS:
        raise ValueError(f"unknown captioner {name!r}; choose one of {', '.join(sorted(CAPTIONERS))}")
    return CAPTIONERS[name](**kwargs)


__all__ = [
    "ANNOTATORS",
    "CAPTIONERS",
    "NEURAL_TASKS",
    "Annotation",
    "Annotator",
    "Captioner",
    "annotator_params",
    "build_annotator",
    "build_captioner",
]
