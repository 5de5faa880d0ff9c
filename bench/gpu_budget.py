"""Where the gpu profile's time goes on one GPU, estimated on CPU, and how many workers bring the
classifier stage under the generator's time.

For every stage's main work at the gpu profile's settings (as ``params.yaml`` resolves them with
``base.profile: gpu``, on Fashion-MNIST: 60k train images, 10k test):
  FLOPs      counted with ``torch.utils.flop_counter.FlopCounterMode`` on CPU (matmuls and convolutions,
             forward and backward) for the real architectures; sampling's forwards per image counted
             by running the pipeline's own img2img sampler (a tiny UNet: the count does not depend on it)
  ops        aten operators dispatched per training step (``TorchDispatchMode``), counted with the
             pipeline's own classifier loop (``training.classifier.fit``) and the generator's
             forward + backward, with AdamW as CUDA runs it (foreach, a few ops for all tensors)
  time       max(FLOPs / (peak x MFU), ops x host cost per op) per step: big steps are compute-bound,
             small ones are bound by the host launching one kernel per op (eager PyTorch). The
             classifier loop keeps its losses on the device and reads them back only at each validation
             (every eval_every steps); FlexMatch's class-wise thresholds index by a boolean mask every
             step, a sync the FixMatch learner pays
The per-op host cost of a GPU box is an assumption (``--us-per-op``); what one op costs on this CPU at a
tiny size (where compute is negligible) is measured and reported beside it, under whatever load the
machine has. Output: ``bench/results/gpu_budget-cpu.json`` (the counting ran on the CPU).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from bench.common import ROOT, diffusion_generator, parser, save, section, setup
from pipeline.config import load_params, params_from_dict
from pipeline.models.classifier import build_model
from pipeline.models.diffusion import build_backbone, train_scheduler
from pipeline.training.classifier import batch_sources, fit

# Fashion-MNIST as prepare splits it: 60k train -> labeled + val per class, the rest the pool; 10k test
TRAIN, TEST, CLASSES, SIZE = 60000, 10000, 10, 28


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched (forward, backward and optimizer alike)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def ops(fn) -> int:
    with OpCounter() as oc:
        fn()
    return oc.n


def adamw_ops(model: torch.nn.Module, foreach: bool) -> int:
    """Operators of one AdamW step over ``model``'s parameters (after a first step made its state)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, foreach=foreach)
    opt.step()
    return ops(opt.step)


def train_flops_per_image(model, x: torch.Tensor, loss) -> int:
    """Forward + backward FLOPs per image of a batch ``x``."""
    return flops(lambda: loss(model, x).backward()) // len(x)


def fwd_flops_per_image(model, x: torch.Tensor, **kw) -> int:
    with torch.no_grad():
        return flops(lambda: model(x, **kw)) // len(x)


def classifier_costs(arch: str, augment: str, batch: int, tiny: int, steps: int) -> dict:
    """FLOPs per image and ops per step of the pipeline's classifier loop at ``arch``; its seconds per
    step on this CPU at batch 2 and ``tiny`` px (compute negligible: the host cost of the ops)."""
    model = build_model(arch, CLASSES, 1)
    x = torch.randint(0, 256, (batch, 1, SIZE, SIZE), dtype=torch.uint8)
    y = torch.arange(batch) % CLASSES
    per_img = train_flops_per_image(model, x.float() / 255, lambda m, v: F.cross_entropy(m(v), y))
    fwd = fwd_flops_per_image(model.eval(), x[:8].float() / 255)

    def train(n, xb, yb):
        fit(build_model(arch, CLASSES, 1), batch_sources(len(xb), (xb, yb)), (xb[:2], yb[:2]), steps=n, lr=1e-3,
                       weight_decay=0.05, seed=0, augment=augment, eval_every=10**9, progress=False)

    per_step = (ops(lambda: train(3, x, y)) - ops(lambda: train(1, x, y))) // 2  # two steps, set-up and eval cancel
    per_step += adamw_ops(model, True) - adamw_ops(model, False)  # as on CUDA: foreach
    xt, yt = x[:2, :, :tiny, :tiny].contiguous(), y[:2]
    train(2, xt, yt)  # warm-up
    t0 = time.perf_counter()
    train(2 + steps, xt, yt)
    t1 = time.perf_counter()
    train(2, xt, yt)
    seconds = ((t1 - t0) - (time.perf_counter() - t1)) / steps
    cpu_ops = (ops(lambda: train(3, xt, yt)) - ops(lambda: train(1, xt, yt))) / 2
    return {"arch": arch, "augment": augment, "train_flops_per_image": per_img, "forward_flops_per_image": fwd,
            "ops_per_step": per_step, "cpu_tiny_seconds_per_step": seconds, "cpu_tiny_ops_per_step": cpu_ops,
            "cpu_tiny_us_per_op": 1e6 * seconds / cpu_ops}


def generator_costs(cfg, sample_cfg) -> dict:
    """Train FLOPs per image, ops per step (forward, backward, AdamW + EMA foreach) and sampling
    forwards per img2img image, for the backbone of ``cfg``."""
    torch.manual_seed(0)
    model = build_backbone(cfg, SIZE, 1, CLASSES)
    s = model.config.sample_size
    sched = train_scheduler(cfg)

    def loss(m, x):
        t = torch.randint(0, 1000, (len(x),))
        return F.mse_loss(m(sched.add_noise(x, torch.randn_like(x), t), t, class_labels=t % CLASSES).sample, x)

    x = torch.randn(2, 1, s, s)
    n_params = sum(p.numel() for p in model.parameters())
    per_img = train_flops_per_image(model, x, loss)
    fwd = fwd_flops_per_image(model.eval(), x, timestep=torch.tensor([500, 500]), class_labels=torch.tensor([0, 1]))
    model.train()
    step_ops = ops(lambda: loss(model, x[:1]).backward()) + 2 * adamw_ops(model, True)  # EMA ~ one foreach pass
    return {"parameters": n_params, "train_flops_per_image": per_img, "forward_flops_per_image": fwd,
            "ops_per_step": step_ops, "padded_size": s}


def img2img_forwards_per_image(sample_cfg, strength: float) -> float:
    """Backbone rows (images through the network, cond and uncond counted apart) per img2img image,
    from the pipeline's own sampler at these settings."""
    tiny = params_from_dict({"base": {"profile": "micro"}}).train_generator
    torch.manual_seed(0)
    unet = build_backbone(tiny, SIZE, 1, CLASSES).eval()
    rows = []
    unet.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    meta = {"image_size": SIZE, "channels": 1, "null_label": CLASSES, "num_classes": CLASSES}
    gen = diffusion_generator(unet, dict(train_scheduler(tiny).config), meta)
    n = 4
    gen.sample(torch.arange(n) % CLASSES, list(range(n)), sample_cfg,
               images=torch.zeros(n, 1, SIZE, SIZE, dtype=torch.uint8), strength=strength)
    return sum(rows) / n


def per_image_augment_seconds(batch: int, repeats: int) -> float:
    """Seconds per batch of torchvision's TrivialAugmentWide applied image by image on this CPU."""
    from torchvision.transforms import v2

    taw, x = v2.TrivialAugmentWide(), torch.randint(0, 256, (batch, 1, SIZE, SIZE), dtype=torch.uint8)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.stack([taw(im) for im in x])
    return (time.perf_counter() - t0) / repeats


def stage_time(flop: float, steps: float, ops_per_step: float, peak: float, mfu: float, us_per_op: float,
               extra: float = 0.0) -> float:
    """Seconds: every step takes the longer of its compute and its host time (ops x us_per_op + ``extra``
    host seconds per step); work without steps (sampling) is compute."""
    if not steps:
        return flop / (peak * mfu)
    return steps * max(flop / steps / (peak * mfu), ops_per_step * us_per_op * 1e-6 + extra)


def workers_needed(runs: int, run_minutes: float, limit_minutes: float) -> int | None:
    """Fewest workers that finish ``runs`` equal runs within ``limit_minutes``; the ratio-sweep seeds of
    the synthetic variants decide their share before their other seeds start, so two runs in a row at least."""
    return next((w for w in range(1, runs + 1) if max(math.ceil(runs / w), 2) * run_minutes <= limit_minutes), None)


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--peak-tflops", type=float, default=990.0, help="dense bf16 peak of the GPU (H200: 990)")
    p.add_argument("--mfu", type=float, nargs="+", default=[0.30, 0.35, 0.40], help="model FLOP utilisations")
    p.add_argument("--us-per-op", type=float, nargs="+", default=[5.0, 10.0, 20.0],
                   help="host time per dispatched op on the GPU box (eager PyTorch on CUDA: about 5-20 us)")
    args = p.parse_args(argv)
    setup(args)  # --threads; the counting runs on the CPU whatever --device says
    prm = load_params(ROOT / "params.yaml", {"base.profile": "gpu"})
    g, s, f, c, pl = prm.train_generator, prm.sample, prm.filter, prm.train_classifier, prm.pseudo_label
    labeled, val = prm.prepare.labeled_per_class * CLASSES, prm.prepare.val_per_class * CLASSES
    pool = TRAIN - labeled - val if prm.prepare.unlabeled_pool == -1 else prm.prepare.unlabeled_pool
    tiny_steps = 3 if args.quick else 20

    with section("classifier and labeler (resnet10t), judge"):
        clf = classifier_costs(c.arch, "classic", c.batch_size, 16, tiny_steps)
        lab = classifier_costs(pl.arch, pl.augment, pl.batch_size, 16, tiny_steps)
        judge = classifier_costs(f.judge_arch, "standard", f.judge_batch_size, 16, tiny_steps)
    with section("generator backbones (UNet, DiT-S/2)"):
        unet = generator_costs(g, s)
        dit = generator_costs(g.model_copy(update={"kind": "dit"}), s)
    with section("sampling forwards, EfficientNet-Lite0"):
        strengths = list(s.strengths)
        rows = {st: img2img_forwards_per_image(s, st) for st in strengths}
        eff = fwd_flops_per_image(timm.create_model("tf_efficientnet_lite0").eval(),  # FLOPs need no weights
                                  torch.randn(2, 3, f.feature_resolution, f.feature_resolution))

    with section("torchvision TrivialAugmentWide image by image (what classic augmentation did before)"):
        per_image_aug = per_image_augment_seconds(c.batch_size, 2 if args.quick else 10)

    n_syn = labeled * s.variations * len(strengths)
    synthetic = [n for n, v in c.variants.items() if v.real and v.uses_synthetic]  # the variants that sweep the ratio
    runs_sweep = len(synthetic) * c.sweep_seeds * len(c.ratio_sweep)
    runs = len(c.variants) * c.seeds + runs_sweep
    runs_classic = sum(c.seeds + (c.sweep_seeds * len(c.ratio_sweep) if n in synthetic else 0)
                       for n, v in c.variants.items() if v.augment == "classic")
    evals = c.steps // c.eval_every + 1
    real_feats = min(f.max_real, labeled + val + pool) + min(f.max_real, TEST)
    run_flops = (c.steps * c.batch_size * clf["train_flops_per_image"]
                 + (evals * val + TEST) * clf["forward_flops_per_image"])
    work = {  # stage -> [(FLOPs, optimizer steps, ops per step, extra host seconds per step), ...]
        "pseudo_label": [(pl.steps * pl.batch_size * lab["train_flops_per_image"]
                          + (pool + 11 * val) * lab["forward_flops_per_image"], pl.steps, lab["ops_per_step"], 0)],
        "train_generator": [((g.pretrain_steps + g.steps) * g.batch_size * unet["train_flops_per_image"],
                             g.pretrain_steps + g.steps, unet["ops_per_step"], 0)],
        "sample": [(n_syn * sum(rows.values()) / len(rows) * unet["forward_flops_per_image"], 0, 0, 0)],
        "filter": [(f.judge_steps * f.judge_batch_size * judge["train_flops_per_image"]
                    + (real_feats + n_syn) * eff + 2 * n_syn * judge["forward_flops_per_image"],
                    f.judge_steps, judge["ops_per_step"], 0)],
        "train_classifier": [(runs_classic * run_flops, runs_classic * c.steps, clf["ops_per_step"], 0),
                             ((runs - runs_classic) * run_flops, (runs - runs_classic) * c.steps,
                              judge["ops_per_step"], 0)],  # the judge: resnet10t, batch 64, standard augmentation
    }
    (a, n, _, _), standard = work["train_classifier"]
    before = [(a, n, judge["ops_per_step"], per_image_aug), standard]  # classic runs: image by image on the CPU
    peak, mid = args.peak_tflops * 1e12, args.mfu[len(args.mfu) // 2]

    def seconds(parts, mfu, us):
        return sum(stage_time(a, n, o, peak, mfu, us, extra) for a, n, o, extra in parts)

    scenarios = {}
    for us in args.us_per_op:
        minutes = {k: seconds(v, mid, us) / 60 for k, v in work.items()}
        gen, clf_min = minutes["train_generator"], minutes["train_classifier"]
        clf_before = seconds(before, mid, us) / 60
        scenarios[f"{us:g}us_per_op"] = {
            "minutes": minutes, "generator_compute_bound": unet["ops_per_step"] * us * 1e-6 <
            work["train_generator"][0][0] / work["train_generator"][0][1] / (peak * mid),
            "train_classifier_minutes_before": clf_before,
            "workers_for_classifier_under_generator": workers_needed(runs, clf_min / runs, gen),
            "workers_before": workers_needed(runs, clf_before / runs, gen),
            "classifier_minutes_by_workers": {w: max(math.ceil(runs / w), 2) * clf_min / runs
                                              for w in (1, 2, 4, 8, 17)}}
    result = {
        "settings": {"params": "params.yaml with base.profile gpu", "dataset": f"Fashion-MNIST {TRAIN} train / "
                     f"{TEST} test, {labeled} labeled, {val} val, {pool} pool", "peak_tflops": args.peak_tflops,
                     "mfu": args.mfu, "mfu_in_scenarios": mid, "us_per_op": args.us_per_op,
                     "synthetic_images": n_syn, "classifier_runs": runs, "classifier_sweep_runs": runs_sweep,
                     "classifier_runs_classic": runs_classic,
                     "flops": "FlopCounterMode: matmul/conv/attention FLOPs (2 per multiply-add), forward + backward",
                     "left_out": "process start-up, data loading and writing per stage or run; the classifier "
                                 "stage's per-run fixed cost (a few seconds each) is not in its minutes"},
        "per_model": {"unet": unet, "dit": dit, "classifier": clf, "labeler": lab, "judge": judge,
                      "efficientnet_lite0_forward_flops_per_image": eff,
                      "img2img_backbone_rows_per_image_by_strength": rows,
                      "cpu_per_image_trivial_augment_seconds_per_batch": per_image_aug},
        "stages": {k: {"flops": sum(a for a, *_ in v), "steps": sum(n for _, n, *_ in v),
                       "seconds_by_mfu": {str(m): seconds(v, m, args.us_per_op[0]) for m in args.mfu}}
                   for k, v in work.items()},
        "dit_train_generator_flops": (g.pretrain_steps + g.steps) * g.batch_size * dit["train_flops_per_image"],
        "scenarios": scenarios,
    }
    save("gpu_budget", "cpu", result, Path(args.out_dir))
    return result


if __name__ == "__main__":
    main()
