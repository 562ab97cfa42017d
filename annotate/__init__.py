"""annotate: pure image -> condition-map functions and models (no Ray, no storage, no shards)"""
from __future__ import annotations

from collections.abc import Callable
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

# caption source name -> factory taking keyword arguments: weights, device, generation params.
CAPTIONERS: dict[str, Callable[..., Captioner]] = {
    "blip": _lazy("annotate.blip:BlipCaptioner"),
}


def build_annotator(task: str, **kwargs: Any) -> Annotator:
    """Build the annotator registered under `task`; unknown names are a clear error."""
    if task not in ANNOTATORS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(sorted(ANNOTATORS))}")
    return ANNOTATORS[task](**kwargs)


def build_captioner(name: str, **kwargs: Any) -> Captioner:
    if name not in CAPTIONERS:
        raise ValueError(f"unknown captioner {name!r}; choose one of {', '.join(sorted(CAPTIONERS))}")
    return CAPTIONERS[name](**kwargs)


__all__ = [
    "ANNOTATORS",
    "CAPTIONERS",
    "Annotation",
    "Annotator",
    "Captioner",
    "build_annotator",
    "build_captioner",
]
