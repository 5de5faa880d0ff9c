"""Which batch size the filter's feature pass wants: EfficientNet-Lite0 features per second by batch.

    python -m bench.features [--batch-sizes 4 8 16 64] [--images 512] [--resolution 224]

The filter embeds every real reference image and every synthetic one in the feature space
(``FeatureSpace``, 28 px images resized to 224 px), ``filter.batch_size`` at a time. On a CPU a
small batch keeps each layer's activations in cache (a 224 px batch of 64 holds about 100 MB per
layer), so it is faster per image; on a GPU a large one is. Every batch size embeds the same
``--images`` uint8 images, alternated ``--repeats`` times. Writes ``bench/results/features-<cpu|cuda>.json``.
"""
from __future__ import annotations

import torch

from bench.common import alternate, parser, rate, save, setup
from pipeline.quality.features import FeatureSpace


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16, 64])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--resolution", type=int, default=224, help="the feature space's input side")
    args = p.parse_args(argv)
    device = setup(args)
    n = 8 if args.quick else args.images
    x = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    spaces = {f"batch {b}": FeatureSpace("efficientnet-lite0", device=device, batch_size=b,
                                         resolution=args.resolution) for b in args.batch_sizes}
    feats = {name: space(x[:max(args.batch_sizes)]) for name, space in spaces.items()}  # warm-up
    ref = next(iter(feats.values()))
    diff = {name: float((f - ref).abs().max()) for name, f in feats.items()}  # the batch changes no feature
    seconds, _, _ = alternate({name: (lambda s=space: s(x)) for name, space in spaces.items()}, args.repeats, device)
    rates = {name: rate(n, s) for name, s in seconds.items()}
    largest = f"batch {max(args.batch_sizes)}"
    payload = {"images": n, "resolution": args.resolution, "feature_space": "efficientnet-lite0",
               "images_per_second": {k: {**v, "speedup_vs_largest_batch": round(
                   v["per_second_median"] / rates[largest]["per_second_median"], 2)} for k, v in rates.items()},
               "max_feature_difference_vs_first_batch_size": diff}
    save("features", device, payload, args.out_dir)
    return payload


if __name__ == "__main__":
    main()
