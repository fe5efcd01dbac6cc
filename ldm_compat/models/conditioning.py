"""The original ``DiffusionWrapper`` conditioning routing, as two small functions.

``conditioning_key`` (the original's ``model.params.conditioning_key``) decides how the conditioning reaches the UNet
(CompVis ``ldm/models/diffusion/ddpm.py:DiffusionWrapper``, Stability-AI adds the ``*-adm`` keys):

================  ===============================================================================
key               UNet call
================  ===============================================================================
``None``          ``unet(x, t)``
``concat``        ``unet(cat([x] + c_concat, 1), t)``
``crossattn``     ``unet(x, t, context=cat(c_crossattn, 1))`` (token axis)
``hybrid``        ``unet(cat([x] + c_concat, 1), t, context=cat(c_crossattn, 1))``
``adm``           ``unet(x, t, y=c_crossattn[0])`` (class labels travel in ``c_crossattn``)
``crossattn-adm`` ``unet(x, t, context=cat(c_crossattn, 1), y=c_adm)``
``hybrid-adm``    ``unet(cat([x] + c_concat, 1), t, context=cat(c_crossattn, 1), y=c_adm)``
================  ===============================================================================

``context`` is passed as ``encoder_hidden_states`` and ``y`` as ``class_labels``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

#: The conditioning keys of the original DiffusionWrapper (CompVis: the first five; Stability-AI: all).
CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm", "crossattn-adm", "hybrid-adm")

_NEEDS_CONCAT = {"concat", "hybrid", "hybrid-adm"}
_NEEDS_CROSSATTN = {"crossattn", "hybrid", "adm", "crossattn-adm", "hybrid-adm"}
_NEEDS_ADM = {"crossattn-adm", "hybrid-adm"}
_COND_NAMES = ("c_concat", "c_crossattn", "c_adm")


def _check_key(conditioning_key) -> None:
    if conditioning_key not in CONDITIONING_KEYS:
        raise ValueError(f"conditioning_key: expected one of {list(CONDITIONING_KEYS)}, got {conditioning_key!r}")


def _as_list(name: str, value) -> list[torch.Tensor]:
    tensors = [value] if isinstance(value, torch.Tensor) else list(value)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError(f"{name}: expected a tensor or a non-empty list of tensors, got {value!r}")
    return tensors


def wrap_conditioning(cond: Any, conditioning_key: str | None) -> dict[str, Any]:
    """``cond`` in the original's dict form, as ``LatentDiffusion.apply_model`` wraps it.

    A dict is taken as is (keys ``c_concat``, ``c_crossattn``, ``c_adm``); a tensor or a list of tensors becomes
    ``{'c_concat': [...]}`` for ``concat`` and ``{'c_crossattn': [...]}`` for every other key; ``None`` gives ``{}``.
    """
    if cond is None:
        return {}
    if isinstance(cond, Mapping):
        unknown = sorted(set(cond) - set(_COND_NAMES))
        if unknown:
            raise ValueError(f"cond: unknown keys {unknown}; expected some of {list(_COND_NAMES)}")
        return dict(cond)
    name = "c_concat" if conditioning_key == "concat" else "c_crossattn"
    return {name: _as_list(name, cond)}


def original_cond(
    conditioning_key: str | None,
    *,
    encoder_hidden_states: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    concat: torch.Tensor | None = None,
) -> dict[str, Any] | None:
    """diffusers-style conditioning (``encoder_hidden_states``, ``class_labels``, ``concat``) → the original's dict.

    ``concat`` becomes ``c_concat``, the context ``c_crossattn``; class labels travel in ``c_crossattn`` for ``adm``
    (as the original ``DiffusionWrapper`` reads them) and in ``c_adm`` for the ``*-adm`` keys. ``None`` for an
    unconditional model.
    """
    _check_key(conditioning_key)
    if conditioning_key is None:
        return None
    cond: dict[str, Any] = {}
    if concat is not None:
        cond["c_concat"] = [concat]
    if conditioning_key == "adm":
        if class_labels is not None:
            cond["c_crossattn"] = [class_labels]
    else:
        if encoder_hidden_states is not None:
            cond["c_crossattn"] = [encoder_hidden_states]
        if class_labels is not None:
            cond["c_adm"] = class_labels
    return cond


def validate_conditioning(
    conditioning_key: str | None,
    cond: Any = None,
    *,
    batch_size: int | None = None,
    unet: Any = None,
) -> dict[str, Any]:
    """Check that ``cond`` carries what ``conditioning_key`` needs; return it in dict form (lists normalised).

    ``cond`` is a tensor, a list of tensors, or a dict with the original keys (see ``wrap_conditioning``). With
    ``batch_size`` every conditioning tensor must have that many rows. With ``unet`` (an ``LDMUNetModel``) the key
    must suit the model: cross-attention keys need ``use_spatial_transformer``, ``adm`` keys need ``num_classes``,
    and a class-conditional model needs an ``adm`` key. Raises a one-line ``ValueError`` naming what is missing.
    """
    _check_key(conditioning_key)
    c = wrap_conditioning(cond, conditioning_key)
    for name in ("c_concat", "c_crossattn"):
        if c.get(name) is not None:
            c[name] = _as_list(name, c[name])
    if conditioning_key in _NEEDS_CONCAT and not c.get("c_concat"):
        raise ValueError(f"cond: conditioning_key={conditioning_key!r} needs 'c_concat' (tensors concatenated to x)")
    if conditioning_key in _NEEDS_CROSSATTN and not c.get("c_crossattn"):
        what = "class labels y" if conditioning_key == "adm" else "the cross-attention context"
        raise ValueError(f"cond: conditioning_key={conditioning_key!r} needs 'c_crossattn' ({what})")
    if conditioning_key in _NEEDS_ADM and c.get("c_adm") is None:
        raise ValueError(f"cond: conditioning_key={conditioning_key!r} needs 'c_adm' (the class/ADM vector y)")
    if c.get("c_adm") is not None and not isinstance(c["c_adm"], torch.Tensor):
        raise ValueError(f"c_adm: expected a tensor, got {type(c['c_adm']).__name__}")

    if batch_size is not None:
        tensors = [*c.get("c_concat", []), *c.get("c_crossattn", [])]
        if c.get("c_adm") is not None:
            tensors.append(c["c_adm"])
        for tensor in tensors:
            if tensor.shape[0] != batch_size:
                raise ValueError(f"cond: a conditioning tensor has {tensor.shape[0]} rows for a batch of {batch_size}")

    if unet is not None:
        config = unet.config
        crossattn = conditioning_key in ("crossattn", "hybrid", "crossattn-adm", "hybrid-adm")
        if crossattn and not config.get("use_spatial_transformer", False):
            raise ValueError(
                f"conditioning_key={conditioning_key!r} needs a UNet with use_spatial_transformer=True "
                "(without it the context would be ignored)"
            )
        adm = conditioning_key in ("adm", "crossattn-adm", "hybrid-adm")
        if adm != (config.get("num_classes") is not None):
            raise ValueError(
                f"conditioning_key={conditioning_key!r} does not fit a UNet with num_classes="
                f"{config.get('num_classes')!r} (class labels go in iff the model is class-conditional)"
            )
    return c


def _concat(x: torch.Tensor, c: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x, *c], dim=1)


def _context(c: Sequence[torch.Tensor], sequential: bool):
    # sequential_crossattn (Stability-AI): one context per transformer block instead of one concatenated tensor
    return list(c) if sequential else torch.cat(list(c), dim=1)


def apply_model(
    unet,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Any = None,
    conditioning_key: str | None = None,
    *,
    sequential_crossattn: bool = False,
) -> torch.Tensor:
    """Run ``unet`` on ``(x, t)`` with ``cond`` routed as the original ``DiffusionWrapper`` (see module docstring).

    ``cond`` is a tensor or list (wrapped as the original ``LatentDiffusion.apply_model``: ``c_concat`` for
    ``concat``, else ``c_crossattn``) or a dict with the original keys. ``sequential_crossattn`` (Stability-AI's
    ``unet_config`` flag) passes the ``crossattn`` context list unconcatenated. Returns the UNet output tensor.
    Works with any diffusers-style UNet; only the needed keyword arguments are passed.
    """
    c = validate_conditioning(conditioning_key, cond)
    kwargs: dict[str, Any] = {}
    if conditioning_key in _NEEDS_CONCAT:
        x = _concat(x, c["c_concat"])
    if conditioning_key in ("crossattn", "hybrid", "crossattn-adm", "hybrid-adm"):
        sequential = sequential_crossattn and conditioning_key == "crossattn"
        kwargs["encoder_hidden_states"] = _context(c["c_crossattn"], sequential)
    if conditioning_key == "adm":
        kwargs["class_labels"] = c["c_crossattn"][0]
    elif conditioning_key in _NEEDS_ADM:
        kwargs["class_labels"] = c["c_adm"]
    out = unet(x, t, **kwargs)
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, tuple):
        return out[0]
    return out
