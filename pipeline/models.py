"""the models one actor of the dataset job holds: each requested task's annotator, the captioner when captions come
from a model, and the base's VAE when the job stores latents; built from the job's config"""
from __future__ import annotations

from dataclasses import asdict

from annotate import annotator_params, build_annotator, build_captioner
from pipeline.config import BuildConfig


def build_models(cfg: BuildConfig):
    """{task: annotator} for every requested task and (when captions come from a model) the captioner, as each
    actor holds them: every image of a multi-task job passes through all of them."""
    settings = asdict(cfg)
    annotators = {task: build_annotator(task, device=cfg.device, **annotator_params(task, settings))
                  for task in cfg.tasks}
    captioner = None
    if cfg.caption in {"blip", "auto"}:
        captioner = build_captioner("blip", weights=cfg.weights, device=cfg.device, num_beams=cfg.caption_beams)
    return annotators, captioner


def build_latent_encoder(cfg: BuildConfig):
    """The base's VAE when --latents asks for stored latents, else None."""
    if not cfg.latents:
        return None
    from annotate.latents import LatentEncoder

    return LatentEncoder(cfg.latents, device=cfg.device)
