"""Tensor helpers shared by training and sampling."""
from __future__ import annotations

import torch


def num_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
