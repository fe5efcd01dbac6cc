"""Building and reloading a LatentDiffusion run's stages, and the random draws its processes share.

- ``build_first_stage`` / ``update_first_stage``: the first stage as the original ``instantiate_first_stage`` gets
  it (random, or its own ``ckpt_path``), and ``load_state_dict(strict=False)`` on its original key layout;
- ``build_cond_stage``: ``ldm_compat.models.cond_stage`` (``__is_unconditional__`` is no cond stage);
- ``read_original_state_dict``: an original checkpoint file or a converted/trained folder;
- ``global_randn`` / ``ProcessDraws``: each process's slice of one draw for the global batch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from ldm_compat.config import ConfigError
from ldm_compat.training.latent_objective import UNCONDITIONAL

logger = logging.getLogger(__name__)


def global_randn(shape, *, num_processes: int = 1, process_index: int = 0, generator=None, device=None, dtype=None):
    """This process's slice of one standard-normal draw for the global batch (``num_processes × shape[0]`` rows):
    every process draws the same, so N processes × b rows see what 1 process × N·b rows sees. With one process this
    is ``torch.randn(shape)``."""
    b = shape[0]
    full = torch.randn((num_processes * b, *shape[1:]), generator=generator, device=device, dtype=dtype)
    return full[process_index * b : (process_index + 1) * b]


class ProcessDraws:
    """The draws of one process of a multi-process run (``global_randn``): ``cpu(shape)`` is the posterior noise
    (the original's ``torch.randn(mean.shape)`` on the CPU), ``like(tensor)`` noise shaped like ``tensor`` on its
    device and in its dtype (the original's ``randn_like``). One process: exactly those calls."""

    def __init__(self, num_processes: int = 1, process_index: int = 0):
        self.num_processes, self.process_index = num_processes, process_index

    def cpu(self, shape) -> torch.Tensor:
        return global_randn(tuple(shape), num_processes=self.num_processes, process_index=self.process_index)

    def like(self, like: torch.Tensor) -> torch.Tensor:
        return global_randn(like.shape, num_processes=self.num_processes, process_index=self.process_index,
                            device=like.device, dtype=like.dtype)  # fmt: skip


def build_first_stage(config: Mapping, scale_factor: float, scale_by_std: bool, source: str):
    """The first stage as the original ``instantiate_first_stage`` gets it: random weights, or its own ``ckpt_path``
    (``AutoencoderKL``/``VQModel`` load ``ckpt_path`` with ``strict=False``, after ``ignore_keys``)."""
    from ldm_compat.models.first_stage import FirstStage, build_model, parse_first_stage_config

    spec = parse_first_stage_config(config, f"{source}: model.params.first_stage_config")
    first_stage = FirstStage(build_model(spec, scale_factor).eval(), spec, scale_factor, scale_by_std)
    own = spec.params.get("ckpt_path")
    if own:
        from ldm_compat.convert.checkpoint_io import load_checkpoint, state_dict_of

        state = state_dict_of(load_checkpoint(own), own)
        ignore = tuple(spec.params.get("ignore_keys") or ())
        state = {k: v for k, v in state.items() if not (ignore and k.startswith(ignore))}
        first_stage, unexpected = update_first_stage(first_stage, config, state)
        logger.info("first stage restored from %s (%d unexpected keys, e.g. the loss)", own, len(unexpected))
    for parameter in first_stage.model.parameters():
        parameter.requires_grad_(False)
    return first_stage


def update_first_stage(first_stage, config: Mapping, tensors: Mapping[str, torch.Tensor]):
    """``load_state_dict(tensors, strict=False)`` on the original first-stage layout: keys it has are replaced, the
    rest is returned as unexpected."""
    from ldm_compat.models.first_stage import load_first_stage, to_original_state_dict

    model = first_stage.model
    current = to_original_state_dict(model.state_dict(), model)
    unexpected = [k for k in tensors if k not in current]
    current.update({k: v for k, v in tensors.items() if k in current})
    rebuilt, _ = load_first_stage(config, current, scale_factor=first_stage.scale_factor,
                                  scale_by_std=first_stage.scale_by_std)  # fmt: skip
    return rebuilt, unexpected


def build_cond_stage(config, state, search_dirs, source: str):
    if config == UNCONDITIONAL:
        return None
    try:
        from ldm_compat.models.cond_stage import build_cond_stage
    except ImportError as err:  # pragma: no cover - only without the cond-stage package
        raise ConfigError(
            f"{source}: model.params.cond_stage_config needs ldm_compat.models.cond_stage ({err})"
        ) from None
    return build_cond_stage(config, state, search_dirs=list(search_dirs))


def read_original_state_dict(path) -> dict[str, torch.Tensor]:
    """The original state dict of an original checkpoint file or of a converted (or trained) folder."""
    from ldm_compat.convert.checkpoint_io import load_checkpoint, state_dict_of

    if Path(path).is_dir():
        from ldm_compat.convert.export import read_original_state_dict as read_folder

        return dict(read_folder(path)[0])
    return state_dict_of(load_checkpoint(path), path)
