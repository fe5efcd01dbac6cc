"""Where the training images come from, as a HuggingFace ``datasets.Dataset``.

Sources (the ``source`` key of a dataset's ``params``; inferred from the other keys when left out):

=============  ==========================================================================================
``digits``     scikit-learn's 1,797 real 8×8 digits, shipped inside its wheel (no download); the default
``imagefolder`` a local folder of images (``data_dir``), read with ``datasets``' ``imagefolder`` builder;
               sub-folder names become ``label``, a ``metadata.jsonl``/``.csv`` can add captions
``hub``        ``datasets.load_dataset(name, subset, split=..., revision=...)``: a Hub dataset name, or a
               local folder/file ``load_dataset`` understands
``disk``       ``datasets.load_from_disk(path)``: a folder written by ``save_to_disk``
=============  ==========================================================================================
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

SOURCES = ("digits", "imagefolder", "hub", "disk")
_SPLIT = re.compile(r"^(?P<name>[\w.-]+)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


def load_digits_dataset(image_size: int = 8):
    """scikit-learn's 1,797 real 8×8 digits (shipped inside the wheel, no download) as a ``datasets.Dataset``.

    Columns: ``image`` (float32 ``h w 1`` in [0, 1], i.e. the 17 grey levels ``k / 16``, upsampled by pixel
    repetition when ``image_size`` is a multiple of 8) and ``class_label`` (int 0–9). Other sizes go through
    ``ImageDataset(source="digits", image_size=...)``, which resizes with a chosen interpolation.
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


def _bound(text: str | None, length: int) -> int | None:
    if text is None:
        return None
    if text.endswith("%"):
        return round(length * int(text[:-1]) / 100)
    return int(text)


def select_split(dataset, split: str, where: str = "split"):
    """Apply a slice such as ``train[:90%]`` or ``train[100:]`` to an in-memory dataset (``digits``, ``disk``).

    Percentages round to the nearest row (``datasets``' own default rounding may differ by one row).
    """
    match = _SPLIT.match(str(split))
    if match is None:
        raise ValueError(f"{where}={split!r}: expected a split name with an optional slice, e.g. 'train[:90%]'")
    n = len(dataset)
    start, stop = _bound(match["start"], n), _bound(match["stop"], n)
    if start is None and stop is None:
        return dataset
    return dataset.select(range(n)[slice(start, stop)])


def split_name(split: str) -> str:
    match = _SPLIT.match(str(split))
    return match["name"] if match else str(split)


def infer_source(params: Mapping[str, Any], where: str) -> str:
    """The ``source`` key, or the source implied by ``name`` / ``data_dir`` / ``path`` (none of them: digits)."""
    source = params.get("source")
    if source is not None:
        if source not in SOURCES:
            raise ValueError(f"{where}.source={source!r}: expected one of {', '.join(SOURCES)}")
        return source
    given = [key for key in ("name", "data_dir", "path") if params.get(key)]
    if len(given) > 1:
        raise ValueError(f"{where}: give one of name (Hub), data_dir (imagefolder) or path (save_to_disk), not {given}")
    return {"name": "hub", "data_dir": "imagefolder", "path": "disk"}[given[0]] if given else "digits"


def _require(params: Mapping[str, Any], key: str, where: str, source: str) -> str:
    value = params.get(key)
    if not value or not isinstance(value, str):
        raise ValueError(f"{where}.{key}: required for source={source!r} (a string), got {value!r}")
    return value


def load_source(params: Mapping[str, Any], where: str = "data"):
    """Load the ``datasets.Dataset`` that ``params`` names (see the module docstring); ``split`` defaults to train."""
    import os

    source = infer_source(params, where)
    split = params.get("split") or "train"
    cache_dir = params.get("cache_dir")
    if source == "digits":
        if split_name(split) != "train":
            raise ValueError(f"{where}.split={split!r}: the digits have one split, 'train' (slice it: 'train[90%:]')")
        return select_split(load_digits_dataset(), split, f"{where}.split")
    import datasets

    if source == "imagefolder":
        data_dir = _require(params, "data_dir", where, source)
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"{where}.data_dir={data_dir}: no such folder")
        try:
            return datasets.load_dataset("imagefolder", data_dir=data_dir, split=split, cache_dir=cache_dir)
        except datasets.data_files.EmptyDatasetError:
            raise ValueError(f"{where}.data_dir={data_dir}: the dataset is empty (no image files)") from None
    if source == "hub":
        name = _require(params, "name", where, source)
        return datasets.load_dataset(
            name, params.get("subset"), split=split, revision=params.get("revision"), cache_dir=cache_dir
        )
    path = _require(params, "path", where, source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where}.path={path}: no such dataset folder (written by save_to_disk)")
    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        name = split_name(split)
        if name not in loaded:
            raise ValueError(f"{where}.split={split!r}: {path} has splits {sorted(loaded)}")
        loaded = loaded[name]
    return select_split(loaded, split, f"{where}.split")
