"""tiny random DPT-Hybrid weights, in the transformers folder layout and in the original MiDaS .pt layout"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import DPTConfig, DPTForDepthEstimation

from annotate.midas import HF_FOLDER, ORIGINAL_FILE, dpt_hybrid_config

# the tiny architecture: 3 one-block BiT stages (GroupNorm keeps the published 32 groups), 4 ViT layers of
# 128 channels (2 heads of 64, the convention the original loader infers), a 4x4 token grid at 64 px
TINY_BACKBONE = {"depths": [1, 1, 1], "hidden_sizes": [128, 256, 512, 1024], "embedding_size": 32}
TINY = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "intermediate_size": 256,
    "image_size": 64,
    "backbone_out_indices": [0, 1, 2, 3],
    "neck_hidden_sizes": [128, 256, 128, 128],
    "fusion_hidden_size": 64,
    "backbone_featmap_shape": [1, 512, 4, 4],
}
TIMM_CLASSES = 10  # the original checkpoint carries timm's unused ImageNet head; a tiny one here


def tiny_dpt_config() -> DPTConfig:
    return dpt_hybrid_config(TINY_BACKBONE, **TINY)


def tiny_dpt_model(seed: int = 0) -> DPTForDepthEstimation:
    """Random weights; tensors the init leaves constant (zeros, norm scales of one) get noise too, so a
    loader that swaps two of them changes the output."""
    torch.manual_seed(seed)
    model = DPTForDepthEstimation(tiny_dpt_config()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() > 1 and float(param.std()) == 0.0:
                param.add_(torch.randn(param.shape, generator=g) * 0.05)
        for conv in (0, 2, 4):  # a depth that varies visibly with the image, above the final ReLU
            model.head.head[conv].weight.mul_(4.0)
        model.head.head[4].bias.fill_(0.5)
    return model


def write_tiny_dpt(folder: Path, seed: int = 0) -> Path:
    """`folder`/dpt-hybrid-midas: config.json + model.safetensors, as Intel/dpt-hybrid-midas is laid out."""
    out = Path(folder) / HF_FOLDER
    tiny_dpt_model(seed).save_pretrained(out)
    return out


def write_tiny_dpt_large(folder: Path, seed: int = 0) -> Path:
    """`folder`/dpt-large: a tiny DPT without the hybrid's ResNet stem (is_hybrid false: a plain ViT), as
    Intel/dpt-large (and MiDaS's dpt_large) is laid out: another depth model users download."""
    torch.manual_seed(seed)
    config = DPTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128,
                       image_size=64, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 32, 64, 64],
                       fusion_hidden_size=32)
    out = Path(folder) / "dpt-large"
    DPTForDepthEstimation(config).save_pretrained(out)
    return out


def original_state_dict(hf: dict[str, torch.Tensor], config: DPTConfig) -> dict[str, torch.Tensor]:
    """The same tensors under the isl-org MiDaS DPTDepthModel(backbone="vitb_rn50_384") names.

    Written out module by module from the original architecture (timm vit_base_resnet50_384 under
    `pretrained.model`, `pretrained.act_postprocess*`, `scratch.*`), not by inverting annotate.midas's rules.
    """
    sd: dict[str, torch.Tensor] = {}
    vit, emb = "pretrained.model.", "dpt.embeddings."
    sd[vit + "cls_token"] = hf[emb + "cls_token"]
    sd[vit + "pos_embed"] = hf[emb + "position_embeddings"]
    # timm ResNetV2 (StdConv2dSame + GroupNorm, non-pre-activation bottlenecks)
    res, bit = vit + "patch_embed.backbone.", emb + "backbone.bit."
    sd[res + "stem.conv.weight"] = hf[bit + "embedder.convolution.weight"]
    for p in ("weight", "bias"):
        sd[res + f"stem.norm.{p}"] = hf[bit + f"embedder.norm.{p}"]
    for s, depth in enumerate(config.backbone_config.depths):
        for b in range(depth):
            src, dst = f"{bit}encoder.stages.{s}.layers.{b}.", f"{res}stages.{s}.blocks.{b}."
            convs = ["conv1", "conv2", "conv3"] + (["downsample.conv"] if b == 0 else [])
            norms = ["norm1", "norm2", "norm3"] + (["downsample.norm"] if b == 0 else [])
            for conv in convs:
                sd[f"{dst}{conv}.weight"] = hf[f"{src}{conv}.weight"]
            for norm in norms:
                for p in ("weight", "bias"):
                    sd[f"{dst}{norm}.{p}"] = hf[f"{src}{norm}.{p}"]
    for p in ("weight", "bias"):
        sd[vit + f"patch_embed.proj.{p}"] = hf[emb + f"projection.{p}"]
    # timm ViT blocks: norm1, attn.qkv (q, k, v stacked), attn.proj, norm2, mlp.fc1, mlp.fc2
    for i in range(config.num_hidden_layers):
        src, dst = f"dpt.encoder.layer.{i}.", f"{vit}blocks.{i}."
        for p in ("weight", "bias"):
            sd[f"{dst}norm1.{p}"] = hf[f"{src}layernorm_before.{p}"]
            sd[f"{dst}attn.qkv.{p}"] = torch.cat(
                [hf[f"{src}attention.attention.{name}.{p}"] for name in ("query", "key", "value")]
            )
            sd[f"{dst}attn.proj.{p}"] = hf[f"{src}attention.output.dense.{p}"]
            sd[f"{dst}norm2.{p}"] = hf[f"{src}layernorm_after.{p}"]
            sd[f"{dst}mlp.fc1.{p}"] = hf[f"{src}intermediate.dense.{p}"]
            sd[f"{dst}mlp.fc2.{p}"] = hf[f"{src}output.dense.{p}"]
    g = torch.Generator().manual_seed(1)
    for p in ("weight", "bias"):
        sd[vit + f"norm.{p}"] = hf[f"dpt.layernorm.{p}"]
        shape = (TIMM_CLASSES, config.hidden_size) if p == "weight" else (TIMM_CLASSES,)
        sd[vit + f"head.{p}"] = torch.randn(shape, generator=g)
    # act_postprocess3/4: [0] ProjectReadout(Linear(2D, D), GELU), [3] 1x1 conv, act_postprocess4[4] 3x3 s2 conv
    reassemble = "neck.reassemble_stage."
    for n in (3, 4):
        for p in ("weight", "bias"):
            sd[f"pretrained.act_postprocess{n}.0.project.0.{p}"] = hf[f"{reassemble}readout_projects.{n - 1}.0.{p}"]
            sd[f"pretrained.act_postprocess{n}.3.{p}"] = hf[f"{reassemble}layers.{n - 1}.projection.{p}"]
    for p in ("weight", "bias"):
        sd[f"pretrained.act_postprocess4.4.{p}"] = hf[f"{reassemble}layers.3.resize.{p}"]
    # scratch: layerN_rn (3x3, no bias), refinenet4 (deepest, fused first) .. refinenet1, output_conv
    for n in range(1, 5):
        sd[f"scratch.layer{n}_rn.weight"] = hf[f"neck.convs.{n - 1}.weight"]
        fusion = f"neck.fusion_stage.layers.{4 - n}."
        for p in ("weight", "bias"):
            sd[f"scratch.refinenet{n}.out_conv.{p}"] = hf[f"{fusion}projection.{p}"]
            for unit in (1, 2):
                for conv in (1, 2):
                    sd[f"scratch.refinenet{n}.resConfUnit{unit}.conv{conv}.{p}"] = hf[
                        f"{fusion}residual_layer{unit}.convolution{conv}.{p}"
                    ]
    for j in (0, 2, 4):  # Conv, Interpolate, Conv, ReLU, Conv, ReLU
        for p in ("weight", "bias"):
            sd[f"scratch.output_conv.{j}.{p}"] = hf[f"head.head.{j}.{p}"]
    return {key: value.clone().contiguous() for key, value in sd.items()}


def write_tiny_midas_original(folder: Path, seed: int = 0) -> Path:
    """`folder`/dpt_hybrid-midas-501f0c75.pt: the weights of write_tiny_dpt(folder, seed) in the original
    MiDaS layout (a plain state dict, as ControlNet's annotator ships it)."""
    model = tiny_dpt_model(seed)
    path = Path(folder) / ORIGINAL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(original_state_dict(model.state_dict(), model.config), path)
    return path
