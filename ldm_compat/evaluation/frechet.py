"""Fréchet distance between two Gaussians fitted to feature sets (the formula behind FID), in float64.

``d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½)``. The trace of the matrix square root is computed as
``Tr((Σ₁^½ Σ₂ Σ₁^½)^½)`` — the same eigenvalues as ``Σ₁ Σ₂`` — from two symmetric eigen-decompositions. Both matrices
are symmetric positive semi-definite, so this never produces the complex parts or the ill-conditioning that a general
``sqrtm(Σ₁ Σ₂)`` meets with singular covariances (e.g. features that are always zero); tiny negative eigenvalues from
rounding are clipped to 0.
"""

from __future__ import annotations

import numpy as np

__all__ = ["feature_statistics", "frechet_distance", "frechet_distance_from_features"]


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, ``ddof=1``) covariance of ``features`` ``(n, d)``, as float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features: expected shape (n ≥ 2, d), got {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError("features: contain NaN or infinity")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (≥ 0)."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != mu2.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"frechet_distance: expected means (d,) and covariances (d, d) of one d, got {mu1.shape}, "
            f"{sigma1.shape}, {mu2.shape}, {sigma2.shape}"
        )
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return max(value, 0.0)  # rounding can leave -1e-13 for identical inputs


def frechet_distance_from_features(features1, features2) -> float:
    """``frechet_distance`` of the Gaussians fitted to two feature sets ``(n₁, d)`` and ``(n₂, d)``."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
