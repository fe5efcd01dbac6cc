"""Training data as HuggingFace ``datasets``; the embedded default is scikit-learn's ``load_digits``."""

from __future__ import annotations

import numpy as np


def load_digits_dataset(image_size: int = 8):
    """scikit-learn's 1,797 real 8×8 digits (shipped inside the wheel, no download) as a ``datasets.Dataset``.

    Columns: ``image`` (float32 ``h w 1`` in [0, 1], upsampled by pixel repetition when ``image_size`` is a
    multiple of 8) and ``class_label`` (int 0–9).
    """
    from datasets import Array3D, Dataset, Features, Value
    from sklearn.datasets import load_digits

    if image_size % 8:
        raise ValueError(f"image_size={image_size}: the digits are 8×8, expected a multiple of 8")
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    scale = image_size // 8
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    features = Features(
        {"image": Array3D(shape=(image_size, image_size, 1), dtype="float32"), "class_label": Value("int64")}
    )
    return Dataset.from_dict(
        {"image": images[..., None], "class_label": digits.target.astype(np.int64)}, features=features
    ).with_format("numpy")
