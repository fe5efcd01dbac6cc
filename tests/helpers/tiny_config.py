"""The tiny original-style training config the reliability tests run (CPU-fast: 8×8 digits, T=10, 0.65 M params)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

TINY = {
    "model": {
        "base_learning_rate": 1.0e-4,
        "target": "ldm.models.diffusion.ddpm.DDPM",
        "params": {
            "timesteps": 10, "beta_schedule": "linear", "image_size": 8, "channels": 1, "log_every_t": 5,
            "learn_logvar": True,
            "unet_config": {
                "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                "params": {"image_size": 8, "in_channels": 1, "out_channels": 1, "model_channels": 32,
                           "num_res_blocks": 1, "attention_resolutions": [], "channel_mult": [1, 2], "num_heads": 1},
            },
        },
    },
    "data": {"target": "main.DataModuleFromConfig", "params": {"batch_size": 4}},
    "lightning": {"trainer": {"max_steps": 4}, "callbacks": {"image_logger": {"params": {"batch_frequency": 0}}}},
    # a trained logvar, so that checkpoints and resumes carry a changing one (the original DDPM never trains it)
    "ldm_compat": {"objective": {"logvar_weighting": True}},
}  # fmt: skip


def tiny_config(**changes) -> dict:
    """A copy of ``TINY``; ``changes`` are dotted keys, e.g. ``tiny_config(**{"data.params.batch_size": 2})``."""
    config = copy.deepcopy(TINY)
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config


def write_config(path: Path, config: dict | None = None) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(config if config is not None else TINY))
    return path
