import pytest
import yaml

from pipeline.config import (IGNORED_BY_KIND, PROFILES, ConfigError, Params, Paths, TrainGeneratorConfig, load_params,
                             params_from_dict)


def write(tmp_path, obj):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(obj))
    return p


def test_repo_params_load_and_match_profile():
    params = load_params("params.yaml")
    assert params.base.profile == "cpu"
    assert params.train_generator.block_out_channels == TrainGeneratorConfig().block_out_channels


def test_the_class_defaults_are_the_cpu_profile():
    """One place for the default run's values: sections.py; the cpu preset adds nothing to them."""
    assert PROFILES["cpu"] == {}
    assert params_from_dict({}) == params_from_dict({"base": {"profile": "cpu"}}) == Params()


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, {"prepare": {"labeled_per_clas": 5}})
    with pytest.raises(ConfigError) as e:
        load_params(p)
    msg = str(e.value)
    assert str(p) in msg and "prepare.labeled_per_clas" in msg and "labeled_per_class" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="sampler"):
        load_params(write(tmp_path, {"sampler": {}}))


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"sample\.per_class.*'many'"):
        load_params(write(tmp_path, {"sample": {"per_class": "many"}}))
    with pytest.raises(ConfigError, match=r"train_generator\.steps"):  # no silent float->int
        load_params(write(tmp_path, {"train_generator": {"steps": 10.5}}))


@pytest.mark.parametrize("key,value", [
    ("sample.per_class", -1), ("sample.guidance_scale", -0.5), ("prepare.labeled_per_class", 0),
    ("base.device", "tpu"), ("prepare.channels", 2), ("base.profile", "huge"), ("sample.shard_index", 1),
    ("pseudo_label.threshold", 1.5), ("pseudo_label.per_class_cap", -1), ("train_generator.labels", "pool"),
    ("train_generator.labeled_weight", 0), ("train_classifier.workers", 0), ("train_classifier.workers", "all"),
])
def test_out_of_range_values_rejected(tmp_path, key, value):
    section, leaf = key.split(".")
    with pytest.raises(ConfigError, match=section):
        load_params(write(tmp_path, {section: {leaf: value}}))


def test_nested_unknown_key(tmp_path):
    with pytest.raises(ConfigError, match=r"filter\.clip\.ckpt.*checkpoint"):
        load_params(write(tmp_path, {"filter": {"clip": {"ckpt": "x"}}}))


def test_profile_preset_then_params_override():
    p = params_from_dict({"base": {"profile": "micro"}, "train_generator": {"steps": 7}})
    assert p.train_generator.steps == 7
    assert p.train_generator.batch_size == PROFILES["micro"]["train_generator"]["batch_size"]


def test_nested_preset_merges_key_by_key_and_kinds_are_checked(tmp_path):
    p = params_from_dict({"base": {"profile": "micro"}, "train_generator": {"dit": {"patch_size": 2}}})
    assert p.train_generator.dit.patch_size == 2  # from params.yaml
    assert p.train_generator.dit.num_layers == PROFILES["micro"]["train_generator"]["dit"]["num_layers"]  # preset
    with pytest.raises(ConfigError, match=r"train_generator\.kind.*'unet', 'dit', 'cgan' or 'datasetgan'"):
        load_params(write(tmp_path, {"train_generator": {"kind": "vae"}}))


def test_keys_a_generator_kind_ignores_are_named_when_the_user_sets_them(tmp_path, caplog):
    """The gpu preset sets lr, init, block_out_channels for every kind: only what params.yaml or an
    override sets is named, with the kinds that read it."""
    assert all(IGNORED_BY_KIND[k] <= set(TrainGeneratorConfig.model_fields) for k in IGNORED_BY_KIND)
    p = write(tmp_path, {"base": {"profile": "gpu"}, "train_generator": {"kind": "cgan", "warmup_steps": 5}})
    with caplog.at_level("WARNING", logger="pipeline.config"):
        load_params(p, {"train_generator.lr": 1e-4, "train_generator.steps": 9})
    assert caplog.messages == [f"{p}: train_generator.kind cgan ignores train_generator.lr, warmup_steps (they apply "
                               "to kind unet, dit, datasetgan only); remove them or set train_generator.kind to one "
                               "of those"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.config"):
        params_from_dict({"train_generator": {"kind": "datasetgan", "p_uncond": 0.2, "lr": 1e-4}})
        params_from_dict({"base": {"profile": "gpu"}, "train_generator": {"kind": "cgan"}})
        params_from_dict({"train_generator": {"kind": "cgan", "p_uncond": 0.1}})  # its default: changes nothing
        params_from_dict({"train_generator": {"kind": "unet", "p_uncond": 0.2, "lr": 1e-4}})
    assert caplog.messages == ["<params>: train_generator.kind datasetgan ignores train_generator.p_uncond (they "
                               "apply to kind unet, dit only); remove them or set train_generator.kind to one of those"]


def test_overrides_and_missing_file(tmp_path):
    p = load_params("params.yaml", {"sample.per_class": 3})
    assert p.sample.per_class == 3
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("base: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(p)


def test_variants_are_named_specs_with_required_data(tmp_path):
    p = params_from_dict({"train_classifier": {"variants": {"mine": {"data": "filtered", "real": False}}}})
    assert list(p.train_classifier.variants) == ["mine"]  # the dict replaces the default list, no merge
    spec = p.train_classifier.variants["mine"]
    assert spec.data == "filtered" and spec.real is False and spec.augment == "standard"
    repo = load_params("params.yaml").train_classifier.variants
    assert repo["real"].data == "prepared" and repo["real"].real and repo["real+classic"].augment == "classic"
    assert repo["synthetic-only"].data == "filtered" and not repo["synthetic-only"].real
    assert not repo["real"].pseudo and not repo["synthetic-only"].pseudo
    assert repo["fixmatch"].learner == "fixmatch" and repo["fixmatch"].data == "prepared"
    assert repo["fixmatch+synthetic"].learner == "fixmatch" and repo["fixmatch+synthetic"].uses_synthetic


def test_a_fixmatch_variant_trains_with_the_learners_budget():
    p = params_from_dict({"pseudo_label": {"arch": "test_resnet", "steps": 30, "seeds": 2, "eval_every": 5},
                          "train_classifier": {"steps": 10, "seeds": 4}})
    learner = p.classifier_config("fixmatch+synthetic")
    assert (learner.arch, learner.steps, learner.seeds, learner.eval_every) == ("test_resnet", 30, 2, 5)
    assert p.classifier_config("real").steps == 10 and p.classifier_config("real").seeds == 4
    assert p.learner()[1] == p.train_classifier.variants["fixmatch"]  # the variant is pseudo_label's learner itself
    assert "pseudo_label" in p.made_with("train_classifier", "fixmatch")
    assert "pseudo_label" not in p.made_with("train_classifier", "real")
    with pytest.raises(ConfigError, match="learner: fixmatch already learns from the unlabeled pool"):
        params_from_dict({"train_classifier": {"variants": {"x": {"data": "prepared", "learner": "fixmatch",
                                                                  "pseudo": True}}}})


def test_unknown_key_inside_a_variant_names_key_and_allowed(tmp_path):
    p = write(tmp_path, {"train_classifier": {"variants": {"real": {"data": "prepared", "augmnt": "classic"}}}})
    with pytest.raises(ConfigError) as e:
        load_params(p)
    msg = str(e.value)
    assert str(p) in msg and "train_classifier.variants.real.augmnt" in msg
    assert "augment" in msg and "data" in msg and "real" in msg


@pytest.mark.parametrize("variants,match", [
    ({"real": {"augment": "classic"}}, r"train_classifier\.variants\.real\.data.*required"),
    ({"real": {"data": "augmented"}}, r"train_classifier\.variants\.real\.data.*'prepared', 'filtered' or 'synthetic'"),
    ({}, r"train_classifier.*variants is empty"),
    ({"cas": {"data": "prepared", "real": False}},
     r"train_classifier\.variants\.cas.*real: false.*filtered or synthetic"),
    # pseudo-labeled pool images are real images: a synthetic-only variant cannot add them
    ({"cas": {"data": "filtered", "real": False, "pseudo": True}},
     r"train_classifier\.variants\.cas.*real: false.*no pseudo: true"),
])
def test_bad_variants_refused(tmp_path, variants, match):
    with pytest.raises(ConfigError, match=match):
        load_params(write(tmp_path, {"train_classifier": {"variants": variants}}))
    with pytest.raises(ConfigError, match=match):  # also under a profile preset
        params_from_dict({"base": {"profile": "micro"}, "train_classifier": {"variants": variants}})


def test_paths_named_once(tmp_path):
    paths = Paths(root=tmp_path)
    assert paths.prepared == tmp_path / "data/prepared"
    assert paths.filtered.parent == paths.synthetic.parent


def test_shipped_params_with_the_gpu_profile_keep_its_presets():
    """A key in params.yaml wins over the preset, so params.yaml must not pin what the profiles set:
    `dvc exp run -S base.profile=gpu` pre-trains on the pool as the README says."""
    raw = yaml.safe_load(open("params.yaml"))
    gpu = params_from_dict({**raw, "base": {**raw["base"], "profile": "gpu"}})
    assert gpu.train_generator.init == "pretrain" and gpu.train_generator.pretrain_steps == 20000
    assert gpu.train_generator.block_out_channels == (128, 256, 256, 256) and gpu.train_generator.attention
    cpu = load_params("params.yaml")
    for knob in ("prediction_type", "zero_terminal_snr", "snr_gamma"):  # one diffusion recipe at every size
        assert getattr(gpu.train_generator, knob) == getattr(cpu.train_generator, knob)
