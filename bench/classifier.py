"""Classifier training and feature extraction throughput against plain PyTorch loops.

train   ours  = ``pipeline.training.classifier.fit``: uint8 tensors, batched random crop +
                flip on the device, bf16 autocast on CUDA, AdamW + one-cycle, one final validation.
        plain = a torch DataLoader over the PIL images of the prepared HF dataset with torchvision
                RandomCrop(padding) / RandomHorizontalFlip / ToTensor / Normalize, the same timm
                model and initial weights, AdamW + OneCycleLR, fp32.
features ours  = ``pipeline.quality.features.FeatureSpace("efficientnet-lite0")``: uint8 batches resized on
                the device (bilinear), channels_last.
        plain = a DataLoader over PIL images resized to 224 one by one (PIL bilinear) +
                ToTensor / Normalize, the same EfficientNet-Lite0 weights, in batches.
archs   the cpu profile's classifier before (``--before-arch``, resnet10t) and after (``--after-arch``,
        test_resnet), both through ``fit`` with classic augmentation (TrivialAugmentWide):
        the steps per second that pay for 5 seeds x 1500 steps per variant.
"""
from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from bench.common import alternate, memory_method, parser, rate, ratio, save, section, setup
from pipeline.config import Paths


def plain_fit(model, ds, steps: int, batch_size: int, lr: float, weight_decay: float, device: str) -> float:
    from torchvision import transforms

    size = ds[0]["image"].size[0]
    mode = "L" if ds[0]["image"].mode == "L" else "RGB"
    tf = transforms.Compose([transforms.RandomCrop(size, padding=max(1, round(size / 8))),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize([0.5], [0.5])])
    data = ds.with_transform(lambda b: {"x": [tf(im.convert(mode)) for im in b["image"]], "y": b["label"]})
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    loss = torch.zeros(())
    for _, batch in zip(range(steps), itertools.chain.from_iterable(itertools.repeat(loader))):
        x, y = batch["x"].to(device), batch["y"].to(device)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return float(loss)


@torch.no_grad()
def plain_features(model, ds, batch_size: int, device: str, resolution: int = 224) -> torch.Tensor:
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize((resolution, resolution)), transforms.ToTensor(),
                             transforms.Normalize([0.5] * 3, [0.5] * 3)])
    data = ds.with_transform(lambda b: {"x": [tf(im.convert("RGB")) for im in b["image"]]})
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    model.to(device).eval()
    return torch.cat([model(b["x"].to(device)).float().cpu() for b in loader])


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet10t", help="timm model of the training benchmark")
    p.add_argument("--steps", type=int, default=0, help="training steps per run (0 = 30 on cpu, 300 on cuda)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--feature-images", type=int, default=0, help="images per extraction run (0 = 128 cpu, 4096 cuda)")
    p.add_argument("--feature-batch-size", type=int, default=64)
    p.add_argument("--before-arch", default="resnet10t", help="the cpu profile's classifier before")
    p.add_argument("--after-arch", default="test_resnet", help="the cpu profile's classifier now")
    args = p.parse_args(argv)
    device = setup(args)
    cuda = device == "cuda"
    if args.quick:
        args.steps, args.batch_size, args.feature_images, args.feature_batch_size = 3, 16, 8, 8
    steps = args.steps or (300 if cuda else 30)
    n_feat = args.feature_images or (4096 if cuda else 128)

    from pipeline.core.images import dataset_to_tensors
    from pipeline.core.io import load_dataset_dir
    from pipeline.models.classifier import build_model
    from pipeline.quality.features import FeatureSpace
    from pipeline.training.classifier import batch_sources, fit

    dd = load_dataset_dir(Paths().prepared / "dataset", "prepare")
    train_ds, val_ds = dd["train"], dd["val"].select(range(64))
    feat_ds = dd["test"].select(range(min(n_feat, len(dd["test"]))))
    (tx, ty), (vx, vy) = dataset_to_tensors(train_ds), dataset_to_tensors(val_ds)
    fx, _ = dataset_to_tensors(feat_ds)
    num_classes = len(train_ds.features["label"].names)
    torch.manual_seed(0)
    init = build_model(args.arch, num_classes, int(tx.shape[1]))
    lr, wd = 3e-3, 0.05

    def ours_fit():
        _, hist = fit(copy.deepcopy(init), batch_sources(args.batch_size, (tx, ty)), (vx, vy), steps=steps,
                                 lr=lr, weight_decay=wd, seed=0, device=device, eval_every=10**9, progress=False)
        return hist["train_loss"][-1]

    def plain_fit_side():
        return plain_fit(copy.deepcopy(init), train_ds, steps, args.batch_size, lr, wd, device)

    space = FeatureSpace("efficientnet-lite0", device=device, batch_size=args.feature_batch_size)
    effnet = build_model("tf_efficientnet_lite0", 0, 3, "efficientnet-lite0").eval().to(device)

    with section(f"classifier warm-up on {device}"):
        fit(copy.deepcopy(init), batch_sources(args.batch_size, (tx, ty)), (vx[:8], vy[:8]), steps=1, lr=lr,
                       weight_decay=wd, seed=0, device=device, progress=False)
        plain_fit(copy.deepcopy(init), train_ds, 1, args.batch_size, lr, wd, device)
        space(fx[:args.feature_batch_size])
        plain_features(effnet, feat_ds.select(range(args.feature_batch_size)), args.feature_batch_size, device)
    with section(f"classifier training: {args.arch}, {steps} steps of batch {args.batch_size}"):
        fs, fm, fl = alternate({"ours": ours_fit, "plain": plain_fit_side}, args.repeats, device)
    with section(f"feature extraction: efficientnet-lite0 224px, {n_feat} images"):
        es, em, el = alternate({"ours": lambda: space(fx),
                                "plain": lambda: plain_features(effnet, feat_ds, args.feature_batch_size, device)},
                               args.repeats, device)
    archs = {"before": args.before_arch, "after": args.after_arch}
    inits = {k: build_model(a, num_classes, int(tx.shape[1])) for k, a in archs.items()}

    def arch_fit(side):
        return lambda: fit(copy.deepcopy(inits[side]), batch_sources(args.batch_size, (tx, ty)), (vx, vy),
                                      steps=steps, lr=lr, weight_decay=wd, seed=0, device=device,
                                      augment="classic", eval_every=10**9, progress=False)[1]["train_loss"][-1]
    with section(f"classifier before/after: {archs}, classic augmentation, {steps} steps of batch {args.batch_size}"):
        arch_fit("after")()  # warm-up
        as_, am, _ = alternate({k: arch_fit(k) for k in archs}, args.repeats, device)
    arch_rates = {k: rate(steps, v) for k, v in as_.items()}
    train_rates = {k: rate(steps, v) for k, v in fs.items()}
    feat_rates = {k: rate(n_feat, v) for k, v in es.items()}
    fo, fp = el["ours"], el["plain"]
    cos = torch.nn.functional.cosine_similarity(fo, fp, dim=1)
    result = {
        "settings": {"arch": args.arch, "steps_per_run": steps, "batch_size": args.batch_size,
                     "train_images": len(tx), "validation_images_at_end": len(vx), "lr": lr, "weight_decay": wd,
                     "feature_images": n_feat, "feature_batch_size": args.feature_batch_size,
                     "feature_space": "efficientnet-lite0 (ImageNet) 224px, pooled 1280-d",
                     "precision_ours": "bf16 autocast" if cuda else "fp32", "precision_plain": "fp32",
                     "plain_dataloader": "torch DataLoader, num_workers 0, PIL + torchvision transforms",
                     "repeats": args.repeats, "order": "alternated", "quick": args.quick,
                     "note": "ours training includes fit's one validation pass and best-state copy at the end"},
        "training": {
            "ours": {**train_rates["ours"], "steps_per_second": train_rates["ours"]["per_second_best"],
                     "images_per_second": train_rates["ours"]["per_second_best"] * args.batch_size,
                     "peak_memory_mib": max(fm["ours"]), "last_loss": float(fl["ours"])},
            "plain": {**train_rates["plain"], "steps_per_second": train_rates["plain"]["per_second_best"],
                      "images_per_second": train_rates["plain"]["per_second_best"] * args.batch_size,
                      "peak_memory_mib": max(fm["plain"]), "last_loss": float(fl["plain"])},
            "ratio_steps_per_second": ratio(train_rates["ours"], train_rates["plain"]),
        },
        "features": {
            "ours": {**feat_rates["ours"], "images_per_second": feat_rates["ours"]["per_second_best"],
                     "peak_memory_mib": max(em["ours"])},
            "plain": {**feat_rates["plain"], "images_per_second": feat_rates["plain"]["per_second_best"],
                      "peak_memory_mib": max(em["plain"])},
            "ratio_images_per_second": ratio(feat_rates["ours"], feat_rates["plain"]),
            "agreement": {"min_cosine_similarity": float(cos.min()), "mean_cosine_similarity": float(cos.mean()),
                          "max_abs_difference": float((fo - fp).abs().max()),
                          "note": "resize differs: torch bilinear on uint8 tensors (ours) vs PIL bilinear (plain)"},
        },
        "archs": {**{k: {"arch": archs[k], "augment": "classic", "steps_per_second": arch_rates[k]["per_second_best"],
                         **arch_rates[k], "peak_memory_mib": max(am[k])} for k in archs},
                  "ratio_steps_per_second_after_vs_before": ratio(arch_rates["after"], arch_rates["before"])},
        "peak_memory_method": memory_method(device),
    }
    save("classifier", device, result, args.out_dir)
    return result


if __name__ == "__main__":
    main()
