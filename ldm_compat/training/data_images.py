"""One image → the original's training array: ``h w c`` float32 in [-1, 1] (``image / 127.5 - 1``).

The steps and their order follow latent-diffusion's ``ldm/data/lsun.py`` ``LSUNBase.__getitem__``: convert to RGB,
center-crop to a square, resize with PIL (``bicubic`` by default), random horizontal flip, then scale to [-1, 1].
Arrays (e.g. scikit-learn digits) take the same path; they are resized with PIL in 32-bit float mode, per channel,
so that no quantisation to 8 bits happens.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

# the original's interpolation names (LSUNBase) plus nearest and box
INTERPOLATIONS = ("nearest", "box", "linear", "bilinear", "bicubic", "lanczos")
MODES = ("RGB", "L")


class CorruptImageError(ValueError):
    """An image that cannot be read or decoded (a truncated file, not an image, an unusable array)."""


def _pil_filter(name: str):
    from PIL import Image

    filters = {
        "nearest": Image.Resampling.NEAREST,
        "box": Image.Resampling.BOX,
        "linear": Image.Resampling.BILINEAR,  # PIL.Image.LINEAR is an alias of BILINEAR
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "lanczos": Image.Resampling.LANCZOS,
    }
    if name not in filters:
        raise ValueError(f"interpolation={name!r}: expected one of {', '.join(INTERPOLATIONS)}")
    return filters[name]


def decode(value: Any):
    """A dataset cell → a loaded ``PIL.Image`` or an ``np.ndarray``; raise ``CorruptImageError`` if unreadable.

    Accepts what ``datasets`` stores: ``{"bytes", "path"}`` (``Image(decode=False)``), a ``PIL.Image``, an array
    (or nested list), raw ``bytes`` or a file path.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        data, path = value.get("bytes"), value.get("path")
        value = data if data is not None else path
        where = path or "embedded bytes"
    else:
        where = value if isinstance(value, (str, os.PathLike)) else "embedded bytes"
    try:
        if isinstance(value, Image.Image):
            value.load()
            return value
        if isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
            image.load()  # decode now: a truncated file fails here, not later in a worker
            return image
        if isinstance(value, (str, os.PathLike)):
            with Image.open(value) as image:
                image.load()
                return image.copy()
        if value is None:
            raise CorruptImageError("no image (None)")
        array = np.asarray(value)
        if array.dtype == object or array.ndim not in (2, 3) or array.size == 0:
            raise CorruptImageError(f"not an image array (shape {array.shape}, dtype {array.dtype})")
        return array
    except CorruptImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError) as err:
        raise CorruptImageError(f"{where}: cannot be decoded ({type(err).__name__}: {err})") from None


def _center_crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    # LSUNBase: crop = min(h, w); img[(h - crop) // 2:(h + crop) // 2, (w - crop) // 2:(w + crop) // 2]
    crop = min(height, width)
    top, left = (height - crop) // 2, (width - crop) // 2
    return top, left, (height + crop) // 2, (width + crop) // 2


def to_hwc(array: np.ndarray) -> np.ndarray:
    """``h w`` → ``h w 1``; ``c h w`` (c ≤ 4 < w) → ``h w c``; ``h w c`` unchanged."""
    if array.ndim == 2:
        return array[..., None]
    if array.shape[-1] > 4 and array.shape[0] <= 4:
        return np.moveaxis(array, 0, -1)
    if array.shape[-1] > 4:
        raise CorruptImageError(f"array of shape {array.shape}: expected h w c or c h w with at most 4 channels")
    return array


def _array_to_unit(array: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """Array → float64 in [-1, 1]: uint8 as the original (``/127.5 - 1``), floats from ``value_range``."""
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 127.5 - 1.0
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise CorruptImageError(f"array of dtype {array.dtype}: expected uint8 or floating point pixels")
    low, high = value_range
    return (array.astype(np.float64) - low) / (high - low) * 2.0 - 1.0


def to_training_array(
    image,
    image_size: int | None = None,
    *,
    interpolation: str = "bicubic",
    flip: bool = False,
    mode: str | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """A decoded image → ``h w c`` float32 in [-1, 1], as the original datasets hand it to ``get_input``.

    Args:
        image: a ``PIL.Image`` or an array (``h w``, ``h w c`` or ``c h w``).
        image_size: center-crop to a square and resize to ``image_size × image_size``; ``None`` keeps the size.
        interpolation: PIL filter for the resize (the original's names; its default is ``bicubic``).
        flip: mirror left–right (the decision is made by the caller so that it can be seeded).
        mode: ``"RGB"`` (the original converts every image to RGB) or ``"L"``; ``None`` means RGB for PIL images
            and "keep the channels" for arrays.
        value_range: the ``(low, high)`` of float arrays; uint8 data always uses the original's ``/127.5 - 1``.
    """
    from PIL import Image

    if mode is not None and mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    resample = _pil_filter(interpolation)
    if isinstance(image, Image.Image):
        image = image.convert(mode or "RGB") if image.mode != (mode or "RGB") else image
        if image_size is not None:
            top, left, bottom, right = _center_crop_box(image.height, image.width)
            if (top, left, bottom, right) != (0, 0, image.height, image.width):
                image = image.crop((left, top, right, bottom))
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), resample=resample)
        array = np.asarray(image, dtype=np.uint8)
        if flip:
            array = array[:, ::-1]
        # float64 arithmetic, then float32, as the original ((image / 127.5 - 1.0).astype(np.float32))
        array = (array / 127.5 - 1.0).astype(np.float32)
        return np.ascontiguousarray(array[..., None] if array.ndim == 2 else array)

    array = _array_to_unit(to_hwc(np.asarray(image)), value_range)
    if mode == "L" and array.shape[-1] == 3:
        # ITU-R 601-2 luma, the weights PIL's convert("L") uses
        array = (array @ np.array([0.299, 0.587, 0.114]))[..., None]
    elif mode == "RGB" and array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if image_size is not None:
        top, left, bottom, right = _center_crop_box(*array.shape[:2])
        array = array[top:bottom, left:right]
        if array.shape[:2] != (image_size, image_size):
            channels = [
                np.asarray(
                    Image.fromarray(np.ascontiguousarray(array[..., c], dtype=np.float32)).resize(
                        (image_size, image_size), resample=resample
                    )
                )
                for c in range(array.shape[-1])
            ]
            # bicubic/lanczos overshoot; the original's uint8 path clamps implicitly, so clamp here
            array = np.clip(np.stack(channels, axis=-1), -1.0, 1.0)
    if flip:
        array = array[:, ::-1]
    return np.ascontiguousarray(array, dtype=np.float32)
