"""A diffusers pipeline for class-conditional diffusion with classifier-free guidance.

Self-contained on purpose (torch and diffusers only): train_generator copies this file
into every diffusion generator folder as ``synthaug_pipeline.py``, so the folder loads
anywhere diffusers is installed, without synthaug:

    from diffusers import DiffusionPipeline, DDIMScheduler
    pipe = DiffusionPipeline.from_pretrained("models/generator", trust_remote_code=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)   # swap samplers as usual
    images = pipe(["Sneaker", "Bag"], num_inference_steps=20, guidance_scale=2.0).images

How it uses the device is set by two plain attributes (synthaug sets them from its device policy):
``pipe.autocast_dtype`` (e.g. ``torch.bfloat16``; None = fp32) and ``pipe.channels_last``.

The backbone is a ``UNet2DModel`` (``unet``) or a ``DiTTransformer2DModel``
(``transformer``) with class ids 0..K-1 for the classes and id K for "no class". Images
live in [-1, 1], padded (centred, with -1) to the backbone's sample size and cropped
back to ``image_size`` at the end.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput


class ClassConditionalPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet"
    _optional_components = ["unet", "transformer"]
    autocast_dtype: torch.dtype | None = None  # autocast around the backbone (None: fp32)
    channels_last: bool = False  # backbone inputs in NHWC

    def __init__(self, scheduler, unet=None, transformer=None, class_names: Sequence[str] | None = None,
                 image_size: int | None = None):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("ClassConditionalPipeline needs exactly one backbone: unet or transformer")
        self.register_modules(scheduler=scheduler, unet=unet, transformer=transformer)
        self.register_to_config(class_names=list(class_names or []), image_size=image_size)

    @property
    def backbone(self):
        return self.unet if self.unet is not None else self.transformer

    @property
    def null_label(self) -> int:
        """The "no class" id (K): unconditional generation and the guidance baseline."""
        return len(self.config.class_names)

    def label_ids(self, labels: Sequence[int | str]) -> torch.Tensor:
        """Class names or ids -> ids; an unknown name is an error that lists the known ones."""
        names = list(self.config.class_names)
        ids = []
        for lab in labels:
            if isinstance(lab, str):
                if lab not in names:
                    raise ValueError(f"unknown class {lab!r}; this generator knows {names}")
                lab = names.index(lab)
            ids.append(int(lab))
        return torch.tensor(ids, dtype=torch.long)

    def guided_output(self, x: torch.Tensor, t, labels: torch.Tensor, guidance_scale: float,
                      guidance_rescale: float = 0.0) -> torch.Tensor:
        """out_u + w * (out_c - out_u); w = 0 (unconditional) and w = 1 (conditional) take one pass,
        other w run the conditional and unconditional halves in one forward of 2N. ``guidance_rescale``
        (phi, Lin et al. 2024) scales the guided output back towards the conditional one's std."""
        model = self.backbone
        if guidance_scale in (0.0, 1.0):
            lab = labels if guidance_scale == 1.0 else torch.full_like(labels, self.null_label)
            return model(x, _per_image(t, x), class_labels=lab).sample.float()
        x2 = torch.cat([x, x])
        null = torch.full_like(labels, self.null_label)
        both = model(x2, _per_image(t, x2), class_labels=torch.cat([labels, null])).sample
        cond, uncond = both.float().chunk(2)
        guided = uncond + guidance_scale * (cond - uncond)
        if guidance_rescale:
            dims = tuple(range(1, guided.ndim))
            rescaled = guided * cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-8)
            guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
        return guided

    @torch.no_grad()
    def __call__(self, class_labels: Sequence[int | str] | torch.Tensor, num_inference_steps: int = 20,
                 guidance_scale: float = 2.0, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 guidance_rescale: float = 0.0, guidance_interval: Sequence[float] = (0.0, 1.0),
                 image: torch.Tensor | None = None, strength: float = 1.0):
        """Images of ``class_labels`` (names or ids; ``null_label`` = unconditional).

        ``noise``: the initial noise (N,C,S,S) when the caller seeds each image itself;
        otherwise drawn from ``generator``. ``guidance_interval``: guidance is applied only at
        noise levels t / num_train_timesteps inside [low, high], the conditional output elsewhere.
        ``image`` (N,C,H,W in [-1, 1]): image-to-image (SDEdit): each image is noised to
        ``strength`` (1 = pure noise) and denoised over the last ``strength`` of the steps.
        ``output_type``: pil | np (float [0,1] NHWC) | pt (float [0,1] NCHW) | uint8 (uint8 NCHW tensor).
        """
        model, device = self.backbone, self._execution_device
        labels = (class_labels if isinstance(class_labels, torch.Tensor) else self.label_ids(class_labels)).to(device)
        side = model.config.sample_size
        side = side if isinstance(side, int) else side[0]
        if noise is None:
            noise = torch.randn((len(labels), model.config.in_channels, side, side), generator=generator,
                                device=generator.device if generator is not None else "cpu")
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        if image is None:
            x = noise.to(device) * self.scheduler.init_noise_sigma
        else:
            if not 0 < strength <= 1:
                raise ValueError(f"strength must lie in (0, 1], got {strength}")
            skip = (num_inference_steps - max(1, round(num_inference_steps * strength))) * self.scheduler.order
            timesteps = timesteps[skip:]
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(skip)
            pad = side - image.shape[-1]
            image = F.pad(image.float(), (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-1.0)
            x = self.scheduler.add_noise(image.to(device), noise.to(device), timesteps[:1].repeat(len(labels)))
        # the guidance of each step, decided before the loop (no host sync inside it)
        num_train = self.scheduler.config.num_train_timesteps
        lo, hi = guidance_interval
        scales = [guidance_scale if lo <= t / num_train <= hi else 1.0 for t in timesteps.tolist()]
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        with torch.autocast(device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            for t, w in zip(self.progress_bar(timesteps), scales):
                model_in = self.scheduler.scale_model_input(x, t).contiguous(memory_format=fmt)
                out = self.guided_output(model_in, t, labels, w, guidance_rescale)
                x = self.scheduler.step(out, t, x).prev_sample.float()
        size = self.config.image_size or side
        lo = (side - size) // 2
        x = x.clamp(-1, 1)[..., lo:lo + size, lo:lo + size]
        if output_type == "uint8":
            images = ((x + 1) * 127.5).round().to(torch.uint8)
        else:
            images = (x + 1) / 2
            if output_type in ("np", "pil"):
                images = images.permute(0, 2, 3, 1).cpu().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _per_image(t, x: torch.Tensor) -> torch.Tensor:
    """One timestep per image (DiT, unlike the UNet, does not broadcast a scalar)."""
    return torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
