"""Training data: HuggingFace ``datasets`` served the way the original latent-diffusion datasets were.

An item is a dict whose image is an ``h w c`` float32 array in [-1, 1] (the original convention, e.g.
``ldm/data/lsun.py``: ``image / 127.5 - 1``), plus ``class_label`` (int) and ``caption``/``txt`` (str) where the data
has them. ``collate`` stacks items into a batch dict; ``get_input`` turns the image entry into ``b c h w`` float32
exactly as the original ``DDPM.get_input``.

Determinism: the shuffle order and the random flips are pure functions of ``(seed, epoch, row)``. The sampler hands
``(epoch, index)`` keys to ``ImageDataset``, so worker processes, skipped batches on resume and several processes
all see the same flips without sharing any random state.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ldm_compat.training.batch import get_conditioning, get_input
from ldm_compat.training.data_images import CorruptImageError, decode, to_hwc, to_training_array
from ldm_compat.training.data_sources import infer_source, load_digits_dataset, load_source

__all__ = [
    "ImageDataset",
    "SeededSampler",
    "build_dataloader",
    "build_dataset",
    "collate",
    "get_conditioning",
    "get_input",
    "load_digits_dataset",
]

# get_input / get_conditioning live in ldm_compat.training.batch and are re-exported here
IMAGE_COLUMNS = ("image", "img", "jpg", "png")
LABEL_COLUMNS = ("class_label", "label", "labels", "fine_label")
CAPTION_COLUMNS = ("caption", "txt", "text")
# targets that mean "this module's ImageDataset" (None: a bare params mapping)
OWN_TARGETS = ("ldm_compat.training.data.ImageDataset", "ImageDataset")


def _pick_column(columns, explicit, candidates, what: str, where: str) -> str | None:
    if explicit is False:
        return None
    if explicit is not None:
        if explicit not in columns:
            raise ValueError(f"{where}.{what}={explicit!r}: no such column (columns: {', '.join(columns)})")
        return explicit
    return next((c for c in candidates if c in columns), None)


class ImageDataset(Dataset):
    """A ``datasets.Dataset`` of images as the original training items (see the module docstring).

    Args:
        source: ``digits`` (default), ``imagefolder``, ``hub`` or ``disk``; inferred from ``name`` / ``data_dir`` /
            ``path`` when left out (see ``ldm_compat.training.data_sources``).
        name, subset, revision: ``load_dataset(name, subset, split=split, revision=revision)`` (source ``hub``).
        data_dir: the image folder (source ``imagefolder``). path: the ``save_to_disk`` folder (source ``disk``).
        split: split name with an optional slice, e.g. ``train[:90%]``. cache_dir: ``datasets`` cache folder.
        dataset: an already loaded ``datasets.Dataset`` (then the source keys are not used).
        image_column: column holding the image (default: the first of image, img, jpg, png).
        image_key: batch key of the image (the model's ``first_stage_key``; default ``image``).
        label_column / caption_column: passed through as ``class_label`` / ``caption`` and ``txt``; default: the
            first of class_label, label, labels, fine_label / caption, txt, text; ``False`` turns them off.
        image_size: center-crop to a square, then resize (``None``: keep the size; all images must then agree).
        interpolation: nearest, box, linear, bilinear, bicubic (the original's default) or lanczos.
        flip_p: probability of a left–right flip (the original LSUN datasets used 0.5 for training).
        mode: ``RGB`` or ``L`` (default: RGB for image files, as the original; arrays keep their channels).
        value_range: ``[low, high]`` of float arrays (uint8 is always ``/127.5 - 1``).
        on_corrupt: ``skip`` (warn, count, leave the image out) or ``raise``.
        check_images: decode every image once up front, so that corrupt ones are counted (and skipped or reported)
            before training; default: on for local sources (imagefolder, disk), off for the Hub (use it on big
            data sets only if you can afford reading them once). Unchecked corrupt images are handled when read.
        max_samples: use only the first ``max_samples`` rows.
        seed: seed of the random flips (default: the run's seed, set by ``build_dataloader``).
    """

    def __init__(
        self,
        source: str | None = None,
        *,
        name: str | None = None,
        subset: str | None = None,
        revision: str | None = None,
        data_dir: str | None = None,
        path: str | None = None,
        split: str = "train",
        cache_dir: str | None = None,
        dataset=None,
        image_column: str | None = None,
        image_key: str = "image",
        label_column: str | bool | None = None,
        caption_column: str | bool | None = None,
        image_size: int | None = None,
        interpolation: str = "bicubic",
        flip_p: float = 0.0,
        mode: str | None = None,
        value_range: tuple[float, float] | list[float] = (0.0, 1.0),
        on_corrupt: str = "skip",
        check_images: bool | None = None,
        max_samples: int | None = None,
        seed: int | None = None,
        where: str = "dataset",
    ):
        self.where = where
        self._check_options(image_size, flip_p, on_corrupt, value_range, max_samples, seed, interpolation, mode)
        params = {"source": source, "name": name, "subset": subset, "revision": revision, "data_dir": data_dir}
        params.update({"path": path, "split": split, "cache_dir": cache_dir})
        self.source = "dataset" if dataset is not None else infer_source(params, where)
        hf = dataset if dataset is not None else load_source(params, where)
        if max_samples is not None and max_samples < len(hf):
            hf = hf.select(range(max_samples))
        columns = list(hf.column_names)
        candidates = IMAGE_COLUMNS + tuple(c for c in columns if _is_image_feature(hf.features.get(c)))
        self.image_column = _pick_column(columns, image_column, candidates, "image_column", where)
        if self.image_column is None:
            raise ValueError(f"{where}: no image column found (columns: {', '.join(columns)}); set image_column")
        self.label_column = _pick_column(columns, label_column, LABEL_COLUMNS, "label_column", where)
        self.caption_column = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption_column", where)
        self.hf = _readable(hf, self.image_column)
        # labels/captions (and small array images, e.g. the digits) are read once: per-row Arrow access is slow
        # list(): datasets ≥ 4 returns a lazy Column whose every [row] is an Arrow read
        columns = (c for c in (self.label_column, self.caption_column) if c is not None)
        self._columns = {c: list(self.hf.with_format(None)[c]) for c in columns}
        self._images = _in_memory_images(self.hf, self.image_column)
        self.image_key, self.image_size, self.interpolation = image_key, image_size, interpolation
        self.flip_p, self.mode, self.value_range = float(flip_p), mode, tuple(float(v) for v in value_range)
        self.on_corrupt, self.seed, self.split = on_corrupt, seed, split
        self.rows = np.arange(len(self.hf))
        self.skipped: list[tuple[int, str]] = []
        if check_images is None:
            check_images = self.source in ("imagefolder", "disk")
        if check_images:
            self._check_all()
        if len(self.rows) == 0:
            raise ValueError(
                f"{where}: the dataset is empty (0 usable images of {len(self.hf)}"
                f"{f', {len(self.skipped)} corrupt' if self.skipped else ''})"
            )

    def _check_options(self, image_size, flip_p, on_corrupt, value_range, max_samples, seed, interpolation, mode):
        from ldm_compat.training.data_images import INTERPOLATIONS, MODES

        w = self.where
        if image_size is not None and (
            isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
        ):
            raise ValueError(f"{w}.image_size={image_size!r}: expected a positive integer or None")
        if not isinstance(flip_p, (int, float)) or not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"{w}.flip_p={flip_p!r}: expected a probability in [0, 1]")
        if on_corrupt not in ("skip", "raise"):
            raise ValueError(f"{w}.on_corrupt={on_corrupt!r}: expected 'skip' or 'raise'")
        if len(value_range) != 2 or not float(value_range[0]) < float(value_range[1]):
            raise ValueError(f"{w}.value_range={list(value_range)!r}: expected [low, high] with low < high")
        if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
            raise ValueError(f"{w}.max_samples={max_samples!r}: expected a positive integer or None")
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise ValueError(f"{w}.seed={seed!r}: expected a non-negative integer")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"{w}.interpolation={interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")
        if mode is not None and mode not in MODES:
            raise ValueError(f"{w}.mode={mode!r}: expected one of {', '.join(MODES)}")

    # ------------------------------------------------------------------------------------------- corrupt images
    def _skip(self, row: int, err: Exception) -> None:
        if self.on_corrupt == "raise":
            raise CorruptImageError(f"{self.where}: image at row {row}: {err} (on_corrupt='skip' leaves it out)")
        self.skipped.append((row, str(err)))

    def _check_all(self) -> None:
        good, sizes = [], set()
        plain = self.hf.with_format(None)
        cells = (
            (start + k, cell)
            for start in range(0, len(plain), 256)  # in chunks: the files' bytes need not fit in memory at once
            for k, cell in enumerate(plain[start : start + 256][self.image_column])
        )
        for row, cell in cells:
            try:
                image = decode(cell)
                size = to_hwc(image).shape[:2] if isinstance(image, np.ndarray) else (image.height, image.width)
            except CorruptImageError as err:
                self._skip(row, err)
                continue
            good.append(row)
            sizes.add(size)
        self.rows = np.asarray(good, dtype=np.int64)
        if self.skipped:
            first = "; ".join(f"row {r}: {e}" for r, e in self.skipped[:3])
            warnings.warn(
                f"{self.where}: skipped {len(self.skipped)} corrupt image(s) of {len(self.hf)} ({first})", stacklevel=3
            )
        if self.image_size is None and len(sizes) > 1:
            raise ValueError(f"{self.where}: images have different sizes {sorted(sizes)[:4]}; set image_size")

    # ------------------------------------------------------------------------------------------- items
    def __len__(self) -> int:
        return len(self.rows)

    def flip_for(self, row: int, epoch: int) -> bool:
        """Whether row ``row`` is flipped in ``epoch``: a pure function of ``(seed, epoch, row)``."""
        if self.flip_p <= 0.0:
            return False
        return bool(np.random.default_rng((self.seed or 0, epoch, row)).random() < self.flip_p)

    def example(self, row: int, epoch: int = 0) -> dict[str, Any]:
        """The item of dataset row ``row`` (raises ``CorruptImageError`` if its image cannot be used)."""
        row = int(row)
        cell = self._images[row] if self._images is not None else self.hf[row][self.image_column]
        image = decode(cell)
        try:
            array = to_training_array(
                image, self.image_size, interpolation=self.interpolation, flip=self.flip_for(row, epoch),
                mode=self.mode, value_range=self.value_range,
            )  # fmt: skip
        except (OSError, ValueError) as err:  # e.g. a truncated file that only fails when its pixels are read
            raise CorruptImageError(f"{type(err).__name__}: {err}") from None
        return {self.image_key: array, **self.fields(row)}

    def fields(self, row: int) -> dict[str, Any]:
        """The item's entries other than the image (``class_label``, ``caption``/``txt``), without decoding it."""
        item: dict[str, Any] = {}
        if self.label_column is not None:
            label = self._columns[self.label_column][int(row)]
            item["class_label"] = np.int64(label) if np.ndim(label) == 0 else np.asarray(label)
        if self.caption_column is not None:
            caption = self._columns[self.caption_column][int(row)]
            item["caption"] = item["txt"] = "" if caption is None else str(caption)
        return item

    def __getitem__(self, key) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        n = len(self.rows)
        for attempt in range(n):
            row = int(self.rows[(index + attempt) % n])
            try:
                return self.example(row, epoch)
            except CorruptImageError as err:
                self._skip(row, err)
                # an unchecked corrupt image: use the next row instead (deterministic), say so once per row
                warnings.warn(f"{self.where}: skipped corrupt image at row {row} ({err})", stacklevel=2)
        raise ValueError(f"{self.where}: no readable image left ({len(self.skipped)} corrupt)")

    def __repr__(self) -> str:
        extra = [f"labels from {self.label_column!r}"] if self.label_column else []
        extra += [f"captions from {self.caption_column!r}"] if self.caption_column else []
        extra += [f"{len(self.skipped)} corrupt skipped"] if self.skipped else []
        size = f"{self.image_size}×{self.image_size}" if self.image_size else "native size"
        return (f"ImageDataset(source={self.source}, split={self.split}, {len(self)} images, {size}, "
                f"flip_p={self.flip_p}{''.join(', ' + e for e in extra)})")  # fmt: skip


def _is_image_feature(feature) -> bool:
    import datasets

    return isinstance(feature, (datasets.Image, datasets.Array2D, datasets.Array3D))


def _readable(hf, image_column: str):
    """Decode images ourselves (to count corrupt ones); read array columns as numpy."""
    import datasets

    feature = hf.features.get(image_column)
    if isinstance(feature, datasets.Image):
        return hf.cast_column(image_column, datasets.Image(decode=False)).with_format(None)
    return hf.with_format("numpy", columns=[image_column], output_all_columns=True)


def _in_memory_images(hf, image_column: str, max_bytes: int = 256 * 2**20) -> np.ndarray | None:
    """The whole image column as one array when it holds fixed-shape arrays that fit in ``max_bytes``."""
    import datasets

    feature = hf.features.get(image_column)
    if not isinstance(feature, (datasets.Array2D, datasets.Array3D)):
        return None
    if len(hf) * int(np.prod(feature.shape)) * np.dtype(feature.dtype).itemsize > max_bytes:
        return None
    # through Arrow (respects select()): the numpy formatter converts row by row and takes ~1 s for the digits
    column = hf.with_format("arrow")[image_column]
    chunks = [chunk.to_numpy(zero_copy_only=False) for chunk in column.chunks]
    images = np.concatenate(chunks) if chunks else np.zeros((0, *feature.shape), dtype=feature.dtype)
    return images.reshape(len(hf), *feature.shape)


class SeededSampler(Sampler):
    """Indices in an order fixed by ``(seed, epoch)``, as ``(epoch, index)`` keys for ``ImageDataset``.

    ``set_epoch`` is called by Accelerate's prepared loaders (and should be called by hand otherwise); the epoch also
    advances by itself after each full pass. ``with_epoch=False`` yields plain indices (for other datasets).
    """

    def __init__(self, num_samples: int, *, shuffle: bool = True, seed: int = 0, with_epoch: bool = True):
        self.num_samples, self.shuffle, self.seed, self.with_epoch = num_samples, shuffle, seed, with_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator:
        epoch = self.epoch
        for index in self.order(epoch):
            yield (epoch, index) if self.with_epoch else index
        self.epoch = epoch + 1


def collate(examples: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Items → a batch dict: arrays stacked (``b h w c`` images), numbers as tensors, strings as lists.

    Strings stay Python lists so that ``ucg_training`` can replace entries, as the original did.
    """
    if not examples:
        raise ValueError("collate: empty batch")
    keys = list(examples[0])
    batch: dict[str, Any] = {}
    for key in keys:
        values = [example[key] for example in examples]
        first = values[0]
        if isinstance(first, (np.ndarray, torch.Tensor)) and np.ndim(first) > 0:
            shapes = {tuple(np.shape(v)) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"batch key {key!r}: items have different shapes {sorted(shapes)}; set image_size")
            batch[key] = torch.stack([torch.as_tensor(np.asarray(v)) for v in values])
        elif isinstance(first, (bool, np.bool_)):
            batch[key] = torch.tensor([bool(v) for v in values])
        elif isinstance(first, (int, np.integer)):
            batch[key] = torch.tensor([int(v) for v in values], dtype=torch.long)
        elif isinstance(first, (float, np.floating)):
            batch[key] = torch.tensor([float(v) for v in values], dtype=torch.float32)
        else:
            batch[key] = list(values)
    return batch


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; pass that on to numpy/random for user datasets
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_dataloader(
    dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    num_workers: int = 0,
    pin_memory: bool | None = None,
    drop_last: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A ``DataLoader`` whose order and flips are fixed by ``seed`` (and the epoch), whatever ``num_workers``.

    Args:
        batch_size: per process (``data.params.batch_size``). num_workers: loader processes (the original's default
            was ``2 × batch_size``; 0 here). pin_memory: default on when CUDA is available. drop_last: as the
            original DataLoader (False).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers={num_workers!r}: expected an integer ≥ 0")
    if len(dataset) == 0:
        raise ValueError("build_dataloader: the dataset is empty")
    # ImageDataset, or a dataset serving its items the same way (keys (epoch, index), flips seeded by .seed)
    own = isinstance(dataset, ImageDataset) or getattr(dataset, "keys_with_epoch", False)
    if own and dataset.seed is None:
        dataset.seed = seed
    sampler = SeededSampler(len(dataset), shuffle=shuffle, seed=seed, with_epoch=own)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory, drop_last=drop_last,
        worker_init_fn=_seed_worker if num_workers else None, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def _is_data_module(config: Mapping) -> bool:
    params = config.get("params") or {}
    return str(config.get("target", "")).endswith("DataModuleFromConfig") or any(
        key in params for key in ("batch_size", "train", "validation", "test", "predict")
    )


def _instantiate(target: str, params: Mapping, where: str):
    """The original ``instantiate_from_config`` for a user's own dataset class (items: ``h w c`` in [-1, 1])."""
    module_name, _, attr = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(
            f"{where}.target={target}: cannot import it ({err}); use ldm_compat.training.data.ImageDataset with "
            "source: digits | imagefolder | hub | disk"
        ) from None
    return cls(**params)


def build_dataset(data_config: Mapping | None, split: str = "train", *, image_size: int | None = None):
    """The ``split`` dataset of an original-style ``data`` section (or of one dataset's ``{target, params}``).

    ``data.params.<split>`` is ``{target, params}``: the target ``ldm_compat.training.data.ImageDataset`` (or no
    target) takes the ``ImageDataset`` keys; any other importable target is built like the original
    ``instantiate_from_config``. A missing ``train`` entry means the embedded digits. ``image_size`` (the model's)
    is used when the dataset's params do not set one.
    """
    from ldm_compat.config import to_plain

    config = to_plain(data_config) or {}
    where = "data"
    if _is_data_module(config):
        where = f"data.params.{split}"
        entry = (config.get("params") or {}).get(split)
        if entry is None:
            if split != "train":
                raise ValueError(f"{where}: not configured")
            entry = {}  # the embedded default: scikit-learn digits
    else:
        entry = config
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected a mapping with target/params, got {type(entry).__name__}")
    target = entry.get("target")
    params = dict(entry.get("params") or {}) if ("target" in entry or "params" in entry) else dict(entry)
    if target is not None and target not in OWN_TARGETS:
        return _instantiate(target, params, where)
    allowed = set(inspect.signature(ImageDataset.__init__).parameters) - {"self", "dataset", "where"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"{where}.params: unknown key(s) {', '.join(unknown)} (expected some of {sorted(allowed)})")
    if params.get("image_size") is None and image_size is not None:
        params["image_size"] = image_size
    return ImageDataset(**params, where=where)
