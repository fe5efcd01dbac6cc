"""Scores of generated digits: classifier confidence and class coverage, and a Fréchet distance to the real digits.

These are offline stand-ins for Inception-based metrics (no download): the features and probabilities come from
``digits_classifier`` (trained on scikit-learn's digits), so the numbers compare runs of this package's digits demo
with each other and with real data, not with published FIDs.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ldm_compat.evaluation.classifier import NUM_CLASSES, digits_classifier, real_digits
from ldm_compat.evaluation.frechet import feature_statistics, frechet_distance

__all__ = ["METRIC_DESCRIPTIONS", "evaluate_samples", "real_reference_scores"]

CONFIDENT = 0.9
METRIC_DESCRIPTIONS = {
    "num_samples": "images scored",
    "confidence": "mean of the classifier's top class probability (real held-out digits score near 1)",
    "confident_fraction": f"share of images whose top class probability is ≥ {CONFIDENT}",
    "class_entropy": f"entropy (nats) of the predicted-class histogram; ln {NUM_CLASSES} = {math.log(NUM_CLASSES):.3f} "
    "means every class equally often, 0 means one class only",
    "classifier_score": "exp(E[KL(p(y|x) ‖ p(y))]), the Inception-score formula with this classifier (1 to 10)",
    "frechet_distance": "Fréchet distance between the classifier features of the images and of all 1,797 real digits",
    "accuracy": "share of images classified as the label they were generated for (class-conditional models)",
    "class_histogram": "predicted class counts, digits 0–9",
    "classifier_heldout_accuracy": "the classifier's accuracy on held-out real digits (how far it can be trusted)",
}


@functools.lru_cache(maxsize=2)
def _real_statistics(seed: int) -> tuple[np.ndarray, np.ndarray]:
    images, _ = real_digits()
    return feature_statistics(digits_classifier(seed).features(images).double().numpy())


def evaluate_samples(images, labels=None, *, classifier_seed: int = 0) -> dict:
    """Score images ``(b, 1 or 3, h, w)`` in [-1, 1] (the model's range); see ``METRIC_DESCRIPTIONS``.

    Any resolution is accepted (area-averaged to 8×8). ``labels`` (``(b,)`` ints), when the images were generated
    for given classes, add ``accuracy``. Returns plain Python numbers (JSON-ready).
    """
    classifier = digits_classifier(classifier_seed)
    features = classifier.features(images).double()
    probs = classifier.head(features.float()).softmax(dim=-1).double()
    n = probs.shape[0]
    if n < 2:
        raise ValueError(f"images: need at least 2 samples for the statistics, got {n}")
    top, predicted = probs.max(dim=-1)
    histogram = torch.bincount(predicted, minlength=NUM_CLASSES)
    share = histogram.double() / n
    class_entropy = float(-(share[share > 0] * share[share > 0].log()).sum())
    marginal = probs.mean(dim=0, keepdim=True)
    kl = (probs * (probs.clamp_min(1e-30).log() - marginal.clamp_min(1e-30).log())).sum(dim=-1)
    scores = {
        "num_samples": int(n),
        "confidence": float(top.mean()),
        "confident_fraction": float((top >= CONFIDENT).double().mean()),
        "class_entropy": class_entropy,
        "classifier_score": float(kl.mean().exp()),
        "frechet_distance": frechet_distance(*feature_statistics(features.numpy()), *_real_statistics(classifier_seed)),
        "class_histogram": [int(c) for c in histogram],
        "classifier_heldout_accuracy": float(classifier.heldout_accuracy),
    }
    if labels is not None:
        labels = torch.as_tensor(labels).long().flatten()
        if labels.shape[0] != n:
            raise ValueError(f"labels: expected {n} entries (one per image), got {labels.shape[0]}")
        scores["accuracy"] = float((predicted == labels).double().mean())
    return scores


def real_reference_scores(num_samples: int = 512, seed: int = 0) -> dict:
    """The scores of ``num_samples`` real digits (a seeded random subset), with their labels: what a perfect
    generator would get at that sample size (the Fréchet distance of a finite sample is biased above 0)."""
    images, labels = real_digits()
    if not 2 <= num_samples <= len(labels):
        raise ValueError(f"num_samples={num_samples}: expected 2 … {len(labels)} (the real digits)")
    chosen = np.sort(np.random.RandomState(seed).permutation(len(labels))[:num_samples])
    return evaluate_samples(images[chosen], labels[chosen])
