"""``LDMDDIMScheduler``: the original latent-diffusion ``DDIMSampler`` (``ldm/models/diffusion/ddim.py``) as a
diffusers scheduler. Build it with ``LDMDDIMScheduler.from_config(ldm_ddpm_scheduler.config)``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .common import LDMScheduleMixin, as_timestep_tensor, check_thresholding, compute_dtype, threshold_sample
from .ldm_config import ldm_params_to_config
from .schedule import (
    DDIM_DISCRETIZATIONS,
    DIFFUSERS_SPACINGS,
    ddim_intermediate_steps,
    diffusers_spaced_timesteps,
    make_ddim_timesteps,
)

__all__ = ["LDMDDIMScheduler", "DDIMSchedulerOutput", "stock_ddim_overrides", "SchedulerMixin", "ConfigMixin"]


def stock_ddim_overrides() -> dict[str, Any]:
    """Keyword overrides that make a stock ``diffusers.DDIMScheduler`` use the original DDIM grid:
    ``DDIMScheduler.from_config(config, **stock_ddim_overrides())``.

    Exact only when ``T % steps == 0``: otherwise the original runs ``ceil(T / (T // steps))`` steps and diffusers
    ``steps``. The stock class also lacks the x0 handling and float64 sigmas of ``LDMDDIMScheduler``.
    """
    return {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}


class LDMDDIMScheduler(LDMScheduleMixin, SchedulerMixin, ConfigMixin):
    """The original ``DDIMSampler``: DDIM steps on the original schedule, bit-equal to it on the same CPU.

    ``set_timesteps(S)`` gives the original grid (uniform: ``range(0, T, T // S) + 1``, so ``T % S != 0`` runs more
    than ``S`` steps, each going back ``T // S``); the last step goes to ``alphas_cumprod[0]``, not to 1. No clipping
    (the original has none). ``step(..., eta=η)``: ``σ = η·√((1-ᾱ_prev)/(1-ᾱ_t)·(1-ᾱ_t/ᾱ_prev))``, computed in float64
    as the original. ``set_timesteps(None)`` runs every training step (``ddim_use_original_steps=True``).

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, cosine_s, ldm_beta_schedule: the
            schedule, as in ``LDMDDPMScheduler`` (take them from its config).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` (stablediffusion's DDIM converts v to eps) or
            ``"sample"``. For x0 (``"sample"``) models the original sampler treated the output as eps — a bug;
            here x0 models are sampled correctly unless ``ldm_bug_compat=True``.
        ddim_discretize: ``"uniform"`` (what ``DDIMSampler.sample`` uses) or ``"quad"`` — the original
            ``ddim_discretize`` of ``make_schedule``.
        ldm_bug_compat: reproduce the original's treatment of x0 model outputs as eps.
        timestep_spacing: ``"leading"``: the original grid (``ddim_discretize``); ``"linspace"`` / ``"trailing"``:
            diffusers' ``DDIMScheduler`` grids, stepping to ``t - T // S`` as it does (uniform only).
        steps_offset: the original's ``+ 1`` shift of the grid (``"leading"`` only), diffusers' name.
        set_alpha_to_one: the last step goes to ᾱ = 1 instead of the original's ``alphas_cumprod[0]``.
        thresholding, dynamic_thresholding_ratio, sample_max_value: diffusers' dynamic thresholding of x̂0 (the
            noise direction keeps the model's ε, as ``DDIMScheduler``). Not in the original.
        rescale_betas_zero_snr: zero terminal SNR betas, as in ``LDMDDPMScheduler``. Not in the original.
        **kwargs: config keys of compatible schedulers (kept in the config for them). ``clip_sample=True`` from a
            diffusers config is not implemented (the original DDIMSampler never clips) and is named in a warning.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    _ldm_compatible_names = ("LDMDDPMScheduler",)
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 2e-2,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        cosine_s: float = 8e-3,
        ldm_beta_schedule: str | None = None,
        ddim_discretize: str = "uniform",
        ldm_bug_compat: bool = False,
        timestep_spacing: str = "leading",
        steps_offset: int = 1,
        set_alpha_to_one: bool = False,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        rescale_betas_zero_snr: bool = False,
        **kwargs,
    ):
        if ddim_discretize not in DDIM_DISCRETIZATIONS:
            raise ValueError(f"ddim_discretize={ddim_discretize!r}: expected one of {DDIM_DISCRETIZATIONS}")
        if timestep_spacing not in DIFFUSERS_SPACINGS:
            raise ValueError(f"timestep_spacing={timestep_spacing!r}: expected one of {DIFFUSERS_SPACINGS}")
        if timestep_spacing != "leading" and ddim_discretize != "uniform":
            raise ValueError(
                f"timestep_spacing={timestep_spacing!r} with ddim_discretize={ddim_discretize!r}: the 'quad' grid is "
                "the original's own; use timestep_spacing='leading' with it"
            )
        if int(steps_offset) != steps_offset or steps_offset < 0:
            raise ValueError(f"steps_offset={steps_offset}: expected an integer ≥ 0")
        check_thresholding(dynamic_thresholding_ratio, sample_max_value)
        self._init_schedule(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            cosine_s=cosine_s,
            ldm_beta_schedule=ldm_beta_schedule,
            prediction_type=prediction_type,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._step_params = None
        self._step_index = None
        self._finish_init(kwargs)

    def _unimplemented_options(self, values) -> list[str]:
        # diffusers' DDIMScheduler ignores clip_sample when thresholding; the original DDIMSampler never clips
        thresholding = values.get("thresholding", self.config.thresholding)
        if values.get("clip_sample") and not thresholding:
            return ["clip_sample=True (the original DDIMSampler never clips x̂0; thresholding=True is available)"]
        return []

    @classmethod
    def from_ldm_config(cls, params: Mapping, **overrides) -> LDMDDIMScheduler:
        """Build from the original ``model.params`` (schedule keys and ``parameterization``; others ignored)."""
        from ldm_compat.config import model_params

        config = ldm_params_to_config(model_params(params))
        config.update(overrides)
        config.setdefault("_class_name", "LDMDDPMScheduler")  # LDM meanings (clip_sample is clip_denoised)
        return cls.from_config(config)

    # ------------------------------------------------------------------ timesteps
    def _grid(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """Ascending grid timesteps and the float64 ᾱ each step goes to."""
        T = self.config.num_train_timesteps
        ac = self._buffers["alphas_cumprod"]
        final = 1.0 if self.config.set_alpha_to_one else float(ac[0])
        if self.config.timestep_spacing == "leading":
            steps = make_ddim_timesteps(
                self.config.ddim_discretize, num_inference_steps, T, steps_offset=self.config.steps_offset
            )
            # the original's alphas_prev: ᾱ[0] first, then the previous grid points — as float64 numbers
            return steps, np.asarray([final] + ac[steps[:-1]].tolist(), dtype=np.float64)
        n = int(num_inference_steps)
        if not 1 <= n <= T:
            raise ValueError(f"num_inference_steps={n}: expected 1 ≤ steps ≤ num_train_timesteps={T}")
        steps = diffusers_spaced_timesteps(self.config.timestep_spacing, n, T)[::-1].copy()
        prev = steps - T // n  # diffusers' DDIMScheduler steps back T // S, whatever the spacing
        a_prev = [float(ac[s]) if s >= 0 else final for s in prev.tolist()]
        return steps, np.asarray(a_prev, dtype=np.float64)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """The original ``make_schedule``: ``num_inference_steps`` is ``DDIMSampler.sample``'s ``S``; ``None`` means
        every training step ``T-1, …, 0`` with ``ᾱ_prev`` ending at 1 (``ddim_use_original_steps=True``).
        ``timestep_spacing``, ``steps_offset`` and ``set_alpha_to_one`` apply to ``S`` steps."""
        T = self.config.num_train_timesteps
        ac = self._buffers["alphas_cumprod"]
        if num_inference_steps is None:
            steps = np.arange(T - 1, -1, -1, dtype=np.int64)
            a_t = ac[steps]
            a_prev = self._buffers["alphas_cumprod_prev"][steps]
            sqrt_one_minus = self._buffers["sqrt_one_minus_alphas_cumprod"][steps]
            # ddim_sigmas_for_original_num_steps: float32 torch arithmetic on the whole float32 buffers (torch's
            # vectorised float32 sqrt is not always correctly rounded, so it must see the same tensor as originally)
            acp = self._buffers["alphas_cumprod_prev"]
            sigma_unit = torch.sqrt((1 - acp) / (1 - ac) * (1 - ac / acp))[steps]
        else:
            steps, a_prev64 = self._grid(num_inference_steps)
            a_t = ac[steps]
            a_t64 = a_t.double().numpy()
            # as the original's mixed numpy/torch expression `(1 - ᾱ_prev) / (1 - ᾱ_t)`: a float64 array divided by a
            # float32 tensor runs Tensor.__rtruediv__, i.e. a float32 reciprocal (torch's, on the same vector)
            # times the float64 array; the rest is float64, the sqrt numpy's
            reciprocal = (1 - a_t).reciprocal().double().numpy()
            sigma_unit = torch.from_numpy(np.sqrt((1 - a_prev64) * reciprocal * (1 - a_t64 / a_prev64)))
            a_prev = torch.from_numpy(a_prev64).float()
            # np.sqrt(1. - ddim_alphas): a correctly rounded float32 sqrt (= float64 sqrt rounded to float32)
            sqrt_one_minus = torch.from_numpy(np.sqrt((1.0 - a_t).double().numpy())).float()
            steps, a_t, a_prev, sqrt_one_minus, sigma_unit = (
                steps[::-1].copy(),
                a_t.flip(0),
                a_prev.flip(0),
                sqrt_one_minus.flip(0),
                sigma_unit.flip(0),
            )
        self.num_inference_steps = len(steps)
        self.timesteps = torch.from_numpy(steps).to(device)
        # per sampling position i: ᾱ_t, ᾱ_prev, √(1-ᾱ_t) (float32) and σ/η (float64 for the grid, as the original)
        self._step_params = {"a_t": a_t, "a_prev": a_prev, "sqrt_one_minus_at": sqrt_one_minus, "sigma": sigma_unit}
        self._step_index = None

    def intermediate_steps(self, log_every_t: int = 100) -> list[int]:
        """Loop positions after which the original ``DDIMSampler`` logs ``x_inter``/``pred_x0`` (its
        ``log_every_t``, default 100); both lists start with ``x_T``."""
        if self._step_params is None:
            raise ValueError("intermediate_steps: call set_timesteps first")
        return ddim_intermediate_steps(len(self.timesteps), log_every_t)

    def _position(self, t: torch.Tensor) -> int:
        value = int(t[0])
        if bool((t != value).any()):
            raise ValueError("timestep: LDMDDIMScheduler.step takes one timestep for the whole batch")
        i = self._step_index
        if i is not None and i < len(self.timesteps) and int(self.timesteps[i]) == value:
            return i  # the running position disambiguates repeated timesteps (``quad`` grids)
        hits = (self.timesteps.cpu() == value).nonzero()
        if hits.numel() == 0:
            raise ValueError(f"timestep={value}: not among the current sampling timesteps (see set_timesteps)")
        return int(hits[0, 0])

    # ------------------------------------------------------------------ the DDIM step
    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        use_clipped_model_output: bool = False,
    ) -> DDIMSchedulerOutput | tuple:
        """One step of the original ``p_sample_ddim``
        (its float32 operations in its order: bit-equal to it on the same CPU).

        ``eta``, ``temperature`` and ``noise_dropout`` are the original sampler's options. ``variance_noise``
        replaces the drawn noise; without it, noise is drawn with ``generator`` at every step (also when
        ``eta == 0``), consuming random numbers like the original. With ``thresholding``, x̂0 is thresholded;
        ``use_clipped_model_output`` (diffusers' option) then re-derives ε from it.
        """
        if self._step_params is None:
            raise ValueError("step: call set_timesteps first")
        if model_output.shape != sample.shape:
            shapes = f"{tuple(sample.shape)}, got {tuple(model_output.shape)}"
            raise ValueError(f"model_output: expected the sample's shape {shapes}")
        dtype = sample.dtype
        cdtype = compute_dtype(dtype)
        x = sample.to(cdtype)
        out = model_output.to(cdtype)
        t = as_timestep_tensor(timestep, x.shape[0], self.config.num_train_timesteps, x.device)
        i = self._position(t)
        p = self._step_params
        # (batch, 1, …, 1) tensors as the original's torch.full: a 0-d divisor would let torch turn the division
        # into a multiplication by the reciprocal, which rounds differently
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)

        def full(value: torch.Tensor) -> torch.Tensor:
            return value.to(x.device, cdtype).expand(shape).contiguous()

        a_t = full(p["a_t"][i])
        a_prev = full(p["a_prev"][i])
        sqrt_one_minus_at = full(p["sqrt_one_minus_at"][i])
        sigma_t = full(eta * p["sigma"][i])  # float64 product for the grid, float32 otherwise

        kind = self.config.prediction_type
        if kind == "v_prediction":
            e_t = self.predict_eps_from_z_and_v(x, t, out)
            pred_x0 = self.predict_start_from_z_and_v(x, t, out)
        elif kind == "epsilon" or self.config.ldm_bug_compat:
            e_t = out  # with ldm_bug_compat an x0 output is (wrongly) used as eps, as the original
            pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        else:
            pred_x0 = out
            e_t = (x - a_t.sqrt() * pred_x0) / sqrt_one_minus_at
        if self.config.thresholding:
            pred_x0 = threshold_sample(pred_x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
            if use_clipped_model_output:
                e_t = (x - a_t.sqrt() * pred_x0) / sqrt_one_minus_at

        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        if variance_noise is None:
            variance_noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=cdtype)
        elif variance_noise.shape != x.shape:
            raise ValueError(f"variance_noise: expected shape {tuple(x.shape)}, got {tuple(variance_noise.shape)}")
        noise = sigma_t * variance_noise.to(x) * temperature
        if noise_dropout > 0.0:
            noise = F.dropout(noise, p=noise_dropout)
        prev_sample = a_prev.sqrt() * pred_x0 + dir_xt + noise
        self._step_index = i + 1
        prev_sample, pred_x0 = prev_sample.to(dtype), pred_x0.to(dtype)
        if not return_dict:
            return (prev_sample, pred_x0)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_x0)
