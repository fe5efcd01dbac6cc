"""The original ``LatentDiffusion`` first stages as stock diffusers ``AutoencoderKL`` / ``VQModel``.

- ``config``: ``first_stage_config`` → ``FirstStageSpec`` → the diffusers config (refusing what it cannot hold)
- ``keys``: ``first_stage_model.*`` ⇄ the diffusers state dict, through the module structure, lossless
- ``numerics``: ``encode_first_stage`` / ``get_first_stage_encoding`` / ``decode_first_stage`` / ``quantize``
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .config import (
    KL_TARGET,
    SUPPORTED_TARGETS,
    VQ_INTERFACE_TARGET,
    VQ_TARGET,
    FirstStageSpec,
    UnsupportedFirstStage,
    build_model,
    diffusers_config,
    parse_first_stage_config,
    resolve_scale_factor,
)
from .keys import key_map, original_order, to_diffusers_state_dict, to_original_state_dict
from .numerics import FirstStage, LDMDiagonalGaussian, QuantizeOutput, sample_posterior

REMAP_BUFFER = "quantize.used"


def load_first_stage(
    first_stage_config: Mapping,
    state: Mapping[str, torch.Tensor],
    *,
    scale_factor: float = 1.0,
    scale_by_std: bool = False,
    source: str = "first_stage_model",
) -> tuple[FirstStage, dict[str, torch.Tensor]]:
    """Build the diffusers model for ``first_stage_config`` and load the original tensors ``state`` (the
    ``first_stage_model.*`` keys, prefix stripped) into it; returns the ``FirstStage`` and the kept tensors."""
    spec = parse_first_stage_config(first_stage_config)
    model = build_model(spec, scale_factor, device="meta")
    weights, kept = to_diffusers_state_dict(state, model, source)
    model.load_state_dict(weights, assign=True, strict=True)
    model.eval().requires_grad_(False)  # as LatentDiffusion.instantiate_first_stage: frozen, in eval mode
    first_stage = FirstStage(model, spec, scale_factor, scale_by_std, remap_used=kept.get(REMAP_BUFFER))
    return first_stage, kept


__all__ = [
    "KL_TARGET",
    "REMAP_BUFFER",
    "SUPPORTED_TARGETS",
    "VQ_INTERFACE_TARGET",
    "VQ_TARGET",
    "FirstStage",
    "FirstStageSpec",
    "LDMDiagonalGaussian",
    "QuantizeOutput",
    "UnsupportedFirstStage",
    "build_model",
    "diffusers_config",
    "key_map",
    "load_first_stage",
    "original_order",
    "parse_first_stage_config",
    "resolve_scale_factor",
    "sample_posterior",
    "to_diffusers_state_dict",
    "to_original_state_dict",
]
