"""sample: guidance, per-image determinism, shards and merge, loading a saved generator (CPU)."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import datasets
import pytest
import torch
from PIL import Image
from pydantic import Field

from pipeline import sample as sp
from pipeline import train_generator as tg
from pipeline.config import Paths, SampleConfig, TrainGeneratorConfig, params_from_dict
from pipeline.core.images import dataset_to_tensors, tensors_to_dataset
from pipeline.core.io import read_json, write_json
from pipeline.core.seeding import image_seed
from pipeline.errors import DataError
from pipeline.models.class_conditional import ClassConditionalPipeline
from pipeline.models.diffusion import DiffusionGenerator, build_unet, inference_scheduler, train_scheduler
from pipeline.models.registry import load_generator
from pipeline.models.sampling import batch_ranges, generate, generation_plan, img2img_plan, shard_range
from tests.helpers import make_prepared, make_pseudo

SIZE = 8
NAMES = ["left", "right/up"]
PLAN = generation_plan(2, 3)  # tiny_params: 3 images of each of 2 classes


def tiny_params(**sample):
    return params_from_dict({
        "base": {"profile": "micro", "device": "cpu", "seed": 5},
        "train_generator": {"block_out_channels": (8, 16), "batch_size": 8, "steps": 2, "warmup_steps": 1,
                            "checkpoint_every": 2, "preview_per_class": 0},
        "sample": {"per_class": 3, "num_inference_steps": 2, "grid_per_class": 2, "batch_size": 3, **sample}})


@pytest.fixture(scope="module")
def generator_root(tmp_path_factory):
    """A project root with a tiny prepared set and a generator trained for 2 steps."""
    root = tmp_path_factory.mktemp("gen")
    x = torch.zeros(8, 1, SIZE, SIZE, dtype=torch.uint8)
    x[:4, :, :4] = 255
    y = torch.tensor([0] * 4 + [1] * 4)
    ds = tensors_to_dataset(x, y, NAMES)
    datasets.DatasetDict({"train": ds, "val": ds, "test": ds}).save_to_disk(str(Paths(root=root).prepared / "dataset"))
    write_json(Paths(root=root).prepared / "summary.json",
               {"class_names": NAMES, "num_classes": 2, "image_size": SIZE, "channels": 1})
    make_pseudo(root, class_names=NAMES)  # no pool: pseudo_label kept nothing, the generator learns the labeled set
    tg.run(tiny_params(), Paths(root=root))
    return root


def tiny_model():
    cfg = tiny_params().train_generator
    torch.manual_seed(0)
    unet = build_unet(cfg, SIZE, 1, 2).eval()
    meta = {"null_label": 2, "image_size": SIZE, "channels": 1, "class_names": NAMES, "fingerprint": "f" * 64}
    return unet, dict(train_scheduler(cfg).config), meta


def tiny_pipeline(unet, conf: dict, sampler: str = "dpm++") -> ClassConditionalPipeline:
    pipe = ClassConditionalPipeline(scheduler=inference_scheduler(sampler, conf), class_names=NAMES,
                                    image_size=SIZE, unet=unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_generator() -> DiffusionGenerator:
    unet, conf, meta = tiny_model()
    return DiffusionGenerator(tiny_pipeline(unet, conf), meta)


def denoise(pipe: ClassConditionalPipeline, noise: torch.Tensor, labels: torch.Tensor, guidance: float,
            steps: int) -> torch.Tensor:
    """The pipeline's guided loop from ``noise``, as images in [-1, 1] (N,C,H,W)."""
    out = pipe(labels, num_inference_steps=steps, guidance_scale=guidance, noise=noise, output_type="pt")
    return out.images * 2 - 1


def test_guidance_batched_equals_separate_passes_and_changes_output():
    unet, conf, _ = tiny_model()
    pipe = tiny_pipeline(unet, conf)
    assert pipe.null_label == 2 and pipe.label_ids(["right/up", 0]).tolist() == [1, 0]
    x, t, y = torch.randn(3, 1, SIZE, SIZE), torch.tensor(500), torch.tensor([0, 1, 0])
    with torch.no_grad():
        cond = unet(x, t, class_labels=y).sample
        uncond = unet(x, t, class_labels=torch.full_like(y, 2)).sample
        guided = pipe.guided_output(x, t, y, 3.0)
        assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-5)
        assert torch.equal(pipe.guided_output(x, t, y, 1.0), cond)
        assert torch.equal(pipe.guided_output(x, t, y, 0.0), uncond)
    for name in ("ddim", "dpm++"):
        pipe.scheduler = inference_scheduler(name, conf)
        noise = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
        lab = torch.tensor([0, 1])
        a = denoise(pipe, noise, lab, 0.0, 3)
        b = denoise(pipe, noise, lab, 4.0, 3)
        assert a.shape == noise.shape and (a - b).abs().max() > 1e-3
        assert torch.equal(a, denoise(pipe, noise, lab, 0.0, 3))  # deterministic given noise


def test_guidance_rescale_matches_the_conditional_std_and_the_interval_switches_guidance_off():
    unet, conf, _ = tiny_model()
    pipe = tiny_pipeline(unet, conf)
    x, t, y = torch.randn(3, 1, SIZE, SIZE), torch.tensor(500), torch.tensor([0, 1, 0])
    with torch.no_grad():
        cond = unet(x, t, class_labels=y).sample
        full = pipe.guided_output(x, t, y, 6.0, guidance_rescale=1.0)
    assert torch.allclose(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), rtol=1e-4)
    noise = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    lab = torch.tensor([0, 1])
    off = pipe(lab, num_inference_steps=3, guidance_scale=4.0, noise=noise, output_type="pt", guidance_interval=(0, 0))
    plain = pipe(lab, num_inference_steps=3, guidance_scale=1.0, noise=noise, output_type="pt")
    assert torch.equal(off.images, plain.images)  # no step inside the interval: conditional only


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_same_seed_same_image_whatever_the_batch(sampler):
    gen = tiny_generator()
    cfg = tiny_params(sampler=sampler).sample
    full, labels, seeds = generate(gen, PLAN, range(0, 6), cfg, 5, batch_size=6, progress=False)
    assert seeds == [image_seed(5, i) for i in range(6)] and labels.tolist() == [0, 0, 0, 1, 1, 1]
    small, _, _ = generate(gen, PLAN, range(0, 6), cfg, 5, batch_size=4, progress=False)
    part, _, part_seeds = generate(gen, PLAN, range(2, 5), cfg, 5, batch_size=2, progress=False)
    assert full.dtype == torch.uint8 and full.shape == (6, 1, SIZE, SIZE)
    # another batch composition changes only float rounding: at most one grey level
    assert (full.int() - small.int()).abs().max() <= 1
    assert (full[2:5].int() - part.int()).abs().max() <= 1 and part_seeds == seeds[2:5]
    again, _, _ = generate(gen, PLAN, range(0, 6), cfg, 5, batch_size=6, progress=False)
    assert torch.equal(full, again)
    other, _, _ = generate(gen, PLAN, range(0, 6), cfg, 6, batch_size=6, progress=False)
    assert not torch.equal(full, other)  # another base seed, other images


def test_shards_and_batches_partition_the_indices():
    ranges = [shard_range(10, k, 3) for k in range(3)]
    assert [i for r in ranges for i in r] == list(range(10))
    assert [list(r) for r in batch_ranges(range(3, 10), 4)] == [[3], [4, 5, 6, 7], [8, 9]]
    assert sp.safe_name("T-shirt/top") == "t-shirt-top"


def copy_generator_chain(src, dst) -> None:
    """The generator and what it was made from (a sampling worker holds them all: its chain is checked)."""
    for part in ("generator", "prepared", "pseudo"):
        shutil.copytree(getattr(Paths(root=src), part), getattr(Paths(root=dst), part))


def test_saved_generator_samples_and_two_shards_merge_to_one_shard_run(generator_root, tmp_path):
    roots = {}
    for name in ("one", "two"):
        roots[name] = tmp_path / name
        copy_generator_chain(generator_root, roots[name])
    single = sp.run(tiny_params(), Paths(root=roots["one"]))
    assert single["complete"] and single["num_images"] == 6
    first = sp.run(tiny_params(num_shards=2, shard_index=0), Paths(root=roots["two"]), shard_only=True)
    assert first["complete"] is False and first["shard"] == 0  # a fan-out worker: its shard alone
    assert not Paths(root=roots["two"]).synthetic.exists()
    merged = sp.run(tiny_params(num_shards=2, shard_index=1), Paths(root=roots["two"]), shard_only=True)
    assert merged["complete"] is False
    merged = sp.run(tiny_params(num_shards=2, shard_index=0), Paths(root=roots["two"]))  # both there: merged
    assert merged["complete"] and merged["counts_per_class"] == {"left": 3, "right/up": 3}
    a = datasets.load_from_disk(str(Paths(root=roots["one"]).synthetic / "dataset"))
    b = datasets.load_from_disk(str(Paths(root=roots["two"]).synthetic / "dataset"))
    assert a.column_names == ["image", "label", "seed", "guidance", "steps", "sampler", "generator", "strength",
                              "source_split", "source_index"]
    assert set(list(a["strength"])) == {1.0} and set(list(a["source_index"])) == {-1}  # generated from noise, no source
    assert a.features["label"].names == NAMES
    for col in ("label", "seed", "guidance", "steps", "sampler", "generator"):
        assert a[col] == b[col]
    assert torch.equal(dataset_to_tensors(a)[0], dataset_to_tensors(b)[0])
    meta = read_json(Paths(root=generator_root).generator / "generator.json")
    assert set(a["generator"]) == {meta["fingerprint"]} and a["seed"] == [image_seed(5, i) for i in range(6)]
    out = Paths(root=roots["two"]).synthetic
    assert sorted(p.name for p in (out / "preview").iterdir()) == ["00_left.png", "01_right-up.png"]
    summary = read_json(out / "summary.json")
    assert summary["num_images"] == 6 and summary["images_per_second"] > 0 and summary["device"] == "cpu"


def test_img2img_plan_is_strength_major_and_keeps_each_source_label():
    src = torch.arange(3 * 1 * 2 * 2, dtype=torch.uint8).reshape(3, 1, 2, 2)
    plan = img2img_plan(src, torch.tensor([0, 1, 1]), (0.25, 1.0), variations=2,
                        origins=[("train", 0), ("train", 1), ("pool", 7)])
    assert len(plan) == 12 and plan.strengths.tolist() == [0.25] * 6 + [1.0] * 6
    assert plan.source_rows.tolist() == [0, 0, 1, 1, 2, 2] * 2 and plan.labels.tolist() == [0, 0, 1, 1, 1, 1] * 2
    # the preview: whole sources, each row the source image then its 4 variations, weakest strength first
    orders, nrow = plan.preview(2, per_class=9)
    assert nrow == 5 and orders == [[0, 1, 6, 7], [2, 3, 8, 9, 4, 5, 10, 11]]
    made = torch.full((8, 1, 2, 2), 200, dtype=torch.uint8)
    grid = plan.with_sources(made, orders[1])
    assert grid.shape[0] == 10 and torch.equal(grid[0], src[1]) and torch.equal(grid[5], src[2])
    assert (grid[1:5] == 200).all() and (grid[6:] == 200).all()


def test_strength_sets_how_far_a_variation_moves_from_its_source():
    """SDEdit: a low strength stays near the source image, strength 1 ignores it (pure noise)."""
    gen = tiny_generator()
    cfg = tiny_params(num_inference_steps=4).sample
    x = torch.zeros(2, 1, SIZE, SIZE, dtype=torch.uint8)
    x[:, :, :4, :4] = 255
    seeds, labels = [1, 2], torch.tensor([0, 0])
    dist = {s: (gen.sample(labels, seeds, cfg, images=x, strength=s).float() - x.float()).abs().mean().item()
            for s in (0.25, 1.0)}
    assert dist[0.25] < dist[1.0]
    fresh = gen.sample(labels, seeds, cfg)  # strength 1 from the same noise: the source is (almost) gone
    assert (gen.sample(labels, seeds, cfg, images=x, strength=1.0).int() - fresh.int()).abs().float().mean() < 8


def test_img2img_stage_records_sources_and_strengths(generator_root, tmp_path):
    root = tmp_path / "i2i"
    copy_generator_chain(generator_root, root)
    out = sp.run(tiny_params(mode="img2img", strengths=[0.5, 1.0], variations=1), Paths(root=root))
    ds = datasets.load_from_disk(str(Paths(root=root).synthetic / "dataset"))
    assert out["num_images"] == 16 and out["images_per_strength"] == {"0.5": 8, "1.0": 8}
    assert list(ds["source_split"]) == ["train"] * 16 and list(ds["source_index"]) == list(range(8)) * 2
    train_y = list(datasets.load_from_disk(str(Paths(root=root).prepared / "dataset"))["train"]["label"])
    assert list(ds["label"]) == train_y * 2  # each variation keeps its source's class
    with Image.open(Paths(root=root).synthetic / "preview" / "00_left.png") as grid:
        assert grid.width == 3 * (SIZE + 1) + 1  # a row: the source, then its variation at each strength
    with pytest.raises(DataError, match="pool_per_class"):  # no pool was pseudo-labeled here
        sp.run(tiny_params(mode="img2img", pool_per_class=2), Paths(root=root))


def test_complete_shard_is_skipped_and_stale_shard_redone(generator_root, tmp_path, caplog):
    root = tmp_path / "r"
    copy_generator_chain(generator_root, root)
    params = tiny_params(num_shards=2, shard_index=0)
    sp.run(params, Paths(root=root), shard_only=True)
    shard = Paths(root=root).synthetic_shards / "shard-000-of-002"
    stamp = (shard / "state.json").stat().st_mtime_ns
    sp.run(params, Paths(root=root), shard_only=True)
    assert (shard / "state.json").stat().st_mtime_ns == stamp  # kept, not regenerated
    sp.run(tiny_params(num_shards=2, shard_index=0, batch_size=2, grid_per_class=1), Paths(root=root), shard_only=True)
    assert (shard / "state.json").stat().st_mtime_ns == stamp  # batch size and preview change no image: kept
    sp.run(tiny_params(num_shards=2, shard_index=0, guidance_scale=3.0), Paths(root=root), shard_only=True)
    assert datasets.load_from_disk(str(shard))["guidance"] == [3.0] * 3
    assert "other settings" in caplog.text
    # a garbage shard record (a worker killed while writing it, a bad copy) is named, and the shard made again
    record = shard.with_name(shard.name + ".json")
    record.write_text("{not json")
    sp.run(tiny_params(num_shards=2, shard_index=0, guidance_scale=3.0), Paths(root=root), shard_only=True)
    assert "shard-000-of-002.json: damaged or unreadable" in caplog.text and read_json(record)["recipe"]


def test_a_setting_is_in_a_shards_recipe_unless_marked_as_changing_no_image():
    class Extended(SampleConfig):
        new_knob: int = 0
        quiet_knob: int = Field(0, json_schema_extra={"changes_images": False})

    recipe = sp.recipe(Extended())
    assert "new_knob" in recipe and "quiet_knob" not in recipe
    assert set(Extended.model_fields) - set(recipe) == {"batch_size", "shard_index", "num_shards", "grid_per_class",
                                                        "quiet_knob"}


def test_a_fan_outs_shard_count_is_not_reported_as_params_changed_since():
    """A fan-out's merge runs with sample.num_shards=N as an override and dvc.lock then records
    params.yaml's values: dvc repro would not re-run sample, and its images are those of one shard."""
    from pipeline.core.provenance import params_made_with

    merged = {"params": tiny_params(num_shards=4).resolved()}
    assert params_made_with(tiny_params(), {"synthetic": merged})[1] == []


class OracleEps:
    """Epsilon 'model' that knows the data is one image x*, with a small error and bounded output."""

    def __init__(self, target: torch.Tensor, alphas_cumprod: torch.Tensor, error: float = 0.02):
        self.target, self.ab, self.error = target, alphas_cumprod, error
        # what the pipeline reads of its backbone
        self.config = SimpleNamespace(sample_size=target.shape[-1], in_channels=target.shape[1])

    def __call__(self, x, t, class_labels=None):
        ab = self.ab[t.long()].reshape(-1, 1, 1, 1)  # t: one timestep per image
        eps = (x - ab.sqrt() * self.target) / (1 - ab).sqrt() + self.error
        return type("Out", (), {"sample": eps.clamp(-4, 4)})()  # a network's output is bounded


class OracleV(OracleEps):
    """The same oracle predicting v = sqrt(ab) * eps - sqrt(1 - ab) * x0 (bounded even at zero SNR)."""

    def __call__(self, x, t, class_labels=None):
        ab = self.ab[t.long()].reshape(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * self.target) / (1 - ab).sqrt()
        v = ab.sqrt() * eps - (1 - ab).sqrt() * self.target + self.error
        return type("Out", (), {"sample": v.clamp(-4, 4)})()


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
@pytest.mark.parametrize("recipe", [{"prediction_type": "epsilon", "zero_terminal_snr": False},
                                    {"prediction_type": "v_prediction", "zero_terminal_snr": True}])
def test_sampler_recovers_the_data_from_pure_noise(sampler, recipe):
    """From the last training step (SNR ~ 0 for epsilon, exactly 0 for v) small model errors must not blow up."""
    cfg = TrainGeneratorConfig(**recipe)
    conf = dict(train_scheduler(cfg).config)
    target = torch.linspace(-1, 1, SIZE * SIZE).reshape(1, 1, SIZE, SIZE)
    oracle = (OracleV if cfg.prediction_type == "v_prediction" else OracleEps)(target,
                                                                               train_scheduler(cfg).alphas_cumprod)
    noise = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    out = denoise(tiny_pipeline(oracle, conf, sampler), noise, torch.tensor([0, 1]), 1.0, 10)
    assert (out - target).abs().max() < 0.1


@pytest.mark.parametrize("kind", ["dit", "cgan", "datasetgan"])
def test_every_kind_plugs_into_the_sample_stage(kind, tmp_path):
    """The same stage, no per-kind code: a merged dataset of per_class images per class, per-seed images."""
    make_prepared(tmp_path)
    params = params_from_dict({
        "base": {"profile": "micro", "device": "cpu", "seed": 5},
        "train_generator": {"kind": kind, "steps": 2, "batch_size": 8, "preview_per_class": 1,
                            "dit": {"patch_size": 2, "num_layers": 1, "num_heads": 2, "head_dim": 8},
                            "cgan": {"z_dim": 8, "g_channels": 16, "d_channels": 8}},
        "sample": {"per_class": 3, "num_inference_steps": 2, "grid_per_class": 2, "batch_size": 4}})
    tg.run(params, Paths(root=tmp_path))
    out = sp.run(params, Paths(root=tmp_path))
    assert out["complete"] and out["generator_kind"] == kind
    assert out["counts_per_class"] == {"left": 3, "right": 3}
    ds = datasets.load_from_disk(str(Paths(root=tmp_path).synthetic / "dataset"))
    x, y = dataset_to_tensors(ds)
    assert x.shape == (6, 1, 8, 8) and y.tolist() == [0, 0, 0, 1, 1, 1]
    one = generate(load_generator(Paths(root=tmp_path).generator), generation_plan(2, 3), range(4, 5), params.sample,
                   5, 1, progress=False)
    assert (one[0].int() - x[4:5].int()).abs().max() <= 1  # image 4 alone = image 4 in a batch of 4
