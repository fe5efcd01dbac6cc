"""Pure functions for the original latent-diffusion noise schedule (no scheduler state).

Everything here follows ``ldm/modules/diffusionmodules/util.py`` (``make_beta_schedule``, ``make_ddim_timesteps``,
``make_ddim_sampling_parameters``) and ``DDPM.register_schedule`` (``ldm/models/diffusion/ddpm.py``) of
CompVis/latent-diffusion and Stability-AI/stablediffusion: the schedule is computed in float64 numpy and only the
finished buffers are cast to float32, so the results are bit-equal to the buffers in original checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

# The 12 persistent buffers ``DDPM.register_schedule`` stores in every original checkpoint, in registration order.
LDM_BUFFER_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)

# Original ``beta_schedule`` names (CompVis; ``squaredcos_cap_v2`` is the stablediffusion addition).
LDM_BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt", "squaredcos_cap_v2")

# The variance floor of ``posterior_log_variance_clipped`` (the posterior variance is 0 at t=0).
POSTERIOR_LOG_VARIANCE_FLOOR = 1e-20


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """The original ``make_beta_schedule``: float64 betas for ``n_timestep`` steps.

    Names are the original's (note the naming trap: LDM ``"linear"`` squares a linspace of square roots, which is
    diffusers ``"scaled_linear"``; LDM ``"sqrt_linear"`` is a plain linspace, diffusers ``"linear"``):

    - ``linear``: ``linspace(√start, √end, T)²``
    - ``cosine``: Nichol & Dhariwal cosine with offset ``cosine_s``, clipped to ``[0, 0.999]``
    - ``sqrt_linear``: ``linspace(start, end, T)``
    - ``sqrt``: ``linspace(start, end, T) ** 0.5``
    - ``squaredcos_cap_v2``: stablediffusion's ``betas_for_alpha_bar`` with the fixed offset 0.008 (ignores
      ``cosine_s``), per step in Python floats, capped at 0.999.
    """
    n_timestep = int(n_timestep)
    if n_timestep < 1:
        raise ValueError(f"timesteps={n_timestep}: expected a positive number of diffusion steps")
    if schedule in ("linear", "sqrt") and min(linear_start, linear_end) < 0:
        raise ValueError(
            f"linear_start={linear_start}, linear_end={linear_end} (beta_start, beta_end): the {schedule!r} schedule "
            "takes square roots, so both must be ≥ 0"
        )
    if schedule == "linear":
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64) ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * np.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = torch.clamp(1 - alphas[1:] / alphas[:-1], min=0, max=0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5
    elif schedule == "squaredcos_cap_v2":
        return _betas_for_alpha_bar(n_timestep, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    else:
        raise ValueError(f"beta_schedule={schedule!r}: expected one of {LDM_BETA_SCHEDULES}")
    return betas.numpy()


def _betas_for_alpha_bar(num_steps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    # stablediffusion util.betas_for_alpha_bar: Python-float arithmetic per step, then a float64 array
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return np.array(betas, dtype=np.float64)


def check_betas(betas: np.ndarray, name: str = "trained_betas") -> np.ndarray:
    """A 1-D float64 array of finite betas in ``[0, 1]``; anything else raises a one-line ``ValueError``."""
    try:
        array = np.asarray(betas, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a 1-D sequence of numbers") from None
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence of betas, got shape {tuple(array.shape)}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: betas must be finite numbers")
    if array.min() < 0 or array.max() > 1:
        raise ValueError(f"{name}: betas must lie in [0, 1], got min {array.min():.6g} and max {array.max():.6g}")
    return array


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas rescaled to zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", Algorithm 1) — diffusers' ``rescale_zero_terminal_snr``, computed in float64 like the rest of the
    schedule (diffusers runs it in float32).

    √ᾱ is shifted so that its last value is 0 and scaled so that its first value is unchanged; the last beta becomes
    exactly 1 (ᾱ_{T-1} = 0).
    """
    betas = np.asarray(betas, dtype=np.float64)
    root = np.sqrt(np.cumprod(1.0 - betas))
    first, last = root[0], root[-1]
    if not first > last:
        raise ValueError(
            "rescale_betas_zero_snr: the schedule's ᾱ must decrease from its first to its last step "
            f"(√ᾱ goes from {first:.6g} to {last:.6g})"
        )
    root = (root - last) * (first / (first - last))
    alphas_cumprod = root**2
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero ᾱ before the end gives nan, caught by check_betas
        alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return check_betas(1.0 - alphas, "rescale_betas_zero_snr")


def is_zero_terminal_snr(alphas_cumprod) -> bool:
    """Whether a schedule ends at ᾱ = 0 exactly (as ``rescale_zero_terminal_snr`` leaves it)."""
    values = torch.as_tensor(alphas_cumprod)
    return values.numel() > 0 and float(values.reshape(-1)[-1]) == 0.0


def ldm_schedule_arrays(betas: np.ndarray, v_posterior: float = 0.0) -> dict[str, np.ndarray]:
    """``register_schedule`` in float64: the 12 buffers before the float32 cast, plus ``alphas`` (not stored)."""
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    # the posterior q(x_{t-1} | x_t, x_0); v_posterior interpolates its variance towards betas (v=1: "fixed large")
    posterior_variance = (1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (
        1.0 - alphas_cumprod
    ) + v_posterior * betas
    with np.errstate(divide="ignore", invalid="ignore"):  # degenerate schedules (betas of 0) give inf, as originally
        arrays = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            # the log is clipped because the posterior variance is 0 at the start of the chain
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, POSTERIOR_LOG_VARIANCE_FLOOR)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        }
    arrays["alphas"] = alphas
    return arrays


def ldm_schedule_buffers(betas: np.ndarray, v_posterior: float = 0.0) -> dict[str, torch.Tensor]:
    """The 12 buffers of ``DDPM.register_schedule`` as float32 CPU tensors (computed in float64, then cast)."""
    arrays = ldm_schedule_arrays(betas, v_posterior)
    return {name: torch.tensor(arrays[name], dtype=torch.float32) for name in LDM_BUFFER_NAMES}


def ldm_intermediate_timesteps(num_train_timesteps: int, log_every_t: int) -> list[int]:
    """The timesteps after whose step the original ``p_sample_loop(return_intermediates=True)`` keeps the sample.

    In sampling order (descending): ``t`` with ``t % log_every_t == 0`` or ``t == T - 1``. The original's list of
    intermediates is the initial noise followed by the sample after each of these steps. The same set (ascending)
    is the ``diffusion_row`` of ``DDPM.log_images``.
    """
    log_every_t = int(log_every_t)
    if log_every_t < 1:
        raise ValueError(f"log_every_t={log_every_t}: expected a positive integer")
    last = int(num_train_timesteps) - 1
    return [t for t in range(last, -1, -1) if t % log_every_t == 0 or t == last]


def ddim_intermediate_steps(num_steps: int, log_every_t: int = 100) -> list[int]:
    """Loop positions ``i`` (0-based, in sampling order) after which the original ``DDIMSampler`` logs intermediates.

    The original keeps ``x_inter``/``pred_x0`` when ``index % log_every_t == 0 or index == total_steps - 1`` with
    ``index = total_steps - i - 1``; both lists also start with ``x_T``.
    """
    log_every_t = int(log_every_t)
    if log_every_t < 1:
        raise ValueError(f"log_every_t={log_every_t}: expected a positive integer")
    total = int(num_steps)
    return [i for i in range(total) if (total - i - 1) % log_every_t == 0 or i == 0]


DDIM_DISCRETIZATIONS = ("uniform", "quad")


def make_ddim_timesteps(
    discretize: str, num_ddim_timesteps: int, num_ddpm_timesteps: int, steps_offset: int = 1
) -> np.ndarray:
    """The original ``make_ddim_timesteps`` (ascending, int64), including its ``+ 1`` shift (``steps_offset``).

    ``uniform``: ``range(0, T, T // S) + 1``: with ``T % S != 0`` this has ``ceil(T / (T // S))`` entries, more than
    ``S``. ``quad``: ``int(linspace(0, √(0.8·T), S)²) + 1`` (may repeat small timesteps, as the original).
    ``steps_offset`` replaces the original's ``+ 1`` (diffusers' name for it). Timesteps that would index past the
    schedule (the original crashed with an IndexError) raise ``ValueError``.
    """
    steps, total, offset = int(num_ddim_timesteps), int(num_ddpm_timesteps), int(steps_offset)
    if steps < 1 or steps > total:
        raise ValueError(f"num_inference_steps={steps}: expected 1 ≤ steps ≤ num_train_timesteps={total}")
    if discretize == "uniform":
        timesteps = np.asarray(list(range(0, total, total // steps)), dtype=np.int64)
    elif discretize == "quad":
        timesteps = ((np.linspace(0, np.sqrt(total * 0.8), steps)) ** 2).astype(np.int64)
    else:
        raise ValueError(f"ddim_discretize={discretize!r}: expected one of {DDIM_DISCRETIZATIONS}")
    timesteps = timesteps + offset  # the original's + 1 ("to get the final alpha values right")
    if timesteps.max() >= total:
        hint = "T // steps does not divide T - 1" if offset == 1 else "the grid stays below T"
        raise ValueError(
            f"num_inference_steps={steps}: the original DDIM grid range(0, {total}, {total // steps}) + {offset} "
            f"reaches t={int(timesteps.max())}, past the last training timestep {total - 1} (the original fails here "
            f"too); choose a number of steps for which {hint}"
        )
    return timesteps


DIFFUSERS_SPACINGS = ("leading", "linspace", "trailing")


def diffusers_spaced_timesteps(spacing: str, num_steps: int, num_train_timesteps: int) -> np.ndarray:
    """diffusers' ``linspace`` / ``trailing`` timesteps (descending, int64), as DDPMScheduler/DDIMScheduler make them.

    ``linspace``: ``round(linspace(0, T-1, n))``; ``trailing``: ``round(arange(T, 0, -T/n)) - 1`` (starts at T-1).
    ``leading`` depends on the scheduler (the original DDIM grid, or strided DDPM) and is not made here.
    """
    n, total = int(num_steps), int(num_train_timesteps)
    if spacing == "linspace":
        return np.linspace(0, total - 1, n).round()[::-1].astype(np.int64)
    if spacing == "trailing":
        return (np.round(np.arange(total, 0, -total / n)).astype(np.int64) - 1)[:n]
    raise ValueError(f"timestep_spacing={spacing!r}: expected 'linspace' or 'trailing' here")


def match_buffers(
    expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], names: Sequence[str] = LDM_BUFFER_NAMES
) -> list[str]:
    """Names of the buffers that are missing from ``actual`` or not bit-equal to ``expected``."""
    bad = []
    for name in names:
        value = actual.get(name)
        ref = expected[name]
        if value is None or tuple(value.shape) != tuple(ref.shape) or not torch.equal(value.float().cpu(), ref):
            bad.append(name)
    return bad
