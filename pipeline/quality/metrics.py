"""Set-level quality (Frechet distance, KID, precision/recall) and k-NN checks, on features.

Every metric is computed from precomputed features with torch-fidelity's own functions.
k-NN queries run in chunks against a fixed-size real reference: cost grows linearly with
the number of synthetic images.
"""
from __future__ import annotations

import math

import torch

from pipeline.core.splits import stratified_subset


def nearest(query: torch.Tensor, ref: torch.Tensor, k: int = 1, chunk: int = 1024,
            exclude_self: bool = False, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Distance from each query row to its k-th nearest row of ``ref`` (``exclude_self``: query is ref;
    ``exclude``: per query row, a row of ``ref`` left out, e.g. the image it was made from; -1 = none)."""
    out = []
    kk = k + 1 if exclude_self else k
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i:i + chunk].double(), ref.double())
        if exclude is not None:
            rows = torch.nonzero(exclude[i:i + chunk] >= 0).flatten()
            d[rows, exclude[i:i + chunk][rows]] = float("inf")
        out.append(d.kthvalue(kk, dim=1).values)
    return torch.cat(out).float() if out else torch.zeros(0)


def realism(query: torch.Tensor, ref: torch.Tensor, k: int = 3, chunk: int = 1024
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """k-NN manifold membership and realism score (Kynkaanniemi et al. 2019).

    inside: the query lies within the k-th-NN radius of some real feature (the rule behind
    improved precision). score: max_j radius_j / ||query - ref_j|| over the half of the real
    features with the smallest radii (as in the paper); >= 1 means inside that tighter manifold.
    """
    radii = nearest(ref, ref, k=k, exclude_self=True, chunk=chunk).double()
    keep = radii <= radii.median()
    inside, score = [], []
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i:i + chunk].double(), ref.double())
        inside.append((d <= radii[None]).any(dim=1))
        score.append((radii[keep][None] / d[:, keep].clamp_min(1e-12)).max(dim=1).values)
    if not inside:
        return torch.zeros(0, dtype=torch.bool), torch.zeros(0)
    return torch.cat(inside), torch.cat(score).float()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets.

    With at least as many images as dimensions this is torch-fidelity's own computation.
    With fewer (per-class sets), the same number is computed in the small space: for centred,
    scaled features A (n1 x d) and B (n2 x d), S1 = A'A and S2 = B'B, and
    tr sqrt(S1 S2) = sum of singular values of A B' (the nonzero eigenvalues of S1 S2 are those
    of (AB')(AB')'), an n x n problem instead of d x d.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    a, b = a.double().cpu(), b.double().cpu()
    d = a.shape[1]
    if min(len(a), len(b)) >= d:
        return fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b),
                                        False)[KEY_METRIC_FID]
    mu_a, mu_b = a.mean(0), b.mean(0)
    A = (a - mu_a) / math.sqrt(len(a) - 1)
    B = (b - mu_b) / math.sqrt(len(b) - 1)
    M = A @ B.T
    G = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    tr_covmean = torch.linalg.eigvalsh(G).clamp_min(0).sqrt().sum()
    diff = mu_a - mu_b
    return float(diff @ diff + (A * A).sum() + (B * B).sum() - 2 * tr_covmean)


def set_metrics(syn: torch.Tensor, real: torch.Tensor, label: str, *, k: int = 3,
                kid_subsets: int = 100, seed: int = 0, prc_max: int = 2000) -> dict:
    """Frechet distance, KID, precision and recall of ``syn`` against ``real``.

    Precision and recall compare every image with every other one, so they use a random
    subset of at most ``prc_max`` synthetic images (said in the figure): the cost stays
    linear in the number of synthetic images.

    Each figure is {"value", "feature_space", "n_real", "n_synthetic"} (+ "std" for KID);
    a value that cannot be computed at these N is None with a "why".
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    n_s, n_r = len(syn), len(real)
    base = {"feature_space": label, "n_real": n_r, "n_synthetic": n_s}

    def fig(value, why=None, **extra):
        out = {"value": None if value is None or not math.isfinite(value) else float(value), **base, **extra}
        if out["value"] is None:
            out["why"] = why or "not finite"
        return out

    out: dict = {}
    if min(n_s, n_r) < 2:
        why = f"needs at least 2 images in each set (synthetic {n_s}, real {n_r})"
        return {m: fig(None, why) for m in ("frechet_distance", "kid", "precision", "recall")}
    syn, real = syn.float().cpu(), real.float().cpu()
    out["frechet_distance"] = fig(frechet_distance(syn, real))
    subset = min(n_s, n_r, 1000)
    if n_s == n_r == subset:  # every subset would be the whole of both sets
        kid_subsets = 1
    kid = kid_features_to_metric(syn, real, kid_subsets=kid_subsets, kid_subset_size=subset,
                                 rng_seed=seed, verbose=False)
    out["kid"] = fig(kid[KEY_METRIC_KID_MEAN], std=kid[KEY_METRIC_KID_STD], subset_size=subset, subsets=kid_subsets)
    if min(n_s, n_r) <= k:
        why = f"precision/recall with k={k} need more than {k} images in each set"
        out["precision"], out["recall"] = fig(None, why), fig(None, why)
    else:
        if n_s > prc_max:
            syn = syn[torch.randperm(n_s, generator=torch.Generator().manual_seed(seed))[:prc_max]]
        prc = prc_features_to_metric(syn, real, prc_neighborhood=k, prc_batch_size=1024,
                                     save_cpu_ram=True, verbose=False)
        used = {"k": k, "n_synthetic_used": len(syn)}
        out["precision"], out["recall"] = fig(prc["precision"], **used), fig(prc["recall"], **used)
    return out


def per_class_metrics(syn: torch.Tensor, syn_y: torch.Tensor, real: torch.Tensor, real_y: torch.Tensor,
                      class_names: list[str], label: str, **kw) -> dict:
    return {name: set_metrics(syn[syn_y == c], real[real_y == c], label, **kw)
            for c, name in enumerate(class_names)}


def quality_summary(f_syn: torch.Tensor, syn_y: torch.Tensor, keep: torch.Tensor, f_ref: torch.Tensor,
                    ref_y: torch.Tensor, f_real: torch.Tensor, real_y: torch.Tensor, class_names: list[str],
                    label: str, *, k: int, kid_subsets: int, seed: int) -> dict:
    """Set metrics of all and of accepted synthetic images against the reference, beside the
    real-vs-real floor (real labeled images vs the same reference, at the synthetic N and at the
    accepted N: the metrics are biased by N), overall and per class."""
    kw = {"k": k, "kid_subsets": kid_subsets, "seed": seed}
    num_classes = len(class_names)

    def floor(n: int) -> torch.Tensor:
        return f_real[stratified_subset(real_y, min(len(f_real), n), num_classes, seed)]

    return {
        "feature_space": label, "reference": f"real test subset, class-stratified (n={len(f_ref)})",
        "before": set_metrics(f_syn, f_ref, label, **kw),
        "after": set_metrics(f_syn[keep], f_ref, label, **kw),
        "floor": {"what": "real labeled train+val images vs the same test reference: the value a perfect "
                          "generator would reach at this N", **set_metrics(floor(len(f_syn)), f_ref, label, **kw)},
        "floor_at_accepted_n": {"what": "the same floor with as many real images as were accepted",
                                **set_metrics(floor(int(keep.sum())), f_ref, label, **kw)},
        "per_class": {
            "before": per_class_metrics(f_syn, syn_y, f_ref, ref_y, class_names, label, **kw),
            "after": per_class_metrics(f_syn[keep], syn_y[keep], f_ref, ref_y, class_names, label, **kw),
            "floor": per_class_metrics(f_real, real_y, f_ref, ref_y, class_names, label, **kw),
        },
    }
