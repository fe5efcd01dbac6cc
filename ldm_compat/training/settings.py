"""What a training run needs from an original-style YAML (``model``, ``data``, ``lightning``), checked up front.

Every ``DDPM`` option of latent-diffusion/stablediffusion is recognised; unknown ``model.params`` keys are listed
in one warning (a typo should not pass silently), wrong types are a one-line error naming the key.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ldm_compat.config import ConfigError, to_plain

# every DDPM.__init__ argument of CompVis latent-diffusion and Stability-AI stablediffusion
DDPM_KEYS = frozenset(
    {
        "unet_config", "timesteps", "beta_schedule", "loss_type", "ckpt_path", "ignore_keys", "load_only_unet",
        "monitor", "use_ema", "first_stage_key", "image_size", "channels", "log_every_t", "clip_denoised",
        "linear_start", "linear_end", "cosine_s", "given_betas", "original_elbo_weight", "v_posterior",
        "l_simple_weight", "conditioning_key", "parameterization", "scheduler_config", "use_positional_encodings",
        "learn_logvar", "logvar_init", "make_it_fit", "ucg_training", "reset_ema", "reset_num_ema_updates",
    }
)  # fmt: skip
# expected Python types of the scalar options (None is always allowed: it means "default")
_TYPES: dict[str, tuple[type, ...]] = {
    "timesteps": (int,), "beta_schedule": (str,), "loss_type": (str,), "ckpt_path": (str,), "ignore_keys": (list,),
    "load_only_unet": (bool,), "monitor": (str,), "use_ema": (bool,), "first_stage_key": (str,),
    "image_size": (int,), "channels": (int,), "log_every_t": (int,), "clip_denoised": (bool,),
    "linear_start": (int, float), "linear_end": (int, float), "cosine_s": (int, float), "given_betas": (list,),
    "original_elbo_weight": (int, float), "v_posterior": (int, float), "l_simple_weight": (int, float),
    "conditioning_key": (str,), "parameterization": (str,), "scheduler_config": (dict,),
    "use_positional_encodings": (bool,), "learn_logvar": (bool,), "logvar_init": (int, float),
    "make_it_fit": (bool,), "ucg_training": (dict,), "reset_ema": (bool,), "reset_num_ema_updates": (bool,),
    "unet_config": (dict,),
}  # fmt: skip


def _get(mapping: Mapping, dotted: str, default: Any = None) -> Any:
    node: Any = mapping
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or node.get(part) is None:
            return default
        node = node[part]
    return node


def check_ddpm_params(params: Mapping, source: str = "config") -> list[str]:
    """Validate ``model.params``: raise on wrong types, warn once listing unknown keys; return the unknown keys."""
    for key, types in _TYPES.items():
        value = params.get(key)
        if value is None:
            continue
        if isinstance(value, bool) and bool not in types:
            raise ConfigError(f"{source}: model.params.{key}={value!r}: expected {'/'.join(t.__name__ for t in types)}")
        if not isinstance(value, types):
            raise ConfigError(
                f"{source}: model.params.{key}={value!r} ({type(value).__name__}): "
                f"expected {'/'.join(t.__name__ for t in types)}"
            )
    if "unet_config" not in params:
        raise ConfigError(f"{source}: model.params.unet_config is required (the UNetModel target and params)")
    known = DDPM_KEYS
    if params.get("first_stage_config") is not None:
        from ldm_compat.convert.to_diffusers import LATENT_DIFFUSION_KEYS

        known = known | LATENT_DIFFUSION_KEYS  # LatentDiffusion's own options (checked by training.latent_model)
    unknown = sorted(set(params) - known)
    if unknown:
        warnings.warn(f"{source}: model.params keys not used by DDPM (ignored): {', '.join(unknown)}", stacklevel=2)
    if params.get("use_positional_encodings"):
        warnings.warn(
            f"{source}: model.params.use_positional_encodings has no effect (dead code in the original: it calls "
            "an undefined compute_latent_shifts)",
            stacklevel=2,
        )
    if params.get("reset_ema") and not params.get("ckpt_path"):
        raise ConfigError(f"{source}: model.params.reset_ema needs ckpt_path (as in stablediffusion)")
    return unknown


# ldm_compat's own options, in a top-level YAML section the original main.py never reads (it uses model, data,
# lightning), so a config carrying it still trains in the original code
OWN_SECTION = "ldm_compat"
OBJECTIVE_FLAGS = ("ldm_bug_compat", "logvar_weighting")


def objective_flags(config: Mapping, source: str = "config") -> dict[str, bool]:
    """``ldm_bug_compat`` and ``logvar_weighting`` for ``DDPMObjective`` from ``ldm_compat.objective`` of a whole
    config; ``logvar_weighting`` defaults to what the original class of ``model.target`` does."""
    from ldm_compat.training.objective import ORIGINAL_LOGVAR_WEIGHTING

    section = config.get(OWN_SECTION)
    section = {} if section is None else section
    if not isinstance(section, Mapping) or set(section) - {"objective"}:
        raise ConfigError(f"{source}: {OWN_SECTION}: expected a mapping with the one key 'objective', got {section!r}")
    flags = section.get("objective")
    flags = {} if flags is None else flags
    where = f"{source}: {OWN_SECTION}.objective"
    if not isinstance(flags, Mapping) or set(flags) - set(OBJECTIVE_FLAGS):
        raise ConfigError(f"{where}: expected a mapping of {', '.join(OBJECTIVE_FLAGS)}, got {flags!r}")
    bug_compat = flags.get("ldm_bug_compat")
    bug_compat = False if bug_compat is None else bug_compat
    weighting = flags.get("logvar_weighting")
    for key, value in (("ldm_bug_compat", bug_compat), ("logvar_weighting", weighting)):
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{where}.{key}={value!r}: expected true or false")
    if weighting is None:
        target = _get(config, "model.target")
        weighting = ORIGINAL_LOGVAR_WEIGHTING.get(target)
        if weighting is None:
            raise ConfigError(
                f"{source}: model.target={target!r} is not an original DDPM class; set {OWN_SECTION}.objective."
                "logvar_weighting (true: LatentDiffusion's loss, false: DDPM's)"
            )
    return {"ldm_bug_compat": bug_compat, "logvar_weighting": weighting}


@dataclass
class TrainSettings:
    """The run's numbers, read from the original config sections with the original defaults."""

    params: dict  # model.params
    base_learning_rate: float
    batch_size: int
    accumulate_grad_batches: int = 1
    max_steps: int | None = None
    max_epochs: int | None = None
    gradient_clip_val: float = 0.0
    image_log_frequency: int = 750  # lightning.callbacks.image_logger.params.batch_frequency
    max_images: int = 4
    val_check_interval: int | None = None
    log_every_n_steps: int = 50  # lightning.trainer.log_every_n_steps, pytorch-lightning's default
    data: dict = field(default_factory=dict)  # the data section, params included
    source: str = "config"
    target: str | None = None  # model.target
    objective_flags: dict = field(default_factory=dict)  # DDPMObjective keywords (see objective_flags)

    @classmethod
    def from_config(cls, config: Mapping, source: str = "config") -> TrainSettings:
        config = to_plain(config)
        params = dict(_get(config, "model.params", {}))
        check_ddpm_params(params, source)
        base_lr = _get(config, "model.base_learning_rate")
        if base_lr is None:
            raise ConfigError(f"{source}: model.base_learning_rate is required")
        batch_size = _get(config, "data.params.batch_size")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"{source}: data.params.batch_size={batch_size!r}: expected a positive integer")
        trainer = _get(config, "lightning.trainer", {})
        accumulate = trainer.get("accumulate_grad_batches") or 1
        if not isinstance(accumulate, int) or accumulate < 1:
            raise ConfigError(f"{source}: lightning.trainer.accumulate_grad_batches={accumulate!r}: expected int ≥ 1")
        max_steps = trainer.get("max_steps")
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps == 0 or max_steps < -1):
            raise ConfigError(f"{source}: lightning.trainer.max_steps={max_steps!r}: expected a positive integer")
        logger = _get(config, "lightning.callbacks.image_logger.params", {})
        log_every = trainer.get("log_every_n_steps", 50)
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
            raise ConfigError(f"{source}: lightning.trainer.log_every_n_steps={log_every!r}: expected int ≥ 1")
        return cls(
            params=params,
            base_learning_rate=float(base_lr),
            batch_size=batch_size,
            accumulate_grad_batches=accumulate,
            max_steps=None if max_steps in (None, -1) else max_steps,
            max_epochs=trainer.get("max_epochs"),
            gradient_clip_val=float(trainer.get("gradient_clip_val") or 0.0),
            image_log_frequency=int(logger.get("batch_frequency", 750)),
            max_images=int(logger.get("max_images", 4)),
            val_check_interval=trainer.get("val_check_interval")
            if isinstance(trainer.get("val_check_interval"), int)
            else None,
            log_every_n_steps=log_every,
            data=dict(config.get("data") or {}),
            source=source,
            target=_get(config, "model.target"),
            objective_flags=objective_flags(config, source),
        )

    def deviation_report(self, objective) -> str:
        """One line for the start of training: what differs from the original ``model.target`` class, or that
        nothing does."""
        deviations = objective.deviations(self.target)
        if not deviations:
            return f"objective: as the original {self.target}"
        return f"objective: deviations from the original {self.target}: " + "; ".join(deviations)

    @property
    def use_ema(self) -> bool:
        return bool(self.params.get("use_ema", True))

    @property
    def is_latent(self) -> bool:
        """A ``LatentDiffusion`` run (``model.params.first_stage_config``)."""
        return self.params.get("first_stage_config") is not None

    @property
    def first_stage_key(self) -> str:
        return self.params.get("first_stage_key") or "image"

    @property
    def monitor(self) -> str | None:
        return self.params.get("monitor", "val/loss")
