"""tiny_sd builds the debug preset's base model: a tiny random Stable Diffusion in diffusers layout, offline"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

# torch, diffusers and transformers are imported where a model is made: a driver that finds the tiny SD built (every
# debug run but the first) would spend ~7 s importing them for nothing, before its first step
if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

IMAGE_SIZE = 64  # pixels; the VAE downsamples 8x, so latents are 8x8, as ControlNet's hint embedding expects
LATENT_SIZE = IMAGE_SIZE // 8
MAX_TOKENS = 77  # CLIP's context length, as in SD
HIDDEN = 32  # CLIP width = UNet cross_attention_dim
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# whole words get merges, so a caption tokenizes into a few ids instead of one per byte
WORDS = [
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "painting", "drawing", "man", "woman",
    "person", "dog", "cat", "bird", "house", "room", "street", "tree", "sky", "water", "red", "blue", "green",
    "white", "black", "small", "large", "standing", "sitting",
]  # fmt: skip


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet in CLIP's vocab order: the 188 printable bytes as themselves, then the
    other 68 shifted to U+0100.. so that every byte is a visible character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in printable)]
    return [chr(b) for b in printable] + shifted


def word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that build `word` as one token: 'dog' -> ('d','o'), ('do','g</w>')."""
    pieces = [*word[:-1], word[-1] + "</w>"]
    merges, left = [], pieces[0]
    for right in pieces[1:]:
        merges.append((left, right))
        left += right
    return merges


def tokenizer_files(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocab layout: byte alphabet, alphabet + '</w>', merged tokens, then the two specials."""
    alphabet = bytes_to_unicode()
    merges = list(dict.fromkeys(m for w in words for m in word_merges(w)))
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *dict.fromkeys(a + b for a, b in merges), BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(out: Path, words: list[str] = WORDS, max_tokens: int = MAX_TOKENS) -> CLIPTokenizer:
    """vocab.json + merges.txt written here, loaded by CLIPTokenizer as the published ones are. `words` become
    single tokens; any other text still tokenizes, byte by byte."""
    from transformers import CLIPTokenizer

    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer_files(words)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer.from_pretrained(str(out), local_files_only=True, model_max_length=max_tokens)
    tokenizer.save_pretrained(str(out))
    return tokenizer


def tiny_unet() -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    # the first block has cross-attention, as in SD, so the ControlNet has every kind of layer
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=2,  # diffusers' legacy name: the number of heads
    )


def tiny_vae() -> AutoencoderKL:
    from diffusers import AutoencoderKL

    # 4 blocks = 3 downsamplings = 8x, like SD's VAE
    return AutoencoderKL(
        sample_size=IMAGE_SIZE,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
    )


def tiny_text_encoder(tokenizer: CLIPTokenizer, hidden: int = HIDDEN, intermediate: int = 37) -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def sd_scheduler() -> DDPMScheduler:
    """The noise schedule SD was trained with."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def tiny_pipeline(tokenizer: CLIPTokenizer, seed: int) -> StableDiffusionPipeline:
    import torch
    from diffusers import StableDiffusionPipeline

    with torch.random.fork_rng():  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        unet, vae, text_encoder = tiny_unet(), tiny_vae(), tiny_text_encoder(tokenizer)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sd(path: Path, seed: int = 0) -> Path:
    """Build the tiny SD at `path` once; an existing one (model_index.json present) is reused as is."""
    path = Path(path)
    if (path / "model_index.json").exists():
        return path
    from annotate.weights import quiet_transformers

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"  # per process: concurrent builders never share one
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # transformers' notes (no torchvision for CLIP's image processor, which the pipeline never uses) and its
        # 'Writing model shards' bar printed above the first line of a debug run, or of its one-line refusal
        with quiet_transformers():
            pipe = tiny_pipeline(write_tokenizer(tmp / "tokenizer"), seed)
            pipe.save_pretrained(str(tmp), safe_serialization=True)
        try:
            tmp.rename(path)  # atomic: `path` is either absent or a whole model
        except OSError:
            if not (path / "model_index.json").exists():  # not a builder that won the race: a real obstacle
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.tiny_sd", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("data/tiny-sd"), help="model folder (diffusers layout)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    print(build_tiny_sd(args.out, args.seed))


if __name__ == "__main__":
    main()
