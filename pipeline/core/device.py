"""One device policy: how the pipeline uses the device it runs on, decided once.

Generator training, sampling and the classifiers (labeler, judge, variants) all ask a
``DevicePolicy`` rather than the device type: the autocast dtype, the memory format, the
optimizer kernels, ``torch.compile`` and pinned host-to-device copies. It comes from
``base.device``, ``base.mixed_precision`` and ``base.compile`` (``policy_for``) and is recorded
beside each output (``as_record``). This is the only module that looks at the device type.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from pipeline.config import BaseParams, resolve_device


def bf16_matmul_units() -> bool:
    """CPUs with bf16 matrix units (Intel AMX, AVX512-BF16), where bf16 autocast pays (about 2.8x the
    fp32 sampling speed of the cpu profile's UNet); elsewhere on CPU bf16 would be emulated."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu, torch >= 2.3
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


@dataclass(frozen=True)
class DevicePolicy:
    device: str  # "cpu" | "cuda" | "cuda:N"
    bf16: bool = False  # bf16 autocast around forward passes (generator, sampler, classifiers)
    # NHWC memory format for the generator's nets and their inputs (classifiers: ``for_classifiers``): off by
    # default. On an H200 the gpu profile's UNet (GroupNorm) trained at 10.2 / 10.7 steps/s with it against
    # 12.3 / 14.4 without (two runs) and sampled at 209 against 280 images/s (bench/results/gpu_check-*-gpu.json);
    # the cpu profile's UNet trains 15% slower with it on 2 AVX2 cores
    channels_last: bool = False
    fused_optimizer: bool = False  # fused AdamW / foreach EMA kernels
    compile: bool = False  # torch.compile the training and sampling networks
    pin_memory: bool = False  # pinned host batches copied with non_blocking=True

    @classmethod
    def for_device(cls, device: str, mixed_precision: str = "auto", compile: bool = False) -> DevicePolicy:
        """What pays on ``device``: fused AdamW / foreach EMA kernels everywhere (on 2 AVX2 cores a cpu-profile
        classifier's AdamW step takes 0.8 ms fused against 2.5 ms, one thread); on CUDA bf16 and pinned copies;
        on CPU bf16 only with bf16 matrix units (``mixed_precision: auto``), fp32 otherwise. compile is a
        params choice."""
        cuda = torch.device(device).type == "cuda"
        bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and (cuda or bf16_matmul_units()))
        return cls(str(device), bf16=bf16, fused_optimizer=True, compile=compile, pin_memory=cuda)

    @classmethod
    def cuda_like(cls, device: str = "cpu", compile: bool = False) -> DevicePolicy:
        """Every CUDA path switched on (channels_last too) on any device: tests exercise them on CPU."""
        return cls(str(device), bf16=True, channels_last=True, fused_optimizer=True, compile=compile,
                   pin_memory=torch.device(device).type == "cuda")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.bf16 else None

    @property
    def mixed_precision(self) -> str:
        """accelerate's name for the precision (``Accelerator(mixed_precision=...)``)."""
        return "bf16" if self.bf16 else "no"

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def is_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def autocast(self):
        """bf16 autocast on the policy's device when ``bf16``, nothing otherwise."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device: pinned and asynchronous when ``pin_memory``."""
        if self.pin_memory and x.device.type == "cpu":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A 4-D network input in the policy's memory format."""
        return x.contiguous(memory_format=self.memory_format) if x.ndim == 4 else x

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` on the device in the policy's memory format (in place, so optimizers and
        checkpoints keep referring to it)."""
        return module.to(self.device, memory_format=self.memory_format)

    def compiled(self, module: torch.nn.Module):
        """The module to call in the hot loop: compiled when ``compile`` (weights shared with
        ``module``, so state dicts and checkpoints are taken from ``module``), else ``module``."""
        return torch.compile(module) if self.compile else module

    def for_classifiers(self) -> DevicePolicy:
        """The policy for the timm classifiers (labeler, judge, variants: BatchNorm convnets): NHWC, on
        every device. It pays for them where it costs the GroupNorm UNet: on 2 AVX2-only cores (no
        AMX) a cpu-profile classifier step (test_resnet, batch 64, classic augmentation) at one thread
        took 39 ms against 52 (1.3x), a FixMatch labeler step at two threads 102-119 ms against 142.
        fp32 on CPU: bf16 autocast paid only 1.13x for a test_resnet step on 2 AVX512-BF16 EPYC cores, and
        there oneDNN's bf16 convolution backward returned NaN or other garbage weight gradients for small
        feature maps (2x2, e.g. 16-px images at layer4), differing from run to run."""
        return dataclasses.replace(self, channels_last=True, bf16=self.bf16 and torch.device(self.device).type != "cpu")

    def adamw(self, params, **kw) -> torch.optim.AdamW:
        return torch.optim.AdamW(params, fused=self.fused_optimizer or None, **kw)

    def as_record(self) -> dict:
        """The policy in force, for generator.json, the sample summary and classifier metrics."""
        return {"device": self.device, "precision": "bf16 autocast" if self.bf16 else "fp32",
                "channels_last": self.channels_last, "fused_optimizer": self.fused_optimizer,
                "compile": self.compile, "pin_memory": self.pin_memory}


def policy_for(base: BaseParams) -> DevicePolicy:
    """The policy of a run's ``base`` params (base.device, base.mixed_precision, base.compile)."""
    return DevicePolicy.for_device(resolve_device(base), base.mixed_precision, base.compile)


def as_policy(device: str | DevicePolicy) -> DevicePolicy:
    """A policy as given, or the default one of a device name (library callers pass ``"cpu"``)."""
    return device if isinstance(device, DevicePolicy) else DevicePolicy.for_device(str(device))
