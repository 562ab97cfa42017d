"""pseudo-random weights in the official file layouts, the same in any environment: each tensor's values are a
function of (seed, its name, its shape) alone, so the reference virtualenv (controlnet_aux, which builds its own
modules) and the project (which builds transformers' or its own) load bit-identical weights from the same names.

Imports only torch: tests/parity/make_fixtures.py runs it in the reference virtualenv.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterable
from pathlib import Path

import torch


def pseudo_random_tensor(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Kaiming-scaled Gaussian weights, norm scales near 1, small positive biases (ReLU networks stay alive)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    noise = torch.randn(shape, generator=g)
    if name.endswith("bias"):
        return 0.05 + 0.02 * noise
    if len(shape) >= 2:
        fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
        return noise * (1.0 / fan_in) ** 0.5
    if name.endswith("weight"):  # LayerNorm / GroupNorm scales
        return 1.0 + 0.1 * noise
    return 0.02 * noise  # tokens, embeddings


def pseudo_random_state(shapes: Iterable[tuple[str, tuple[int, ...]]], seed: int = 0) -> dict[str, torch.Tensor]:
    return {name: pseudo_random_tensor(name, tuple(shape), seed) for name, shape in shapes}


def write_state(state: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


# OpenPose's last PAF conv: a constant field pointing down-right, so that random heatmap peaks join into limbs and
# people (with purely random weights no limb passes the PAF test, and the decoding and drawing would go untested)
OPENPOSE_PAF_BIAS = ("Mconv7_stage6_L1.bias", 0.5)


def openpose_state(shapes: Iterable[tuple[str, tuple[int, ...]]], seed: int = 0) -> dict[str, torch.Tensor]:
    """body_pose_model.pth's tensors (published names, 'conv1_1.weight', ...), pseudo-random, people found."""
    state = pseudo_random_state(shapes, seed)
    name, value = OPENPOSE_PAF_BIAS
    state[name] = torch.full_like(state[name], value)
    return state
