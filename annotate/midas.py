"""MiDaS DPT-Hybrid depth maps, min-max normalised to 0..255 per image, as ControlNet's depth model uses"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import transformers
from transformers import DPTConfig, DPTForDepthEstimation

from annotate.base import Annotation
from annotate.device import inference, pick_device, precision
from annotate.resize import DETECT_RESOLUTION, detection_size, to_detection, to_output
from annotate.weights import (
    MissingWeightsError,
    load_complete_model,
    load_state_dict_file,
    one_line,
    require_finite,
    require_tensors,
    resolve_folder,
    resolve_weight,
    sha256_file,
    sha256_folder,
)

HF_FOLDER = "dpt-hybrid-midas"  # the transformers conversion, published as Intel/dpt-hybrid-midas
HF_REPO = "Intel/dpt-hybrid-midas"
HF_MODEL_TYPE = "dpt"  # its config.json's model_type
ORIGINAL_FILE = "dpt_hybrid-midas-501f0c75.pt"  # isl-org MiDaS v3 DPTDepthModel, as ControlNet ships it
ORIGINAL_REPO = "lllyasviel/Annotators"


# ---------------------------------------------------------------------------------------------------------
# model configuration


def dpt_hybrid_config(backbone: dict[str, Any] | None = None, **overrides: Any) -> DPTConfig:
    """The configuration of the published Intel/dpt-hybrid-midas, with `overrides` (BiT ones in `backbone`)."""
    bit = {
        "global_padding": "same",
        "layer_type": "bottleneck",
        "depths": [3, 4, 9],
        "hidden_sizes": [256, 512, 1024, 2048],
        "embedding_size": 64,
        "num_groups": 32,
        "out_features": ["stage1", "stage2", "stage3"],
        "embedding_dynamic_padding": True,
    }
    config = {
        "is_hybrid": True,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "image_size": 384,
        "patch_size": 16,
        "backbone_out_indices": [2, 5, 8, 11],  # hybrid: only [2:] are used, the ViT blocks MiDaS hooks
        "readout_type": "project",
        "reassemble_factors": [1, 1, 1, 0.5],
        "neck_hidden_sizes": [256, 512, 768, 768],
        "fusion_hidden_size": 256,
        "backbone_featmap_shape": [1, 1024, 24, 24],
        "neck_ignore_stages": [0, 1],
        "use_batch_norm_in_fusion_residual": False,
    }
    return DPTConfig(**{**config, **overrides}, backbone_config={**bit, **(backbone or {})})


def _count(state_dict: dict[str, torch.Tensor], pattern: str) -> int:
    return sum(1 for key in state_dict if re.fullmatch(pattern, key))


def config_from_original(state_dict: dict[str, torch.Tensor]) -> DPTConfig:
    """The DPT-Hybrid config matching an original MiDaS state dict's tensor shapes.

    Shapes fix every size but two: attention heads follow the ViT convention of 64 channels per head, and
    GroupNorm keeps the published 32 groups. The published checkpoint gives the published config.
    """
    sd = state_dict
    bb = "pretrained.model.patch_embed.backbone."
    hidden = sd["pretrained.model.cls_token"].shape[-1]
    layers = _count(sd, r"pretrained\.model\.blocks\.\d+\.attn\.qkv\.weight")
    grid = math.isqrt(sd["pretrained.model.pos_embed"].shape[1] - 1)  # (1, 1 + grid*grid, hidden)
    depths, widths = [], []
    while (f"{bb}stages.{len(depths)}.blocks.0.conv3.weight") in sd:
        stage = len(depths)
        depths.append(_count(sd, rf"{re.escape(bb)}stages\.{stage}\.blocks\.\d+\.conv3\.weight"))
        widths.append(sd[f"{bb}stages.{stage}.blocks.0.conv3.weight"].shape[0])
    backbone = {
        "depths": depths,
        "hidden_sizes": [*widths, 2 * widths[-1]],  # the 4th stage is never built (3 out_features)
        "embedding_size": sd[f"{bb}stem.conv.weight"].shape[0],
    }
    return dpt_hybrid_config(
        backbone,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=sd["pretrained.model.blocks.0.mlp.fc1.weight"].shape[0],
        image_size=grid * 16,
        backbone_out_indices=[(k + 1) * layers // 4 - 1 for k in range(4)],  # 12 layers: 2, 5, 8, 11
        neck_hidden_sizes=[sd[f"scratch.layer{n}_rn.weight"].shape[1] for n in range(1, 5)],
        fusion_hidden_size=sd["scratch.layer1_rn.weight"].shape[0],
        backbone_featmap_shape=[1, widths[-1], grid, grid],
    )


# ---------------------------------------------------------------------------------------------------------
# original MiDaS key layout -> transformers DPTForDepthEstimation

_Rename = str | Callable[[re.Match[str]], str]

# (original key prefix pattern, transformers prefix); the rest of the key (".weight", ".bias", ...) is kept.
_RENAMES: list[tuple[str, _Rename]] = [
    (r"pretrained\.model\.cls_token", "dpt.embeddings.cls_token"),
    (r"pretrained\.model\.pos_embed", "dpt.embeddings.position_embeddings"),
    # timm ResNetV2 stem and stages of the hybrid patch embedding -> transformers BiT backbone
    (r"pretrained\.model\.patch_embed\.backbone\.stem\.conv\.", "dpt.embeddings.backbone.bit.embedder.convolution."),
    (r"pretrained\.model\.patch_embed\.backbone\.stem\.norm\.", "dpt.embeddings.backbone.bit.embedder.norm."),
    (
        r"pretrained\.model\.patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.",
        r"dpt.embeddings.backbone.bit.encoder.stages.\1.layers.\2.",
    ),
    (r"pretrained\.model\.patch_embed\.proj\.", "dpt.embeddings.projection."),
    # timm ViT blocks (qkv is split separately)
    (r"pretrained\.model\.blocks\.(\d+)\.norm1\.", r"dpt.encoder.layer.\1.layernorm_before."),
    (r"pretrained\.model\.blocks\.(\d+)\.norm2\.", r"dpt.encoder.layer.\1.layernorm_after."),
    (r"pretrained\.model\.blocks\.(\d+)\.attn\.proj\.", r"dpt.encoder.layer.\1.attention.output.dense."),
    (r"pretrained\.model\.blocks\.(\d+)\.mlp\.fc1\.", r"dpt.encoder.layer.\1.intermediate.dense."),
    (r"pretrained\.model\.blocks\.(\d+)\.mlp\.fc2\.", r"dpt.encoder.layer.\1.output.dense."),
    (r"pretrained\.model\.norm\.", "dpt.layernorm."),
    # act_postprocess3/4 = (readout project, transpose, unflatten, 1x1 conv[, 3x3 stride-2 conv]);
    # 1 and 2 are identities in the hybrid (ResNet features go straight to the neck)
    (
        r"pretrained\.act_postprocess([34])\.0\.project\.0\.",
        lambda m: f"neck.reassemble_stage.readout_projects.{int(m[1]) - 1}.0.",
    ),
    (
        r"pretrained\.act_postprocess([34])\.3\.",
        lambda m: f"neck.reassemble_stage.layers.{int(m[1]) - 1}.projection.",
    ),
    (r"pretrained\.act_postprocess4\.4\.", "neck.reassemble_stage.layers.3.resize."),
    (r"scratch\.layer([1-4])_rn\.", lambda m: f"neck.convs.{int(m[1]) - 1}."),
    # refinenet4 fuses the deepest features first; transformers reverses the list, so it is layers.0
    (
        r"scratch\.refinenet([1-4])\.out_conv\.",
        lambda m: f"neck.fusion_stage.layers.{4 - int(m[1])}.projection.",
    ),
    (
        r"scratch\.refinenet([1-4])\.resConfUnit([12])\.conv([12])\.",
        lambda m: f"neck.fusion_stage.layers.{4 - int(m[1])}.residual_layer{m[2]}.convolution{m[3]}.",
    ),
    (r"scratch\.output_conv\.", "head.head."),
]
_COMPILED = [(re.compile(pattern), repl) for pattern, repl in _RENAMES]
_QKV = re.compile(r"pretrained\.model\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)")
_DROPPED = ("pretrained.model.head.",)  # timm's ImageNet classifier, unused by the depth model


def rename_original_key(key: str) -> str | None:
    """The transformers name of an original MiDaS key; None if no rule knows it."""
    for pattern, repl in _COMPILED:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return None


def convert_original_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original MiDaS DPT-Hybrid state dict -> transformers DPTForDepthEstimation state dict."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith(_DROPPED):
            continue
        if qkv := _QKV.fullmatch(key):
            # timm packs (3 * hidden, ...) as q, k, v
            layer, kind = qkv.groups()
            for part, name in zip(value.chunk(3, dim=0), ("query", "key", "value"), strict=True):
                out[f"dpt.encoder.layer.{layer}.attention.attention.{name}.{kind}"] = part.clone()
            continue
        new = rename_original_key(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(
            f"not a MiDaS DPT-Hybrid checkpoint: {len(unknown)} unknown keys, e.g. {', '.join(unknown[:3])}"
        )
    return out


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in an original MiDaS .pt (plain, or {"model": ..., "optimizer": ...} as MiDaS saves)."""
    state = load_state_dict_file(path, "MiDaS DPT-Hybrid checkpoint")
    if "optimizer" in state and "model" in state:
        state = state["model"]
    return state


def model_from_original(path: str | Path) -> DPTForDepthEstimation:
    """A transformers DPTForDepthEstimation holding the weights of an original MiDaS checkpoint."""
    original = load_original_state_dict(path)
    what = "the MiDaS DPT-Hybrid checkpoint (dpt_hybrid-midas-501f0c75.pt)"
    require_tensors(original, path, what)
    try:  # a key the layout needs, or a shape it fixes, that the file does not have
        with torch.device("meta"):  # no random init of 123M parameters that the file replaces anyway
            model = DPTForDepthEstimation(config_from_original(original))
        converted = {k: v.float() if v.is_floating_point() else v
                     for k, v in convert_original_state_dict(original).items()}
        model.load_state_dict(converted, strict=True, assign=True)
    except (KeyError, IndexError, RuntimeError, ValueError) as err:
        raise ValueError(f"{path} is not {what} ({type(err).__name__}: {one_line(err)})") from None
    require_finite(model, path, what)
    return model


def model_from_folder(folder: str | Path) -> DPTForDepthEstimation:
    # the first fusion layer has no coarser level to add, so transformers never runs its residual_layer1; fp32
    # whatever the file's dtype, as the original checkpoint (transformers 5 keeps a file's fp16, and CPU batches failed)
    load = partial(DPTForDepthEstimation.from_pretrained, local_files_only=True, dtype=torch.float32)
    model = load_complete_model(load, folder,
                                "MiDaS DPT-Hybrid (dpt-hybrid-midas)",
                                unused=("neck.fusion_stage.layers.0.residual_layer1.",))
    # Intel/dpt-large (a DPT-BEiT too) is a whole DPT of its own config: it loaded, and the job wrote its depth maps,
    # not those ControlNet's depth model was trained on, under the name DPT-Hybrid
    if not model.config.is_hybrid:
        raise ValueError(f"{folder} is not MiDaS DPT-Hybrid (dpt-hybrid-midas): its config.json is a DPT that is not "
                         "hybrid (no ResNet stem: Intel/dpt-large's or a DPT-BEiT's), whose depth maps are not "
                         "ControlNet's")
    return model


def find_midas_weights(source: str | None) -> tuple[str, Path]:
    """("hf", folder) or ("original", file): what the source holds first, then what the hub cache holds."""
    looked = []
    if source:
        if source.endswith((".pt", ".pth")):  # the checkpoint file itself
            parent, _, filename = source.rpartition("/")
            return "original", resolve_weight(filename, parent or ".")
        try:  # a --weights folder that is itself a Hugging Face folder counts only if its config is DPT's: it may be
            # BLIP's files beside the .pt
            return "hf", resolve_folder(HF_FOLDER, source, model_type=HF_MODEL_TYPE)
        except MissingWeightsError:
            looked.append(f"{source}/{HF_FOLDER}/")
        try:
            return "original", resolve_weight(ORIGINAL_FILE, source)
        except MissingWeightsError:
            looked.append(f"{source}/{ORIGINAL_FILE}")
    try:
        return "hf", resolve_folder(HF_FOLDER, hub_repo=HF_REPO)
    except MissingWeightsError:
        looked.append(f"the Hugging Face hub cache ({HF_REPO})")
    cached = _hub_cached_file(ORIGINAL_REPO, ORIGINAL_FILE)
    if cached is not None:
        return "original", cached
    looked.append(f"the Hugging Face hub cache ({ORIGINAL_REPO}/{ORIGINAL_FILE})")
    raise MissingWeightsError(
        f"MiDaS weights not found: neither the folder {HF_FOLDER!r} (https://huggingface.co/{HF_REPO}) nor "
        f"the file {ORIGINAL_FILE!r} (https://huggingface.co/{ORIGINAL_REPO}); looked in: {', '.join(looked)}. "
        f"Put either one in the folder you pass with --weights."
    )


def _hub_cached_file(repo_id: str, filename: str) -> Path | None:
    """A file already in the HF hub cache (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(repo_id, filename)
    return Path(cached) if isinstance(cached, str) else None


# ---------------------------------------------------------------------------------------------------------
# pre- and post-processing (pure numpy / OpenCV)


def detection_input(image: np.ndarray, detect_resolution: int) -> np.ndarray:
    """The image at its detection size (annotate.resize), as ControlNet 1.1 sizes it; a non-square one is squeezed
    to a square of the shorter side's size, since transformers' DPT-Hybrid reshapes its tokens to a square grid
    (the dataset job's images are square)."""
    h, w = detection_size(image.shape[0], image.shape[1], detect_resolution)
    if h == w:
        return to_detection(image, detect_resolution)
    side = min(h, w)
    enlarging = float(detect_resolution) / min(image.shape[:2]) > 1
    return cv2.resize(image, (side, side), interpolation=cv2.INTER_LANCZOS4 if enlarging else cv2.INTER_AREA)


def preprocess(images: list[np.ndarray], detect_resolution: int) -> torch.Tensor:
    """Same-size RGB uint8 (H, W, 3) images -> (B, 3, h, w) float32 in [-1, 1] (mean 0.5, std 0.5), at the
    detection size (the shorter side at `detect_resolution`, sides multiples of 64).

    Contiguous: a permuted (channels-last) batch stays channels-last through the padded convolutions, where
    PyTorch's CPU GroupNorm is about 1000x less exact (8e-3 relative error at the output).
    """
    batch = np.stack([detection_input(np.ascontiguousarray(image), detect_resolution) for image in images])
    x = torch.from_numpy(batch).float() / 127.5 - 1.0  # (B, h, w, 3)
    return x.permute(0, 3, 1, 2).contiguous()


def depth_to_map(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) float32 depth at the network's size -> (H, W) uint8, as the ControlNet 1.1 annotator makes it:
    min-max normalised to 0..255 and truncated there, then resized bilinearly (annotate.resize.to_output).
    A constant depth (no information) becomes all zeros rather than a division by zero."""
    depth = depth.astype(np.float32) - depth.min()
    top = depth.max()
    if not np.isfinite(top) or top <= 1e-12:
        return np.zeros(size, np.uint8)
    normalised = ((depth / top) * np.float32(255.0)).clip(0, 255).astype(np.uint8)  # float32, as the reference
    return to_output(normalised, size)


# ---------------------------------------------------------------------------------------------------------
# the annotator


@dataclass
class MidasAnnotator:
    """DPT-Hybrid (MiDaS v3) relative inverse depth, batched, on GPU with fp16 autocast when there is one."""

    seed: int = 0  # unused: the model is deterministic; accepted so every task builds alike
    weights: str | None = None  # folder/URL holding dpt-hybrid-midas/ or dpt_hybrid-midas-501f0c75.pt
    device: str | None = None
    detect_resolution: int = DETECT_RESOLUTION  # the shorter side the network sees (controlnet_aux's 512)
    batch_size: int = 16  # images per forward pass
    autocast: bool = True  # fp16 autocast on CUDA (ignored on CPU)
    name: str = "midas"
    channels: int = 1
    _device: torch.device = field(init=False, repr=False, default=torch.device("cpu"))
    _model: Any = field(init=False, repr=False, default=None)
    _format: str = field(init=False, repr=False, default="")
    _path: Path = field(init=False, repr=False, default=Path())
    _sha256: str | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        self._device = pick_device(self.device)
        self._format, self._path = find_midas_weights(self.weights)
        model = model_from_folder(self._path) if self._format == "hf" else model_from_original(self._path)
        self._model = model.eval().to(self._device)

    def predict_depth(self, images: list[np.ndarray]) -> np.ndarray:
        """Same-size RGB uint8 images -> (B, h, w) float32 relative inverse depth at the detection size."""
        x = preprocess(images, self.detect_resolution).to(self._device)
        # the hybrid embeddings reject sizes other than config.image_size, but interpolate their position embeddings
        # to any grid, as the original MiDaS does. Every model here is hybrid: model_from_folder refuses another DPT,
        # and model_from_original builds the hybrid's config (a .pt without its ResNet stem does not load)
        self._model.dpt.embeddings.image_size = tuple(x.shape[-2:])
        with inference(self._device, self.autocast):
            depth = self._model(pixel_values=x).predicted_depth  # (B, h, w)
        return depth.float().cpu().numpy()

    def __call__(self, images: list[np.ndarray], keys: list[str]) -> list[Annotation]:
        if len(images) != len(keys):
            raise ValueError(f"{len(images)} images but {len(keys)} keys")
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.shape, []).append(i)
        out: dict[int, Annotation] = {}
        params = {"detect_resolution": self.detect_resolution}
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                depths = self.predict_depth([images[i] for i in chunk])
                out.update((i, Annotation(depth_to_map(depth, images[i].shape[:2]), params=dict(params)))
                           for i, depth in zip(chunk, depths, strict=True))
        return [out[i] for i in range(len(images))]

    @property
    def sha256(self) -> str:
        """sha256 of the weights (computed once, on first use: hashing 500 MB takes a moment)."""
        if self._sha256 is None:
            self._sha256 = sha256_folder(self._path) if self._format == "hf" else sha256_file(self._path)
        return self._sha256

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": "DPT-Hybrid (MiDaS v3)",
            "weights_format": self._format,  # "hf" folder or "original" MiDaS checkpoint
            "weights_file": self._path.name,
            "sha256": self.sha256,
            "detect_resolution": self.detect_resolution,
            "precision": precision(self._device, self.autocast),
            "normalisation": "per-image min-max to 0..255",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }
