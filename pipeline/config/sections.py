"""The typed sections of ``params.yaml``: one pydantic model per stage, every field defaulted to the value the
default run (the cpu profile) uses and commented, the reasons in docs/decisions.md; unknown keys and wrong types are
errors (``Paths``, in paths.py, names every file the pipeline uses)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, model_validator

from pipeline.config.section import (EMA, LR, Batch, Every, Images, Location, Number, Probability, Seeds, Steps,
                                     WeightDecay, Width)
from pipeline.config.section import Section as _Section
from pipeline.config.variants import VARIANT_NAME, VariantSpec
from pipeline.errors import ConfigError


class BaseParams(_Section):
    # master seed: splits, initialisation, sampling seeds, classifier seeds
    seed: int = Number(0, "each synthetic image's seed is seed x 1,000,000,007 + its index, within torch's "
                       "64-bit seeds", ge=0, le=2**32 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    profile: Literal["micro", "cpu", "gpu"] = "cpu"  # size preset, see PROFILES
    # the device policy of every stage (pipeline/core/device.py): auto = bf16 autocast on cuda; on CPUs with AMX /
    # AVX512-BF16 for generator training and sampling only; fp32 elsewhere (docs/decisions.md#mixed-precision)
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    compile: bool = False  # torch.compile the networks that train and sample (docs/decisions.md#compile)


class PrepareConfig(_Section):
    source: Literal["fashion-mnist", "imagefolder", "hf-disk"] = "fashion-mnist"
    # fashion-mnist: folder with the four IDX .gz files; imagefolder: root with one
    # sub-folder per class; hf-disk: a folder written by datasets' save_to_disk.
    path: Location = "/usr/share/datasets/fashion-mnist"
    image_column: str = "image"  # hf-disk only
    label_column: str = "label"  # hf-disk only
    # square side after resizing
    image_size: int = Number(28, "a generator halves the side at each level", ge=8, le=1024)
    channels: Literal[1, 3] = 1  # 1 = grayscale (L), 3 = RGB
    # how an image becomes image_size x image_size: center-crop = scale the short side, crop the center | stretch
    resize: Literal["center-crop", "stretch"] = "center-crop"
    labeled_per_class: int = Images(50)  # the small labeled train set
    val_per_class: int = Images(50)  # labeled validation set (model selection)
    # labeled dev split for studies only (docs/studies.md), drawn after the others from what is left: 0 = none
    dev_per_class: int = Images(0, ge=0)
    test_fraction: float = Number(0.2, "a share: 0 leaves no test, 1 no train", gt=0, lt=1)  # hold-out if no test split
    unlabeled_pool: int = Images(10000, ge=-1, why="pool images")  # rest of train, labels dropped; 0 none, -1 all
    on_bad_image: Literal["skip", "error"] = "skip"  # unreadable image: report and skip, or stop


class PseudoLabelConfig(_Section):
    """The semi-supervised learner: ``seeds`` classifiers of the labeled set and the pool (each best on val)
    whose mean prediction labels every pool image (DPT, step one); a variant with ``learner: fixmatch``
    trains with these same settings."""
    # fixmatch: on the labeled set + the pool (training/tasks.py) | supervised: labeled set alone (self-training's)
    method: Literal["fixmatch", "supervised"] = "fixmatch"
    arch: str = "test_resnet"  # timm model of the labeler (docs/decisions.md#classifier-arch)
    seeds: int = Seeds(3)  # models (seed k = base.seed * 1000 + k, paired with the variants'); labels: their mean
    steps: int = Steps(4500)  # AdamW, one-cycle, best val checkpoint kept (docs/decisions.md#labeler-steps)
    eval_every: int = Every(450)  # steps between validation checks (model selection)
    batch_size: int = Batch(64)  # labeled images per step
    lr: float = LR(3e-3)  # docs/decisions.md#labeler-levers, as ema_decay and unlabeled_ratio
    weight_decay: float = WeightDecay(0.05)
    augment: Literal["standard", "classic"] = "classic"  # labeled: crop + flip | TrivialAugmentWide, then crop + flip
    unlabeled_ratio: int = Number(3, "a step holds batch_size x (1 + 2 x unlabeled_ratio) images (FixMatch's "
                                      # fixmatch: pool images per labeled image in each step (FixMatch's mu)
                                      "mu is 7)", ge=1, le=64)
    # fixmatch: teacher confidence that makes a pool image count
    fixmatch_threshold: float = Number(0.95, "a confidence", gt=0, le=1)
    # fixmatch: class-wise thresholds | distribution alignment
    fairness: Literal["flexmatch", "da", "none"] = "flexmatch"
    unlabeled_weight: float = Number(1.0, "1 usual", ge=0, le=100)  # fixmatch: weight of the pool loss
    ema_decay: float = EMA(0.99)  # fixmatch: the pool's labels come from this EMA of the weights
    tta: Literal["flip", "none"] = "flip"  # mean over an image and its mirror | none (docs/decisions.md#labeler-tta)
    threshold: float = Probability(0.0)  # pool images kept: top-class p >= this (0: all, with p, as DPT)
    per_class_cap: int = Images(0, ge=0)  # at most this many per class, the most confident first (0 = no cap)
    balance: bool = False  # every class keeps as many as the class with the fewest confident images

    @property
    def flip(self) -> bool:  # the labeler predicts with mirror-image test-time augmentation
        return self.tta == "flip"

    @property
    def name(self) -> str:  # the learner as records and the report name it, e.g. fixmatch+flexmatch
        return f"fixmatch+{self.fairness}" if self.method == "fixmatch" else "supervised"

    @property
    def pool_per_step(self) -> int:  # fixmatch: pool images in each step
        return self.unlabeled_ratio * self.batch_size


class DitConfig(_Section):
    """kind: dit (diffusers DiTTransformer2DModel, adaLN-zero class conditioning)."""
    patch_size: int = Width(4, why="a patch's side")  # side of a patch token (the image is padded to a multiple)
    num_layers: int = Width(6)  # transformer blocks
    num_heads: int = Width(4)  # attention heads per block
    head_dim: int = Width(32, ge=8)  # width per head (hidden size = num_heads * head_dim)


class CganConfig(_Section):
    """kind: cgan (DCGAN generator, projection discriminator with spectral norm, hinge loss). Shared keys
    that apply: steps, batch_size, ema_decay, hflip, checkpoint_every, log_every, preview_per_class, labels;
    the diffusion keys (lr, lr_schedule, warmup_steps, init, ...) are ignored (IGNORED_BY_KIND): learning rates are
    set here."""
    z_dim: int = Width(64)  # latent size
    g_channels: int = Width(64, ge=8)  # generator width at the lowest resolution (halved at each 2x upsampling)
    d_channels: int = Width(32, ge=8)  # discriminator width at half resolution (x2, x4 deeper)
    lr_g: float = LR(2e-4)  # generator Adam learning rate, betas (0, 0.99)
    lr_d: float = LR(2e-4)  # discriminator Adam learning rate, betas (0, 0.99)
    diffaugment: str = "color,translation,cutout"  # DiffAugment policies on real and fake ("" = off)


class DatasetGanConfig(_Section):
    """kind: datasetgan (unconditional diffusion on train + pool, labels from UNet features)."""
    # noise level at which the UNet's features are read
    feature_timestep: int = Number(100, "below num_train_timesteps", ge=0, le=99_999)
    # noised copies of each labeled image for the interpreter
    feature_draws: int = Number(4, "all held in memory", ge=1, le=1000)
    interpreter_steps: int = Steps(500)  # optimizer steps of the interpreter (an MLP)
    # unconditional candidates per requested image; the most confident wins
    label_tries: int = Number(4, "all generated", ge=1, le=1000)


# the top-level train_generator keys a kind does not read: loading params warns when params.yaml or an override
# sets one for that kind (the profiles set some of them for every kind)
_CONDITIONAL_DIFFUSION = frozenset({"init", "pretrain_steps", "p_uncond"})
IGNORED_BY_KIND = {
    "cgan": _CONDITIONAL_DIFFUSION | {"block_out_channels", "layers_per_block", "attention", "prediction_type",
                                      "num_train_timesteps", "beta_schedule", "zero_terminal_snr", "snr_gamma", "lr",
                                      "lr_schedule", "warmup_steps", "weight_decay", "grad_clip"},
    "datasetgan": _CONDITIONAL_DIFFUSION | {"labeled_weight"},  # unconditional: every step a pre-training step
}


class TrainGeneratorConfig(_Section):
    # generator family: unet | dit (class-conditional diffusion), cgan (conditional GAN),
    # datasetgan (unconditional diffusion + an interpreter that labels its samples)
    kind: Literal["unet", "dit", "cgan", "datasetgan"] = "unet"
    # what the conditional kinds learn from: labeled = the labeled set only | pseudo = labeled +
    # pseudo-labeled pool (data/pseudo) | auto = pseudo when pseudo_label kept any pool image
    labels: Literal["auto", "labeled", "pseudo"] = "auto"
    # a labeled image is drawn this many times as often as a pseudo-labeled one
    labeled_weight: float = Number(4.0, "a relative weight", gt=0, le=1e4)
    # scratch | pretrain (unconditional on train + pool for pretrain_steps, then conditional
    # fine-tune on train for steps) | a local diffusers UNet2DModel folder to fine-tune
    init: Location = "scratch"
    # one per level (docs/decisions.md#generator-size)
    block_out_channels: tuple[Annotated[int, Width()], ...] = (32, 64, 64)
    layers_per_block: int = Width(1)  # resnet layers in each down/up block
    attention: bool = False  # self-attention in the lowest-resolution blocks
    # what the backbone predicts: v (Salimans & Ho 2022) stays bounded at zero SNR, epsilon does not
    # (this, zero_terminal_snr and snr_gamma: docs/decisions.md#diffusion-recipe)
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    num_train_timesteps: int = Number(1000, "1,000 usual", ge=2, le=100_000)  # DDPM training noise levels
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    # rescale the betas so the last noise level is pure noise (Lin et al. 2024; needs v_prediction)
    zero_terminal_snr: bool = True
    snr_gamma: float = Number(5.0, "5 usual", ge=0, le=1000)  # Min-SNR-gamma loss weighting (Hang et al. 2023); 0 = off
    p_uncond: float = Probability(0.1)  # label dropout for classifier-free guidance
    steps: int = Steps(1200)  # conditional optimizer steps (docs/decisions.md#generator-size)
    pretrain_steps: int = Steps(0, ge=0)  # unconditional steps on train + pool (init=pretrain)
    # images per optimizer step, over all processes: each process computes batch_size / (num_processes x
    # gradient_accumulation_steps) per forward pass, so 1, 2 or 8 processes optimise alike
    batch_size: int = Batch(64)
    # training processes (GPUs) on this machine; > 1 runs under torchrun
    num_processes: int = Number(1, "one per GPU", ge=1, le=1024)
    gradient_accumulation_steps: int = Batch(1)  # forward passes per optimizer step on each process
    lr: float = LR(1e-3)  # AdamW peak learning rate
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # after warm-up; restarts at fine-tuning
    warmup_steps: int = Steps(100, ge=0)  # linear warm-up at the start of each phase
    weight_decay: float = WeightDecay(0.0)  # AdamW weight decay
    grad_clip: float = Number(1.0, "a gradient norm (1 usual)", gt=0, le=1e6)  # max gradient norm
    ema_decay: float = EMA(0.999)  # EMA of weights (the saved, sampled weights)
    hflip: bool = False  # random horizontal flips (off: Fashion-MNIST shoes all face one way)
    checkpoint_every: int = Every(200)  # steps between resumable checkpoints
    log_every: int = Every(25)  # steps between progress log lines
    preview_per_class: int = Number(8, "a grid", ge=0, le=1024)  # images per class in samples.png (0 = none)
    dit: DitConfig = DitConfig()
    cgan: CganConfig = CganConfig()
    datasetgan: DatasetGanConfig = DatasetGanConfig()

    @model_validator(mode="after")
    def _check(self):
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError("zero_terminal_snr: at zero SNR the noise cannot be predicted from the image; "
                             "set prediction_type: v_prediction or zero_terminal_snr: false")
        split = self.num_processes * self.gradient_accumulation_steps
        if self.batch_size % split:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of num_processes x "
                             f"gradient_accumulation_steps = {split} (each forward pass takes an equal share)")
        if self.kind == "datasetgan" and self.datasetgan.feature_timestep >= self.num_train_timesteps:
            raise ValueError(f"datasetgan.feature_timestep {self.datasetgan.feature_timestep} must be below "
                             f"num_train_timesteps {self.num_train_timesteps} (a noise level the UNet was trained at)")
        if self.kind == "cgan" and split > 1:
            raise ValueError("kind cgan trains in one process without accumulation: set num_processes and "
                             "gradient_accumulation_steps to 1")
        return self


Share = Annotated[float, Probability(why="a share")]
Strength = Annotated[float, Number(why="a noise level, 1 = pure noise", gt=0, le=1)]
HOW = {"changes_images": False}  # a field of how images are made, not what they are (keeps_output)


class SampleConfig(_Section):
    sampler: Literal["ddim", "dpm++"] = "dpm++"  # DDIM (eta 0) or DPM-Solver++ (2nd order)
    num_inference_steps: int = Number(20, "noise levels", ge=1, le=100_000)  # denoising steps per image
    # 0 = unconditional, 1 = conditional only, >1 = CFG
    guidance_scale: float = Number(2.0, "1 to 10 usual", ge=0, le=100)
    # phi of Lin et al. 2024: guided output's std matched to the conditional's
    guidance_rescale: float = Probability(0.0)
    # guidance only at noise levels t/T inside [low, high] (Kynkaanniemi et al. 2024); conditional elsewhere
    # (docs/decisions.md#diffusion-recipe)
    guidance_interval: tuple[Share, Share] = (0.0, 0.7)
    # generate: per_class new images of each class from noise | img2img: variations of real images
    # (SDEdit; DA-Fusion, Trabucco et al. 2024): every labeled train image, and pool_per_class
    # pseudo-labeled pool images of each class, noised to each of strengths and denoised with its class
    mode: Literal["generate", "img2img"] = "generate"
    per_class: int = Images(300)  # synthetic images per class (mode generate)
    strengths: tuple[Strength, ...] = (0.25, 0.5, 0.75, 1.0)  # img2img: noise levels, 1 = from pure noise
    # img2img: variations of each source image at each strength
    variations: int = Number(1, "all generated", ge=1, le=10_000)
    pool_per_class: int = Images(0, ge=0)  # img2img: pseudo-labeled pool images per class also used as sources
    # how images are made and shown, not what they are: changes_images False (HOW) keeps a field out of sample.recipe
    batch_size: int = Batch(0, ge=0, json_schema_extra=HOW)  # per forward; 0 = 64 cpu, 256 cuda
    # which shard this run generates
    shard_index: int = Number(0, "below num_shards", ge=0, le=9_999, json_schema_extra=HOW)
    num_shards: int = Number(1, "shards", ge=1, le=10_000, json_schema_extra=HOW)  # shards, contiguous index ranges
    grid_per_class: int = Number(64, "a grid", ge=1, le=1024, json_schema_extra=HOW)  # images in each preview grid

    @model_validator(mode="after")
    def _shard_in_range(self):
        if not self.strengths or not all(0 < v <= 1 for v in self.strengths):
            raise ValueError(f"strengths must be values in (0, 1] (got {list(self.strengths)})")
        lo, hi = self.guidance_interval
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"guidance_interval must be [low, high] with 0 <= low <= high <= 1 (got {[lo, hi]})")
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} must be < num_shards {self.num_shards}")
        return self


class ClipConfig(_Section):
    checkpoint: Location | None = None  # local CLIPModel/CLIPProcessor folder; None = no CLIP score
    prompt: str = "a photo of a {}"  # {} is the class name
    # reject below this CLIP score (None = score only)
    min_score: float | None = Number(None, "100 x a cosine", ge=-100, le=100)

    @model_validator(mode="after")
    def _min_score_needs_checkpoint(self):
        if self.min_score is not None and not self.checkpoint:
            raise ValueError("clip.min_score is set but clip.checkpoint is not: point clip.checkpoint at a "
                             "local CLIP folder (CLIPModel + CLIPProcessor save_pretrained) or remove min_score")
        return self


class FilterConfig(_Section):
    # space for the metrics, realism and memorisation: efficientnet-lite0 (ImageNet; not comparable
    # with published Inception FID) | inception (needs inception_weights) | judge (its penultimate layer)
    feature_space: Literal["efficientnet-lite0", "inception", "judge"] = "efficientnet-lite0"
    # efficientnet-lite0 input side (224 = as trained)
    feature_resolution: int = Number(224, "a side in px", ge=32, le=1024)
    inception_weights: Location | None = None  # local torch-fidelity Inception file
    clip: ClipConfig = ClipConfig()
    judge_arch: str = "resnet10t"  # timm model trained on real labeled + val data
    judge_steps: int = Steps(300)  # optimizer steps (best validation checkpoint kept)
    judge_lr: float = LR(3e-3)  # AdamW peak learning rate of the judge
    judge_batch_size: int = Batch(64)  # judge training batch
    min_confidence: float = Probability(0.5)  # judge probability of the intended label
    realism_k: int = Number(3, "3 usual", ge=1, le=1000)  # k of the k-NN real manifold (Kynkaanniemi et al. 2019)
    require_realism: bool = True  # reject images outside the real k-NN manifold
    # reject near-copies: nearest labeled train image closer than this fraction of the
    # median train-to-train nearest-neighbour distance
    memorization_ratio: float = Number(0.5, "a ratio of distances (1: as far as real images are)", ge=0, le=100)
    keep_top_fraction: float = Number(1.0, "a share (0: none kept)", gt=0, le=1)  # per class, by judge confidence
    balance: bool = True  # same number kept in every class
    # real images per reference set: the realism manifold (labeled train + val, then pool) and
    # the metric reference (a class-stratified test subset, used only to report, never to select)
    max_real: int = Images(1000, ge=10)
    # KID subsets (size min(N_real, N_synthetic, 1000))
    kid_subsets: int = Number(100, "each computed", ge=1, le=100_000)
    batch_size: int = Batch(4)  # feature extraction and judge scoring (docs/decisions.md#filter-batch-size)


class TrainClassifierConfig(_Section):
    # name -> what it trains on. params.yaml is the one list of variants: dvc.yaml runs one
    # train_classifier stage per entry, the report shows them in this order.
    variants: dict[str, VariantSpec] = {name: VariantSpec(data=data, **kw) for name, data, kw in (
        ("real", "prepared", {}), ("real+classic", "prepared", {"augment": "classic"}),
        ("real+synthetic+classic", "filtered", {"augment": "classic"}), ("synthetic-only", "filtered", {"real": False}),
        ("fixmatch", "prepared", {"learner": "fixmatch", "augment": "classic"}),
        ("fixmatch+synthetic", "filtered", {"learner": "fixmatch", "augment": "classic", "synthetic_ratio": 0.25}))}
    arch: str = "test_resnet"  # any timm model name (timm.list_models()); docs/decisions.md#classifier-arch
    # None = from scratch | efficientnet-lite0 (ImageNet, arch tf_efficientnet_lite0) | a local .safetensors
    pretrained: Location | None = None
    seeds: int = Seeds(4)  # per variant (seed k = base.seed * 1000 + k, paired; docs/decisions.md#seeds)
    # runs side by side; auto: 1 per CPU core, 1 on CUDA (docs/decisions.md#seeds-side-by-side)
    workers: Literal["auto"] | Annotated[int, Number(why="processes, one per core", ge=1, le=1024)] = "auto"
    steps: int = Steps(1500)  # optimizer steps of every supervised variant (docs/decisions.md#classifier-steps)
    batch_size: int = Batch(64)
    lr: float = LR(3e-3)  # peak of the one-cycle schedule (AdamW)
    weight_decay: float = WeightDecay(0.05)
    synthetic_ratio: float = Probability(0.25)  # synthetic share of a batch (docs/decisions.md#synthetic-ratio)
    # extra shares tried with the first sweep_seeds seeds (variants with real and synthetic images); which one is
    # used: RATIO_RULE in pipeline/training/plan.py. Off by default: docs/decisions.md#ratio-sweep
    ratio_sweep: tuple[Share, ...] = ()
    sweep_seeds: int = Seeds(2)
    # pseudo: true variants: share of the real part of each batch drawn from the pseudo-labeled pool, the labeled
    # images the rest; None = in proportion to the two sets' sizes, as if concatenated (docs/decisions.md#pseudo-share)
    pseudo_share: float | None = Probability(None)
    # pool images learn the labeler's class (hard), its probabilities of the clean image (soft), or of the very
    # augmented view the student sees (teacher: consistent distillation; docs/decisions.md#pseudo-labels-teacher);
    # probabilities sharpened by pseudo_temperature (< 1 sharpens)
    pseudo_labels: Literal["hard", "soft", "teacher"] = "teacher"
    pseudo_temperature: float = Number(1.0, "a softmax temperature (1: as predicted)", gt=0, le=100)
    synthetic_labels: Literal["intended", "labeler", "teacher"] = "intended"  # class; labeler: probs; teacher: per view
    eval_every: int = Every(100)  # steps between validation checks (model selection)
    label_smoothing: float = Number(0.0, "a share of the target (1: no label left)", ge=0, lt=1)
    eval_batch_size: int = Batch(512)  # batch size of test predictions (validation: max(256, batch_size))
    ece_bins: int = Number(15, "15 usual", ge=2, le=10_000)  # bins of the expected calibration error

    @model_validator(mode="after")
    def _check(self):
        if not self.variants:
            raise ValueError("variants is empty: name at least one variant (e.g. real: {data: prepared})")
        bad = [n for n in self.variants if not VARIANT_NAME.fullmatch(n) or ".." in n]
        if bad:
            raise ValueError(f"variant name(s) {bad}: use letters, digits and + - _ . only, starting with a letter "
                             "or digit, without '..' (each name becomes a folder and a command-line argument)")
        if any(not 0 <= r <= 1 for r in self.ratio_sweep):
            raise ValueError(f"ratio_sweep values must lie in [0, 1] (got {list(self.ratio_sweep)})")
        return self


class ReportConfig(_Section):
    title: str = "synthaug augmentation report"
    grid_per_class: int = Number(8, "images in one grid", ge=1, le=1024)  # images per class in the report's grids


def learner_config(lab: PseudoLabelConfig, base: TrainClassifierConfig = TrainClassifierConfig()
                   ) -> tuple[TrainClassifierConfig, VariantSpec]:
    """The semi-supervised learner ``lab`` as a classifier config (``base`` with the learner's arch, steps, batch,
    learning rate, evaluation and seeds) and the variant it trains (method fixmatch: learner fixmatch)."""
    budget = {k: getattr(lab, k) for k in ("arch", "steps", "batch_size", "lr", "weight_decay", "eval_every", "seeds")}
    cfg = base.model_copy(update=budget | {"pretrained": None, "label_smoothing": 0.0})
    return cfg, VariantSpec(data="prepared", learner=lab.method, augment=lab.augment)


class Params(_Section):
    base: BaseParams = BaseParams()
    prepare: PrepareConfig = PrepareConfig()
    pseudo_label: PseudoLabelConfig = PseudoLabelConfig()
    train_generator: TrainGeneratorConfig = TrainGeneratorConfig()
    sample: SampleConfig = SampleConfig()
    filter: FilterConfig = FilterConfig()
    train_classifier: TrainClassifierConfig = TrainClassifierConfig()
    report: ReportConfig = ReportConfig()

    def resolved(self) -> dict:
        """Plain dict of every value in force (saved beside each output)."""
        return self.model_dump(mode="json")

    def learner(self) -> tuple[TrainClassifierConfig, VariantSpec]:
        """The semi-supervised learner (pseudo_label's settings) as train_classifier's config and a variant."""
        return learner_config(self.pseudo_label, self.train_classifier)

    def classifier_config(self, variant: str) -> TrainClassifierConfig:
        """train_classifier's settings for ``variant``: one with ``learner: fixmatch`` trains with the learner's
        arch, steps, batch, learning rate, evaluation and seeds (``learner``), the pool labeler's budget."""
        variants = self.train_classifier.variants
        if variant not in variants:
            raise ConfigError(f"train_classifier variant {variant!r} is not in train_classifier.variants "
                              f"({', '.join(variants)}); add it to params.yaml or pick one of those")
        return self.train_classifier if variants[variant].learner == "supervised" else self.learner()[0]

    def made_with(self, stage: str, variant: str | None = None) -> dict:
        """The resolved sections an output of ``stage`` depends on: ``base`` and its own (for a
        classifier ``variant``, its own entry of ``variants`` only). Recorded in the output and
        compared with the params in force by the report."""
        r = self.resolved()
        own = r[stage] if variant is None else {**r[stage], "variants": {variant: r[stage]["variants"][variant]}}
        learner = variant is not None and self.train_classifier.variants[variant].learner != "supervised"
        return {"base": r["base"], stage: own} | ({"pseudo_label": r["pseudo_label"]} if learner else {})


STAGES = {name: f.annotation for name, f in Params.model_fields.items() if name != "base"}  # stage -> its config


def keeps_output(section: type[BaseModel]) -> frozenset[str]:
    """A section's fields marked ``changes_images: False``: how its stage works, not what it makes."""
    return frozenset(k for k, f in section.model_fields.items() if f.json_schema_extra == {"changes_images": False})
