"""a ControlNetHED.pth with random weights, in the published layout: key names, shapes and fp16 dtype"""
from __future__ import annotations

from pathlib import Path

import torch

# (in channels, out channels, 3x3 convs) of block1..block5, written out here rather than taken from
# annotate.hed so that a test comparing the two catches a loader that drifted from the published file
PUBLISHED_BLOCKS = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))


def tiny_hed_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Random He-scaled weights with the published keys; the published file stores fp16 tensors."""
    g = torch.Generator().manual_seed(seed)
    # a plausible learned RGB mean, so the random net sees centred inputs and draws some structure
    state = {"norm": torch.tensor([123.0, 117.0, 104.0]).view(1, 3, 1, 1)}
    for b, (c_in, c_out, layers) in enumerate(PUBLISHED_BLOCKS, start=1):
        for i in range(layers):
            fan_in = (c_in if i == 0 else c_out) * 9
            scale = (2.0 / fan_in) ** 0.5 / (64.0 if (b, i) == (1, 0) else 1.0)  # inputs span +-128
            state[f"block{b}.convs.{i}.weight"] = torch.randn(c_out, fan_in // 9, 3, 3, generator=g) * scale
            state[f"block{b}.convs.{i}.bias"] = torch.randn(c_out, generator=g) * 0.01
        state[f"block{b}.projection.weight"] = torch.randn(1, c_out, 1, 1, generator=g) * (4.0 / c_out) ** 0.5
        state[f"block{b}.projection.bias"] = torch.zeros(1)
    return {key: value.to(dtype) for key, value in state.items()}


def write_tiny_hed(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write `folder`/ControlNetHED.pth (full architecture, random weights, ~30 MB) and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ControlNetHED.pth"
    torch.save(tiny_hed_state_dict(seed, dtype), path)
    return path
