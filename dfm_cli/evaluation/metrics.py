"""Distances between feature sets: Fréchet (FID/FDD/FVD), KID and IS via torch-fidelity,
CLIP score, improved precision and recall, and the multi-scale sliced Wasserstein distance (SWD).

The Fréchet distance is computed in float64 from the eigenvalues of the symmetric PSD
matrix `sqrt(S1) S2 sqrt(S1)`, whose trace of square root equals `tr sqrt(S1 S2)`. Unlike
`scipy.linalg.sqrtm(S1 @ S2)` this never produces an imaginary part and does not fail on
singular or near-singular covariances (few samples, collapsed features).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dfm_cli.errors import DfmError
from dfm_cli.method.decompose import LaplacianPyramid


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of `N D` features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise DfmError(f"need at least 2 feature vectors to form statistics, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖mu1 - mu2‖² + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), robust to singular covariances."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise DfmError(
            f"feature statistics differ in size: {mu1.shape} vs {mu2.shape}; were they made "
            "with the same feature extractor?"
        )
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt, 0.0))


def save_statistics(path: Path, stats: dict[str, np.ndarray]) -> Path:
    """ADM layout: an `.npz` with `mu` and `sigma` (plus e.g. `mu_dinov2`, `sigma_dinov2`)."""
    if path.suffix != ".npz":
        raise DfmError(f"{path}: statistics are saved as .npz (ADM layout); use a name ending in .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, allow_pickle=True, **stats)  # numpy's default, named so that mypy does not read `**stats` as it
    return path


def kid(
    features1: np.ndarray, features2: np.ndarray, subsets: int = 100, subset_size: int = 1000
) -> tuple[float, float]:
    """KID mean and std through torch-fidelity (polynomial kernel, unbiased MMD²)."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = min(subset_size, len(features1), len(features2))
    out = kid_features_to_metric(
        torch.from_numpy(np.asarray(features1, np.float64)),
        torch.from_numpy(np.asarray(features2, np.float64)),
        kid_subsets=subsets,
        kid_subset_size=size,
        verbose=False,
    )
    return float(out["kernel_inception_distance_mean"]), float(out["kernel_inception_distance_std"])


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS mean and std through torch-fidelity, from unbiased Inception logits."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    out = isc_features_to_metric(torch.from_numpy(np.asarray(logits, np.float32)), splits=splits)
    return float(out["inception_score_mean"]), float(out["inception_score_std"])


def clip_score(image_features: np.ndarray, text_features: np.ndarray) -> float:
    """100 × mean max(cos(image, caption), 0), the usual CLIP score."""
    a = image_features / np.linalg.norm(image_features, axis=1, keepdims=True)
    b = text_features / np.linalg.norm(text_features, axis=1, keepdims=True)
    return float(100 * np.clip((a * b).sum(1), 0, None).mean())


# --------------------------------------------------------------------------- precision and recall


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`len(a) × len(b)` squared Euclidean distances in float64, clamped at 0 against rounding."""
    d = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]
    return np.maximum(d, 0)


def knn_radii(features: np.ndarray, k: int = 3, block: int = 1024) -> np.ndarray:
    """Squared distance from each feature vector to its k-th nearest neighbour in the same set
    (the vector itself, at distance 0, does not count), in row blocks to bound memory."""
    f = np.asarray(features, np.float64)
    if len(f) <= k:
        raise DfmError(f"precision/recall with k = {k} needs more than {k} samples per set, got {len(f)}")
    radii = np.empty(len(f))
    for start in range(0, len(f), block):
        d = _squared_distances(f[start : start + block], f)
        radii[start : start + block] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself
    return radii


def _covered(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int) -> np.ndarray:
    """For each point: does it lie in at least one ball (centre, k-NN radius)?"""
    inside = np.zeros(len(points), dtype=bool)
    for start in range(0, len(points), block):
        d = _squared_distances(points[start : start + block], centres)
        inside[start : start + block] = (d <= radii[None, :]).any(1)
    return inside


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), as ADM's evaluator reports them.

    Each set's manifold is the union of balls around its points with radius the distance to
    the k-th nearest neighbour. Precision is the share of generated samples inside the real
    manifold (fidelity); recall the share of real samples inside the generated one (diversity).

    >>> pts = np.random.default_rng(0).standard_normal((20, 4))
    >>> precision_recall(pts, pts)
    (1.0, 1.0)
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise DfmError(f"precision/recall needs two N x D feature sets, got {real.shape} and {fake.shape}")
    precision = _covered(fake, real, knn_radii(real, k, block), block).mean()
    recall = _covered(real, fake, knn_radii(fake, k, block), block).mean()
    return float(precision), float(recall)


# --------------------------------------------------------------------------- SWD


def swd_descriptors(
    images: np.ndarray, levels: int, patch: int = 7, per_image: int = 128, seed: int = 0
) -> list[np.ndarray]:
    """Random `patch × patch` neighbourhoods from each level of a Laplacian pyramid, coarsest
    first, each level normalised per channel (ProGAN's SWD descriptors, on dfm's pyramid)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).double() / 127.5 - 1
    pyramid = LaplacianPyramid(levels, [2] * (levels - 1))
    rng = np.random.default_rng(seed)
    out = []
    for band in pyramid.decompose(x):
        n, c, h, w = band.shape
        if h < patch or w < patch:
            raise DfmError(
                f"images of {x.shape[-2]}x{x.shape[-1]} are too small for {levels} SWD levels; use fewer (--swd-levels)"
            )
        ys = rng.integers(0, h - patch + 1, (n, per_image))
        xs = rng.integers(0, w - patch + 1, (n, per_image))
        offsets = np.arange(patch)
        rows = torch.from_numpy(ys[..., None, None] + offsets[:, None])
        cols = torch.from_numpy(xs[..., None, None] + offsets[None, :])
        idx = torch.arange(n)[:, None, None, None]
        patches = band.permute(0, 2, 3, 1)[idx, rows, cols]  # n, per_image, patch, patch, c
        desc = patches.reshape(n * per_image, patch, patch, c)
        desc = (desc - desc.mean((0, 1, 2))) / desc.std((0, 1, 2)).clamp_min(1e-8)
        out.append(desc.reshape(len(desc), -1).numpy())
    return out


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, projections: int = 512, repeats: int = 4, seed: int = 0) -> float:
    """Mean over random unit directions of the 1D Wasserstein-1 distance between projections."""
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b))
    a, b = a[rng.permutation(len(a))[:n]], b[rng.permutation(len(b))[:n]]
    total = 0.0
    for _ in range(repeats):
        dirs = rng.standard_normal((a.shape[1], projections))
        dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
        pa, pb = np.sort(a @ dirs, axis=0), np.sort(b @ dirs, axis=0)
        total += float(np.abs(pa - pb).mean())
    return total / repeats


def swd(images1: np.ndarray, images2: np.ndarray, levels: int = 3) -> dict[str, float]:
    """Multi-scale SWD (×1e3, as ProGAN reports it) per pyramid level and averaged.

    Needs no downloaded weights; both sets must share a resolution.
    """
    if images1.shape[1:] != images2.shape[1:]:
        raise DfmError(f"SWD needs equal image shapes, got {images1.shape[1:]} and {images2.shape[1:]}")
    d1, d2 = swd_descriptors(images1, levels), swd_descriptors(images2, levels, seed=1)
    per_level = [1e3 * sliced_wasserstein(a, b) for a, b in zip(d1, d2)]
    result = {f"swd_level_{s}": v for s, v in enumerate(per_level, 1)}
    result["swd"] = float(np.mean(per_level))
    return result
