"""From a collated batch to the model's inputs, as the original ``DDPM.get_input`` and ``DiffusionWrapper``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["get_conditioning", "get_input"]


def get_input(batch: Mapping[str, Any], key: str, *, channels: int | None = None) -> torch.Tensor:
    """``batch[key]`` → ``b c h w`` float32, as the original ``DDPM.get_input``.

    The original takes channels-last ``b h w c`` (a 3-D ``b h w`` gets a channel at the end) and only applies
    ``.float()``: values are not rescaled, so data must already be in [-1, 1]. ``b c h w`` is accepted when it is
    unambiguous: ``channels`` matches dim 1 and not dim 3, or, without ``channels``, dim 1 ≤ 4 < dim 3. Otherwise the
    original's channels-last reading applies.
    """
    if key not in batch:
        raise ValueError(f"batch has no key {key!r} (first_stage_key); keys: {', '.join(map(str, batch))}")
    x = batch[key]
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"batch[{key!r}] has shape {tuple(x.shape)}: expected b h w c (or b h w, b c h w)")
    if channels is not None:
        channels_first = x.shape[1] == channels and x.shape[3] != channels
    else:
        channels_first = x.shape[1] <= 4 < x.shape[3]
    if not channels_first:
        x = x.permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.contiguous_format).float()


def get_conditioning(batch: Mapping[str, Any], conditioning_key: str | None, params: Mapping | None = None):
    """The conditioning a ``conditioning_key`` needs, from the batch, with the pipeline's (diffusers) names.

    Returns ``None`` for an unconditional model (the original pixel-space ``DDPM`` never used conditioning), else a
    dict with ``class_labels`` (``adm`` keys; from ``class_label``), ``encoder_hidden_states`` (``crossattn`` and
    ``hybrid``; a precomputed context tensor from ``context``) and ``concat`` (``concat`` and ``hybrid``; from
    ``concat``, channels-last like images). ``params.cond_stage_key`` renames the context source (or the concat
    source for ``concat``). ``ldm_compat.models.conditioning.original_cond(conditioning_key, **cond)`` turns this
    into the original ``DiffusionWrapper`` dict (``c_concat``/``c_crossattn``/``c_adm``) that ``apply_model`` takes;
    the same names are the pipeline's call arguments.
    """
    if conditioning_key is None:
        return None
    params = params or {}
    key = params.get("cond_stage_key")
    cond: dict[str, torch.Tensor] = {}

    def take(name: str) -> Any:
        if name not in batch:
            raise ValueError(
                f"conditioning_key={conditioning_key!r} needs batch key {name!r}; keys: {', '.join(map(str, batch))}"
            )
        return batch[name]

    if conditioning_key.endswith("adm"):
        cond["class_labels"] = torch.as_tensor(take("class_label")).long()
    if conditioning_key in ("crossattn", "hybrid", "crossattn-adm", "hybrid-adm"):
        context = take(key or "context")
        if isinstance(context, list) and context and isinstance(context[0], str):
            raise ValueError(
                f"batch key {key or 'context'!r} holds text: pixel-space DDPM has no text encoder; "
                "store precomputed context tensors"
            )
        cond["encoder_hidden_states"] = torch.as_tensor(np.asarray(context) if isinstance(context, list) else context)
    if conditioning_key in ("concat", "hybrid", "hybrid-adm"):
        # cond_stage_key names the concat source only when concat is the sole conditioning
        cond["concat"] = get_input(batch, key if key and conditioning_key == "concat" else "concat")
    return cond
