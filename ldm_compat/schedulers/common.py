"""What both ldm_compat schedulers share: the float64 schedule, its buffers, and the original DDPM helpers.

The helpers index the float32 buffers exactly as the original's ``extract_into_tensor`` and keep its operation
order, so in float32 they give the original's bits.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from .ldm_config import check_prediction_type, resolve_schedule
from .schedule import LDM_BUFFER_NAMES, ldm_schedule_arrays, rescale_zero_terminal_snr

_HALF_TYPES = (torch.float16, torch.bfloat16)
LDM_SCHEDULER_NAMES = ("LDMDDPMScheduler", "LDMDDIMScheduler")


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


def threshold_sample(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Imagen; diffusers' ``thresholding=True``): per sample, ``s`` = the ``ratio`` quantile of
    ``|x̂0|`` over all its elements, clamped to ``[1, max_value]``; x̂0 is clamped to ``[-s, s]`` and divided by ``s``."""
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # torch.quantile needs float32/64
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (flat.clamp(min=-s, max=s) / s).reshape(x0.shape).to(dtype)


def check_thresholding(dynamic_thresholding_ratio: float, sample_max_value: float) -> None:
    if not 0.0 <= float(dynamic_thresholding_ratio) <= 1.0:
        raise ValueError(f"dynamic_thresholding_ratio={dynamic_thresholding_ratio}: expected a quantile in [0, 1]")
    if not float(sample_max_value) >= 1.0:
        raise ValueError(f"sample_max_value={sample_max_value}: expected a value ≥ 1 (the threshold's upper bound)")


def _init_defaults(klass) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(klass.__init__).parameters.items()
        if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
    }


class LDMScheduleMixin:
    """Schedule state and helpers shared by ``LDMDDPMScheduler`` and ``LDMDDIMScheduler``.

    After ``_init_schedule``: ``betas``, ``alphas``, ``alphas_cumprod`` (float32 tensors from the float64 computation,
    as the original's buffers) and ``init_noise_sigma = 1.0``.
    """

    # the other ldm_compat scheduler, so that from_config between them drops each other's keys quietly
    _ldm_compatible_names: tuple[str, ...] = ()
    # **kwargs of __init__ takes the "hidden" config keys of compatible classes (see _accept_hidden_keys)
    ignore_for_config = ["kwargs"]
    # config keys whose value follows the other one: overriding one in from_config re-derives its partner
    _linked_config_keys: dict[str, str] = {}

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
        """``ConfigMixin.from_config``, with three additions:

        - a config of a stock diffusers scheduler keeps *its* meaning: keys it left at its defaults (listed in the
          in-memory ``_use_default_values``) take the stock class's defaults, not this class's (diffusers would
          use ours: huggingface/diffusers#7626; e.g. ``beta_schedule`` "linear" vs our "scaled_linear");
        - overriding one of two linked keys (``v_posterior``/``variance_type``) re-derives the other;
        - options of the stock counterpart class that this class does not implement are named in one warning
          when their value differs from what this class does (see ``_unimplemented_options``).
        """
        values = dict(kwargs)
        if isinstance(config, Mapping):
            config = dict(config)
            foreign = not _is_ldm_config(config)
            if foreign:
                config = _with_source_defaults(cls, config)
                values = {**config, **kwargs}
            for key, partner in cls._linked_config_keys.items():
                if key in kwargs and partner not in kwargs:
                    config.pop(partner, None)
        scheduler, unused = super().from_config(config, return_unused_kwargs=True, **kwargs)
        scheduler._warn_unimplemented(values, stacklevel=3)
        return (scheduler, unused) if return_unused_kwargs else scheduler

    @classmethod
    def _compatible_config_keys(cls) -> frozenset[str]:
        keys = set()
        for klass in cls._get_compatibles():
            keys |= set(_init_defaults(klass))
        return frozenset(keys - set(_init_defaults(cls)))

    def _accept_hidden_keys(self, kwargs: dict[str, Any]) -> None:
        """``__init__(**config)`` of a config that holds keys for compatible classes (diffusers' "hidden" entries,
        which ``from_config`` keeps for them): keep them in the config; any other key is a ``TypeError``."""
        unknown = sorted(set(kwargs) - self._compatible_config_keys())
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected keyword arguments {', '.join(unknown)}")
        if not kwargs:
            return
        # a splat of one of our own configs passes ldm_beta_schedule; other callers mean diffusers' options
        from_ldm_config = "ldm_beta_schedule" not in (self.config.get("_use_default_values") or [])
        self.register_to_config(**kwargs)
        if not from_ldm_config:
            self._warn_unimplemented(kwargs, stacklevel=6)  # the caller of __init__ (through register_to_config)

    def _unimplemented_options(self, values: Mapping[str, Any]) -> list[str]:
        """``key=value`` of the stock counterpart's options that this class ignores, where the value differs from
        what this class does."""
        return []

    def _warn_unimplemented(self, values: Mapping[str, Any], stacklevel: int) -> None:
        ignored = self._unimplemented_options(values)
        if ignored:
            warnings.warn(
                f"{type(self).__name__}: diffusers options not implemented by the original sampler are ignored: "
                f"{'; '.join(ignored)}",
                UserWarning,
                stacklevel=stacklevel,
            )

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
        rescale_betas_zero_snr: bool = False,
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
        if rescale_betas_zero_snr:  # after trained_betas, as diffusers: the config keeps the betas before rescaling
            betas64 = rescale_zero_terminal_snr(betas64)
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

    def _finish_init(self, hidden: dict[str, Any]) -> None:
        self._accept_hidden_keys(hidden)
        # every key is now explicit, so diffusers' from_config keeps them all (instead of the target's defaults)
        self.register_to_config(_use_default_values=[])

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
        """Forward diffusion ``√ᾱ_t·x0 + √(1-ᾱ_t)·ε`` — the original ``q_sample``
        (its float32 operations in its order: bit-equal to it on the same CPU).

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


def _is_ldm_config(config: Mapping[str, Any]) -> bool:
    """A config written by one of the ldm_compat schedulers (its keys have LDM meaning, e.g. ``clip_sample`` is the
    original DDPM's ``clip_denoised``)."""
    return config.get("_class_name") in LDM_SCHEDULER_NAMES or "ldm_beta_schedule" in config


def _with_source_defaults(cls, config: dict[str, Any]) -> dict[str, Any]:
    """Fill the keys a stock scheduler left at its defaults with that scheduler's defaults."""
    used = list(config.get("_use_default_values") or [])
    if not used:
        return config
    source = _source_class(cls, config, used)
    if source is None:
        return config  # unknown origin: diffusers' rule (this class's defaults) applies
    defaults = _init_defaults(source)
    config.update({k: defaults[k] for k in used if k in defaults})
    config["_use_default_values"] = [k for k in used if k not in defaults]
    return config


def _source_class(cls, config: Mapping[str, Any], used: list[str]):
    """The stock diffusers class that wrote an in-memory config: by ``_class_name``, else the compatible class whose
    ``__init__`` keys are among the config's keys and cover its ``_use_default_values`` (unique, or all agreeing on
    those defaults)."""
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    name = config.get("_class_name")
    if isinstance(name, str) and name not in LDM_SCHEDULER_NAMES:
        klass = getattr(diffusers, name, None)
        return klass if isinstance(klass, type) and issubclass(klass, SchedulerMixin) else None
    keys = {k for k in config if not k.startswith("_")}
    candidates = []
    for klass in cls._get_compatibles():
        if klass.__name__ in LDM_SCHEDULER_NAMES:
            continue
        init_keys = set(_init_defaults(klass))
        if init_keys <= keys and set(used) <= init_keys:
            candidates.append(klass)
    exact = [k for k in candidates if set(_init_defaults(k)) == keys]
    if len(exact) == 1:
        return exact[0]
    if candidates and all(
        {k: _init_defaults(c)[k] for k in used} == {k: _init_defaults(candidates[0])[k] for k in used}
        for c in candidates
    ):
        return candidates[0]
    return None
