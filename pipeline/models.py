"""the models one actor of the dataset job holds: each requested task's annotator, the captioner when captions come
from a model, and the base's VAE when the job stores latents; built from the job's config"""
from __future__ import annotations

from dataclasses import asdict

from annotate import annotator_params, build_annotator, build_captioner
from pipeline.config import BuildConfig


def models_device(cfg: BuildConfig, gpu_ids: list) -> str:
    """Where an actor's models run: --device, else the GPU the actor reserved (`gpu_ids`: ray.get_gpu_ids(); Ray
    narrows the actor's CUDA_VISIBLE_DEVICES to it, so "cuda" is that GPU), else the CPU. An actor that reserved no
    GPU (--gpus-per-worker 0) still sees every GPU of its node: "cuda when there is one" put the models of all such
    actors, one per CPU, on the node's first GPU, which Ray had not given to any of them."""
    return cfg.device or ("cuda" if gpu_ids else "cpu")


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
