"""where neural annotators run: the GPU when there is one, with fp16 autocast (or exact fp32) there, else the CPU in
fp32"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def pick_device(device: str | None) -> torch.device:
    """None or "auto": CUDA when there is one, else CPU; anything else as torch spells it ("cuda:1")."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def inference(device: torch.device, fp16: bool = True) -> contextlib.ExitStack:
    """inference_mode, plus on CUDA either fp16 autocast or exact fp32 (the CPU stays fp32: its fp16 kernels are
    slow)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    stack.enter_context(torch.autocast(device.type, dtype=torch.float16, enabled=fp16 and device.type == "cuda"))
    if not fp16 and device.type == "cuda":
        stack.enter_context(exact_fp32())
    return stack


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for cuDNN's convolutions and cuBLAS's matmuls, restored after. PyTorch lets cuDNN round fp32
    convolutions to TF32 by default: 10 mantissa bits, fp16's, the rounding that fp32 is asked for to avoid (on an
    H200, OpenPose under fp16 autocast changed 1.2% of a map; in fp32 with TF32 off its maps were the CPU's, pixel for
    pixel)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def precision(device: torch.device, fp16: bool = True) -> str:
    return "fp16-autocast" if fp16 and device.type == "cuda" else "fp32"
