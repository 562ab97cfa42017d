"""pretrain_base: the toy's pixel-space text-to-image base (UNet + CLIP text encoder), saved in diffusers layout"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python train/pretrain_base.py`: import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from train.model import BaseModel, ControlledUNet, diffusion_loss, encode_prompts, plain_attention_on_cpu

MAX_TOKENS = 16  # "a magenta triangle on a white background" is 7 words: BOS + 7 + EOS, with room to spare


@dataclass
class PretrainConfig:
    """Pretrain a small pixel-space text-to-image diffusion model on captioned shards (the toy shapes), to serve as
    the locked base of `train/run.py --preset toy`. Written in diffusers layout (unet/, text_encoder/, tokenizer/,
    scheduler/, model_index.json without a VAE), loaded by the trainer like any Stable Diffusion."""

    data: str = "data/toy/canny"
    """Shards written by the dataset job; the last shard is held out (the ControlNet validates on it)."""
    out: str = "data/toy/base"
    """Output folder (diffusers layout)."""
    resolution: int = 32
    """Image side in pixels."""
    channels: tuple[int, ...] = (16, 32, 64)
    """UNet block widths; attention only at the last (lowest) resolution."""
    text_width: int = 32
    """Text encoder width (= the UNet's cross-attention width)."""
    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 32
    """Samples per step."""
    lr: float = 1e-3
    """AdamW learning rate (100 warm-up steps)."""
    ema_decay: float = 0.999
    """EMA of the weights that are saved (diffusers' EMAModel, with its warm-up)."""
    snr_gamma: float | None = None
    """Min-SNR loss weighting (Hang et al. 2023); None: the plain loss. A Min-SNR base (5.0, batch 16) drew
    about as well, but a ControlNet on it learned much slower (edge F1 0.44 against 0.66 after 500 steps)."""
    prompt_dropout: float = 0.1
    """Captions replaced by the empty prompt, so classifier-free guidance works."""
    seed: int = 0
    threads: int = 0
    """Torch CPU threads (0: every core)."""
    samples: list[str] = field(default_factory=lambda: [
        "a red circle on a white background", "a blue square on a black background",
        "a yellow triangle on a gray background", "a magenta star on a white background"])
    """Captions drawn into base_samples.png at the end, to see what the base can draw."""


def caption_words(source) -> list[str]:
    """Every word of the source's captions (one pass), which the tokenizer keeps as single tokens."""
    from train.data import make_dataset

    stream = make_dataset(source, resolution=8, batch_size=256, seed=0, prompt_dropout=0.0, epoch_samples=None)
    return sorted({w for batch in stream for caption in batch["caption"] for w in caption.lower().split()})


def build_base(cfg: PretrainConfig, words: list[str], folder: Path) -> BaseModel:
    """A fresh pixel-space base: 3-channel UNet, tiny CLIP text encoder and tokenizer, cosine noise schedule."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from train.tiny_sd import tiny_text_encoder, write_tokenizer

    levels = len(cfg.channels)
    tokenizer = write_tokenizer(folder / "tokenizer", words, MAX_TOKENS)
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution, in_channels=3, out_channels=3, block_out_channels=cfg.channels,
        layers_per_block=1, down_block_types=("DownBlock2D",) * (levels - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        cross_attention_dim=cfg.text_width, attention_head_dim=8, norm_num_groups=8,
    )
    text_encoder = tiny_text_encoder(tokenizer, hidden=cfg.text_width, intermediate=2 * cfg.text_width)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    return BaseModel(tokenizer, text_encoder, unet, scheduler, vae=None)


def save_base(base: BaseModel, folder: Path) -> None:
    import diffusers

    base.unet.save_pretrained(folder / "unet")
    base.text_encoder.save_pretrained(folder / "text_encoder")
    base.tokenizer.save_pretrained(folder / "tokenizer")
    base.noise_scheduler.save_pretrained(folder / "scheduler")
    index = {"_class_name": "PixelSpaceTextToImage", "_diffusers_version": diffusers.__version__,
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"],
             "vae": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))


def draw(base: BaseModel, captions: list[str], seed: int, scale: float = 3.0) -> np.ndarray:
    """What the base draws for `captions` (Euler ancestral 20 steps, CFG 3, as validation samples): a
    (R, len * R, 3) uint8 strip."""
    from train.sampling import sample

    side = base.unet.config.sample_size
    images = sample(base, None, torch.zeros(len(captions), 3, side, side), captions, steps=20, guidance_scale=scale,
                    seed=seed, sampler="euler_a", device=torch.device("cpu"))
    return np.concatenate(list((images * 255).round().astype(np.uint8)), axis=1)


def same_settings(out: Path, cfg: PretrainConfig) -> bool:
    """Whether `out` holds a base pretrained with `cfg` (threads and the output path aside)."""
    try:
        done = json.loads((out / "pretrain.json").read_text())["config"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return False
    ignored = {"threads", "out"}
    settings = json.loads(json.dumps(asdict(cfg)))  # tuples as lists, as the record has them
    def shaping(record: dict) -> dict:
        return {k: v for k, v in record.items() if k not in ignored}

    return shaping(done) == shaping(settings)


def base_train_step(base: BaseModel, model: ControlledUNet, params: list[torch.nn.Parameter], optimizer, ema,
                    batch: dict, generator: torch.Generator, device: torch.device,
                    snr_gamma: float | None = None) -> torch.Tensor:
    """One pretraining step: UNet and text encoder learn together (clipped at 1), then the EMA follows."""
    text = encode_prompts(base, batch["caption"], device, grad=True)
    loss = diffusion_loss(base, model, batch["pixel_values"].to(device), None, text, generator, snr_gamma)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    ema.step(params)
    return loss.detach()


def pretrain(cfg: PretrainConfig) -> Path:
    from diffusers.training_utils import EMAModel

    from train.data import make_loader, resolve_images
    from train.loop import split_validation

    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    started = time.perf_counter()
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (out / "model_index.json").exists():
        raise FileExistsError(f"{out} exists and is not a base model; choose another --out")
    if same_settings(out, cfg):  # a re-run of `make repro` goes on to the ControlNet
        print(f"{out} was pretrained with these settings already; skipped (delete it to train it again)")
        return out
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    source, _ = split_validation(resolve_images(cfg.data), None)
    torch.manual_seed(cfg.seed)
    base = build_base(cfg, caption_words(source), tmp)
    plain_attention_on_cpu(torch.device("cpu"), base.unet)
    params = [*base.unet.parameters(), *base.text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100))
    ema = EMAModel(params, decay=cfg.ema_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = make_loader(source, resolution=cfg.resolution, batch_size=cfg.batch_size, seed=cfg.seed,
                         prompt_dropout=cfg.prompt_dropout, epoch_samples=6000)
    stream = (batch for _ in iter(int, 1) for batch in loader)  # endless: the loader is one resampled epoch
    model = ControlledUNet(base.unet, None)
    bar = tqdm(range(cfg.steps), desc="base", unit="step", dynamic_ncols=True, mininterval=5)
    for _ in bar:
        loss = base_train_step(base, model, params, optimizer, ema, next(stream), generator, torch.device("cpu"),
                               cfg.snr_gamma)
        warmup.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    ema.copy_to(params)
    base.unet.eval()
    base.text_encoder.eval()
    save_base(base, tmp)
    Image.fromarray(draw(base, cfg.samples, cfg.seed)).resize(
        (cfg.resolution * 4 * len(cfg.samples), cfg.resolution * 4), Image.NEAREST).save(tmp / "base_samples.png")
    record = {"config": asdict(cfg), "final_loss": loss.item(), "minutes": (time.perf_counter() - started) / 60,
              "training_shards": len(source.urls)}
    (tmp / "pretrain.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(out, ignore_errors=True)  # a previous base (checked above), replaced only once the new one is whole
    tmp.rename(out)
    print(f"wrote the base to {out} ({record['minutes']:.1f} min, final loss {record['final_loss']:.4f}); "
          f"what it draws: {out / 'base_samples.png'}")
    return out


def main(argv: list[str] | None = None) -> int:
    from pipeline.format import cli

    cfg = cli(PretrainConfig, args=argv, prog="python -m train.pretrain_base")
    try:
        pretrain(cfg)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
