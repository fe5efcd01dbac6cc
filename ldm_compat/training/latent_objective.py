"""What the original ``LatentDiffusion`` adds to ``DDPM`` on the loss side, as small pure pieces.

- ``LatentDiffusionObjective``: ``LatentDiffusion.p_losses`` — the simple loss always weighted by the per-timestep
  log-variance (``loss_simple / exp(logvar_t) + logvar_t``, learned or not), and the ``loss_dict`` keys exactly as the
  original logs them: ``{p}/loss_simple``, with ``learn_logvar`` ``{p}/loss_gamma`` and ``logvar`` (no prefix),
  ``{p}/loss_vlb``, ``{p}/loss`` (``p`` = ``train`` | ``val``).
- ``settle_conditioning_key``: ``conditioning_key`` as ``LatentDiffusion.__init__`` settles it (``concat_mode``,
  ``__is_unconditional__``).
- ``conditioning_source``: what ``LatentDiffusion.get_input`` hands the cond stage (``xc``) for a ``cond_stage_key``.
- ``make_cond_ids``: the ``num_timesteps_cond`` schedule (``shorten_cond_schedule``).
- ``std_scale_factor``: the ``scale_by_std`` value, ``1 / z.flatten().std()``.

CompVis ``ldm/models/diffusion/ddpm.py`` and the Stability-AI fork agree on all of this; the fork adds the ``v``
target, the ``txt``/``cls`` keys and ``force_null_conditioning`` (both are accepted).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ldm_compat.config import ConfigError, model_params
from ldm_compat.training.objective import DDPMObjective

UNCONDITIONAL = "__is_unconditional__"
FIRST_STAGE = "__is_first_stage__"
# cond_stage_key values whose batch entries reach the cond stage as they are (lists of strings, boxes)
RAW_COND_KEYS = ("caption", "coordinates_bbox", "txt")
# cond_stage_key values for which the cond stage gets the whole batch dict (ClassEmbedder reads its own key)
BATCH_COND_KEYS = ("class_label", "cls")


def settle_conditioning_key(params: Mapping) -> str | None:
    """``LatentDiffusion.__init__``: no ``conditioning_key`` means ``concat`` if ``concat_mode`` (default True) else
    ``crossattn``; an ``__is_unconditional__`` cond stage means ``None`` (unless SD2's ``force_null_conditioning``)."""
    key = params.get("conditioning_key")
    if key is None:
        key = "concat" if params.get("concat_mode", True) else "crossattn"
    if params.get("cond_stage_config") == UNCONDITIONAL and not params.get("force_null_conditioning"):
        key = None
    return key


def conditioning_source(batch: Mapping[str, Any], cond_stage_key: str, first_stage_key: str, x=None, device=None):
    """``xc`` of ``LatentDiffusion.get_input``: the image ``x`` itself when the keys agree, the raw entry for text
    keys, the whole batch for class keys, else ``batch[cond_stage_key]`` read like an image (b h w c → b c h w) on
    ``device``."""
    from ldm_compat.training.batch import get_input

    if cond_stage_key == first_stage_key:
        return x
    if cond_stage_key in RAW_COND_KEYS:
        if cond_stage_key not in batch:
            raise ValueError(f"cond_stage_key={cond_stage_key!r}: the batch has no such key ({', '.join(batch)})")
        return batch[cond_stage_key]
    if cond_stage_key in BATCH_COND_KEYS:
        return batch
    if cond_stage_key not in batch:
        raise ValueError(f"cond_stage_key={cond_stage_key!r}: the batch has no such key ({', '.join(batch)})")
    value = batch[cond_stage_key]
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        # the original would fail here (DDPM.get_input on strings); name the fix instead
        raise ValueError(
            f"cond_stage_key={cond_stage_key!r} holds text: the original passes text only for the keys "
            f"{', '.join(RAW_COND_KEYS)}; rename the batch key"
        )
    return get_input(batch, cond_stage_key).to(device)


def make_cond_ids(num_timesteps: int, num_timesteps_cond: int) -> torch.Tensor:
    """``LatentDiffusion.make_cond_schedule``: ``T - 1`` everywhere, then ``round(linspace(0, T-1, n))`` first."""
    cond_ids = torch.full((num_timesteps,), num_timesteps - 1, dtype=torch.long)
    cond_ids[:num_timesteps_cond] = torch.round(torch.linspace(0, num_timesteps - 1, num_timesteps_cond)).long()
    return cond_ids


@torch.no_grad()
def std_scale_factor(z: torch.Tensor) -> torch.Tensor:
    """``scale_by_std``: ``1. / z.flatten().std()`` (unbiased std, in ``z``'s dtype), as ``on_train_batch_start``."""
    return 1.0 / z.detach().flatten().std()


class LatentDiffusionObjective(DDPMObjective):
    """``LatentDiffusion.p_losses``: ``DDPMObjective`` with the logvar weighting on by default and the original's keys.

    The weighting is ``LatentDiffusion``'s whether ``logvar`` is learned or not (with a constant ``logvar`` of 0 it
    changes nothing); ``logvar_weighting=False`` turns it off (the pixel ``DDPM`` loss, a deviation). Arguments as
    ``DDPMObjective``; ``from_ldm_config`` settles ``conditioning_key`` like the original.
    """

    @classmethod
    def from_ldm_config(cls, params: Mapping, ldm_bug_compat: bool = False, **overrides) -> LatentDiffusionObjective:
        params = model_params(params)
        params = {**params, "conditioning_key": settle_conditioning_key(params)}
        if overrides.get("logvar_weighting") is None:
            overrides["logvar_weighting"] = True
        return super().from_ldm_config(params, ldm_bug_compat=ldm_bug_compat, **overrides)

    def p_losses(self, unet, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None, cond=None):
        """``(loss, loss_dict)`` as ``LatentDiffusion.p_losses(x_start, cond, t, noise)`` (arguments in
        ``DDPMObjective``'s order); ``cond`` is a tensor, a list or the original's ``c_concat``/``c_crossattn`` dict."""
        loss, logs = super().p_losses(unet, x_start, t, noise=noise, cond=cond)
        prefix = "train" if self.training else "val"
        # the original logs the mean logvar under the bare key "logvar"
        return loss, {("logvar" if k == f"{prefix}/logvar" else k): v for k, v in logs.items()}


# expected types of LatentDiffusion's own options (None always means "the original default")
_TYPES: dict[str, tuple[type, ...]] = {
    "first_stage_config": (dict,), "cond_stage_config": (dict, str), "cond_stage_key": (str,),
    "cond_stage_trainable": (bool,), "concat_mode": (bool,), "cond_stage_forward": (str,),
    "scale_factor": (int, float), "scale_by_std": (bool,), "num_timesteps_cond": (int,),
    "force_null_conditioning": (bool,),
}  # fmt: skip


def check_latent_params(params: Mapping, source: str = "config") -> None:
    """One-line errors for ``LatentDiffusion`` options the original would reject or that cannot train here."""
    for key in ("first_stage_config", "cond_stage_config"):
        if params.get(key) is None:
            raise ConfigError(f"{source}: model.params.{key} is required for LatentDiffusion")
    for key, types in _TYPES.items():
        value = params.get(key)
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise ConfigError(
                f"{source}: model.params.{key}={value!r} ({type(value).__name__}): "
                f"expected {'/'.join(t.__name__ for t in types)}"
            )
    cond = params.get("cond_stage_config")
    if params.get("cond_stage_trainable") and cond in (UNCONDITIONAL, FIRST_STAGE):
        # the original asserts this in instantiate_cond_stage
        raise ConfigError(f"{source}: model.params.cond_stage_trainable cannot be true with cond_stage_config {cond}")
    if params.get("force_null_conditioning") and settle_conditioning_key(params) is not None:
        # LatentDiffusion.get_input then gives c = None and forward() asserts c is not None
        raise ConfigError(
            f"{source}: model.params.force_null_conditioning with conditioning_key "
            f"{settle_conditioning_key(params)!r}: the original LatentDiffusion cannot train this (forward asserts a "
            "conditioning); it is for subclasses that bring their own"
        )
    n_cond, timesteps = params.get("num_timesteps_cond") or 1, params.get("timesteps", 1000)
    if not isinstance(n_cond, int) or not 1 <= n_cond <= timesteps:
        raise ConfigError(
            f"{source}: model.params.num_timesteps_cond={n_cond!r}: expected an integer in [1, timesteps]"
        )
    if params.get("scale_by_std") and float(params.get("scale_factor", 1.0)) != 1.0 and not params.get("ckpt_path"):
        # on_train_batch_start asserts scale_factor == 1 before computing it
        raise ConfigError(
            f"{source}: model.params.scale_by_std with scale_factor={params['scale_factor']}: the original requires "
            "scale_factor 1.0 when it computes the std rescaling"
        )


__all__ = [
    "BATCH_COND_KEYS",
    "FIRST_STAGE",
    "RAW_COND_KEYS",
    "UNCONDITIONAL",
    "LatentDiffusionObjective",
    "check_latent_params",
    "conditioning_source",
    "make_cond_ids",
    "settle_conditioning_key",
    "std_scale_factor",
]
