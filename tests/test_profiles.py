"""The size presets resolve as docs/parameters.md says with the shipped params.yaml, which shadows none of
them (the cpu profile is the class defaults, so it has nothing to shadow); every stage runs once on CPU with the
gpu profile's architectures at tiny step counts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import cli, filter, prepare, pseudo_label, report, sample, train_classifier, train_generator
from pipeline.config import PROFILES, Paths, load_params, read_yaml
from pipeline.core.io import read_json
from pipeline.core.tensors import num_parameters
from pipeline.models.diffusion import build_backbone
from pipeline.models.registry import GENERATOR_META
from tests.helpers import make_idx_dir

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params.yaml"


def resolved(profile: str, **overrides):
    return load_params(PARAMS, {"base.profile": profile, **overrides})


def leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def unet_parameters(p) -> int:
    return num_parameters(build_backbone(p.train_generator, p.prepare.image_size, p.prepare.channels, 10))


@pytest.mark.parametrize("profile", list(PROFILES))  # the id "gpu" is a keyword, not the gpu marker: it runs
def test_params_yaml_shadows_no_preset(profile):
    """A key set both in a preset and in params.yaml silently replaces the preset's value."""
    clash = set(leaves(read_yaml(PARAMS))) & set(leaves(PROFILES[profile]))
    assert not clash, f"params.yaml sets keys of the {profile} preset, which it then overrides: {sorted(clash)}"


def test_gpu_profile_pretrains_a_30m_unet_on_the_whole_pool():
    p = resolved("gpu")
    g = p.train_generator
    assert p.prepare.unlabeled_pool == -1  # the whole unlabeled pool ...
    assert g.init == "pretrain" and g.pretrain_steps == 20000 and g.steps == 10000  # pre-trained on, fine-tuned
    assert g.kind == "unet" and g.attention and g.block_out_channels == (128, 256, 256, 256) and g.layers_per_block == 2
    assert unet_parameters(p) > 30e6
    assert (g.dit.patch_size, g.dit.num_layers, g.dit.num_heads, g.dit.head_dim) == (2, 12, 6, 64)  # DiT-S/2
    assert g.batch_size == 256 and g.num_processes == 1
    assert (g.prediction_type, g.zero_terminal_snr, g.snr_gamma) == ("v_prediction", True, 5.0)  # the cpu recipe
    assert p.pseudo_label.arch == "resnet10t" and p.pseudo_label.steps == 3000
    c = p.train_classifier
    assert (c.arch, c.steps, c.seeds, c.ratio_sweep, c.synthetic_ratio) == ("resnet10t", 3000, 5, (), 0.5)
    assert len(c.variants) == 6


def test_cpu_profile_is_the_documented_default():
    p = load_params(PARAMS)
    assert p.base.profile == "cpu" and p == resolved("cpu")
    assert PROFILES["cpu"] == {}  # the class defaults (pipeline/config/sections.py) are the cpu profile
    g = p.train_generator
    assert g.init == "scratch" and (g.prediction_type, g.zero_terminal_snr, g.snr_gamma) == ("v_prediction", True, 5.0)
    assert 0.9e6 < unet_parameters(p) < 1.2e6  # "a 1M-parameter UNet"
    assert p.prepare.labeled_per_class * 10 == 500  # 500 labeled Fashion-MNIST images
    s = p.sample
    assert s.mode == "img2img" and len(s.strengths) * s.variations * 500 == 1500  # 1,500 img2img variations
    c = p.train_classifier
    assert (c.arch, c.steps, c.seeds) == ("test_resnet", 1500, 4)
    assert p.filter.batch_size == 4  # the feature pass on a CPU (docs/decisions.md#filter-batch-size)
    lab = p.pseudo_label
    assert (lab.arch, lab.steps, lab.seeds) == ("test_resnet", 4500, 3)  # docs/decisions.md#labeler-steps
    assert c.synthetic_ratio == 0.25 and c.ratio_sweep == ()  # docs/decisions.md#synthetic-ratio


def test_micro_profile_is_small():
    p = resolved("micro")
    assert p.train_generator.steps <= 20 and p.train_classifier.steps <= 20 and p.pseudo_label.steps <= 20


@pytest.mark.slow
def test_every_stage_runs_with_the_gpu_architectures(tmp_path):
    """The gpu profile as resolved from params.yaml (UNet with attention pre-trained on the pool, DiT-S/2,
    resnet10t labeler, judge and classifiers), every count cut to a few steps and images."""
    data = make_idx_dir(tmp_path / "fmnist", n_train=60, n_test=12, classes=3, size=28)
    tiny = {
        "base.device": "cpu", "prepare.path": str(data), "prepare.labeled_per_class": 3, "prepare.val_per_class": 2,
        "pseudo_label.steps": 2, "pseudo_label.batch_size": 8, "pseudo_label.threshold": 0.0,
        "train_generator.pretrain_steps": 2, "train_generator.steps": 2, "train_generator.batch_size": 4,
        "train_generator.warmup_steps": 1, "train_generator.preview_per_class": 0,
        "sample.variations": 1, "sample.num_inference_steps": 2,
        "filter.judge_steps": 2, "filter.max_real": 20, "filter.feature_resolution": 32, "filter.kid_subsets": 2,
        "filter.min_confidence": 0.0, "filter.require_realism": False, "filter.memorization_ratio": 0.0,
        "train_classifier.steps": 2, "train_classifier.seeds": 2, "train_classifier.eval_every": 1,
        "train_classifier.batch_size": 8, "train_classifier.ratio_sweep": [],
        "train_classifier.variants": {"real": {"data": "prepared"},
                                      "real+synthetic+classic": {"data": "filtered", "augment": "classic"}},
    }
    params, paths = resolved("gpu", **tiny), Paths(root=tmp_path)
    g = params.train_generator
    assert g.init == "pretrain" and g.attention and params.train_classifier.arch == "resnet10t"
    prepare.run(params, paths)
    pseudo_label.run(params, paths)
    train_generator.run(params, paths)
    meta = read_json(paths.generator / GENERATOR_META)
    assert meta["kind"] == "unet" and meta["num_parameters"] > 30e6 and meta["steps"] == 4  # 2 pre-training + 2
    assert sample.run(params, paths)["num_images"] == 9  # img2img: one variation of each of 3 x 3 labeled images
    filter.run(params, paths)
    for variant in params.train_classifier.variants:
        train_classifier.run(params, paths, variant)
    assert "headline" in report.run(params, paths)
    dit = resolved("gpu", **tiny, **{"train_generator.kind": "dit"})
    train_generator.run(dit, paths)
    assert read_json(paths.generator / GENERATOR_META)["kind"] == "dit"
    assert sample.run(dit, paths)["num_images"] == 9


def test_micro_runs_end_to_end_on_an_rgb_image_folder(tmp_path, monkeypatch, caplog):
    """A user's first try on their own images: ``synthaug run all`` at micro on an RGB folder of plain-coloured
    classes. The untrained generator's images all lay outside the real images' k-NN manifold, the realism check
    rejected every one and train_classifier stopped on an empty filtered set; micro turns the checks an untrained
    generator cannot pass off and the filter names them."""
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(20):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    # two variants (the baseline and a synthetic one) of the default six: each is 2 seeds of training more
    variants = {"real": {"data": "prepared"}, "real+synthetic+classic": {"data": "filtered", "augment": "classic"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "base": {"profile": "micro", "device": "cpu"}, "train_classifier": {"variants": variants},
        "prepare": {"source": "imagefolder", "path": str(tmp_path / "imgs"), "image_size": 32, "channels": 3}}))
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO"):
        cli.main(["run", "all"])
    filtered = read_json(tmp_path / "data/filtered/summary.json")
    assert filtered["acceptance"]["accepted"] > 0 and not filtered["thresholds"]["require_realism"]
    assert "checks off (every image passes them): judge confidence (filter.min_confidence: 0); realism" in caplog.text
    assert (tmp_path / "reports/report.md").is_file()
