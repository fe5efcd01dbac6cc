"""The scheduler side of ``LDMCompatPipeline``'s sampling loop: timesteps and the keyword arguments of ``step``."""

from __future__ import annotations

import inspect

import torch


def set_timesteps(scheduler, num_inference_steps: int | None, device: torch.device) -> None:
    """``scheduler.set_timesteps``: ``None`` is our schedulers' own default (every training step for
    ``LDMDDPMScheduler``: the original ``p_sample_loop``), ``num_train_timesteps`` for diffusers schedulers."""
    params = inspect.signature(scheduler.set_timesteps).parameters
    if num_inference_steps is None and not type(scheduler).__module__.startswith("ldm_compat."):
        num_inference_steps = scheduler.config.num_train_timesteps
    elif num_inference_steps is not None and (
        not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1
    ):
        raise ValueError(f"num_inference_steps: expected a positive int or None, got {num_inference_steps!r}")
    kwargs = {"device": device} if "device" in params else {}
    if num_inference_steps is None:
        scheduler.set_timesteps(**kwargs)
    else:
        scheduler.set_timesteps(num_inference_steps, **kwargs)


def step_kwargs(scheduler, eta: float, generator, variance_noise) -> dict:
    """``eta`` and ``generator`` for a ``step`` that takes them; a nonzero ``eta`` or ``variance_noise`` a scheduler
    cannot take is an error."""
    params = inspect.signature(scheduler.step).parameters
    name = type(scheduler).__name__
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    elif eta:
        raise ValueError(f"eta: {name}.step takes no eta (use a DDIM scheduler for eta={eta})")
    if "generator" in params:
        kwargs["generator"] = generator
    if variance_noise is not None and "variance_noise" not in params:
        raise ValueError(f"variance_noise: {name}.step takes no variance_noise")
    return kwargs
