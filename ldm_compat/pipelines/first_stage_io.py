"""The pipeline's first stage: ``vae`` / ``vqvae`` (stock ``AutoencoderKL`` / ``VQModel``) with the original
``LatentDiffusion`` semantics (``ldm_compat.models.first_stage.FirstStage``).

Decoding is ``decode_first_stage``: ``decode(1 / scale_factor * z)`` with ``scale_factor`` = the model config's
``scaling_factor``; a ``VQModelInterface`` first stage re-quantizes ``z`` first (taming's ``VectorQuantizer2``
distance). Encoding (the masked image of an inpainting model, an ``__is_first_stage__`` cond stage) is
``get_first_stage_encoding(encode_first_stage(x))``: a KL posterior sample drawn as the original (one
``torch.randn`` of the mean's shape, from ``generator``), times ``scale_factor``.

Which original first stage a folder holds is the pipeline config ``first_stage_config`` (the original YAML entry,
trimmed to what the semantics need); without it a ``VQModel`` counts as ``VQModelInterface`` (what every LDM
config uses, and what diffusers' ``VQModel`` itself does) and an ``AutoencoderKL`` as the original ``AutoencoderKL``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import PIL.Image
import torch

from ldm_compat.config import to_plain

FIRST_STAGE_COMPONENTS = ("vae", "vqvae")
#: the ``first_stage_config.params`` entries that decide encode/decode (``lossconfig``, ``ckpt_path``, ``monitor``, …
#: only matter for training the autoencoder)
_SEMANTIC_PARAMS = ("embed_dim", "n_embed", "ddconfig", "remap", "sane_index_shape")


def trim_first_stage_config(first_stage_config: Mapping | None) -> dict | None:
    """The part of an original ``first_stage_config`` the pipeline keeps in its config."""
    if first_stage_config is None:
        return None
    config = to_plain(first_stage_config)
    if not isinstance(config, Mapping) or "target" not in config:
        raise ValueError(f"first_stage_config: expected the original {{target, params}} mapping, got {config!r}")
    params = dict(config.get("params") or {})
    return {"target": config["target"], "params": {k: params[k] for k in _SEMANTIC_PARAMS if k in params}}


def first_stage_component(components: Mapping) -> tuple[str, object] | tuple[None, None]:
    """``(name, model)`` of the pipeline's first stage, or ``(None, None)`` for a pixel-space model."""
    present = [(name, components.get(name)) for name in FIRST_STAGE_COMPONENTS if components.get(name) is not None]
    if len(present) > 1:
        raise ValueError("vae, vqvae: a pipeline has one first stage; got both")
    return present[0] if present else (None, None)


def _spec(model, first_stage_config: Mapping | None):
    from ldm_compat.models.first_stage import KL_TARGET, VQ_INTERFACE_TARGET, FirstStageSpec, parse_first_stage_config

    is_vq = hasattr(model, "quantize")
    if first_stage_config is not None:
        config = to_plain(first_stage_config)
        # the pipeline never computes code indices, the only thing remap changes; its buffer lives in ldm_extras
        params = {k: v for k, v in dict(config.get("params") or {}).items() if k != "remap"}
        spec = parse_first_stage_config({"target": config["target"], "params": params}, "first_stage_config")
        if spec.is_vq != is_vq:
            raise ValueError(
                f"first_stage_config.target={spec.target!r} does not fit the pipeline's {type(model).__name__}"
            )
        return spec
    latent = int(model.config.latent_channels)
    embed_dim = int(getattr(model.config, "vq_embed_dim", None) or latent) if is_vq else latent
    n_embed = int(model.config.num_vq_embeddings) if is_vq else None
    return FirstStageSpec(target=VQ_INTERFACE_TARGET if is_vq else KL_TARGET, ddconfig={}, embed_dim=embed_dim,
                          n_embed=n_embed)  # fmt: skip


def original_first_stage(model, first_stage_config: Mapping | None = None, scale_by_std: bool = False):
    """The ``FirstStage`` around ``model``; it installs the original's activation and attention arithmetic in the
    stock model (no weights change, ``ldm_compat.models.first_stage.original_ops``)."""
    from ldm_compat.models.first_stage import FirstStage

    return FirstStage(model, _spec(model, first_stage_config), scale_by_std=bool(scale_by_std))


def _from_pil(images, mode: str) -> torch.Tensor:
    array = np.stack([np.asarray(i.convert(mode), dtype=np.float32) for i in images])
    return torch.from_numpy(array[..., None] if array.ndim == 3 else array).permute(0, 3, 1, 2)


def _pil_list(value) -> list | None:
    if isinstance(value, PIL.Image.Image):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(i, PIL.Image.Image) for i in value):
        return list(value)
    return None


def _as_tensor(value, name: str, channels: int) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor) or value.ndim not in (3, 4) or not value.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a (batch, {channels}, height, width) float tensor or PIL images, "
                         f"got {_describe(value)}")  # fmt: skip
    value = value[None] if value.ndim == 3 else value
    if value.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels, got shape {tuple(value.shape)}")
    return value


def image_tensor(image, name: str = "image", channels: int = 3) -> torch.Tensor:
    """An image as ``(B, C, H, W)`` in the model's [-1, 1]: tensors and arrays as given, PIL images (or a list of
    them) as ``uint8 / 127.5 - 1`` — the original scripts' conversion."""
    pil = _pil_list(image)
    return _from_pil(pil, "RGB") / 127.5 - 1.0 if pil is not None else _as_tensor(image, name, channels)


def mask_tensor(mask) -> torch.Tensor:
    """An inpainting mask as ``(B, 1, H, W)`` in {0, 1} (1 = repaint): PIL as ``uint8 / 255`` (grayscale), tensors
    in [0, 1]; then binarized at 0.5, as the original ``make_batch_sd`` (and diffusers' mask processor)."""
    pil = _pil_list(mask)
    mask = _from_pil(pil, "L") / 255.0 if pil is not None else _as_tensor(mask, "mask_image", 1)
    return (mask >= 0.5).to(mask.dtype)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
