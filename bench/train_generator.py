"""Generator training throughput: the pipeline's loop against a diffusers-example style loop.

pipeline = ``pipeline.training.diffusion.train`` as the stage runs it: the training set held as a
           uint8 tensor on the device, batches drawn and augmented there, accelerate with bf16
           autocast on CUDA and on CPUs with AMX / AVX512-BF16, EMA, grad clipping (timed run includes
           its one final checkpoint).
tuned    = the same building blocks (``draw_batch``, ``diffusion_loss``) with fused AdamW and
           foreach EMA on CUDA and optionally torch.compile: what the suggested changes buy; fp32
           on CPU, so there it is the pipeline's loop before bf16 autocast.
example  = diffusers' examples/unconditional_image_generation/train_unconditional.py, made
           class-conditional: a torch DataLoader over the PIL images of the prepared HF dataset with
           torchvision transforms, fp32, plain AdamW, the same scheduler, EMA and clipping, and
           ``loss.item()`` each step for the progress bar.
All three start from the same initial weights and train at the same batch size.
On CUDA the model FLOP utilisation (MFU) is reported against the GPU's dense bf16 peak.
"""
from __future__ import annotations

import copy
import itertools
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import alternate, compile_if, parser, rate, ratio, save, section, setup
from pipeline.config import Paths, params_from_dict

TARGET_CUDA = 2.0
# dense bf16 tensor-core peak (FLOP/s) by a substring of torch.cuda.get_device_name; first match wins
BF16_PEAK = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
             ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12),
             ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def bf16_peak(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK if k in name), None)


def load_real(device: str, n: int | None = None):
    """Prepared train split -> (TrainData on device, the HF dataset)."""
    from pipeline.core.images import dataset_to_tensors
    from pipeline.core.io import load_dataset_dir, read_json
    from pipeline.training.generator import TrainData

    paths = Paths()
    ds = load_dataset_dir(paths.prepared / "dataset", "prepare")["train"]
    if n:
        ds = ds.select(range(min(n, len(ds))))
    x, y = dataset_to_tensors(ds)
    summary = read_json(paths.prepared / "summary.json")
    return TrainData(x.to(device), y.to(device), int(summary["num_classes"]), None,
                     list(summary["class_names"])), ds


def example_loop(unet, cfg, ds, num_classes: int, steps: int, device: str) -> float:
    """diffusers train_unconditional.py's loop (class-conditional, CFG label dropout); last loss."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel
    from torchvision import transforms

    mode = "L" if unet.config.in_channels == 1 else "RGB"
    augmentations = transforms.Compose([
        transforms.RandomHorizontalFlip() if cfg.hflip else transforms.Lambda(lambda im: im),
        transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    def transform_images(examples):
        return {"input": [augmentations(im.convert(mode)) for im in examples["image"]], "label": examples["label"]}

    data = ds.with_transform(transform_images)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True, num_workers=0,
                                         drop_last=len(data) >= cfg.batch_size)
    noise_scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                                    prediction_type=cfg.prediction_type, clip_sample=False)
    model = unet.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    ema_model = EMAModel(model.parameters(), decay=cfg.ema_decay, model_cls=UNet2DModel, model_config=model.config)
    ema_model.to(device)
    size = unet.config.sample_size
    loss_value = float("nan")
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for _, batch in zip(range(steps), batches):
        clean_images = batch["input"].to(device)
        pad = size - clean_images.shape[-1]
        if pad:
            clean_images = F.pad(clean_images, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-1.0)
        class_labels = batch["label"].to(device)
        drop = torch.rand(class_labels.shape, device=device) < cfg.p_uncond
        class_labels = torch.where(drop, torch.full_like(class_labels, num_classes), class_labels)
        noise = torch.randn(clean_images.shape, device=device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],),
                                  device=device).long()
        noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
        model_output = model(noisy_images, timesteps, class_labels=class_labels).sample
        loss = F.mse_loss(model_output.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema_model.step(model.parameters())
        loss_value = loss.detach().item()
    return loss_value


def tuned_loop(unet, cfg, data, steps: int, device: str, compile_model: bool) -> float:
    """The pipeline's batch drawing and loss with fused AdamW / foreach EMA on CUDA, optional compile."""
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    from pipeline.core.device import DevicePolicy
    from pipeline.core.seeding import step_rng
    from pipeline.models.diffusion import train_scheduler
    from pipeline.training.diffusion import diffusion_loss, draw_batch

    cuda = device == "cuda"
    scheduler = train_scheduler(cfg)
    unet = unet.to(device).train()
    if cuda:
        unet = unet.to(memory_format=torch.channels_last)
    model = compile_if(unet, device, compile_model)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cuda)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, foreach=cuda, model_cls=UNet2DModel,
                   model_config=unet.config)
    ema.to(device)
    losses = torch.zeros(steps, device=device)
    for step in range(steps):
        gen = step_rng(0, 0, step, device)
        x0, labels = draw_batch(data, cfg, step, gen, unet.config.sample_size)
        with DevicePolicy.for_device(device).autocast():
            loss = diffusion_loss(model, scheduler, x0, labels, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip, foreach=cuda)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        losses[step] = loss.detach()
    return float(losses[-1])


def flops_per_step(unet, cfg, data, device: str) -> float:
    """Forward + backward FLOPs of one training step (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.core.device import DevicePolicy
    from pipeline.core.seeding import step_rng
    from pipeline.models.diffusion import train_scheduler
    from pipeline.training.diffusion import diffusion_loss, draw_batch

    model = copy.deepcopy(unet).to(device).train()
    gen = step_rng(0, 0, 0, device)
    x0, labels = draw_batch(data, cfg, 0, gen, model.config.sample_size)
    counter = FlopCounterMode(display=False)
    with counter:
        with DevicePolicy.for_device(device).autocast():
            loss = diffusion_loss(model, train_scheduler(cfg), x0, labels, gen)
        loss.backward()
    return float(counter.get_total_flops())


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per timed run (0 = 6 on cpu, 100 on cuda)")
    p.add_argument("--batch-size", type=int, default=0, help="0 = the profile's batch size")
    p.add_argument("--profile", default="", choices=("", "micro", "cpu", "gpu"),
                   help="architecture and batch preset (default: cpu on cpu, gpu on cuda)")
    p.add_argument("--compile", action="store_true", help="torch.compile the tuned loop (CUDA only)")
    args = p.parse_args(argv)
    device = setup(args)
    cuda = device == "cuda"
    profile = args.profile or ("gpu" if cuda else "cpu")
    overrides = {"init": "scratch", "pretrain_steps": 0, "checkpoint_every": 10**9, "log_every": 10**9,
                 "preview_per_class": 0}
    if args.quick:
        profile, args.steps, args.batch_size = "micro", 2, 8
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    cfg = params_from_dict({"base": {"profile": profile}, "train_generator": overrides}).train_generator
    steps = args.steps or (100 if cuda else 6)
    cfg = cfg.model_copy(update={"steps": steps})
    data, ds = load_real(device, 64 if args.quick else None)

    from accelerate import Accelerator

    from pipeline.models.diffusion import build_unet
    from pipeline.training.diffusion import train

    torch.manual_seed(0)
    init = build_unet(cfg, data.image_size, data.channels, data.num_classes)
    from pipeline.core.device import DevicePolicy

    bf16 = DevicePolicy.for_device(device).bf16  # as the stage decides (base.mixed_precision: auto)
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no")
    ckpt_root = Path(tempfile.mkdtemp(prefix="bench-train-generator-"))
    runs = itertools.count()

    def pipeline_side():
        return train(copy.deepcopy(init), cfg, data, seed=0, ckpt_dir=ckpt_root / f"run{next(runs)}",
                     chash="bench", accelerator=accelerator).losses[-1]

    def tuned_side():
        return tuned_loop(copy.deepcopy(init), cfg, data, steps, device, args.compile)

    def example_side():
        return example_loop(copy.deepcopy(init), cfg, ds, data.num_classes, steps, device)

    with section(f"train_generator warm-up on {device}"):
        warm = cfg.model_copy(update={"steps": 1})
        train(copy.deepcopy(init), warm, data, seed=0, ckpt_dir=ckpt_root / "warm", chash="w", accelerator=accelerator)
        tuned_loop(copy.deepcopy(init), warm, data, 2 if args.compile and cuda else 1, device, args.compile)
        example_loop(copy.deepcopy(init), warm, ds, data.num_classes, 1, device)
    with section(f"train_generator: {steps} steps of batch {cfg.batch_size}, blocks {cfg.block_out_channels}"):
        secs, mem, last = alternate({"pipeline": pipeline_side, "tuned": tuned_side, "example": example_side},
                                    args.repeats, device)
    images = steps * cfg.batch_size
    rates = {k: rate(images, v) for k, v in secs.items()}
    flops = flops_per_step(init, cfg, data, device)
    n_params = sum(p.numel() for p in init.parameters())
    out = {}
    for name, r in rates.items():
        steps_per_s = r["per_second_best"] / cfg.batch_size
        out[name] = {**r, "images_per_second": r["per_second_best"], "steps_per_second": steps_per_s,
                     "achieved_tflops": flops * steps_per_s / 1e12, "peak_memory_mib": max(mem[name]),
                     "last_loss": float(last[name])}
    peak = bf16_peak(torch.cuda.get_device_name()) if cuda else None
    if peak:
        for name in out:
            out[name]["mfu_vs_bf16_dense_peak"] = out[name]["achieved_tflops"] * 1e12 / peak
    ratios = {"pipeline_vs_example": ratio(rates["pipeline"], rates["example"]),
              "tuned_vs_example": ratio(rates["tuned"], rates["example"]),
              "tuned_vs_pipeline": ratio(rates["tuned"], rates["pipeline"])}
    if not cuda:  # the tuned loop is fp32 on CPU: the pipeline before bf16 autocast, side by side
        ratios["pipeline_bf16_vs_fp32_loop"] = ratio(rates["pipeline"], rates["tuned"])
    result = {
        "settings": {"profile": profile, "block_out_channels": list(cfg.block_out_channels),
                     "layers_per_block": cfg.layers_per_block, "attention": cfg.attention,
                     "parameters": n_params, "batch_size": cfg.batch_size, "steps_per_run": steps,
                     "repeats": args.repeats, "order": "alternated (pipeline, tuned, example)",
                     "train_images": len(data.images), "precision_pipeline": "bf16 autocast" if bf16 else "fp32",
                     "precision_tuned": "bf16 autocast" if cuda else "fp32 (on CPU: the pipeline's loop before bf16)",
                     "precision_example": "fp32", "fused_adamw_tuned": cuda,
                     "compile_tuned": bool(args.compile and cuda),
                     "example_dataloader": "torch DataLoader, num_workers 0 (the example's default), "
                                           "PIL -> torchvision ToTensor/Normalize", "quick": args.quick,
                     "note": "the pipeline side includes one final checkpoint save per run"},
        "flops_per_step": flops,
        "flops_method": "torch.utils.flop_counter.FlopCounterMode, forward + backward of one step",
        "bf16_dense_peak_flops": peak, **out, "ratio_images_per_second": ratios,
        "target": {"ratio": TARGET_CUDA, "applies_to": "cuda", "judged_on": "paired_median",
                   "met": (ratios["pipeline_vs_example"]["paired_median"] >= TARGET_CUDA) if cuda else None,
                   "cpu_note": "no target on CPU; on a CPU with AMX / AVX512-BF16 the pipeline trains in bf16 autocast "
                               "(mixed_precision: auto), the tuned and example loops in fp32"},
        "peak_memory_method": __import__("bench.common", fromlist=["memory_method"]).memory_method(device),
    }
    save("train_generator", device, result, args.out_dir)
    return result


if __name__ == "__main__":
    main()
