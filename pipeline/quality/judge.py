"""The judge: a timm classifier trained on the real labeled split, selected on val, cached.

It scores each synthetic image (probability of the intended label, margin, predicted
class) and can serve as a feature space. Never sees the test split.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.config import FilterConfig
from pipeline.core.io import save_safetensors, sha256_tensor, write_json
from pipeline.models.classifier import build_model
from pipeline.training.classifier import batch_sources, fit, predict_proba

log = logging.getLogger(__name__)
JUDGE_RECIPE = "r2"  # bump when training changes beyond the key's settings, so a cached judge is not reused


def train_judge(cfg: FilterConfig, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                num_classes: int, seed: int, device) -> tuple[torch.nn.Module, dict]:
    """A timm classifier (cfg.judge_arch) trained on the real labeled train split, selected on val.
    Its initial weights come from ``seed`` too, whatever ran before in the process."""
    torch.manual_seed(seed)
    model = build_model(cfg.judge_arch, num_classes, int(train[0].shape[1]))
    return fit(model, batch_sources(cfg.judge_batch_size, train), val, steps=cfg.judge_steps,
                          lr=cfg.judge_lr, weight_decay=0.05, seed=seed, device=device, augment="standard",
                          eval_every=max(1, cfg.judge_steps // 5), progress=False)


def judge_scores(judge: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device
                 ) -> dict[str, np.ndarray]:
    """Probability of the intended label, margin top1 - top2 of the probabilities, predicted class."""
    p = predict_proba(judge, x, batch_size, device)
    top2 = p.topk(min(2, p.shape[1]), dim=1).values
    margin = top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0)
    return {"confidence": p[torch.arange(len(y)), y].numpy(), "margin": margin.numpy(),
            "predicted": p.argmax(1).numpy()}


def load_or_train_judge(cfg: FilterConfig, train: tuple[torch.Tensor, torch.Tensor],
                        val: tuple[torch.Tensor, torch.Tensor], num_classes: int, seed: int, device,
                        cache_dir: Path) -> tuple[torch.nn.Module, dict]:
    """The judge for this data and these settings: from ``cache_dir`` when trained before."""
    key = sha256_tensor(torch.cat([train[0].flatten(), val[0].flatten()]))[:12] + \
        f"-{sha256_tensor(torch.cat([train[1], val[1]]))[:8]}-{cfg.judge_arch}-s{cfg.judge_steps}" \
        f"-lr{cfg.judge_lr}-b{cfg.judge_batch_size}-seed{seed}-{JUDGE_RECIPE}"
    path = cache_dir / f"judge-{key}.safetensors"
    if path.exists():
        model = build_model(cfg.judge_arch, num_classes, int(train[0].shape[1]))
        model.load_state_dict(load_file(str(path)))
        meta = path.with_suffix(".json")
        hist = json.loads(meta.read_text()) if meta.exists() else {}
        log.info("filter: judge from cache %s", path.name)
        return model.eval(), hist
    model, hist = train_judge(cfg, train, val, num_classes, seed, device)
    save_safetensors(model.state_dict(), path)
    keep = {k: hist[k] for k in ("best_val_acc", "best_step", "steps", "seconds") if k in hist}
    write_json(path.with_suffix(".json"), keep)
    return model.eval(), keep
