"""Offline evaluation of generated digits: a small in-package classifier, its scores and a Fréchet distance."""

from ldm_compat.evaluation.frechet import feature_statistics, frechet_distance, frechet_distance_from_features
from ldm_compat.evaluation.metrics import METRIC_DESCRIPTIONS, evaluate_samples, real_reference_scores

__all__ = [
    "METRIC_DESCRIPTIONS",
    "evaluate_samples",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "real_reference_scores",
]
