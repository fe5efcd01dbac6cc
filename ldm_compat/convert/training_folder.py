"""The pipeline folder at the end of training: the same format (and code path) as a converted checkpoint.

Training holds the pieces of the original ``DDPM`` as separate objects (UNet, ``LitEmaModel``, ``DDPMObjective``,
scheduler); they are assembled into the original state-dict layout first, so the folder, its export and its
conversion behave exactly like those of a checkpoint written by the original code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm_compat.config import to_plain
from ldm_compat.convert.layout import OriginalStateDict
from ldm_compat.convert.to_diffusers import write_folder


def original_state_dict(unet, scheduler, objective=None, ema=None, extras=None) -> dict[str, torch.Tensor]:
    """What the original ``DDPM.state_dict()`` would hold for these components (in its key order).

    ``extras``: further original keys a ``LatentDiffusion`` holds (``scale_factor``, ``first_stage_model.*``,
    ``cond_stage_model.*``), put where the original writes them."""
    parts = OriginalStateDict(
        unet={k: v.detach().cpu() for k, v in unet.state_dict().items()},
        schedule=scheduler.ldm_buffers(),
    )
    if objective is not None and objective.config.learn_logvar:
        parts.logvar = objective.logvar.detach().cpu().clone()
    if ema is not None:
        prefix = "model_ema."
        parts.ema = {k[len(prefix) :]: v.detach().cpu() for k, v in ema.to_original_state_dict(unet).items()}
    if extras:
        more = OriginalStateDict.split(extras)
        parts.scale_factor, parts.first_stage, parts.cond_stage = more.scale_factor, more.first_stage, more.cond_stage
        parts.other = more.other
    return parts.join()


def write_training_folder(
    output_dir: str | os.PathLike,
    *,
    unet,
    scheduler,
    config,
    objective=None,
    ema=None,
    global_step: int = 0,
    epoch: int = 0,
    overwrite: bool = False,
    extras=None,
    search_dirs=(),
) -> Path:
    """Write the folder for a trained model: ``unet/`` holds the EMA weights when there is an EMA; ``extras`` as in
    ``original_state_dict``; ``search_dirs``: where a cond stage finds its local files (tokenizers)."""
    state_dict = original_state_dict(unet, scheduler, objective, ema, extras)
    text = OmegaConf.to_yaml(OmegaConf.create(to_plain(config)))
    return write_folder(
        state_dict, to_plain(config), output_dir, entries={"global_step": global_step, "epoch": epoch},
        config_text=text, overwrite=overwrite, source="training", search_dirs=list(search_dirs),
    )  # fmt: skip
