"""CLIP score of each image against a prompt naming its intended class (a local checkpoint only)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import FilterConfig
from pipeline.errors import ConfigError


def load_clip(checkpoint: str | None, device: str = "cpu"):
    """(CLIPModel, CLIPProcessor) from a local folder; ConfigError when it is not usable."""
    if not checkpoint:
        raise ConfigError("filter.clip.checkpoint is not set")
    path = Path(checkpoint)
    if not path.is_dir():
        raise ConfigError(f"filter.clip.checkpoint: {checkpoint} not found. Point it at a local folder "
                          f"written by CLIPModel.save_pretrained + CLIPProcessor.save_pretrained "
                          f"(nothing is downloaded at run time), or set it to null.")
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        proc = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"filter.clip.checkpoint: {checkpoint} is not a CLIP model + processor folder "
                          f"({err})") from None
    return model, proc


@torch.no_grad()
def clip_scores(model, processor, images: torch.Tensor, labels: torch.Tensor, class_names: list[str],
                prompt: str = "a photo of a {}", batch_size: int = 64, device: str = "cpu") -> torch.Tensor:
    """CLIPScore = 100 * max(cos(image, text of the intended class), 0) per image."""
    texts = [prompt.format(n) for n in class_names]
    tok = processor(text=texts, return_tensors="pt", padding=True)
    tok = {k: v.to(device) for k, v in tok.items()}
    t = model.get_text_features(**tok)
    t = getattr(t, "pooler_output", t)
    t = F.normalize(t.float(), dim=-1)
    out = []
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        batch = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch
        pix = processor(images=list(batch.permute(0, 2, 3, 1).cpu().numpy()), return_tensors="pt")["pixel_values"]
        v = model.get_image_features(pixel_values=pix.to(device))
        v = F.normalize(getattr(v, "pooler_output", v).float(), dim=-1)
        cos = (v * t[labels[i:i + batch_size].to(device)]).sum(-1)
        out.append((100.0 * cos.clamp_min(0)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def clip_column(cfg: FilterConfig, syn_x, syn_y, class_names, device) -> tuple[np.ndarray, dict]:
    if not cfg.clip.checkpoint:
        return np.full(len(syn_x), np.nan), {
            "used": False, "why": "filter.clip.checkpoint not set (no CLIP weights are installed here; "
                                  "point it at a local CLIPModel/CLIPProcessor folder to score images)"}
    model, proc = load_clip(cfg.clip.checkpoint, device)
    s = clip_scores(model, proc, syn_x, syn_y, class_names, cfg.clip.prompt, cfg.batch_size, device)
    return s.numpy(), {"used": True, "checkpoint": cfg.clip.checkpoint, "prompt": cfg.clip.prompt,
                       "min_score": cfg.clip.min_score, "score": "100 * max(cos(image, prompt), 0)"}
