"""Device helpers shared by training and sampling."""
from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA, nothing elsewhere."""
    dev = torch.device(device)
    return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()


def num_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
