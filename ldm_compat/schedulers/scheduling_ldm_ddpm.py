"""``LDMDDPMScheduler``: the original latent-diffusion ``DDPM`` schedule and ancestral sampler as a diffusers
scheduler (``register_schedule``, ``q_sample``, ``p_mean_variance``/``p_sample``, the v helpers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .common import LDMScheduleMixin, check_thresholding, extract, threshold_sample
from .ldm_config import config_to_ldm_params, ldm_params_to_config
from .schedule import (
    DIFFUSERS_SPACINGS,
    LDM_BUFFER_NAMES,
    POSTERIOR_LOG_VARIANCE_FLOOR,
    diffusers_spaced_timesteps,
    is_zero_terminal_snr,
    ldm_intermediate_timesteps,
    match_buffers,
)

__all__ = ["LDMDDPMScheduler", "DDPMSchedulerOutput", "SchedulerMixin", "ConfigMixin", "resolve_variance_type"]

TIMESTEP_SPACINGS = DIFFUSERS_SPACINGS
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")
_REFUSED_VARIANCE_TYPES = {
    "fixed_large_log": "diffusers' DDPMScheduler.step takes the square root of log β for it, which is NaN",
    "learned": "it needs a UNet that predicts its variance; the original DDPM has fixed variances",
    "learned_range": "it needs a UNet that predicts its variance; the original DDPM has fixed variances",
}


def resolve_variance_type(variance_type: str | None, v_posterior: float) -> tuple[str | None, float]:
    """``(variance_type, v_posterior)`` as the config keeps them: the original's ``v_posterior`` weight of the
    posterior variance ``(1-v)·β̃ + v·β`` is 0 for ``fixed_small``/``fixed_small_log`` and 1 for ``fixed_large``.

    ``variance_type=None`` derives the name from ``v_posterior`` (``None`` for 0 < v < 1, which diffusers cannot
    name); ``fixed_large`` sets ``v_posterior`` to 1; a contradicting pair raises ``ValueError``.
    """
    v = float(v_posterior)
    if variance_type is None:
        return {0.0: "fixed_small_log", 1.0: "fixed_large"}.get(v), v
    if variance_type in _REFUSED_VARIANCE_TYPES:
        raise ValueError(f"variance_type={variance_type!r} is not supported: {_REFUSED_VARIANCE_TYPES[variance_type]}")
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type={variance_type!r}: expected one of {VARIANCE_TYPES} or None")
    wanted = 1.0 if variance_type == "fixed_large" else 0.0
    if v not in (0.0, wanted):
        raise ValueError(
            f"variance_type={variance_type!r} contradicts v_posterior={v} (the original's v_posterior is 0 for "
            "fixed_small/fixed_small_log and 1 for fixed_large); pass one of them"
        )
    return variance_type, wanted


class LDMDDPMScheduler(LDMScheduleMixin, SchedulerMixin, ConfigMixin):
    """The original ``DDPM`` noise schedule and ancestral sampler (``p_sample``), bit-equal to it on the same CPU.

    Config keys use diffusers names where the meaning is the same, so stock schedulers (``DDPMScheduler``,
    ``DDIMScheduler``, ``DPMSolverMultistepScheduler``, …) can be built with ``from_config(scheduler.config)``;
    the LDM-only keys keep the original names. Build it from an original config with ``from_ldm_config``.

    Args:
        num_train_timesteps: the original ``timesteps``.
        beta_start, beta_end: the original ``linear_start``, ``linear_end``.
        beta_schedule: diffusers meaning: ``"scaled_linear"`` (LDM ``linear``), ``"linear"`` (LDM ``sqrt_linear``),
            ``"squaredcos_cap_v2"`` (LDM ``cosine`` with ``cosine_s=0.008``).
        trained_betas: explicit betas (the original ``given_betas``); also holds the materialised betas of schedules
            diffusers cannot express (LDM ``sqrt``, ``cosine`` with another ``cosine_s``).
        prediction_type: ``"epsilon"`` / ``"sample"`` / ``"v_prediction"`` — the original ``parameterization``
            eps / x0 / v. (The original could not sample v models ancestrally; this scheduler can.)
        clip_sample: clamp x̂0 to ``[-clip_sample_range, clip_sample_range]`` — the original ``clip_denoised``.
        clip_sample_range: 1.0 in the original.
        timestep_spacing: ``"leading"`` / ``"linspace"`` / ``"trailing"`` (diffusers meaning) for strided sampling
            with ``set_timesteps(n < num_train_timesteps)``, which the original did not have.
        v_posterior: the original ``v_posterior``: posterior variance ``(1-v)·β̃_t + v·β_t``.
        cosine_s: the original ``cosine_s`` (cosine schedule offset).
        ldm_beta_schedule: the original ``beta_schedule`` name (``linear``, ``cosine``, ``sqrt_linear``, ``sqrt``,
            ``squaredcos_cap_v2``); ``None`` means derived from ``beta_schedule``, or "given betas" when
            ``trained_betas`` is set. When set, it decides the formula.
        log_every_t: the original ``log_every_t`` (see ``intermediate_timesteps``).
        variance_type: diffusers' name of the noise variance: ``"fixed_small"``/``"fixed_small_log"`` (the posterior
            variance β̃, the original's ``v_posterior=0``) or ``"fixed_large"`` (β, ``v_posterior=1``); ``None``
            derives it from ``v_posterior``. Either way the noise is the original's
            ``exp(½·posterior_log_variance_clipped)·z``. Learned variances are refused.
        thresholding, dynamic_thresholding_ratio, sample_max_value: diffusers' dynamic thresholding of x̂0 (replaces
            ``clip_sample`` when on). Not in the original.
        rescale_betas_zero_snr: rescale the betas to zero terminal SNR (diffusers' ``rescale_zero_terminal_snr``,
            here in float64). Not in the original; export writes the rescaled buffers (see docs/scheduler.md).
        **kwargs: config keys of compatible schedulers (kept in the config for them, as ``from_config`` does).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    _ldm_compatible_names = ("LDMDDIMScheduler",)
    _linked_config_keys = {"v_posterior": "variance_type", "variance_type": "v_posterior"}
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
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        v_posterior: float = 0.0,
        cosine_s: float = 8e-3,
        ldm_beta_schedule: str | None = None,
        log_every_t: int = 100,
        variance_type: str | None = None,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        rescale_betas_zero_snr: bool = False,
        **kwargs,
    ):
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing={timestep_spacing!r}: expected one of {TIMESTEP_SPACINGS}")
        if int(log_every_t) < 1:
            raise ValueError(f"log_every_t={log_every_t}: expected a positive integer")
        if float(clip_sample_range) <= 0:
            raise ValueError(f"clip_sample_range={clip_sample_range}: expected a positive number")
        check_thresholding(dynamic_thresholding_ratio, sample_max_value)
        variance_type, v_posterior = resolve_variance_type(variance_type, v_posterior)
        self.register_to_config(variance_type=variance_type, v_posterior=v_posterior)
        self._init_schedule(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            cosine_s=cosine_s,
            ldm_beta_schedule=ldm_beta_schedule,
            prediction_type=prediction_type,
            v_posterior=v_posterior,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        self.set_timesteps()
        self._finish_init(kwargs)

    def _unimplemented_options(self, values) -> list[str]:
        offset = values.get("steps_offset", 0)
        if offset is not None and int(offset) != 0:
            return [f"steps_offset={offset} (strided sampling here starts its leading grid at 0)"]
        return []

    # ------------------------------------------------------------------ construction from original configs
    @classmethod
    def from_ldm_config(cls, params: Mapping, **overrides) -> LDMDDPMScheduler:
        """Build from the original ``model.params`` mapping (or the whole original config with ``model.params``).

        Reads ``timesteps, beta_schedule, linear_start, linear_end, cosine_s, given_betas, v_posterior,
        parameterization, clip_denoised, log_every_t`` (original defaults when missing; other keys are ignored).
        ``given_betas`` may be a list (YAML). ``overrides`` are scheduler config keys (e.g. ``timestep_spacing``).
        """
        from ldm_compat.config import model_params

        config = ldm_params_to_config(model_params(params))
        config.update(overrides)
        return cls(**config)

    @classmethod
    def from_betas(cls, betas, params: Mapping | None = None, **overrides) -> LDMDDPMScheduler:
        """Build from explicit betas (e.g. a checkpoint's float32 ``betas`` buffer) as ``trained_betas``; the other
        keys come from the original ``params`` (parameterization, v_posterior, clip_denoised, log_every_t, …)."""
        from ldm_compat.config import model_params

        values = torch.as_tensor(betas).detach().cpu().double().numpy()
        base = model_params(params or {})
        base.pop("timesteps", None)  # the number of steps is the number of betas
        base["given_betas"] = [float(b) for b in values.reshape(-1)]
        return cls.from_ldm_config(base, **overrides)

    @classmethod
    def from_ldm_checkpoint(cls, params: Mapping, state_dict: Mapping[str, torch.Tensor], prefix: str = ""):
        """Build from ``params`` and check against a checkpoint's schedule buffers (``prefix + name``).

        If the checkpoint has the 12 buffers and they are bit-equal to the recomputed ones, this is
        ``from_ldm_config(params)``; if they differ (or ``params`` cannot be used), the checkpoint's ``betas`` are
        taken verbatim as ``trained_betas`` (``from_betas``) — then ``betas`` match exactly and the other buffers
        are recomputed from them in float64. Without a ``betas`` buffer this is ``from_ldm_config(params)``.
        """
        from ldm_compat.config import model_params

        params = model_params(params)
        buffers = {name: state_dict[prefix + name] for name in LDM_BUFFER_NAMES if prefix + name in state_dict}
        if "betas" not in buffers:
            return cls.from_ldm_config(params)
        for overrides in zero_snr_candidates(buffers):
            try:
                scheduler = cls.from_ldm_config(params, **overrides)
            except ValueError:
                continue
            if not match_buffers(scheduler.ldm_buffers(), buffers):
                return scheduler
        return cls.from_betas(buffers["betas"], params)

    def to_ldm_config(self) -> dict[str, Any]:
        """The original ``model.params`` schedule keys (``timesteps, beta_schedule, linear_start, linear_end,
        cosine_s, given_betas`` (when given), ``v_posterior, parameterization, clip_denoised, log_every_t``).

        The original has no zero-SNR option: with ``rescale_betas_zero_snr`` these are the keys of the schedule
        *before* rescaling (the original cannot take ``given_betas`` from a YAML list); the rescaled schedule
        travels in the checkpoint's buffers, which the original's ``load_state_dict`` puts over the YAML's.
        """
        return config_to_ldm_params(self.config)

    def schedule_mismatches(self, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> list[str]:
        """Names of the 12 buffers missing from ``state_dict`` or not bit-equal to this schedule's."""
        return match_buffers(
            self._buffers, {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        )

    # ------------------------------------------------------------------ timesteps
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Sampling timesteps. Default: every training step ``T-1, …, 0`` (the original ``p_sample_loop``).

        ``num_inference_steps < T`` strides with ``timestep_spacing`` (diffusers' convention); each step then goes to
        the next listed timestep with the posterior of that jump (the original had no strided DDPM). ``timesteps``:
        a custom strictly descending list.
        """
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("set_timesteps: pass num_inference_steps or timesteps, not both")
        if timesteps is not None:
            steps = np.asarray(list(timesteps), dtype=np.int64)
            if steps.ndim != 1 or steps.size == 0 or np.any(np.diff(steps) >= 0):
                raise ValueError("timesteps: expected a non-empty, strictly descending list")
            if steps[0] >= T or steps[-1] < 0:
                raise ValueError(f"timesteps: values must lie in [0, {T - 1}]")
            self.num_inference_steps = len(steps)
        else:
            n = T if num_inference_steps is None else int(num_inference_steps)
            if not 1 <= n <= T:
                raise ValueError(f"num_inference_steps={num_inference_steps}: expected 1 ≤ n ≤ {T}")
            self.num_inference_steps = n
            steps = self._spaced_timesteps(n)
        self.custom_timesteps = timesteps is not None
        self.timesteps = torch.from_numpy(steps.copy()).to(device)
        self._set_step_coefficients(steps)

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        T, spacing = self.config.num_train_timesteps, self.config.timestep_spacing
        if n == T:
            return np.arange(T - 1, -1, -1, dtype=np.int64)
        if spacing == "leading":
            return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64)
        return diffusers_spaced_timesteps(spacing, n, T)

    def _set_step_coefficients(self, steps: np.ndarray) -> None:
        """Per-timestep posterior coefficients for the current timesteps (indexed by ``t``).

        A step from ``t`` to ``t - 1`` uses the original buffers verbatim. A longer jump to ``s`` uses the same
        float64 formulas with ``β = 1 - ᾱ_t/ᾱ_s`` and ``ᾱ_prev = ᾱ_s`` (``1`` past the end), cast to float32.
        """
        T = self.config.num_train_timesteps
        coef1 = self._buffers["posterior_mean_coef1"].clone()
        coef2 = self._buffers["posterior_mean_coef2"].clone()
        logvar = self._buffers["posterior_log_variance_clipped"].clone()
        prev = np.full(T, -2, dtype=np.int64)  # -2: not a sampling timestep
        ac = self._alphas_cumprod64
        v = self._v_posterior
        for i, t in enumerate(steps.tolist()):
            s = int(steps[i + 1]) if i + 1 < len(steps) else -1
            prev[t] = s
            if s == t - 1:
                continue
            a_t, a_s = ac[t], (ac[s] if s >= 0 else 1.0)
            beta = 1.0 - a_t / a_s
            var = (1 - v) * beta * (1.0 - a_s) / (1.0 - a_t) + v * beta
            coef1[t] = float(beta * np.sqrt(a_s) / (1.0 - a_t))
            coef2[t] = float((1.0 - a_s) * np.sqrt(a_t / a_s) / (1.0 - a_t))
            logvar[t] = float(np.log(max(var, POSTERIOR_LOG_VARIANCE_FLOOR)))
        self._prev_timestep = torch.from_numpy(prev)
        self._step_coefficients = {"coef1": coef1, "coef2": coef2, "log_variance": logvar}

    def previous_timestep(self, timestep) -> int | torch.Tensor:
        """The timestep a step from ``timestep`` goes to (``-1`` after the last one)."""
        t = torch.as_tensor(timestep).long()
        prev = self._prev_timestep[t.cpu()]
        if bool((prev == -2).any()):
            raise ValueError(f"timestep={t.tolist()}: not among the current sampling timesteps (see set_timesteps)")
        return prev.to(t.device) if isinstance(timestep, torch.Tensor) else int(prev)

    def intermediate_timesteps(self) -> list[int]:
        """Timesteps after whose step the original ``p_sample_loop(return_intermediates=True)`` keeps the sample
        (``t % log_every_t == 0 or t == T - 1``), in sampling order; the list of intermediates starts with x_T."""
        return ldm_intermediate_timesteps(self.config.num_train_timesteps, self.config.log_every_t)

    # ------------------------------------------------------------------ the reverse process
    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t):
        """Mean, variance and clipped log-variance of ``q(x_{t-1} | x_t, x_0)`` — the original ``q_posterior``."""
        t, x0, x, dtype = self._prepare(t, x_start, x_t)
        mean = self._coef("posterior_mean_coef1", t, x) * x0 + self._coef("posterior_mean_coef2", t, x) * x
        variance = self._coef("posterior_variance", t, x)
        log_variance = self._coef("posterior_log_variance_clipped", t, x)
        return mean.to(dtype), variance.to(dtype), log_variance.to(dtype)

    def predict_start(self, model_output: torch.Tensor, sample: torch.Tensor, t) -> torch.Tensor:
        """x̂0 from the model output according to ``prediction_type`` (before clipping)."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return self.predict_start_from_noise(sample, t, model_output)
        if kind == "v_prediction":
            return self.predict_start_from_z_and_v(sample, t, model_output)
        return model_output

    def _clip_start(self, x_recon: torch.Tensor, clip: bool) -> torch.Tensor:
        # as diffusers: dynamic thresholding, when on, replaces clipping
        if self.config.thresholding:
            return threshold_sample(x_recon, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        if clip:
            return x_recon.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x_recon

    def p_mean_variance(self, model_output: torch.Tensor, sample: torch.Tensor, t, clip_denoised: bool | None = None):
        """The original ``p_mean_variance`` given the model output: ``(model_mean, posterior_variance,
        posterior_log_variance)`` at the training step ``t → t-1``; ``clip_denoised`` defaults to ``clip_sample``
        (``thresholding``, when on, replaces it)."""
        x_recon = self.predict_start(model_output, sample, t)
        x_recon = self._clip_start(x_recon, self.config.clip_sample if clip_denoised is None else clip_denoised)
        return self.q_posterior(x_recon, sample, t)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple:
        """One ancestral step ``x_t → x_{prev}`` — the original ``p_sample``
        (its float32 operations in its order: bit-equal to it on the same CPU, on full schedules).

        x̂0 from the model output (eps, x0 or v), clamped when ``clip_sample`` (or dynamically thresholded when
        ``thresholding``); the posterior mean with the ``v_posterior`` variance; noise ``exp(½·log σ²)·z`` except
        where ``t == 0``. ``timestep``: an int or a
        ``(batch,)`` tensor (one timestep per batch element). ``variance_noise`` replaces the drawn ``z``; without
        it, ``z`` is drawn with ``generator`` — at every step, also ``t == 0``, consuming random numbers like the
        original. Half-precision inputs are computed in float32 and returned in their dtype.
        """
        t, x_t, out, dtype = self._prepare(timestep, sample, model_output)
        prev = self._prev_timestep[t.cpu()]
        if bool((prev == -2).any()):
            raise ValueError(f"timestep={t.tolist()}: not among the current sampling timesteps (see set_timesteps)")
        x_recon = self._clip_start(self.predict_start(out, x_t, t), self.config.clip_sample)
        coefs = {k: v.to(x_t.device, x_t.dtype) for k, v in self._step_coefficients.items()}
        mean = extract(coefs["coef1"], t, x_t.ndim) * x_recon + extract(coefs["coef2"], t, x_t.ndim) * x_t
        if variance_noise is None:
            variance_noise = randn_tensor(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        elif variance_noise.shape != x_t.shape:
            raise ValueError(f"variance_noise: expected shape {tuple(x_t.shape)}, got {tuple(variance_noise.shape)}")
        nonzero_mask = (1 - (t == 0).to(x_t.dtype)).reshape(t.shape[0], *((1,) * (x_t.ndim - 1)))
        log_variance = extract(coefs["log_variance"], t, x_t.ndim)
        prev_sample = mean + nonzero_mask * (0.5 * log_variance).exp() * variance_noise.to(x_t)
        prev_sample, x_recon = prev_sample.to(dtype), x_recon.to(dtype)
        if not return_dict:
            return (prev_sample, x_recon)
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x_recon)


def zero_snr_candidates(buffers) -> list[dict[str, Any]]:
    """Scheduler overrides to try when matching a checkpoint's schedule buffers against a config: a schedule that
    ends at ᾱ = 0 may be the config's schedule rescaled to zero terminal SNR (which the original's YAML cannot
    say)."""
    candidates: list[dict[str, Any]] = [{}]
    if "alphas_cumprod" in buffers and is_zero_terminal_snr(buffers["alphas_cumprod"]):
        candidates.append({"rescale_betas_zero_snr": True})
    return candidates
