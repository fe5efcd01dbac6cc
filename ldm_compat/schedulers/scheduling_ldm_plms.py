"""``LDMPLMSScheduler``: the original ``PLMSSampler`` (``ldm/models/diffusion/plms.py`` of CompVis/latent-diffusion
and Stability-AI/stablediffusion) as a diffusers scheduler.

The original takes two UNet evaluations in its first step (a pseudo improved Euler start: the DDIM step with ``ε_t``
gives a predictor at the next timestep, which is evaluated again, and the mean of both ε takes the real step), then
one per step with Adams–Bashforth combinations of the last 2, 3 and 4 ε. To fit diffusers' one-evaluation-per-call
``step()``, ``timesteps`` lists the second grid timestep twice (as diffusers' ``PNDMScheduler`` with
``skip_prk_steps`` does), so the plain loop ``for t in timesteps: x = step(unet(x, t), t, x).prev_sample`` makes
exactly the original's evaluations, in its order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .common import as_timestep_tensor, compute_dtype
from .schedule import ddim_intermediate_steps
from .scheduling_ldm_ddim import LDMDDIMScheduler

__all__ = ["LDMPLMSScheduler"]

# Adams–Bashforth weights for (ε_t, ε_{t-1}, …) by how many earlier ε the sampler holds, and their divisor; the
# original evaluates them left to right (c0·ε_t + c1·ε_{t-1} + …) / d, which the signed weights reproduce bit for bit
_ADAMS_BASHFORTH = {1: ((3, -1), 2), 2: ((23, -16, 5), 12), 3: ((55, -59, 37, -9), 24)}
_MAX_HISTORY = 3


def norm_thresholding(x0: torch.Tensor, value: float) -> torch.Tensor:
    """stablediffusion's ``dynamic_threshold``: scale each sample down to an RMS of at most ``value``."""
    rms = x0.pow(2).flatten(1).mean(1).sqrt().clamp(min=value)
    return x0 * (value / rms.reshape(-1, *((1,) * (x0.ndim - 1))))


class LDMPLMSScheduler(LDMDDIMScheduler):
    """The original ``PLMSSampler``, bit-equal to it on the same CPU (``eta`` must be 0, as the original insists).

    Same config as ``LDMDDIMScheduler`` (build it with ``from_config`` of any ldm_compat scheduler's config) and the
    same grid: ``set_timesteps(S)`` is the original ``make_schedule(S)`` (uniform by default). ``timesteps`` then has
    ``len(grid) + 1`` entries, the second grid point twice: call 0 returns the first step's predictor (the DDIM step
    with ``ε(x_T)``, a sample at the next timestep), call 1 takes the first real step from ``x_T`` with the mean of
    both ε, and every later call one Adams–Bashforth step (2nd, 3rd, then 4th order). ``step()`` must be called
    with the timesteps in that order; ``set_timesteps`` starts a new chain.

    Parameterization: the original ``PLMSSampler`` uses the model output as ε whatever the model predicts (it has
    no v or x0 branch; stablediffusion's ``PLMSSampler`` samples v models wrongly). By default v and x0 outputs are
    converted to ε at the evaluated ``(sample, timestep)``; ``ldm_bug_compat=True`` uses them as ε, as the original.

    Args: as ``LDMDDIMScheduler``; ``ldm_bug_compat`` here covers v as well as x0 outputs.
    """

    _ldm_compatible_names = ("LDMDDPMScheduler", "LDMDDIMScheduler")

    # ------------------------------------------------------------------ timesteps
    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """The original ``make_schedule(ddim_num_steps=num_inference_steps)`` on the DDIM grid, then the timesteps
        of every UNet evaluation: the first grid point, the second, then the rest of the grid from the second on."""
        if num_inference_steps is None:
            # plms_sampling(ddim_use_original_steps=True) reads model.ddim_sigmas_for_original_num_steps, which no
            # model has: the original cannot run this mode (PLMSSampler.sample never asks for it)
            raise ValueError("num_inference_steps=None: the original PLMSSampler runs only on a DDIM grid; pass S")
        super().set_timesteps(num_inference_steps, device)
        grid = self.timesteps
        # the first step's second evaluation is at time_range[min(1, len - 1)]: the same timestep for a 1-step grid
        second = min(1, len(grid) - 1)
        self.timesteps = torch.cat([grid[:1], grid[second : second + 1], grid[1:]])
        self._plms_grid = grid.cpu()
        self._reset_chain()

    def _reset_chain(self) -> None:
        self._calls = 0
        self._old_eps: list[torch.Tensor] = []
        self._first = None  # (x_T, ε(x_T)) kept between the two calls of the first step

    @property
    def starts_original_step(self) -> bool:
        """Whether the next ``step()`` call begins a step of the original loop (``False`` only for the first step's
        second evaluation, where the original applies no ``mask``/``x0`` blending)."""
        return getattr(self, "_calls", 0) != 1

    def intermediate_steps(self, log_every_t: int = 100) -> list[int]:
        """Positions in ``timesteps`` after whose ``step()`` the original logs ``x_inter``/``pred_x0`` (its
        ``log_every_t``); both lists start with ``x_T``. Original step ``i`` ends at call ``i + 1``."""
        if self._step_params is None:
            raise ValueError("intermediate_steps: call set_timesteps first")
        return [i + 1 for i in ddim_intermediate_steps(len(self._plms_grid), log_every_t)]

    # ------------------------------------------------------------------ the PLMS step
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
        quantize_denoised: Callable[[torch.Tensor], torch.Tensor] | None = None,
        dynamic_threshold: float | None = None,
    ) -> DDIMSchedulerOutput | tuple:
        """One UNet evaluation's part of the original ``p_sample_plms``.

        ``model_output`` is the (guided) UNet output at ``(sample, timestep)``. ``temperature`` and
        ``noise_dropout`` are accepted as the original's: with σ = 0 they change nothing, but the noise is drawn (one
        ``randn`` per call, with ``generator``, or ``variance_noise`` instead) as the original draws it.
        ``quantize_denoised``: a callable that snaps x̂0 to the first stage's codebook (the original's
        ``quantize_denoised=True`` calls ``first_stage_model.quantize``; pass e.g. ``lambda z: vq.quantize(z)[0]``).
        ``dynamic_threshold``: stablediffusion's ``norm_thresholding`` of x̂0.

        Returns ``prev_sample`` and ``pred_original_sample`` (x̂0 of that update; call 0 returns the predictor's).
        """
        if eta != 0:
            raise ValueError(f"eta={eta}: PLMS needs eta=0 (the original raises 'ddim_eta must be 0 for PLMS')")
        if isinstance(quantize_denoised, bool):
            raise ValueError("quantize_denoised: pass the first stage's quantizer as a callable (z -> quantized z)")
        if self._step_params is None:
            raise ValueError("step: call set_timesteps first")
        if model_output.shape != sample.shape:
            shapes = f"{tuple(sample.shape)}, got {tuple(model_output.shape)}"
            raise ValueError(f"model_output: expected the sample's shape {shapes}")
        k = self._calls
        if k >= len(self.timesteps):
            raise ValueError(f"step: all {len(self.timesteps)} timesteps are done; call set_timesteps for a new chain")
        dtype = sample.dtype
        cdtype = compute_dtype(dtype)
        x = sample.to(cdtype)
        t = as_timestep_tensor(timestep, x.shape[0], self.config.num_train_timesteps, x.device)
        expected = int(self.timesteps[k])
        if bool((t != expected).any()):
            raise ValueError(
                f"timestep={t.tolist()}: LDMPLMSScheduler.step call {k} expects t={expected} (its timesteps in order)"
            )
        e_t = self._eps(model_output.to(cdtype), t, x)

        if variance_noise is None:
            variance_noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=cdtype)
        elif variance_noise.shape != x.shape:
            raise ValueError(f"variance_noise: expected shape {tuple(x.shape)}, got {tuple(variance_noise.shape)}")
        options = (variance_noise.to(x), temperature, noise_dropout, quantize_denoised, dynamic_threshold)

        if k == 0:  # pseudo improved Euler, first half: the predictor at the next timestep
            self._first = (x, e_t)
            prev_sample, pred_x0 = self._ddim_update(x, e_t, 0, *options)
        elif k == 1:  # ... second half: the real first step from x_T with the mean of both ε
            x_T, e_first = self._first
            self._first = None
            prev_sample, pred_x0 = self._ddim_update(x_T, (e_first + e_t) / 2, 0, *options)
            e_t = e_first  # the original keeps ε(x_T), not the mean
        else:
            weights, divisor = _ADAMS_BASHFORTH[len(self._old_eps)]
            history = [e_t, *reversed(self._old_eps)]
            combined = weights[0] * history[0]
            for w, e in zip(weights[1:], history[1:]):
                combined = combined + w * e
            prev_sample, pred_x0 = self._ddim_update(x, combined / divisor, k - 1, *options)
        if k != 0:
            self._old_eps = [*self._old_eps, e_t][-_MAX_HISTORY:]
        self._calls = k + 1
        prev_sample, pred_x0 = prev_sample.to(dtype), pred_x0.to(dtype)
        if not return_dict:
            return (prev_sample, pred_x0)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_x0)

    def _eps(self, out: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """ε of a model output at ``(x, t)``: the output itself for eps models and under ``ldm_bug_compat``."""
        kind = self.config.prediction_type
        if kind == "epsilon" or self.config.ldm_bug_compat:
            return out
        if kind == "v_prediction":
            return self.predict_eps_from_z_and_v(x, t, out)
        sqrt_a = self._coef("sqrt_alphas_cumprod", t, x)
        return (x - sqrt_a * out) / self._coef("sqrt_one_minus_alphas_cumprod", t, x)

    def _ddim_update(self, x, e_t, i, variance_noise, temperature, noise_dropout, quantize, dynamic_threshold):
        """The original ``get_x_prev_and_pred_x0``: a DDIM step (σ = 0) from ``x`` with ``e_t`` at grid point ``i``."""
        p = self._step_params
        # (batch, 1, …, 1) tensors as the original's torch.full (see LDMDDIMScheduler.step)
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)

        def full(value: torch.Tensor) -> torch.Tensor:
            return value.to(x.device, x.dtype).expand(shape).contiguous()

        a_t, a_prev = full(p["a_t"][i]), full(p["a_prev"][i])
        sqrt_one_minus_at = full(p["sqrt_one_minus_at"][i])
        sigma_t = full(0.0 * p["sigma"][i])
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        if quantize is not None:
            pred_x0 = quantize(pred_x0)
            pred_x0 = pred_x0[0] if isinstance(pred_x0, tuple) else pred_x0
        if dynamic_threshold is not None:
            pred_x0 = norm_thresholding(pred_x0, dynamic_threshold)
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        noise = sigma_t * variance_noise * temperature
        if noise_dropout > 0.0:
            noise = F.dropout(noise, p=noise_dropout)
        return a_prev.sqrt() * pred_x0 + dir_xt + noise, pred_x0
