"""What both ldm_compat schedulers share: the float64 schedule, its buffers, and the original DDPM helpers.

The helpers index the float32 buffers exactly as the original's ``extract_into_tensor`` and keep its operation
order, so in float32 they give the original's bits.
"""

from __future__ import annotations

from typing import Any

import torch

from .ldm_config import check_prediction_type, resolve_schedule
from .schedule import LDM_BUFFER_NAMES, ldm_schedule_arrays

_HALF_TYPES = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision samples are computed in float32 (the buffers are float32) and cast back afterwards."""
    return torch.float32 if dtype in _HALF_TYPES else dtype


def as_timestep_tensor(timestep: Any, batch_size: int, num_train_timesteps: int, device=None) -> torch.Tensor:
    """An int, a 0-d tensor or a ``(batch,)`` tensor of timesteps → a long ``(batch,)`` tensor, range-checked."""
    t = torch.as_tensor(timestep, device=device)
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise ValueError(f"timestep={timestep!r}: expected integer timesteps")
    t = t.long()
    if t.ndim == 0:
        t = t.expand(batch_size)
    elif t.ndim != 1 or t.shape[0] not in (1, batch_size):
        raise ValueError(
            f"timestep: expected an int or a 1-D tensor with one timestep per batch element ({batch_size}), "
            f"got shape {tuple(t.shape)}"
        )
    elif t.shape[0] == 1:
        t = t.expand(batch_size)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_train_timesteps):
        raise ValueError(f"timestep: values must lie in [0, {num_train_timesteps - 1}], got {t.tolist()}")
    return t


def extract(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``values[t]`` shaped ``(batch, 1, …, 1)`` — the original ``extract_into_tensor``."""
    return values.gather(-1, t).reshape(t.shape[0], *((1,) * (ndim - 1)))


class LDMScheduleMixin:
    """Schedule state and helpers shared by ``LDMDDPMScheduler`` and ``LDMDDIMScheduler``.

    After ``_init_schedule``: ``betas``, ``alphas``, ``alphas_cumprod`` (float32 tensors from the float64 computation,
    as the original's buffers) and ``init_noise_sigma = 1.0``.
    """

    # the other ldm_compat scheduler, so that from_config between them drops each other's keys quietly
    _ldm_compatible_names: tuple[str, ...] = ()

    @classmethod
    def _get_compatibles(cls):
        compatibles = list(super()._get_compatibles())
        from . import scheduling_ldm_ddim, scheduling_ldm_ddpm

        for module in (scheduling_ldm_ddpm, scheduling_ldm_ddim):
            for name in cls._ldm_compatible_names:
                klass = getattr(module, name, None)
                if klass is not None and klass not in compatibles:
                    compatibles.append(klass)
        return compatibles

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """``ConfigMixin.from_config``, then re-derive the keys that diffusers' "hidden" config entries may have
        overwritten (see ``_derived_config``)."""
        out = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        scheduler = out[0] if return_unused_kwargs else out
        derived = scheduler._derived_config()
        if derived:
            scheduler.register_to_config(**derived)
        return out

    def _derived_config(self) -> dict[str, Any]:
        """Config entries that are not ``__init__`` arguments but are computed from them (for stock diffusers)."""
        return {}

    def _init_schedule(
        self,
        *,
        num_train_timesteps: int,
        beta_start: float,
        beta_end: float,
        beta_schedule: str,
        trained_betas,
        cosine_s: float,
        ldm_beta_schedule: str | None,
        prediction_type: str,
        v_posterior: float = 0.0,
    ) -> None:
        check_prediction_type(prediction_type)
        v_posterior = float(v_posterior)
        if not 0.0 <= v_posterior <= 1.0:
            raise ValueError(f"v_posterior={v_posterior}: expected a weight in [0, 1]")
        defaults = self.config.get("_use_default_values", None) or []
        betas64, normalised = resolve_schedule(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            cosine_s=cosine_s,
            ldm_beta_schedule=ldm_beta_schedule,
            beta_schedule_is_default="beta_schedule" in defaults,
        )
        if normalised:
            self.register_to_config(**normalised)
        arrays = ldm_schedule_arrays(betas64, v_posterior)
        self._alphas_cumprod64 = arrays["alphas_cumprod"]
        self._v_posterior = v_posterior
        self._buffers = {name: torch.tensor(arrays[name], dtype=torch.float32) for name in LDM_BUFFER_NAMES}
        self._device_buffers: dict[tuple[str, torch.device], torch.Tensor] = {}
        self.betas = self._buffers["betas"].clone()
        # the original's to_torch(alphas): 1 - betas in float64, then float32 (used by the eps lvlb_weights)
        self.alphas = torch.tensor(arrays["alphas"], dtype=torch.float32)
        self.alphas_cumprod = self._buffers["alphas_cumprod"].clone()
        self.init_noise_sigma = 1.0

    def _finish_init(self) -> None:
        derived = self._derived_config()
        # every key is now explicit, so diffusers' from_config keeps them all (instead of the target's defaults)
        self.register_to_config(**derived, _use_default_values=[])

    # ------------------------------------------------------------------ buffers
    def ldm_buffers(self) -> dict[str, torch.Tensor]:
        """The 12 buffers of the original ``register_schedule`` (float32 CPU copies; names as in checkpoints)."""
        return {name: value.clone() for name, value in self._buffers.items()}

    def ldm_alphas(self) -> torch.Tensor:
        """``1 - betas`` computed in float64, as float32 (the original's ``to_torch(alphas)``; not a buffer)."""
        return self.alphas.clone()

    def _buffer(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (name, torch.device(device))
        cached = self._device_buffers.get(key)
        if cached is None:
            cached = self._buffers[name].to(device)
            self._device_buffers[key] = cached
        return cached.to(dtype)

    def _coef(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return extract(self._buffer(name, like.device, like.dtype), t, like.ndim)

    def _prepare(self, timesteps, *tensors: torch.Tensor):
        """Upcast half-precision inputs; return ``(t, tensors…, output dtype)``."""
        ref = tensors[0]
        if any(x.shape != ref.shape for x in tensors[1:]):
            # one clear line instead of a broadcasting error (or, worse, a silent broadcast) further down
            shapes = ", ".join(str(tuple(x.shape)) for x in tensors[1:])
            raise ValueError(f"tensor shapes: expected the sample's shape {tuple(ref.shape)}, got {shapes}")
        dtype = compute_dtype(ref.dtype)
        t = as_timestep_tensor(timesteps, ref.shape[0], self.config.num_train_timesteps, ref.device)
        return (t, *[x.to(dtype) for x in tensors], ref.dtype)

    # ------------------------------------------------------------------ original DDPM helpers
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """Forward diffusion ``√ᾱ_t·x0 + √(1-ᾱ_t)·ε`` — the original ``q_sample`` (bit-equal in float32).

        ``timesteps``: an int or a ``(batch,)`` tensor. Half-precision inputs are computed in float32 and returned
        in their own dtype.
        """
        t, x0, eps, dtype = self._prepare(timesteps, original_samples, noise)
        out = self._coef("sqrt_alphas_cumprod", t, x0) * x0 + self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * eps
        return out.to(dtype)

    q_sample = add_noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v target ``√ᾱ_t·ε - √(1-ᾱ_t)·x0`` — stablediffusion ``get_v(x, noise, t)``; ``sample`` is x0."""
        t, x0, eps, dtype = self._prepare(timesteps, sample, noise)
        out = self._coef("sqrt_alphas_cumprod", t, x0) * eps - self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * x0
        return out.to(dtype)

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Alias of ``get_velocity`` with the original's name and argument order."""
        return self.get_velocity(x, noise, t)

    def predict_start_from_noise(self, x_t: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """x̂0 = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε — the original ``predict_start_from_noise``."""
        t, x, eps, dtype = self._prepare(t, x_t, noise)
        out = self._coef("sqrt_recip_alphas_cumprod", t, x) * x - self._coef("sqrt_recipm1_alphas_cumprod", t, x) * eps
        return out.to(dtype)

    def predict_start_from_z_and_v(self, x_t: torch.Tensor, t, v: torch.Tensor) -> torch.Tensor:
        """x̂0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v — stablediffusion ``predict_start_from_z_and_v``."""
        t, x, v, dtype = self._prepare(t, x_t, v)
        out = self._coef("sqrt_alphas_cumprod", t, x) * x - self._coef("sqrt_one_minus_alphas_cumprod", t, x) * v
        return out.to(dtype)

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t, v: torch.Tensor) -> torch.Tensor:
        """ε̂ = √ᾱ_t·v + √(1−ᾱ_t)·x_t — stablediffusion ``predict_eps_from_z_and_v``."""
        t, x, v, dtype = self._prepare(t, x_t, v)
        out = self._coef("sqrt_alphas_cumprod", t, x) * v + self._coef("sqrt_one_minus_alphas_cumprod", t, x) * x
        return out.to(dtype)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity (DDPM-family schedulers do not scale the model input); for pipeline compatibility."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps
