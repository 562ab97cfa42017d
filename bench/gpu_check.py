"""make gpu-check: one offline command that proves the CUDA paths and takes the GPU figures.

Sections, most important first, each guarded by the time budget (one that would not fit is skipped and says so):

  environment   torch, CUDA, the GPU, and its measured bf16 matrix rate (the MFU denominator)
  parity        the annotators (HED, MiDaS, OpenPose, BLIP) on the GPU against the CPU, map by map
  amp           one trainer step under bf16 autocast and under fp16 with the grad scaler
  toy           the toy reproduction on the GPU: base pretraining and ControlNet s/step, one fidelity evaluation
  sd15          Stable Diffusion 1.5's architecture (random weights, 512 px): ControlNet training samples/s, peak
                memory and MFU at batch 8 and 32, with and without gradient checkpointing, against the plain
                UNet fine-tuning step (the paper's overhead)
  levers        the trainer's GPU levers at SD 1.5 size: the ControlNet step on stored latents as the trainer runs
                it, with cuDNN's autotuning, with channels-last weights, and with --compile when time is left (not
                with --smoke), timed in turn over rounds; tuning and compile times apart
  data          the trainer's stream at 512 px: samples/s from the sd15 preset's 2 loader workers and more, images
                decoded or stored latents read, against the samples/s the sd15 section trained (does it keep up?)
  annotators    full-size HED, MiDaS DPT-Hybrid, OpenPose and BLIP-large at 512 px: images/s by batch size

Needs no Ray, no W&B and no network: what the GPU machine lacks travels as wheels (`make gpu-wheels`). `--smoke`
runs every section at toy sizes on the CPU (a test runs it, so it cannot rot). Writes gpu_check.json and
gpu_check.md to --out and prints the tables.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/gpu_check.py`: import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np
import torch

PEAK_BF16_TFLOPS_NOTE = "MFU is against the bf16 matrix rate measured in `environment`, not the datasheet's"
NEMO_ANCHOR = "NVIDIA NeMo: 27.2 samples/s for SD 1.5 ControlNet on one A100-80G (batch 32, flash attention, " \
              "channels-last, Inductor)"
PAPER_OVERHEAD = "the paper: +34% time and +23% memory over fine-tuning SD alone, on an A100"

# Stable Diffusion 1.5's published component configs (runwayml/stable-diffusion-v1-5), so the architecture is
# built without a download; weights are random
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    center_input_sample=False, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
SD15_TEXT = dict(  # CLIP ViT-L/14's text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
ANNOTATOR_TASKS = ("hed", "midas", "openpose", "blip")


# ---------------------------------------------------------------------------------------------------------
# the run: sizes, the time budget, one section at a time


@dataclass(frozen=True)
class Sizes:
    """What each section runs at: the real sizes on a GPU, toy ones for --smoke on the CPU."""

    matmul_n: int
    parity_px: int
    parity_images: int
    sd_px: int
    sd_batches: tuple[int, ...]
    sd_timed_steps: int
    annotator_px: int
    annotator_images: int
    annotator_batches: tuple[int, ...]
    annotator_tasks: tuple[str, ...]
    toy_batch: int
    toy_steps: int
    toy_validation_samples: int
    full_size: bool  # SD 1.5 and full-size annotators; else the tiny test models
    warmup_steps: int
    detect_resolution: int | None  # the neural annotators' (None: their default, 512)
    data_workers: tuple[int, ...]  # loader workers per rank, timed one after the other
    data_samples: int  # samples streamed per timing

    @classmethod
    def of(cls, smoke: bool) -> Sizes:
        if smoke:  # OpenPose's throughput is left out: its full-size network is slow on a CPU (parity runs it)
            return cls(matmul_n=256, parity_px=64, parity_images=1, sd_px=64, sd_batches=(2,), sd_timed_steps=1,
                       annotator_px=64, annotator_images=2, annotator_batches=(1, 2),
                       annotator_tasks=("hed", "midas", "blip"), toy_batch=8, toy_steps=1, toy_validation_samples=2,
                       full_size=False, warmup_steps=1, detect_resolution=64, data_workers=(1,), data_samples=16)
        return cls(matmul_n=8192, parity_px=256, parity_images=3, sd_px=512, sd_batches=(8, 32), sd_timed_steps=5,
                   annotator_px=512, annotator_images=32, annotator_batches=(1, 8, 32),
                   annotator_tasks=ANNOTATOR_TASKS, toy_batch=32, toy_steps=20, toy_validation_samples=64,
                   full_size=True, warmup_steps=2, detect_resolution=None, data_workers=(2, 4, 8), data_samples=512)


# seconds each section needs at the real sizes on one H100/H200-class GPU (a section is skipped when less is left):
# what each took on an H200 (2026-12: environment 6-7, parity 13, amp 42, toy 34, sd15 100, levers 30 without
# --compile, data 14, annotators 80), rounded up. The default budget holds them all; --compile's row only where
# more is given
ESTIMATE_S = {"environment": 10, "parity": 20, "amp": 50, "toy": 40, "sd15": 120, "levers": 45, "data": 20,
              "annotators": 90}
DEFAULT_BUDGET_S = 420.0


@dataclass
class Budget:
    seconds: float
    started: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    budget: Budget
    tmp: Path
    smoke: bool
    results: dict[str, Any] = field(default_factory=dict)  # earlier sections' results (the matmul rate)

    def say(self, message: str) -> None:
        print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def check(name: str, passed: bool, detail: str = "") -> dict[str, Any]:
    return {"check": name, "passed": bool(passed), "detail": detail}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_section(name: str, section: Callable[[Context], dict[str, Any]], ctx: Context) -> dict[str, Any]:
    """Run one section unless its estimate exceeds what is left; an exception fails the section, not the run."""
    estimate = 0 if ctx.smoke else ESTIMATE_S[name]
    left = ctx.budget.left()
    if estimate > left:
        ctx.say(f"{name}: skipped (needs ~{estimate} s, {left:.0f} s of the budget left)")
        return {"status": "skipped", "reason": f"needs ~{estimate} s, {left:.0f} s left"}
    ctx.say(f"{name}: running ({left:.0f} s of the budget left)")
    started = time.perf_counter()
    try:
        result = section(ctx)
        failed = [c for c in result.get("checks", []) if not c["passed"]]
        result["status"] = "failed" if failed else "ok"
    except Exception as e:  # recorded with its traceback; the other sections still run
        traceback.print_exc()
        result = {"status": "error", "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    result["seconds"] = round(time.perf_counter() - started, 1)
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    ctx.say(f"{name}: {result['status']} in {result['seconds']} s")
    return result


# ---------------------------------------------------------------------------------------------------------
# environment


def matmul_tflops(device: torch.device, n: int, dtype: torch.dtype, repeats: int = 10) -> float:
    """The measured matrix rate: mean of `repeats` n x n x n products on random data after 3 warm-ups."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def environment(ctx: Context) -> dict[str, Any]:
    import diffusers
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__, "cpus": os.cpu_count(),
        "device": str(ctx.device),
    }
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        info |= {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                 "gpu_memory_gb": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count,
                 "bf16": torch.cuda.is_bf16_supported()}
    info["matmul_dtype"] = str(dtype).removeprefix("torch.")
    # three significant figures, not two decimals: a loaded CPU's ~0.004 TFLOP/s rounded to 0.0, and the check failed
    info["matmul_tflops"] = float(f"{matmul_tflops(ctx.device, ctx.sizes.matmul_n, dtype):.3g}")
    ctx.results["matmul_tflops"] = info["matmul_tflops"]
    return {"info": info, "checks": [check("matrix rate measured", info["matmul_tflops"] > 0,
                                           f"{info['matmul_tflops']} TFLOP/s ({info['matmul_dtype']})")]}


# ---------------------------------------------------------------------------------------------------------
# parity: the annotators on the device against the CPU


def parity_images(px: int, count: int) -> list[np.ndarray]:
    from pipeline.preprocess import center_crop_resize
    from pipeline.sample_data import load_photo

    return [center_crop_resize(load_photo(name), px) for name in ("astronaut", "chelsea", "coffee")[:count]]


def map_agreement(cpu: np.ndarray, device: np.ndarray) -> dict[str, float]:
    """How two uint8 maps of one image differ: identical-pixel fraction, 99th percentile and max |difference|."""
    diff = np.abs(cpu.astype(int) - device.astype(int))
    return {"identical": float((diff == 0).mean()), "p99": float(np.percentile(diff, 99)), "max": int(diff.max())}


# per task: the most a map may differ (99th percentile of |difference| in grey levels) and the least fraction of
# identical pixels. HED and MiDaS run under fp16 autocast on a GPU (measured on an H200: p99 1, max 1). OpenPose runs
# exact fp32 there, and its maps were the CPU's pixel for pixel: 0.999 leaves room for one keypoint's dot, not a limb
# (under fp16 autocast one map was 0.988 identical)
MAP_TOLERANCE = {"hed": (3, 0.0), "midas": (4, 0.0), "openpose": (0, 0.999)}


def write_tiny_annotator_weights(folder: Path) -> str:
    from tests.tiny_weights.blip import write_tiny_blip
    from tests.tiny_weights.hed import write_tiny_hed
    from tests.tiny_weights.midas import write_tiny_dpt
    from tests.tiny_weights.openpose import write_tiny_openpose

    for write in (write_tiny_hed, write_tiny_openpose, write_tiny_dpt, write_tiny_blip):
        write(folder)
    return str(folder)


def detect_kwargs(ctx: Context) -> dict[str, int]:
    """The neural annotators' detect resolution at this run's sizes (their default, 512, on a GPU)."""
    return {} if ctx.sizes.detect_resolution is None else {"detect_resolution": ctx.sizes.detect_resolution}


def raw_openpose(annotator, images: list[np.ndarray]) -> np.ndarray:
    """The network's heatmaps and PAFs at the first scale, concatenated: the stage before keypoint decoding."""
    from annotate.resize import to_detection

    detected = [to_detection(image, annotator.detect_resolution) for image in images]
    pafs, heatmaps, _ = annotator._forward(detected, annotator.scales[0])
    return np.concatenate([pafs, heatmaps], axis=1)


def openpose_under_autocast(ctx: Context, weights: str, images: list[np.ndarray], keys: list[str],
                            cpu: list[Any]) -> list[dict[str, Any]]:
    """OpenPose on the device under fp16 autocast against the CPU's maps: rows only (the annotator runs fp32), to
    show what autocast would move."""
    from annotate import build_annotator

    fp16 = build_annotator("openpose", weights=weights, device=str(ctx.device), fp16=True, **detect_kwargs(ctx))
    return [parity_row("openpose fp16 autocast", key, c, g)
            for key, c, g in zip(keys, cpu, fp16(images, keys), strict=True)]


def parity_row(task: str, key: str, cpu: Any, device: Any) -> dict[str, Any]:
    """One image's CPU and device annotations compared: the maps' agreement and whether each kept the sample."""
    return {"task": task, "image": key, **map_agreement(cpu.condition, device.condition), "keep_cpu": cpu.keep,
            "keep_device": device.keep}


def parity(ctx: Context) -> dict[str, Any]:
    from annotate import build_annotator, build_captioner
    from annotate.device import exact_fp32

    weights = write_tiny_annotator_weights(ctx.tmp / "tiny-weights")
    images = parity_images(ctx.sizes.parity_px, ctx.sizes.parity_images)
    keys = [f"p{i}" for i in range(len(images))]
    rows, checks = [], []
    with exact_fp32():  # what autocast leaves in fp32 stays fp32 on both sides
        for task, (p99_limit, identical_limit) in MAP_TOLERANCE.items():
            annotators = {d: build_annotator(task, weights=weights, device=d, **detect_kwargs(ctx))
                          for d in ("cpu", str(ctx.device))}
            cpu, dev = (annotators[d](images, keys) for d in ("cpu", str(ctx.device)))
            for key, c, g in zip(keys, cpu, dev, strict=True):
                same_shape = c.condition.shape == g.condition.shape and c.condition.dtype == g.condition.dtype
                row = parity_row(task, key, c, g)
                rows.append(row)
                checks.append(check(f"{task} {key}: map within tolerance",
                                    same_shape and row["p99"] <= p99_limit
                                    and row["identical"] >= identical_limit and c.keep == g.keep,
                                    f"identical {row['identical']:.4f}, p99 {row['p99']:.0f}, max {row['max']}"))
            if task == "openpose":
                rows += openpose_under_autocast(ctx, weights, images, keys, cpu)
                # the maps of random weights are mostly empty: the raw maps show the agreement
                raw_cpu, raw_dev = (raw_openpose(annotators[d], images) for d in ("cpu", str(ctx.device)))
                error = float(np.abs(raw_cpu - raw_dev).max() / max(np.abs(raw_cpu).max(), 1e-12))
                # 1e-3: fp32's differences in summation order are far below it, fp16's rounding (2.8e-3) above
                checks.append(check("openpose: heatmaps and PAFs within 0.1% (relative to their range)",
                                    error <= 1e-3, f"max relative difference {error:.2e}"))
                rows.append({"task": "openpose raw", "image": "all", "max_relative": error})
        captions = {d: build_captioner("blip", weights=weights, device=d)(images) for d in ("cpu", str(ctx.device))}
    same = sum(a == b for a, b in zip(captions["cpu"], captions[str(ctx.device)], strict=True))
    checks.append(check("blip: captions are strings", all(isinstance(c, str) for c in captions[str(ctx.device)]),
                        f"{same}/{len(images)} identical to the CPU's"))
    return {"rows": rows, "checks": checks}


# ---------------------------------------------------------------------------------------------------------
# amp: one trainer step under bf16 autocast and under fp16 with the grad scaler


def synthetic_batch(batch: int, px: int, seed: int = 0) -> dict[str, Any]:
    """Smooth random images and sparse random edge maps: what a training batch looks like, no data needed."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.interpolate(torch.rand(batch, 3, px // 8, px // 8, generator=g), size=px,
                                             mode="bilinear").mul(2).sub(1)
    edges = (torch.rand(batch, 1, px, px, generator=g) > 0.9).float().expand(-1, 3, -1, -1).contiguous()
    return {"pixel_values": images, "conditioning_pixel_values": edges,
            "caption": ["a photo of a red house on a street"] * batch}


def module_digest(*modules: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def tiny_base():
    """The debug preset's tiny random SD, built in memory."""
    from train.model import BaseModel
    from train.tiny_sd import tiny_pipeline, write_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        pipe = tiny_pipeline(write_tokenizer(Path(tmp) / "tokenizer"), seed=0)
    return BaseModel(pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.scheduler, pipe.vae)


def amp_step(ctx: Context, precision: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from train.config import debug
    from train.loop import Trainer
    from train.model import zero_convolutions


    cfg = dataclasses.replace(debug(), mixed_precision=precision, batch_size=2)
    trainer = Trainer(cfg, 0, 1, ctx.device, base=tiny_base())
    locked = module_digest(*trainer.base.frozen_modules)
    generator = torch.Generator(ctx.device).manual_seed(0)
    # 4 steps: fp16's grad scaler starts high and may skip the first steps (overflow), as it is meant to
    losses = [trainer.train_step([synthetic_batch(2, cfg.resolution, seed=s)], generator).item() for s in range(4)]
    masters = {p.dtype for p in trainer.controlnet.parameters()}
    zero_convs = [m.weight for m in zero_convolutions(trainer.controlnet)]
    used = str(trainer.amp_dtype).removeprefix("torch.") if trainer.amp_dtype else "none (fp32)"
    row = {"precision": precision, "autocast": used, "losses": [round(x, 5) for x in losses],
           "grad_scale": trainer.scaler.get_scale() if trainer.scaler.is_enabled() else None}
    checks = [
        check(f"{precision}: finite losses", all(np.isfinite(losses)), f"{row['losses']} (autocast {used})"),
        check(f"{precision}: ControlNet master weights fp32", masters == {torch.float32},
              str(sorted(map(str, masters)))),
        check(f"{precision}: locked SD unchanged", module_digest(*trainer.base.frozen_modules) == locked),
        check(f"{precision}: zero convolutions trained (non-zero)", all(w.abs().sum() > 0 for w in zero_convs)),
    ]
    if precision == "fp16" and ctx.device.type == "cuda":
        checks.append(check("fp16: grad scaler on", trainer.scaler.is_enabled(), f"scale {row['grad_scale']}"))
    return row, checks


def amp(ctx: Context) -> dict[str, Any]:
    rows, checks = [], []
    for precision in ("bf16", "fp16"):
        row, more = amp_step(ctx, precision)
        rows.append(row)
        checks += more
    return {"rows": rows, "checks": checks}


# ---------------------------------------------------------------------------------------------------------
# toy: the reproduction's two phases and its fidelity evaluation on the device


def toy_batch(count: int, offset: int = 0) -> tuple[dict[str, Any], list[str]]:
    """`count` toy shapes with their Canny maps, annotated as `make repro`'s dataset job does."""
    from annotate import build_annotator
    from pipeline.toy_shapes import sample as toy_sample
    from train.data import to_tensors

    canny = build_annotator("canny", seed=0, low_range=(80, 120), high_gap=(60, 100))
    pairs = [toy_sample(0, offset + i) for i in range(count)]
    keys = [f"t{offset + i:06d}" for i in range(count)]
    maps = canny([image for image, _ in pairs], keys)
    tensors = [to_tensors(image, np.repeat(m.condition[:, :, None], 3, axis=2)) for (image, _), m in zip(pairs, maps,
                                                                                                        strict=True)]
    return {"pixel_values": torch.stack([t for t, _ in tensors]),
            "conditioning_pixel_values": torch.stack([c for _, c in tensors]),
            "caption": [caption for _, caption in pairs], "key": keys}, [c for _, c in pairs]


def seconds_per_step(step: Callable[[], Any], device: torch.device, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def base_pretraining_seconds(ctx: Context, batch: dict[str, Any], captions: list[str]) -> list[float]:
    """s/step of the toy base's pretraining (train.pretrain_base's step, at its default settings) on the device."""
    from diffusers.training_utils import EMAModel

    from train.model import ControlledUNet
    from train.pretrain_base import PretrainConfig, base_train_step, build_base

    cfg = PretrainConfig()
    base = build_base(cfg, sorted({w for c in captions for w in c.split()}), ctx.tmp / "toy-base")
    for module in (base.unet, base.text_encoder):
        module.to(ctx.device)
    params = [*base.unet.parameters(), *base.text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    ema = EMAModel(params, decay=cfg.ema_decay)
    generator = torch.Generator(ctx.device).manual_seed(0)
    model = ControlledUNet(base.unet, None)
    return seconds_per_step(lambda: base_train_step(base, model, params, optimizer, ema, batch, generator,
                                                    ctx.device), ctx.device, ctx.sizes.toy_steps,
                            ctx.sizes.warmup_steps)


def toy(ctx: Context) -> dict[str, Any]:
    """The toy reproduction's two phases on the device (s/step, so the README can say how long `make repro` takes
    there), and one fidelity evaluation of the toy preset (Canny re-run on the samples, edge F1)."""
    from annotate import build_annotator
    from train.config import toy as toy_preset
    from train.loop import Trainer
    from train.pretrain_base import PretrainConfig
    from train.validate import FidelityTracker, ValidationSet

    batch, captions = toy_batch(ctx.sizes.toy_batch)
    rows, checks = [], []
    times = base_pretraining_seconds(ctx, batch, captions)
    rows.append({"phase": f"base pretraining (batch {ctx.sizes.toy_batch})", "s_per_step": statistics.median(times),
                 "steps": len(times), "minutes_for_preset": statistics.median(times) * PretrainConfig().steps / 60})
    # phase 2: the ControlNet on the committed toy base, and one fidelity evaluation
    preset = dataclasses.replace(toy_preset(), validation_samples=ctx.sizes.toy_validation_samples)
    trainer = Trainer(preset, 0, 1, ctx.device)
    generator = torch.Generator(ctx.device).manual_seed(0)
    losses: list[float] = []
    times = seconds_per_step(lambda: losses.append(trainer.train_step([batch], generator).item()), ctx.device,
                             ctx.sizes.toy_steps, ctx.sizes.warmup_steps)
    precision = str(trainer.amp_dtype).removeprefix("torch.") if trainer.amp_dtype else "fp32"
    rows.append({"phase": f"ControlNet (batch {ctx.sizes.toy_batch}, {precision})",
                 "s_per_step": statistics.median(times), "steps": len(times),
                 "minutes_for_preset": statistics.median(times) * 500 / 60})
    checks.append(check("toy ControlNet: finite losses", all(np.isfinite(losses)), f"last {losses[-1]:.4f}"))
    held_out, _ = toy_batch(preset.validation_samples, offset=10_000)
    vset = ValidationSet(held_out["conditioning_pixel_values"], held_out["pixel_values"], held_out["caption"],
                         held_out["key"])
    canny = build_annotator("canny", seed=0, low_range=(80, 120), high_gap=(60, 100))
    tracker = FidelityTracker("canny", canny, tuple(preset.prompt_modes), tuple(preset.guidance_scales))
    synchronize(ctx.device)
    start = time.perf_counter()
    metrics, _ = tracker.evaluate(trainer, vset, step=len(losses))
    synchronize(ctx.device)
    evaluation_s = time.perf_counter() - start
    primary = metrics[tracker.primary]
    rows.append({"phase": f"fidelity evaluation ({len(vset.keys)} samples x {len(preset.prompt_modes)} prompt modes x "
                 f"{len(preset.guidance_scales)} scales, {preset.validation_steps} {preset.validation_sampler} steps)",
                 "s_per_step": evaluation_s, "steps": 1, "minutes_for_preset": evaluation_s * 11 / 60})
    checks.append(check("toy fidelity evaluation: scores in [0, 1]", all(0.0 <= v <= 1.0 for k, v in metrics.items()
                                                                         if k.endswith("edge_f1")),
                        f"{tracker.primary} {primary:.3f}"))
    return {"rows": rows, "checks": checks,
            "note": "minutes_for_preset: base 2,000 steps; ControlNet 500 steps (make repro); 11 evaluations"}


# ---------------------------------------------------------------------------------------------------------
# sd15: training throughput at Stable Diffusion 1.5's size


def sd15_base(device: torch.device, full_size: bool):
    """SD 1.5's UNet, CLIP ViT-L text encoder and VAE from their configs, random weights (on the device), or the
    debug tiny SD for --smoke."""
    if not full_size:
        base = tiny_base()
        for module in base.frozen_modules:
            module.to(device)
        return base
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from train.model import BaseModel
    from train.tiny_sd import sd_scheduler, write_tokenizer

    tokenizer = write_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer")  # 77 tokens, as SD's
    torch.manual_seed(0)
    with device:  # initialised where they run: seconds instead of a minute on the CPU
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id,
                                                    pad_token_id=tokenizer.pad_token_id))
    return BaseModel(tokenizer, text_encoder, unet, sd_scheduler(), vae)


def count_flops(step: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def measure_training(ctx: Context, name: str, make_step: Callable[[int], Callable[[], Any]], batch: int,
                     checkpointing: bool) -> dict[str, Any]:
    """One row: median s/step, samples/s, peak memory and MFU of `make_step(batch)` (OOM is recorded, not raised)."""
    row: dict[str, Any] = {"model": name, "batch": batch, "grad_checkpointing": checkpointing}
    try:
        reset_peak(ctx.device)
        step = make_step(batch)
        times = seconds_per_step(step, ctx.device, ctx.sizes.sd_timed_steps, ctx.sizes.warmup_steps)
        memory = peak_gb(ctx.device)
        flops = count_flops(step)
    except torch.cuda.OutOfMemoryError:
        return {**row, "error": "out of memory"}
    seconds = statistics.median(times)
    rate = ctx.results.get("matmul_tflops")
    achieved = flops / seconds / 1e12
    return {**row, "s_per_step": seconds, "samples_per_s": batch / seconds, "peak_memory_gb": memory,
            "tflop_per_step": flops / 1e12, "achieved_tflops": achieved, "mfu": achieved / rate if rate else None}


def with_stored_latents(base, data: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch as a dataset built with --latents gives it: the VAE's mean and std instead of the images."""
    with torch.no_grad():
        dist = base.vae.encode(data["pixel_values"].to(device, base.vae.dtype)).latent_dist
    stored = torch.stack([dist.mean, dist.std], dim=1).to(torch.float16).float()  # stored as float16
    return {**{k: v for k, v in data.items() if k != "pixel_values"}, "latent_dist": stored}


def controlnet_steps(ctx: Context, base, checkpointing: bool, px: int, stored_latents: bool = False,
                     torch_compile: bool = False, channels_last: bool = False) -> Callable[[int], Callable[[], Any]]:

    from train.config import sd15 as sd15_preset
    from train.loop import Trainer

    def make(batch: int) -> Callable[[], Any]:
        cfg = dataclasses.replace(sd15_preset(), resolution=px, batch_size=batch, mixed_precision="bf16",
                                  gradient_checkpointing=checkpointing, compile=torch_compile)
        if not checkpointing:  # an earlier configuration may have turned it on in the shared base
            base.unet.disable_gradient_checkpointing()
        with ctx.device:  # the ControlNet copy initialised on the device
            trainer = Trainer(cfg, 0, 1, ctx.device, base=base)
        if channels_last:  # before the first step creates the optimizer's state, which follows the weights' layout
            for module in (trainer.base.unet, trainer.controlnet):
                module.to(memory_format=torch.channels_last)
        data = synthetic_batch(batch, px)
        if stored_latents:
            data = with_stored_latents(base, data, ctx.device)
        generator = torch.Generator(ctx.device).manual_seed(0)
        return lambda: trainer.train_step([data], generator)

    return make


def unet_steps(ctx: Context, base, checkpointing: bool, px: int) -> Callable[[int], Callable[[], Any]]:
    """The plain fine-tuning step on the same model: the whole UNet trains (fp32 master weights, bf16 autocast),
    text encoder and VAE frozen, the same loss, AdamW and clipping: the paper's baseline for the overhead."""
    from train.model import ControlledUNet, diffusion_loss, encode_prompts

    def make(batch: int) -> Callable[[], Any]:
        amp = torch.bfloat16 if ctx.device.type == "cuda" else None
        # nn.Module.to, as the trainer casts: diffusers' own warns on each cast of modules it keeps none of in fp32
        torch.nn.Module.to(base.unet, dtype=torch.float32).requires_grad_(True).train()
        for module in (base.text_encoder, base.vae):
            torch.nn.Module.to(module, dtype=amp or torch.float32).requires_grad_(False)
        if checkpointing:
            base.unet.enable_gradient_checkpointing()
        else:
            base.unet.disable_gradient_checkpointing()
        params = list(base.unet.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        model = ControlledUNet(base.unet, None)
        data = synthetic_batch(batch, px)
        generator = torch.Generator(ctx.device).manual_seed(0)

        def step() -> float:
            pixels = data["pixel_values"].to(ctx.device)
            text = encode_prompts(base, data["caption"], ctx.device)
            with torch.autocast(ctx.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = diffusion_loss(base, model, pixels, None, text, generator)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        return step

    return make


def sd15(ctx: Context) -> dict[str, Any]:
    sizes = ctx.sizes
    base = sd15_base(ctx.device, sizes.full_size)
    plan = [("ControlNet", controlnet_steps, b, gc_on) for b in sizes.sd_batches for gc_on in (False, True)]
    plan += [("ControlNet, stored latents", partial(controlnet_steps, stored_latents=True), b, False)
             for b in sizes.sd_batches]  # the VAE encoder's share of a step, which --latents saves
    plan += [("UNet fine-tuning", unet_steps, b, False) for b in sizes.sd_batches]
    per_config_s = 20 if sizes.full_size else 0
    rows = []
    for name, steps, batch, checkpointing in plan:
        if ctx.budget.left() < per_config_s:
            rows.append({"model": name, "batch": batch, "grad_checkpointing": checkpointing,
                         "error": "skipped: out of time budget"})
            continue
        ctx.say(f"sd15: {name}, batch {batch}, gradient checkpointing {'on' if checkpointing else 'off'}")
        rows.append(measure_training(ctx, name, steps(ctx, base, checkpointing, sizes.sd_px), batch, checkpointing))
        gc.collect()
    checks = [check(f"{r['model']} batch {r['batch']}{' +ckpt' if r['grad_checkpointing'] else ''}: ran",
                    "error" not in r or "skipped" in r["error"], r.get("error", f"{r['samples_per_s']:.2f} samples/s"))
              for r in rows]
    overhead = overhead_ratios(rows)
    stored = [r["samples_per_s"] for r in rows if r["model"] == "ControlNet, stored latents" and "samples_per_s" in r]
    if stored:  # what the data section's stream has to keep up with
        ctx.results["trained_samples_per_s"] = max(stored)
    return {"rows": rows, "checks": checks, "overhead": overhead, "resolution": sizes.sd_px,
            "notes": [PEAK_BF16_TFLOPS_NOTE, NEMO_ANCHOR, PAPER_OVERHEAD]}


@dataclass(frozen=True)
class Lever:
    autotune: bool = False  # torch.backends.cudnn.benchmark
    channels_last: bool = False  # the UNet's and the ControlNet's convolution weights in NHWC
    compile: bool = False  # --compile (torch.compile, inductor)


LEVERS = {  # the trainer's default first (the others' speed is against it); the compiled row last (skipped when time
    # runs short)
    "trainer default": Lever(),
    "cuDNN autotuning": Lever(autotune=True),
    "channels-last weights": Lever(channels_last=True),
    "--compile": Lever(compile=True),
}
COMPILE_ROW_S = 160  # what the compiled row needs at SD 1.5 size: its first step compiled for 141 s on an H200
LEVER_ROUNDS = 3  # rounds of timing, each row in turn in each


@contextlib.contextmanager
def lever_applied(base, lever: Lever) -> Iterator[None]:
    """The process-wide and shared parts of a lever, for one row's steps: cuDNN's autotuning and the shared UNet's
    memory format (each row's ControlNet keeps its own)."""
    torch.backends.cudnn.benchmark = lever.autotune
    if lever.channels_last:
        base.unet.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = False
        base.unet.to(memory_format=torch.contiguous_format)


def allocated_bytes(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def levers(ctx: Context) -> dict[str, Any]:
    """The trainer's GPU levers at SD 1.5 size, side by side: the ControlNet step on stored latents at the first SD
    batch as the trainer runs it, with cuDNN's autotuning (the trainer ran with it until two of these checks measured
    0.99x and 0.82x), with the UNet's and ControlNet's weights channels-last (NVIDIA's SD recipe in NeMo uses it), and
    with --compile. Every row is built and stepped first (its first step apart: it holds the compile and cuDNN's
    tuning), then all are timed in turn, LEVER_ROUNDS rounds: on an H200 the same step timed as one row after another
    drifted from 0.137 to 0.185 s over a run, which a row's place would have turned into its speed. A row's memory is
    the base's plus its own peak over what was allocated before it was built (the rows built before it stay).
    --smoke leaves the compiled row out (inductor compiles for minutes on a CPU)."""
    sizes, batch = ctx.sizes, ctx.sizes.sd_batches[0]
    base = sd15_base(ctx.device, sizes.full_size)
    base_bytes = allocated_bytes(ctx.device)
    built, notes = [], []
    for name, lever in LEVERS.items():
        # (the sections after this one keep their time: the compiled row is the one to go without)
        if lever.compile and (ctx.smoke or ctx.budget.left() - ctx.results.get("reserved_after_s", 0) < COMPILE_ROW_S):
            notes.append(f"{name}: not run ({'--smoke' if ctx.smoke else 'out of time budget'})")
            continue
        before = allocated_bytes(ctx.device)
        reset_peak(ctx.device)
        try:
            with lever_applied(base, lever):
                step = controlnet_steps(ctx, base, False, sizes.sd_px, stored_latents=True, torch_compile=lever.compile,
                                        channels_last=lever.channels_last)(batch)
                started = time.perf_counter()
                loss = float(step())
                first = time.perf_counter() - started  # float() waited for the device
        except torch.cuda.OutOfMemoryError:  # the rows built before this one hold their models
            notes.append(f"{name}: out of memory beside {len(built)} rows built before it")
            gc.collect()
            continue
        peak = peak_gb(ctx.device)
        memory = None if peak is None else (base_bytes - before) / 2**30 + peak
        built.append(({"lever": name, "batch": batch, "first_step_s": first, "first_loss": loss,
                       "peak_memory_gb": memory}, lever, step))
    rounds: dict[str, list[float]] = {row["lever"]: [] for row, _, _ in built}
    for _ in range(LEVER_ROUNDS):
        for row, lever, step in built:
            with lever_applied(base, lever):  # one warm-up step after the switch: the memory format changed back
                rounds[row["lever"]].append(statistics.median(seconds_per_step(step, ctx.device, sizes.sd_timed_steps,
                                                                               1)))
    rows = [row | {"s_per_step": statistics.median(rounds[row["lever"]]),
                   "rounds_s": "-".join(f"{t:.3f}" for t in sorted(rounds[row["lever"]]))} for row, _, _ in built]
    for row in rows:
        seconds = row["s_per_step"]
        row |= {"samples_per_s": batch / seconds, "speed_vs_default": rows[0]["s_per_step"] / seconds}
    del built
    gc.collect()
    return {"rows": rows, "resolution": sizes.sd_px, "notes": notes,
            "checks": [check(f"{r['lever']}: finite loss", math.isfinite(r["first_loss"]),
                             f"loss {r['first_loss']:.4f}, {r['speed_vs_default']:.2f}x the default step")
                       for r in rows]}


def overhead_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ControlNet against plain UNet fine-tuning at the same batch (no checkpointing): time and memory ratios."""
    done = {(r["model"], r["batch"]): r for r in rows if "s_per_step" in r and not r["grad_checkpointing"]}
    ratios = []
    for (model, batch), row in done.items():
        plain = done.get(("UNet fine-tuning", batch))
        if model == "ControlNet" and plain:
            memory = (row["peak_memory_gb"] / plain["peak_memory_gb"]) if plain["peak_memory_gb"] else None
            ratios.append({"batch": batch, "time": row["s_per_step"] / plain["s_per_step"], "memory": memory})
    return ratios


# ---------------------------------------------------------------------------------------------------------
# data: does the trainer's stream keep up with the GPU?


def write_training_shards(folder: Path, px: int, photos: int, per_shard: int) -> list[str]:
    """Tars laid out as the dataset job writes them (JPEG, Canny PNG, caption, and the latent distribution that
    --latents stores), from scikit-image's photos at `px`: what the trainer's stream reads, without running the
    job (which needs Ray)."""
    import cv2

    from bench.annotators import photo_crops
    from pipeline import format as fmt
    from pipeline.preprocess import encode_jpeg, encode_png

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    crops = photo_crops(photos, px)
    for shard in range(0, photos, per_shard):
        url = folder / f"{shard // per_shard:05d}.tar"
        with open(url, "wb") as stream, fmt.SampleTarWriter(stream) as tar:
            for i, image in enumerate(crops[shard : shard + per_shard], start=shard):
                latent = np.stack([rng.standard_normal((4, px // 8, px // 8)), np.full((4, px // 8, px // 8), 0.1)])
                tar.write(f"{i:09d}", {"jpg": encode_jpeg(image), "txt": b"a photo",
                                       "canny.png": encode_png(cv2.Canny(image, 100, 200)),
                                       fmt.LATENT_EXT: fmt.latent_npy(latent.astype(np.float16))})
        urls.append(str(url))
    return urls


def stream_rate(urls: list[str], px: int, batch: int, samples: int, workers: int, latents: bool,
                pin_memory: bool) -> tuple[float, int]:
    """Samples/s the trainer's loader delivers in its second half, and the number of batches that were not full
    (there should be none). The first half holds the workers' start-up and the burst of batches they all had ready
    at once (two each, the loader's prefetch), which would inflate the rate of many workers."""
    from train.data import DataSource, make_loader

    loader = make_loader(DataSource(urls, task="canny"), resolution=px, batch_size=batch, seed=0,
                         epoch_samples=samples, num_workers=workers, latents=latents, pin_memory=pin_memory)
    arrivals, sizes = [], []
    for item in loader:
        arrivals.append(time.perf_counter())
        sizes.append(len(item["key"]))
    half = len(arrivals) // 2
    return sum(sizes[half + 1 :]) / (arrivals[-1] - arrivals[half]), sum(size != batch for size in sizes)


def data(ctx: Context) -> dict[str, Any]:
    """The trainer's stream at SD 1.5's resolution, from the sd15 preset's 2 loader workers per rank and more, with
    the images decoded and with stored latents read instead, against the best samples/s the sd15 section trained
    (ControlNet on stored latents): below 1x the step would wait for its data, and --data-workers should grow.
    The images rows are held to the same, fastest, step: one that encodes the images with the VAE asks for less."""
    sizes = ctx.sizes
    batch = sizes.sd_batches[0]
    urls = write_training_shards(ctx.tmp / "data", sizes.sd_px, photos=64 if sizes.full_size else 8, per_shard=16)
    trained = ctx.results.get("trained_samples_per_s")
    rows, notes = [], []
    for latents in (False, True):
        for workers in sizes.data_workers:
            rate, short = stream_rate(urls, sizes.sd_px, batch, sizes.data_samples, workers, latents,
                                      pin_memory=ctx.device.type == "cuda")
            rows.append({"stream": "stored latents" if latents else "images decoded", "loader_workers": workers,
                         "batch": batch, "samples_per_s": rate, "short_batches": short,
                         "vs_training": rate / trained if trained else None})
    if trained is None:
        notes.append("no training rate to compare with (the sd15 section did not run)")
    else:
        notes.append(f"training on stored latents: {trained:.1f} samples/s (sd15 section, its best batch)")
    return {"rows": rows, "notes": notes, "resolution": sizes.sd_px, "cpus": len(os.sched_getaffinity(0)),
            "checks": [check(f"{r['stream']}, {r['loader_workers']} loader workers: full batches",
                             r["short_batches"] == 0, f"{r['samples_per_s']:.1f} samples/s") for r in rows]}


# ---------------------------------------------------------------------------------------------------------
# annotators: images/s by batch size at full size


def annotator_weights(task: str, folder: Path, full_size: bool) -> str:
    if full_size:
        from bench.annotators import write_weights

        return write_weights(task, folder)
    return write_tiny_annotator_weights(folder)


def annotators(ctx: Context) -> dict[str, Any]:
    from bench.annotators import build_call, photo_crops, time_mode

    sizes = ctx.sizes
    images = photo_crops(sizes.annotator_images, sizes.annotator_px)
    rows, checks = [], []
    for task in sizes.annotator_tasks:
        if ctx.budget.left() < (20 if sizes.full_size else 0):
            rows.append({"task": task, "error": "skipped: out of time budget"})
            continue
        folder = ctx.tmp / f"weights-{task}"
        weights = annotator_weights(task, folder, sizes.full_size)
        rates = {}
        for batch in sizes.annotator_batches:
            # the annotator benchmark's own builder and timer: `batch` images per call and per forward
            call, _ = build_call(task, weights, str(ctx.device), batch, sizes.detect_resolution)
            call(images[:batch])  # warm-up at this batch's shapes
            reset_peak(ctx.device)
            rates[batch] = time_mode(call, images, batch, repeats=1, device=str(ctx.device))[0]
            rows.append({"task": task, "batch": batch, "images_per_s": rates[batch],
                         "peak_memory_gb": peak_gb(ctx.device)})
            del call
            gc.collect()
        best = max(rates.values())
        saturating = min(b for b, r in rates.items() if r >= 0.9 * best)  # the smallest batch within 10% of the best
        ratio = rates[max(rates)] / rates[1] if 1 in rates else None
        rows.append({"task": task, "batch": "summary", "batched_over_single": ratio, "saturating_batch": saturating})
        # HED is left out: on an H200 one image at a time already ran 259 images/s (batch 8: 393), leaving batching
        # little to save
        if task in ("midas", "blip") and sizes.full_size:
            checks.append(check(f"{task}: batching >= 2x one at a time", ratio is not None and ratio >= 2.0,
                                f"{ratio:.2f}x at batch {max(rates)}; saturates at {saturating}"))

        shutil.rmtree(folder, ignore_errors=True)
    return {"rows": rows, "checks": checks, "resolution": sizes.annotator_px}


SECTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "environment": environment, "parity": parity, "amp": amp, "toy": toy, "sd15": sd15, "levers": levers,
    "data": data, "annotators": annotators,
}


# ---------------------------------------------------------------------------------------------------------
# report


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(report: dict[str, Any]) -> str:
    sections = report["sections"]
    env = sections.get("environment", {}).get("info", {})
    out = [f"# make gpu-check ({'smoke, CPU' if report['smoke'] else env.get('gpu', report['device'])})", "",
           f"torch {env.get('torch', '?')}, CUDA {env.get('cuda')}, diffusers {env.get('diffusers', '?')}, "
           f"matrix rate {env.get('matmul_tflops', '?')} TFLOP/s ({env.get('matmul_dtype', '?')}); "
           f"{report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget", "",
           markdown_table([{"section": name, "status": s["status"], "seconds": s.get("seconds"),
                            "note": s.get("reason") or s.get("error") or ""} for name, s in sections.items()],
                          ["section", "status", "seconds", "note"])]
    sd = sections.get("sd15", {})
    if sd.get("rows"):
        out += ["", f"## Training at SD 1.5 size ({sd['resolution']} px, bf16 autocast)", "",
                markdown_table(sd["rows"], ["model", "batch", "grad_checkpointing", "samples_per_s", "s_per_step",
                                            "peak_memory_gb", "tflop_per_step", "achieved_tflops", "mfu", "error"])]
        if sd.get("overhead"):
            out += ["", "ControlNet over UNet fine-tuning: " + "; ".join(
                f"batch {r['batch']}: time x{r['time']:.2f}, memory x{_cell(r['memory'])}" for r in sd["overhead"])]
        out += [f"- {note}" for note in sd.get("notes", [])]
    for name, columns in (("annotators", ["task", "batch", "images_per_s", "peak_memory_gb", "batched_over_single",
                                          "saturating_batch", "error"]),
                          ("parity", ["task", "image", "identical", "p99", "max", "keep_cpu", "keep_device",
                                      "max_relative"]),
                          ("toy", ["phase", "s_per_step", "steps", "minutes_for_preset"]),
                          ("levers", ["lever", "batch", "first_step_s", "s_per_step", "rounds_s", "samples_per_s",
                                      "speed_vs_default", "peak_memory_gb"]),
                          ("data", ["stream", "loader_workers", "batch", "samples_per_s", "vs_training"]),
                          ("amp", ["precision", "autocast", "losses", "grad_scale"])):
        if sections.get(name, {}).get("rows"):
            out += ["", f"## {name}", "", markdown_table(sections[name]["rows"], columns)]
            out += [f"- {note}" for note in sections[name].get("notes", [])]
    checks = [{"section": name, **c} for name, s in sections.items() for c in s.get("checks", [])]
    out += ["", "## Checks", "", markdown_table(checks, ["section", "check", "passed", "detail"])]
    return "\n".join(out) + "\n"


def write_report(args: argparse.Namespace, ctx: Context, sections: dict[str, dict[str, Any]]) -> str:
    report = {"smoke": args.smoke, "device": str(ctx.device), "budget_s": args.budget_s,
              "seconds": time.perf_counter() - ctx.budget.started, "sections": sections}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    text = to_markdown(report)
    (args.out / "gpu_check.md").write_text(text)
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every section at toy sizes on the CPU")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds for the whole check; a section that would not fit is skipped (default "
                             f"{DEFAULT_BUDGET_S:.0f}; --compile's row needs ~{COMPILE_ROW_S} s more)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_check"), help="folder for the results")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {','.join(SECTIONS)}")
    parser.add_argument("--device", default="cuda", help="the GPU to check (default cuda; --smoke uses the CPU)")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA GPU here (torch.cuda.is_available() is False); --smoke runs the sections on the CPU")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; never reach for the hub
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    device = torch.device("cpu" if args.smoke else args.device)
    ctx = Context(device, Sizes.of(args.smoke), Budget(args.budget_s), Path(tempfile.mkdtemp(prefix="gpu-check-")),
                  args.smoke)
    ordered = [name for name in SECTIONS if name in args.sections]
    if "environment" not in ordered:  # MFU needs the matrix rate
        ordered.insert(0, "environment")
    sections: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(ordered):
        ctx.results["reserved_after_s"] = sum(ESTIMATE_S[later] for later in ordered[i + 1:])
        sections[name] = run_section(name, SECTIONS[name], ctx)
        text = write_report(args, ctx, sections)  # after every section: a run cut short keeps what it measured
    print("\n" + text)
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")

    shutil.rmtree(ctx.tmp, ignore_errors=True)
    return 0 if all(s["status"] in ("ok", "skipped") for s in sections.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
