"""toy: a laptop-sized reproduction of sudden convergence (pixel-space base model, then a ControlNet on it)"""
from __future__ import annotations

import argparse
import copy
import json
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from tqdm import tqdm

from annotate.canny import CannyAnnotator
from pipeline import format as fmt
from train.convergence import detect_sudden_convergence, mauc
from train.data import make_loader, resolve_shards
from train.fidelity import PRIMARY, score_images

TASK = "canny"
MAX_WORDS = 8  # "a red circle on a white background" is 7 words
PRIMARY_CURVE = "fidelity/captions/cfg1/edge_f1"  # the curve a run is judged by: captions, control at CFG 1


@dataclass
class ToyConfig:
    data: str = field(default="data/toy/canny", metadata={"help": "the dataset job's output (Canny)"})
    out: str = field(default="data/toy/run", metadata={"help": "run folder: base model, results.json, PNGs"})
    resolution: int = field(default=32, metadata={"help": "image side"})
    batch_size: int = field(default=32, metadata={"help": "batch of both phases"})
    base_steps: int = field(default=2200, metadata={"help": "base text-to-image pretraining steps"})
    base_lr: float = field(default=1e-3, metadata={"help": "base AdamW learning rate"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA of the base UNet weights"})
    control_steps: int = field(default=1200, metadata={"help": "ControlNet training steps"})
    lr: float = field(default=1e-4, metadata={"help": "ControlNet AdamW learning rate"})
    prompt_dropout: float = field(default=0.5, metadata={"help": "ControlNet prompt dropout (the paper's 50%%)"})
    eval_every: int = field(default=25, metadata={"help": "ControlNet steps between fidelity evaluations"})
    val_samples: int = field(default=64, metadata={"help": "held-out samples (from the last shard)"})
    ddim_steps: int = field(default=20, metadata={"help": "DDIM steps when sampling"})
    cfg_scales: list[float] = field(default_factory=lambda: [1.0, 9.0], metadata={"help": "CFG scales evaluated"})
    modes: list[str] = field(default_factory=lambda: ["captions", "empty"], metadata={"help": "prompt modes"})
    grid_evals: int = field(default=6, metadata={"help": "evaluations shown in the sample grid"})
    seed: int = field(default=0, metadata={"help": "seed of data order, initial noise and weights"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    wandb: str = field(default="auto", metadata={"help": "W&B mode: auto, online, offline, off"})


def parse_args(argv: list[str] | None) -> ToyConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, f in ToyConfig.__dataclass_fields__.items():
        default = f.default_factory() if callable(f.default_factory) else f.default
        kind = type(default[0]) if isinstance(default, list) else type(default)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=f.metadata["help"],
                            nargs="+" if isinstance(default, list) else None)
    return ToyConfig(**vars(parser.parse_args(argv)))


# ---------------------------------------------------------------- models


class WordEncoder(nn.Module):
    """The tiny "text encoder": learned word + position embeddings; "" is a learned null sequence."""

    def __init__(self, vocab: list[str], dim: int = 32):
        super().__init__()
        self.vocab = vocab
        self.index = {w: i + 1 for i, w in enumerate(vocab)}  # 0: padding and unknown words
        self.words = nn.Embedding(len(vocab) + 1, dim)
        self.position = nn.Parameter(torch.randn(MAX_WORDS, dim) * 0.02)
        self.null = nn.Parameter(torch.randn(MAX_WORDS, dim) * 0.02)

    def ids(self, captions: list[str]) -> torch.Tensor:
        rows = [[self.index.get(w, 0) for w in c.lower().split()[:MAX_WORDS]] for c in captions]
        return torch.tensor([r + [0] * (MAX_WORDS - len(r)) for r in rows])  # (B, L)

    def forward(self, captions: list[str]) -> torch.Tensor:
        """B captions -> (B, L, dim) encoder hidden states."""
        hidden = self.words(self.ids(captions)) + self.position
        empty = torch.tensor([not c.strip() for c in captions])[:, None, None]
        return torch.where(empty, self.null.expand_as(hidden), hidden)


def build_unet(resolution: int = 32):
    """~1M-parameter pixel-space UNet, attention only at the lowest (8x8) resolution."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=resolution, in_channels=3, out_channels=3, block_out_channels=(16, 32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


class FullResEmbedding(nn.Module):
    """Condition (B, 3, R, R) -> (B, C, R, R) with stride-1 convs; the last conv starts at zero, so a fresh
    ControlNet adds nothing (the default embedding downsamples 8x, for latents, which pixel space lacks)."""

    def __init__(self, channels: int, hidden: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, hidden, 3, padding=1),
                                  nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU())
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.body(condition))


def build_controlnet(unet: nn.Module) -> nn.Module:
    """The trainable copy of the locked UNet, with a full-resolution condition embedding."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16,))
    controlnet.controlnet_cond_embedding = FullResEmbedding(unet.config.block_out_channels[0])
    return controlnet


def predict(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
            controlnet: nn.Module | None = None, condition: torch.Tensor | None = None) -> torch.Tensor:
    """eps_theta(x_t, t, c_t[, c_f]): the locked UNet, with the ControlNet's residuals when given."""
    extra: dict[str, Any] = {}
    if controlnet is not None:
        down, mid = controlnet(x, t, encoder_hidden_states=text, controlnet_cond=condition, return_dict=False)
        extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    return unet(x, t, encoder_hidden_states=text, **extra).sample


def diffusion_loss(scheduler, x0: torch.Tensor, generator: torch.Generator, unet: nn.Module, text: torch.Tensor,
                   controlnet: nn.Module | None = None, condition: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 10 in pixel space: || eps - eps_theta(x_t, t, c_t[, c_f]) ||^2; x0: (B, 3, R, R) in [-1, 1]."""
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
    return F.mse_loss(predict(unet, scheduler.add_noise(x0, noise, t), t, text, controlnet, condition), noise)


@torch.no_grad()
def sample(unet: nn.Module, text: torch.Tensor, null: torch.Tensor, scale: float, steps: int, seed: int,
           controlnet: nn.Module | None = None, condition: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM with CFG; the control goes to the CONDITIONAL branch only:
    eps = eps(x, null) + s * (eps(x, text, control) - eps(x, null)). Returns (B, 3, R, R) in [-1, 1]."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(noise_scheduler().config)
    ddim.set_timesteps(steps)
    r = unet.config.sample_size
    x = torch.randn((text.shape[0], 3, r, r), generator=torch.Generator().manual_seed(seed))  # fixed seeds
    for t in ddim.timesteps:
        tt = t.expand(x.shape[0])
        eps = predict(unet, x, tt, text, controlnet, condition)
        if scale != 1.0:
            uncond = predict(unet, x, tt, null)
            eps = uncond + scale * (eps - uncond)
        x = ddim.step(eps, t, x).prev_sample
    return x.clamp(-1, 1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, R, R) in [-1, 1] -> (B, R, R, 3) uint8."""
    return ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


class EMA:
    """An exponential moving average of a module's weights, with the usual warm-up of the decay."""

    def __init__(self, module: nn.Module, decay: float):
        self.module, self.decay, self.updates = copy.deepcopy(module).requires_grad_(False), decay, 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema, p in zip(self.module.parameters(), module.parameters(), strict=True):
            ema.lerp_(p, 1 - decay)


# ---------------------------------------------------------------- data


def split_shards(data: str) -> tuple[list[str], str]:
    """(training shards, the held-out validation shard: the last one)."""
    urls = resolve_shards(data).urls
    if len(urls) < 2:
        raise ValueError(f"{data} has {len(urls)} shard(s); the toy run holds out the last one, so it needs two")
    return urls[:-1], urls[-1]


def vocabulary(urls: list[str]) -> list[str]:
    """Every word of the training captions, sorted."""
    words: set[str] = set()
    for url in urls:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if member.name.endswith("." + fmt.CAPTION_EXT):
                    words.update(tar.extractfile(member).read().decode().lower().split())
    return sorted(words)


def batches(urls: list[str], cfg: ToyConfig, dropout: float, seed: int) -> Iterator[dict[str, Any]]:
    """An endless stream of training batches (resampled shards, one "epoch" per ~6k samples)."""
    loader = make_loader(urls, resolution=cfg.resolution, batch_size=cfg.batch_size, seed=seed,
                         prompt_dropout=dropout, epoch_samples=max(cfg.batch_size, 6000), shuffle_buffer=500)
    while True:
        yield from loader


def validation_set(url: str, cfg: ToyConfig) -> dict[str, Any]:
    """The first `val_samples` samples of the held-out shard, captions kept."""
    loader = make_loader([url], resolution=cfg.resolution, batch_size=cfg.val_samples, seed=cfg.seed,
                         prompt_dropout=0.0, epoch_samples=None, shuffle_buffer=1)
    return next(iter(loader))


def dataset_annotator(data: str) -> CannyAnnotator:
    """The dataset job's Canny, with its seed and threshold ranges: a validation key redraws its thresholds."""
    with fsspec.open(f"{data.rstrip('/')}/{fmt.MANIFEST}") as f:
        config = json.load(f)["config"]
    return CannyAnnotator(seed=config["seed"], low_range=tuple(config["canny_low"]),
                          high_gap=tuple(config["canny_high_gap"]))


# ---------------------------------------------------------------- the two phases


def pretrain_base(cfg: ToyConfig, urls: list[str], vocab: list[str], logger: Any) -> tuple[nn.Module, WordEncoder]:
    """The base text-to-image model (EMA UNet + word encoder), loaded when already saved (resume-friendly)."""
    from diffusers import UNet2DConditionModel

    folder = Path(cfg.out) / "base"
    if (folder / "words.pt").exists():
        words = WordEncoder(json.loads((folder / "vocab.json").read_text()))
        words.load_state_dict(torch.load(folder / "words.pt"))
        print(f"base model loaded from {folder}; pretraining skipped")
        return UNet2DConditionModel.from_pretrained(folder / "unet"), words
    torch.manual_seed(cfg.seed)
    unet, words, scheduler = build_unet(cfg.resolution), WordEncoder(vocab), noise_scheduler()
    params = [*unet.parameters(), *words.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.base_lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100))
    ema, generator = EMA(unet, cfg.ema_decay), torch.Generator().manual_seed(cfg.seed)
    stream = batches(urls, cfg, dropout=0.1, seed=cfg.seed)  # 10% empty captions, so CFG works
    bar = tqdm(range(cfg.base_steps), desc="base", unit="step", dynamic_ncols=True)
    for step in bar:
        batch = next(stream)
        loss = diffusion_loss(scheduler, batch["pixel_values"], generator, unet, words(batch["caption"]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        warmup.step()
        ema.update(unet)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 25 == 0:
            logger.log({"base/loss": loss.item()}, step=step)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps({"steps": cfg.base_steps, "final_loss": loss.item(),
                                                   "minutes": bar.format_dict["elapsed"] / 60}))
    ema.module.save_pretrained(folder / "unet")
    torch.save(words.state_dict(), folder / "words.pt")
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return ema.module, words


def evaluate(unet: nn.Module, controlnet: nn.Module, words: WordEncoder, val: dict[str, Any], cfg: ToyConfig,
             annotator: CannyAnnotator) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Fidelity of each (prompt mode, CFG scale) on the validation set: metrics and the generated images."""
    conditions = val["conditioning_pixel_values"]  # (N, 3, R, R) in [0, 1]
    maps = list((conditions[:, 0].numpy() * 255).round().astype(np.uint8))  # the input Canny maps
    null = words([""] * len(maps))
    metrics, images = {}, {}
    controlnet.eval()
    for mode in cfg.modes:
        text = words(val["caption"] if mode == "captions" else [""] * len(maps))
        for scale in cfg.cfg_scales:
            name = f"{mode}/cfg{scale:g}"
            generated = to_uint8(sample(unet, text, null, scale, cfg.ddim_steps, cfg.seed, controlnet, conditions))
            scores, _ = score_images(TASK, annotator, generated, maps, val["key"])
            metrics |= {f"fidelity/{name}/{k}": v for k, v in scores.items()}
            images[name] = generated
    controlnet.train()
    return metrics, images


def train_controlnet(cfg: ToyConfig, unet: nn.Module, words: WordEncoder, urls: list[str], val: dict[str, Any],
                     annotator: CannyAnnotator, logger: Any, on_eval: Callable[[dict[str, Any]], None]) -> dict:
    """ControlNet on the LOCKED base; evaluations at step 0, every eval_every steps and at the end, each followed
    by on_eval(history), so a run stopped early still leaves its curve so far."""
    torch.manual_seed(cfg.seed + 1)
    unet.requires_grad_(False).eval()
    words.requires_grad_(False).eval()
    controlnet = build_controlnet(unet).train()
    scheduler, generator = noise_scheduler(), torch.Generator().manual_seed(cfg.seed + 1)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=cfg.lr)
    stream = batches(urls, cfg, dropout=cfg.prompt_dropout, seed=cfg.seed + 1)
    history: dict[str, Any] = {"steps": [], "metrics": [], "images": {}, "loss": [], "eval_seconds": 0.0}
    bar = tqdm(range(cfg.control_steps + 1), desc="controlnet", unit="step", dynamic_ncols=True)
    for step in bar:
        if step % cfg.eval_every == 0 or step == cfg.control_steps:
            started = time.perf_counter()
            metrics, images = evaluate(unet, controlnet, words, val, cfg, annotator)
            history["eval_seconds"] += time.perf_counter() - started
            history["steps"].append(step)
            history["metrics"].append(metrics)
            history["images"][step] = images.get("captions/cfg1", next(iter(images.values())))
            logger.log(metrics, step=cfg.base_steps + step)
            bar.write(f"step {step}: " + ", ".join(f"{k.removeprefix('fidelity/')} {v:.3f}"
                                                   for k, v in metrics.items() if k.endswith(PRIMARY[TASK])))
            on_eval(history)
        if step == cfg.control_steps:
            break
        batch = next(stream)
        loss = diffusion_loss(scheduler, batch["pixel_values"], generator, unet, words(batch["caption"]), controlnet,
                              batch["conditioning_pixel_values"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history["loss"].append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return history


# ---------------------------------------------------------------- outputs


def curves_of(history: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """fidelity/<mode>/cfg<s>/edge_f1 -> {steps, scores}."""
    names = [k for k in history["metrics"][0] if k.endswith("/" + PRIMARY[TASK])]
    return {n: {"steps": history["steps"], "scores": [m[n] for m in history["metrics"]]} for n in names}


def detect(curves: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    return {n: {**detect_sudden_convergence(c["steps"], c["scores"]), "mauc": mauc(c["steps"], c["scores"])}
            for n, c in curves.items()}


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot_curves(curves: dict[str, dict[str, list[float]]], detection: dict[str, dict[str, Any]], path: Path,
                title: str, size: tuple[int, int] = (900, 520)) -> None:
    """Score vs step for every curve, the primary curve's detected step dashed; drawn with PIL."""
    w, h = size
    left, right, top, bottom = 60, 20, 40, 50
    image = Image.new("RGB", size, "white")
    pen, font = ImageDraw.Draw(image), ImageFont.load_default()
    x_max = max(max(c["steps"]) for c in curves.values()) or 1

    def xy(step: float, score: float) -> tuple[float, float]:
        return left + step / x_max * (w - left - right), h - bottom - score * (h - top - bottom)

    pen.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(6):  # ticks: scores 0..1, steps 0..x_max
        y = i / 5
        pen.line([xy(0, y), (left - 5, xy(0, y)[1])], fill="black")
        pen.line([xy(0, y), xy(x_max, y)], fill=(230, 230, 230))
        pen.text((left - 35, xy(0, y)[1] - 6), f"{y:.1f}", fill="black", font=font)
        s = x_max * i / 5
        pen.line([xy(s, 0), (xy(s, 0)[0], h - bottom + 5)], fill="black")
        pen.text((xy(s, 0)[0] - 12, h - bottom + 8), f"{s:.0f}", fill="black", font=font)
    pen.text((w / 2 - 40, h - 20), "ControlNet step", fill="black", font=font)
    pen.text((5, top - 25), "edge F1", fill="black", font=font)
    pen.text((left, 8), title, fill="black", font=font)
    for i, (name, curve) in enumerate(curves.items()):
        colour = PALETTE[i % len(PALETTE)]
        points = [xy(s, v) for s, v in zip(curve["steps"], curve["scores"], strict=True)]
        pen.line(points, fill=colour, width=3 if name == PRIMARY_CURVE else 1)
        for px, py in points:
            pen.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        pen.text((left + 10, top + 8 + 14 * i), f"-- {name.removeprefix('fidelity/')}", fill=colour, font=font)
    found = detection.get(PRIMARY_CURVE, {})
    if found.get("step") is not None:
        x = xy(found["step"], 0)[0]
        for y in range(top, h - bottom, 8):
            pen.line([(x, y), (x, y + 4)], fill="black", width=2)
        pen.text((x + 4, top + 4), f"detected step {found['step']}", fill="black", font=font)
    image.save(path)


def sample_grid(val: dict[str, Any], history: dict[str, Any], evals: int, path: Path, columns: int = 8) -> None:
    """Rows: the input conditions, then the captions/CFG 1 samples for them at `evals` evaluation steps."""
    steps = history["steps"]
    shown = [steps[round(i)] for i in np.linspace(0, len(steps) - 1, min(evals, len(steps)))]
    n = min(columns, len(val["key"]))
    conditions = (val["conditioning_pixel_values"][:n].permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    labelled = {"condition": conditions, **{f"step {s}": history["images"][s][:n] for s in dict.fromkeys(shown)}}
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in labelled.values()], axis=0)
    scale, margin = 4, 70  # 4x nearest-neighbour zoom; a left margin for the row labels
    zoomed = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    canvas = Image.new("RGB", (zoomed.width + margin, zoomed.height), "white")
    canvas.paste(zoomed, (margin, 0))
    pen, side = ImageDraw.Draw(canvas), conditions.shape[1] * scale
    for i, label in enumerate(labelled):
        pen.text((4, i * side + side // 2 - 6), label, fill="black", font=ImageFont.load_default())
    canvas.save(path)


def base_grid(unet: nn.Module, words: WordEncoder, captions: list[str], path: Path, seed: int) -> None:
    """What the base model draws for some captions (CFG 3): it must really generate the shapes."""
    images = to_uint8(sample(unet, words(captions), words([""] * len(captions)), 3.0, 20, seed))
    grid = np.concatenate(list(images), axis=1)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)


class Logger:
    """W&B (online with a key, offline otherwise) under project controlnet-repro, or nothing."""

    def __init__(self, cfg: ToyConfig):
        from train.tracking import wandb_mode

        mode, message = wandb_mode(cfg.wandb)
        print(message)
        self.run = None
        if mode != "off":
            import wandb

            self.run = wandb.init(project="controlnet-repro", name=Path(cfg.out).name, mode=mode, dir=cfg.out,
                                  config=asdict(cfg))

    def log(self, values: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def finish(self, summary: dict[str, Any], images: dict[str, Path]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({k: wandb.Image(str(p)) for k, p in images.items()})
            self.run.summary.update(summary)
            self.run.finish()


def write_outputs(cfg: ToyConfig, val: dict[str, Any], history: dict[str, Any], timings: dict[str, float]) -> dict:
    """results.json, the curve plot and the sample grid, from the evaluations so far."""
    out = Path(cfg.out)
    curves = curves_of(history)
    detection = detect(curves)
    plot_curves(curves, detection, out / "fidelity.png", f"toy ControlNet, lr {cfg.lr:g}: edge F1 (1 px) on "
                f"{len(val['key'])} held-out samples; thick = captions, CFG 1 (primary)")
    sample_grid(val, history, cfg.grid_evals, out / "samples.png")
    results = {"settings": asdict(cfg), "primary": PRIMARY_CURVE, "curves": curves, "detection": detection,
               "metrics": [{"step": s, **m} for s, m in zip(history["steps"], history["metrics"], strict=True)],
               "control_loss": history["loss"], "timings": timings}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_urls, val_url = split_shards(cfg.data)
    val, annotator, vocab = validation_set(val_url, cfg), dataset_annotator(cfg.data), vocabulary(train_urls)
    logger = Logger(cfg)
    unet, words = pretrain_base(cfg, train_urls, vocab, logger)
    base_grid(unet, words, val["caption"][:8], out / "base_samples.png", cfg.seed)
    base_done = time.perf_counter()
    base_log = out / "base" / "train.json"
    pretrain = json.loads(base_log.read_text())["minutes"] if base_log.exists() else None

    def timings(history: dict[str, Any]) -> dict[str, Any]:
        now = time.perf_counter()
        return {"base_minutes_this_run": (base_done - started) / 60, "base_pretrain_minutes": pretrain,
                "control_minutes": (now - base_done) / 60, "eval_minutes": history["eval_seconds"] / 60,
                "total_minutes": (now - started) / 60}

    history = train_controlnet(cfg, unet, words, train_urls, val, annotator, logger,
                               lambda h: write_outputs(cfg, val, h, timings(h)))
    results = write_outputs(cfg, val, history, timings(history))
    detection = results["detection"]
    summary = {f"{n}/{k}": v for n, d in detection.items() for k, v in d.items() if k != "reason"}
    logger.finish({**summary, **results["timings"]}, {"fidelity_plot": out / "fidelity.png",
                                                      "samples": out / "samples.png",
                                                      "base_samples": out / "base_samples.png"})
    print(report(detection[PRIMARY_CURVE], results["timings"]))
    return results


def report(found: dict[str, Any], timings: dict[str, float]) -> str:
    step = found["step"] if found["converged"] else f"not converged ({found['reason']})"
    return (f"{PRIMARY_CURVE}: start {found['start']:.3f}, plateau {found['plateau']:.3f}, detected step {step}, "
            f"mAUCC {found['mauc']:.3f}; minutes: base {timings['base_minutes_this_run']:.1f} (pretraining "
            f"{timings['base_pretrain_minutes'] or 0:.1f}), ControlNet "
            f"{timings['control_minutes']:.1f} (evaluation {timings['eval_minutes']:.1f}), total "
            f"{timings['total_minutes']:.1f}")


if __name__ == "__main__":
    main()
