"""Classifier-free guidance exactly as the original ``DDIMSampler`` / ``PLMSSampler`` do it.

The original runs the unconditional and the conditional branch in one UNet call on the batch ``[uc, c]`` (in that
order: ``torch.cat([unconditional_conditioning, c])``), splits the output with ``chunk(2)`` and combines
``e_u + s·(e_c − e_u)``. With ``s == 1`` or no unconditional conditioning it makes one call on ``c`` alone. Running
the branches as two calls, or in the order ``[c, uc]``, gives the same numbers up to the last float32 bits (the
UNet's kernels may block a batch of ``2b`` differently from one of ``b``); this module keeps the original's batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["combine_guidance", "guidance_batch", "guided_model_output"]


def combine_guidance(model_uncond: torch.Tensor, model_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """``e_u + s·(e_c − e_u)`` in the original's operation order."""
    return model_uncond + guidance_scale * (model_cond - model_uncond)


def _cat_uc_c(uncond: Any, cond: Any, where: str) -> Any:
    # the structure walk of stablediffusion's DDIMSampler (dicts of tensors or lists, lists, tensors); the other
    # samplers take tensors only, for which this is the same torch.cat
    if isinstance(cond, torch.Tensor):
        if not isinstance(uncond, torch.Tensor):
            raise ValueError(f"uncond{where}: expected a tensor like cond{where}, got {type(uncond).__name__}")
        if uncond.shape != cond.shape:
            raise ValueError(f"uncond{where}: shape {tuple(uncond.shape)} differs from cond{where} {tuple(cond.shape)}")
        return torch.cat([uncond, cond])
    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping) or set(uncond) != set(cond):
            keys = sorted(uncond) if isinstance(uncond, Mapping) else type(uncond).__name__
            raise ValueError(f"uncond{where}: expected a dict with the keys {sorted(cond)} of cond, got {keys}")
        return {k: _cat_uc_c(uncond[k], cond[k], f"{where}[{k!r}]") for k in cond}
    if isinstance(cond, (list, tuple)):
        if not isinstance(uncond, (list, tuple)) or len(uncond) != len(cond):
            raise ValueError(f"uncond{where}: expected a list of {len(cond)} entries like cond{where}")
        return [_cat_uc_c(u, c, f"{where}[{i}]") for i, (u, c) in enumerate(zip(uncond, cond))]
    raise ValueError(f"cond{where}: expected a tensor, a list or a dict of them, got {type(cond).__name__}")


def guidance_batch(x: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The original's guided UNet input: ``x`` and ``t`` twice, the conditioning as ``[uncond, cond]``."""
    return torch.cat([x] * 2), torch.cat([t] * 2), _cat_uc_c(uncond, cond, "")


def guided_model_output(
    model: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Any,
    uncond: Any = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """The (guided) model output the original samplers hand to their update.

    ``model(x, t, cond)`` is the UNet behind the original's ``apply_model`` (e.g. ``ldm_compat.models.apply_model``
    with the case's conditioning key); ``t`` has one timestep per sample. ``guidance_scale == 1`` makes one call on
    ``cond``, as the original. A scale other than 1 without ``uncond`` is an error here (the original silently
    sampled without guidance).
    """
    if guidance_scale == 1.0:
        return model(x, t, cond)
    if uncond is None:
        raise ValueError(f"guidance_scale={guidance_scale}: needs an unconditional conditioning (uncond)")
    model_uncond, model_cond = model(*guidance_batch(x, t, cond, uncond)).chunk(2)
    return combine_guidance(model_uncond, model_cond, guidance_scale)
