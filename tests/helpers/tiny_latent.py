"""Tiny LatentDiffusion training configs for the tests: ``configs/digits_latent.yaml`` shrunk (T=10, 4 images).

``digits_latent(**changes)`` keeps the shipped config's model (random tiny KL first stage, trainable ClassEmbedder,
cross-attention, ``scale_by_std``, ``ucg_training``) so that the tests run the same path users start from.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DIGITS_LATENT = yaml.safe_load((ROOT / "configs" / "digits_latent.yaml").read_text())
SMALL = {
    "model.params.timesteps": 10, "model.params.log_every_t": 5, "data.params.batch_size": 4,
    "lightning.trainer.max_steps": 4, "lightning.trainer.val_check_interval": None,
    "lightning.callbacks.image_logger.params.batch_frequency": 0,
}  # fmt: skip


def digits_latent(**changes) -> dict:
    """A copy of the shipped digits config made small; ``changes`` are dotted keys (``None`` values are kept)."""
    config = copy.deepcopy(DIGITS_LATENT)
    for dotted, value in {**SMALL, **changes}.items():
        node = config
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config


def write_latent_config(path: Path, **changes) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(digits_latent(**changes)))
    return path
