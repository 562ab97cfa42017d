"""where neural annotators run: the GPU when there is one, with fp16 autocast there, else the CPU in fp32"""
from __future__ import annotations

import contextlib

import torch


def pick_device(device: str | None) -> torch.device:
    """None or "auto": CUDA when there is one, else CPU; anything else as torch spells it ("cuda:1")."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def inference(device: torch.device, fp16: bool = True) -> contextlib.ExitStack:
    """inference_mode, plus fp16 autocast on CUDA (the CPU stays fp32: its fp16 kernels are slow)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    stack.enter_context(torch.autocast(device.type, dtype=torch.float16, enabled=fp16 and device.type == "cuda"))
    return stack


def precision(device: torch.device, fp16: bool = True) -> str:
    return "fp16-autocast" if fp16 and device.type == "cuda" else "fp32"
