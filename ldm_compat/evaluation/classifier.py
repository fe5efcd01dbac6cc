"""A small digits classifier, trained in a few seconds on scikit-learn's ``load_digits`` inside this package.

It plays the role Inception plays for FID, for the 8×8 digits demo: its class probabilities give a confidence / class
coverage / "classifier score" (the Inception-score formula), and its last hidden layer gives the features of a
Fréchet distance. Training is full-batch (no data order) from a fixed seed, run under ``torch.random.fork_rng`` so
that evaluating mid-training never disturbs the training's random stream; the result is cached per process.
Training runs on one CPU thread so that the weights do not depend on the machine's thread count.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["DIGITS_SIZE", "DigitsClassifier", "digits_classifier", "real_digits", "to_digits_inputs"]

DIGITS_SIZE = 8
NUM_CLASSES = 10
FEATURES = 64
_STEPS, _LR, _WEIGHT_DECAY, _HELDOUT = 150, 1e-2, 1e-4, 0.2


def real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 scikit-learn digits as ``(images (n, 1, 8, 8) in [-1, 1], labels (n,))`` (the training scale)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0 * 2.0 - 1.0).float()[:, None]
    return images, torch.from_numpy(digits.target).long()


def to_digits_inputs(images) -> torch.Tensor:
    """Samples ``(b, c, h, w)`` in [-1, 1] → the classifier's ``(b, 64)`` inputs.

    RGB is averaged to grey; any size is area-averaged to 8×8 (exact for digits upsampled by pixel repetition);
    values are clamped to [-1, 1] as an image file would be.
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"images: expected (b, 1 or 3, h, w) in [-1, 1], got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("images: contain NaN or infinity")
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (DIGITS_SIZE, DIGITS_SIZE):
        x = F.adaptive_avg_pool2d(x, DIGITS_SIZE)
    return x.clamp(-1.0, 1.0).flatten(1)


@dataclass
class DigitsClassifier:
    """The trained network (``body`` → 64 features → ``head`` → 10 logits) and its held-out accuracy on real digits."""

    body: nn.Module
    head: nn.Module
    heldout_accuracy: float
    heldout_indices: np.ndarray

    @torch.no_grad()
    def features(self, images) -> torch.Tensor:
        """Penultimate-layer features ``(b, 64)`` of samples ``(b, c, h, w)`` in [-1, 1]."""
        return self.body(to_digits_inputs(images))

    @torch.no_grad()
    def probabilities(self, images) -> torch.Tensor:
        """Class probabilities ``(b, 10)``."""
        return self.head(self.features(images)).softmax(dim=-1)


@functools.lru_cache(maxsize=2)
def digits_classifier(seed: int = 0) -> DigitsClassifier:
    """Train (once per process and seed) the digits classifier on 80 % of ``load_digits``; 20 % is held out."""
    images, labels = real_digits()
    inputs = to_digits_inputs(images)
    order = np.random.RandomState(seed).permutation(len(labels))
    held = np.sort(order[: int(len(order) * _HELDOUT)])
    train = np.sort(order[int(len(order) * _HELDOUT) :])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, FEATURES), nn.ReLU())
        head = nn.Linear(FEATURES, NUM_CLASSES)
    params = list(body.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=_LR, weight_decay=_WEIGHT_DECAY)
    x, y = inputs[train], labels[train]
    threads = torch.get_num_threads()
    # one thread: the same float reductions on every machine, and no contention with a busy trainer (~2 s)
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            for _ in range(_STEPS):  # full batch: no data order, no randomness
                loss = F.cross_entropy(head(body(x)), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    body.eval().requires_grad_(False)
    head.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = (head(body(inputs[held])).argmax(-1) == labels[held]).float().mean().item()
    return DigitsClassifier(body=body, head=head, heldout_accuracy=accuracy, heldout_indices=held)
