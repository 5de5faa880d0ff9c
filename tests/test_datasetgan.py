"""datasetgan: interpreter on UNet features, labeled sampling, save/load (tiny UNets, CPU)."""
from __future__ import annotations

import pytest
import torch

from pipeline import train_generator as tg
from pipeline.config import Paths, SampleConfig
from pipeline.core.images import pad_images, to_unit
from pipeline.core.io import read_json
from pipeline.core.seeding import derived_seed, seeded_noise
from pipeline.errors import DataError
from pipeline.models import datasetgan as dg
from pipeline.models.diffusion import PIPELINE_FILE, build_unet, inference_scheduler, train_scheduler
from pipeline.models.registry import load_generator
from pipeline.training.datasetgan import fit_interpreter
from tests.helpers import SIZE, make_prepared, tiny_params, toy_images

SAMPLE = SampleConfig(sampler="ddim", num_inference_steps=2, guidance_scale=2.0)


def tiny_dg_params(**train):
    return tiny_params(kind="datasetgan", steps=6, datasetgan={"feature_draws": 2, "interpreter_steps": 60,
                                                              "label_tries": 3, "feature_timestep": 20}, **train)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("dg")
    make_prepared(root)
    meta = tg.run(tiny_dg_params(), Paths(root=root))
    return root, meta


def test_interpreter_reads_the_class_from_unet_features():
    """Even an untrained UNet's pooled features separate left and right squares."""
    cfg = tiny_params().train_generator
    torch.manual_seed(0)
    unet = build_unet(cfg, SIZE, 1, 2).eval()
    x, y = toy_images(8)
    sched = train_scheduler(cfg)
    f = dg.unet_features(unet, sched, pad_images(to_unit(x), SIZE), 20, list(range(len(x))), 2)
    assert f.shape[0] == 16 and f.shape[1] == 4 * sum([16, 16, 8])  # mid + 2 up blocks, 2x2 pooled
    interp = fit_interpreter(f, y, 2, steps=100, seed=0)
    assert (interp(f).argmax(1) == y).float().mean() == 1.0


def test_stage_writes_a_loadable_labeled_generator(trained):
    root, meta = trained
    out = Paths(root=root).generator
    assert {p.name for p in out.iterdir()} >= {"model_index.json", PIPELINE_FILE, "unet", "scheduler",
                                               dg.INTERPRETER_FILE, "generator.json"}
    saved = read_json(out / "generator.json")
    assert saved["kind"] == "datasetgan" and saved["fingerprint"] == meta["fingerprint"]
    assert 0.0 <= saved["interpreter_val_accuracy"] <= 1.0 and saved["interpreter_val_n"] == 16
    gen = load_generator(out)
    assert isinstance(gen, dg.DatasetGanGenerator)
    assert saved["label_tries"] == 3 and saved["null_label"] == 2


def test_kept_image_is_the_candidate_most_likely_of_its_class(trained):
    gen = load_generator(Paths(root=trained[0]).generator)
    seeds, labels = [11, 12], torch.tensor([0, 1])
    out = gen.sample(labels, seeds, SAMPLE)
    assert out.dtype == torch.uint8 and out.shape == (2, 1, SIZE, SIZE)
    assert torch.equal(gen.sample(labels[1:], seeds[1:], SAMPLE), out[1:])  # per image, not per batch
    # candidates of image 0 made by hand: the kept one is the interpreter's best for class 0
    cand = [derived_seed(11, k) for k in range(3)]
    s = gen.unet.config.sample_size
    pipe = gen.diffusion.pipe
    pipe.scheduler = inference_scheduler("ddim", gen.diffusion.schedule)
    x = pipe(torch.full((3,), pipe.null_label), num_inference_steps=2, guidance_scale=0.0,
             noise=seeded_noise(cand, (1, s, s), "cpu"), output_type="uint8").images
    with torch.no_grad():
        p0 = gen.interpreter(gen.features(pad_images(x.float() / 127.5 - 1, s), cand)).softmax(1)[:, 0]
    assert torch.equal(out[0], x[p0.argmax()])


def test_same_seed_same_weights(tmp_path, trained):
    make_prepared(tmp_path)
    again = tg.run(tiny_dg_params(), Paths(root=tmp_path))
    assert again["fingerprint"] == trained[1]["fingerprint"]
    assert again["interpreter_train_accuracy"] == trained[1]["interpreter_train_accuracy"]


def test_needs_the_pool(tmp_path):
    make_prepared(tmp_path, pool=False)
    with pytest.raises(DataError, match="kind=datasetgan need the unlabeled pool"):
        tg.run(tiny_dg_params(), Paths(root=tmp_path))
