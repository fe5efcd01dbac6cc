"""Schedulers: the original DDPM schedule and samplers as diffusers ``SchedulerMixin`` classes.

- ``LDMDDPMScheduler``: ``register_schedule`` + ``q_sample`` + ``p_sample`` (ancestral sampling):
  the original's float32 operations in its order (bit-equal to it on the same CPU).
- ``LDMDDIMScheduler``: the original ``DDIMSampler``.
- pure helpers: ``make_beta_schedule``, ``ldm_schedule_buffers``, ``make_ddim_timesteps``,
  ``ldm_intermediate_timesteps``, ``ddim_intermediate_steps``, ``ldm_params_to_config``, ``config_to_ldm_params``,
  ``rescale_zero_terminal_snr``, ``is_zero_terminal_snr``.
"""

from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .ldm_config import (
    DIFFUSERS_OF_LDM_SCHEDULE,
    PARAMETERIZATION_OF_PREDICTION_TYPE,
    PREDICTION_TYPE_OF_PARAMETERIZATION,
    config_to_ldm_params,
    diffusers_can_express,
    ldm_params_to_config,
)
from .schedule import (
    LDM_BETA_SCHEDULES,
    LDM_BUFFER_NAMES,
    ddim_intermediate_steps,
    is_zero_terminal_snr,
    ldm_intermediate_timesteps,
    ldm_schedule_buffers,
    make_beta_schedule,
    make_ddim_timesteps,
    match_buffers,
    rescale_zero_terminal_snr,
)
from .scheduling_ldm_ddim import LDMDDIMScheduler, stock_ddim_overrides
from .scheduling_ldm_ddpm import LDMDDPMScheduler
from .scheduling_ldm_plms import LDMPLMSScheduler

__all__ = [
    "ConfigMixin",
    "DIFFUSERS_OF_LDM_SCHEDULE",
    "LDMDDIMScheduler",
    "LDMDDPMScheduler",
    "LDMPLMSScheduler",
    "LDM_BETA_SCHEDULES",
    "LDM_BUFFER_NAMES",
    "PARAMETERIZATION_OF_PREDICTION_TYPE",
    "PREDICTION_TYPE_OF_PARAMETERIZATION",
    "SchedulerMixin",
    "config_to_ldm_params",
    "ddim_intermediate_steps",
    "diffusers_can_express",
    "is_zero_terminal_snr",
    "ldm_intermediate_timesteps",
    "ldm_params_to_config",
    "ldm_schedule_buffers",
    "make_beta_schedule",
    "make_ddim_timesteps",
    "match_buffers",
    "rescale_zero_terminal_snr",
    "stock_ddim_overrides",
]
