"""The top-level layout of an original latent-diffusion ``DDPM``/``LatentDiffusion`` state dict.

The original module saves, in this order (``_save_to_state_dict`` order, latent-diffusion ``ddpm.py``):
``logvar`` (only when ``learn_logvar``), the 12 schedule buffers, ``scale_factor`` (LatentDiffusion with
``scale_by_std``), ``model.diffusion_model.*`` (the UNet), ``model_ema.*`` (LitEma), ``first_stage_model.*``,
``cond_stage_model.*``. Our UNet's keys are the original UNet keys, so splitting and joining is a prefix operation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ldm_compat.schedulers.schedule import LDM_BUFFER_NAMES

# the 12 persistent buffers of DDPM.register_schedule, in registration order
SCHEDULE_BUFFER_NAMES = LDM_BUFFER_NAMES
UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
WRAPPER_PREFIX = "diffusion_model."  # DiffusionWrapper's child name, kept in LitEma's parameter names
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."


@dataclass
class OriginalStateDict:
    """An original state dict split into its parts; ``join()`` puts it back in the original key order."""

    unet: dict[str, torch.Tensor] = field(default_factory=dict)  # UNet keys, prefix removed
    ema: dict[str, torch.Tensor] = field(default_factory=dict)  # LitEma buffers, ``model_ema.`` removed
    schedule: dict[str, torch.Tensor] = field(default_factory=dict)
    logvar: torch.Tensor | None = None
    scale_factor: torch.Tensor | None = None
    first_stage: dict[str, torch.Tensor] = field(default_factory=dict)  # full keys, prefix kept
    cond_stage: dict[str, torch.Tensor] = field(default_factory=dict)  # full keys, prefix kept
    other: dict[str, torch.Tensor] = field(default_factory=dict)  # anything else, full keys, original order

    @classmethod
    def split(cls, state_dict: Mapping[str, torch.Tensor]) -> OriginalStateDict:
        parts = cls()
        for key, value in state_dict.items():
            if key.startswith(UNET_PREFIX):
                parts.unet[key[len(UNET_PREFIX) :]] = value
            elif key.startswith(EMA_PREFIX):
                parts.ema[key[len(EMA_PREFIX) :]] = value
            elif key in SCHEDULE_BUFFER_NAMES:
                parts.schedule[key] = value
            elif key == "logvar":
                parts.logvar = value
            elif key == "scale_factor":
                parts.scale_factor = value
            elif key.startswith(FIRST_STAGE_PREFIX):
                parts.first_stage[key] = value
            elif key.startswith(COND_STAGE_PREFIX):
                parts.cond_stage[key] = value
            else:
                parts.other[key] = value
        return parts

    def join(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.logvar is not None:
            out["logvar"] = self.logvar
        for name in SCHEDULE_BUFFER_NAMES:
            if name in self.schedule:
                out[name] = self.schedule[name]
        if self.scale_factor is not None:
            out["scale_factor"] = self.scale_factor
        out.update((UNET_PREFIX + k, v) for k, v in self.unet.items())
        out.update((EMA_PREFIX + k, v) for k, v in self.ema.items())
        out.update(self.first_stage)
        out.update(self.cond_stage)
        out.update(self.other)
        return out


def strip_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``load_only_unet`` input → UNet keys: accepts ``model.diffusion_model.*``, ``diffusion_model.*`` or bare keys.

    The original ``load_only_unet`` expected ``diffusion_model.*`` and silently loaded nothing from a normal
    checkpoint (``model.diffusion_model.*``); both spellings work here.
    """
    out = {}
    for key, value in state_dict.items():
        for prefix in (UNET_PREFIX, WRAPPER_PREFIX):
            if key.startswith(prefix):
                out[key[len(prefix) :]] = value
                break
    return out


def ema_buffer_name(param_name: str) -> str:
    """LitEma's buffer name for a UNet parameter: the DiffusionWrapper path with every dot removed."""
    return (WRAPPER_PREFIX + param_name).replace(".", "")


def ema_shadow_map(param_names) -> dict[str, str]:
    """UNet parameter name → LitEma buffer name, built forwards from the names (LitEma names are not invertible)."""
    return {name: ema_buffer_name(name) for name in param_names}
