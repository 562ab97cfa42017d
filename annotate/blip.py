"""BLIP captions through transformers' BlipForConditionalGeneration (the Salesforce checkpoints)"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoTokenizer, BlipForConditionalGeneration

from annotate.device import inference, pick_device, precision
from annotate.weights import load_complete_model, load_pretrained_folder, resolve_folder, sha256_folder

HF_FOLDER = "blip-image-captioning-large"
HF_REPO = "Salesforce/blip-image-captioning-large"
# the smaller checkpoint users also run (ViT-B): the same model class and files, found when the large is not there
OTHER_CHECKPOINTS = (("blip-image-captioning-base", "Salesforce/blip-image-captioning-base"),)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")  # BLIP's BERT tokenizer, fast or slow
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # BlipImageProcessor's defaults
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageSpec:
    """What BlipImageProcessor does to an image, read from the folder's preprocessor_config.json."""

    height: int
    width: int
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: int = Image.Resampling.BICUBIC
    rescale: float = 1 / 255


def read_image_spec(folder: Path, image_size: int) -> ImageSpec:
    """The preprocessing of a BLIP folder: its preprocessor_config.json, or the image_processor entry of its
    processor_config.json (what BlipProcessor.save_pretrained writes since transformers 5, and transformers reads);
    `image_size` (the vision config's) when it has neither."""
    path, nested = folder / "preprocessor_config.json", False
    if not path.is_file():
        path, nested = folder / "processor_config.json", True
    if not path.is_file():
        return ImageSpec(image_size, image_size)
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    if nested:
        config = config.get("image_processor") if isinstance(config, dict) else None
        if not isinstance(config, dict):
            return ImageSpec(image_size, image_size)
    size = config.get("size", image_size)
    height, width = (size["height"], size["width"]) if isinstance(size, dict) else (size, size)
    return ImageSpec(
        height=height,
        width=width,
        mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(config.get("image_std", OPENAI_CLIP_STD)),
        resample=int(config.get("resample", Image.Resampling.BICUBIC)),
        rescale=float(config.get("rescale_factor", 1 / 255)),
    )


def preprocess(images: list[np.ndarray], spec: ImageSpec) -> torch.Tensor:
    """RGB uint8 (H, W, 3) images -> (B, 3, height, width) float32, resized with PIL as the processor does."""
    size = (spec.width, spec.height)
    batch = np.stack([np.asarray(Image.fromarray(image).resize(size, spec.resample)) for image in images])
    x = batch.astype(np.float32) * spec.rescale  # (B, H, W, 3)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def refuse_other_blip(folder: Path) -> None:
    """A folder whose config.json names another BLIP head (Salesforce/blip-vqa-base's BlipForQuestionAnswering) is
    refused in one line: the VQA checkpoint holds the captioner's vision model and text decoder by name, so it
    loaded whole, and its answer decoder wrote the captions. Other models' folders lack the captioner's tensors,
    which the load refuses; a config naming no architecture is left to it too."""
    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):  # unreadable or not an object: the load says so
        return
    blip_heads = [a for a in architectures if isinstance(a, str) and a.startswith("Blip")]
    if blip_heads and "BlipForConditionalGeneration" not in blip_heads:
        raise ValueError(f"{folder} holds {', '.join(blip_heads)}, not BlipForConditionalGeneration (the "
                         "captioner: Salesforce/blip-image-captioning-large or -base)")


@dataclass
class BlipCaptioner:
    """Batched BLIP captioning: greedy (num_beams=1) or beam search, fp16 autocast on CUDA.

    With a `prompt` ("a photography of"), BLIP continues it and the caption starts with the prompt.
    """

    weights: str | None = None  # folder/URL holding blip-image-captioning-large/ or -base/ (or the folder itself)
    device: str | None = None
    num_beams: int = 1  # 1 = greedy
    max_new_tokens: int = 30
    prompt: str | None = None
    batch_size: int = 16  # images per generate call
    autocast: bool = True  # fp16 autocast on CUDA (ignored on CPU)
    name: str = "blip"
    _device: torch.device = field(init=False, repr=False, default=torch.device("cpu"))
    _folder: Path = field(init=False, repr=False, default=Path())
    _model: Any = field(init=False, repr=False, default=None)
    _tokenizer: Any = field(init=False, repr=False, default=None)
    _spec: ImageSpec = field(init=False, repr=False, default=ImageSpec(384, 384))
    _sha256: str | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        self._device = pick_device(self.device)
        self._folder = resolve_folder(HF_FOLDER, source=self.weights, hub_repo=HF_REPO, others=OTHER_CHECKPOINTS)
        refuse_other_blip(self._folder)
        # fp32 whatever the file's dtype (transformers 5 keeps a file's fp16): autocast runs it in fp16 on CUDA
        load = partial(BlipForConditionalGeneration.from_pretrained, local_files_only=True, dtype=torch.float32)
        model = load_complete_model(load, self._folder, "the BLIP captioner")
        self._model = model.eval().to(self._device)
        if not any((self._folder / name).is_file() for name in TOKENIZER_FILES):  # AutoTokenizer then makes one of
            # 5 tokens from the config alone, and every caption is ''
            raise ValueError(f"{self._folder} holds no tokenizer for BLIP (none of {', '.join(TOKENIZER_FILES)})")
        self._tokenizer = load_pretrained_folder(partial(AutoTokenizer.from_pretrained, local_files_only=True),
                                                 self._folder, "BLIP's tokenizer")
        self._spec = read_image_spec(self._folder, model.config.vision_config.image_size)

    def _prompt_ids(self, batch: int) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """([CLS] prompt [SEP]) ids and mask, (batch, T); generate swaps [CLS] for [DEC] and drops [SEP]."""
        if not self.prompt:
            return None, None
        ids = torch.tensor([self._tokenizer(self.prompt).input_ids], device=self._device).repeat(batch, 1)
        return ids, torch.ones_like(ids)

    def caption_batch(self, images: list[np.ndarray]) -> list[str]:
        pixel_values = preprocess(images, self._spec).to(self._device)
        input_ids, attention_mask = self._prompt_ids(len(images))
        with inference(self._device, self.autocast):
            tokens = self._model.generate(
                pixel_values=pixel_values,
                input_ids=input_ids,
                attention_mask=attention_mask,
                num_beams=self.num_beams,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
            )
        return [text.strip() for text in self._tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    def __call__(self, images: list[np.ndarray]) -> list[str]:
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            captions.extend(self.caption_batch(images[start : start + self.batch_size]))
        return captions

    @property
    def sha256(self) -> str:
        """sha256 of the weights (computed once, on first use: hashing 1.8 GB takes a moment)."""
        if self._sha256 is None:
            self._sha256 = sha256_folder(self._folder)
        return self._sha256

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": "BlipForConditionalGeneration",
            "weights_file": self._folder.name,
            "sha256": self.sha256,
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
            "prompt": self.prompt,
            "image_size": [self._spec.height, self._spec.width],
            "precision": precision(self._device, self.autocast),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }
