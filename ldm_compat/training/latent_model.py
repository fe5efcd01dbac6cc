"""The parts of the original ``LatentDiffusion`` around the UNet, for training: first stage, cond stage, scale factor.

``LatentModel`` holds the frozen first stage (a stock diffusers ``AutoencoderKL``/``VQModel`` in eval mode, from
``ldm_compat.models.first_stage``) and the cond stage (``ldm_compat.models.cond_stage``), and does what the original
does with them: ``get_input`` (encode, then ``get_first_stage_encoding``: a KL posterior *sample* times
``scale_factor``, or the VQ latents before quantization), ``get_learned_conditioning`` (``cond_stage_forward``
included), the ``scale_by_std`` rescaling on the very first batch, ``ckpt_path`` (a whole original checkpoint or a
converted folder), and the original state dict (``first_stage_model.*``, ``cond_stage_model.*``, ``scale_factor``)
for the outputs. ``LatentTrainModule`` is what Accelerate wraps: UNet + objective + the cond stage when
``cond_stage_trainable`` (so its gradients are synchronised too), running ``LatentDiffusion.forward``.

Random draws happen where the original makes them, from the same generators: the posterior noise
(``torch.randn(mean.shape)`` on the CPU) in ``get_input``, then ``t``, then (inside the module) whatever a trainable
cond stage draws, the ``num_timesteps_cond`` noise, and the loss noise. ``draws`` (``latent_stages.ProcessDraws``)
hands every process its slice of one draw for the global batch; a ``draw`` argument overrides it (validation and
image logging use their own generators).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm_compat.config import ConfigError, to_plain
from ldm_compat.models.cond_stage.base import module_tree_order
from ldm_compat.training.latent_objective import (
    FIRST_STAGE,
    UNCONDITIONAL,
    check_latent_params,
    conditioning_source,
    make_cond_ids,
    settle_conditioning_key,
    std_scale_factor,
)
from ldm_compat.training.latent_stages import (
    ProcessDraws,
    build_cond_stage,
    build_first_stage,
    read_original_state_dict,
    update_first_stage,
)

logger = logging.getLogger(__name__)

LATENT_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
# batch keys of the latent cache (ldm_compat.training.latent_cache): first-stage moments, cond-stage output, the text
CACHED_MOMENTS, CACHED_COND, CACHED_COND_TEXT = "__first_stage__", "__cond__", "__cond_text__"
# cond_stage_forward names that mean the cond stage's own forward: every original encoder's encode() calls forward
_FORWARD_NAMES = (None, "encode", "forward", "__call__")

Draw = Callable[[tuple[int, ...]], torch.Tensor]  # shape → standard-normal noise


def is_latent(params: Mapping) -> bool:
    """A ``model.params`` of a ``LatentDiffusion`` (it has a ``first_stage_config``)."""
    return params.get("first_stage_config") is not None


@dataclass(frozen=True)
class LatentOptions:
    """``LatentDiffusion.__init__`` arguments, with the original defaults and ``conditioning_key`` settled."""

    first_stage_config: dict
    cond_stage_config: Any
    first_stage_key: str = "image"
    cond_stage_key: str = "image"
    cond_stage_trainable: bool = False
    cond_stage_forward: str | None = None
    conditioning_key: str | None = None
    scale_factor: float = 1.0
    scale_by_std: bool = False
    num_timesteps_cond: int = 1
    timesteps: int = 1000

    @classmethod
    def from_params(cls, params: Mapping, source: str = "config") -> LatentOptions:
        check_latent_params(params, source)
        forward = params.get("cond_stage_forward")
        if forward not in _FORWARD_NAMES:
            raise ConfigError(
                f"{source}: model.params.cond_stage_forward={forward!r}: the cond stages here expose their forward "
                "only (the original encoders' encode() calls forward); use null or 'encode'"
            )
        return cls(
            first_stage_config=to_plain(params["first_stage_config"]),
            cond_stage_config=to_plain(params["cond_stage_config"]),
            first_stage_key=params.get("first_stage_key") or "image",
            cond_stage_key=params.get("cond_stage_key") or "image",
            cond_stage_trainable=bool(params.get("cond_stage_trainable", False)),
            cond_stage_forward=forward,
            conditioning_key=settle_conditioning_key(params),
            scale_factor=float(params.get("scale_factor", 1.0)),
            scale_by_std=bool(params.get("scale_by_std", False)),
            num_timesteps_cond=int(params.get("num_timesteps_cond") or 1),
            timesteps=int(params.get("timesteps", 1000)),
        )

    @property
    def num_downs(self) -> int:
        """``len(ch_mult) - 1``: the first stage downsamples by ``2 ** num_downs``."""
        ddconfig = (self.first_stage_config.get("params") or {}).get("ddconfig") or {}
        return max(len(ddconfig.get("ch_mult") or (1,)) - 1, 0)


class LatentModel:
    """First stage, cond stage and ``scale_factor`` of a ``LatentDiffusion`` run (see the module docstring).

    Registered for checkpointing (``state_dict``/``load_state_dict``): the ``scale_factor`` a ``scale_by_std`` run
    computed, and whether it came from a checkpoint.
    """

    def __init__(self, options: LatentOptions, first_stage, cond_stage, *, search_dirs=(), source: str = "config"):
        self.options = options
        self.first_stage = first_stage
        self.cond_stage = cond_stage
        self.search_dirs = list(search_dirs)
        self.source = source
        self.draws = ProcessDraws()  # one process; build_latent_model binds the run's processes
        self.restarted_from_ckpt = False
        self.std_rescaled = False
        self.stage_key_order: list[str] = []  # first/cond-stage keys in a loaded checkpoint's (the original's) order
        self.cond_ids = make_cond_ids(options.timesteps, options.num_timesteps_cond) if self.shorten_cond else None
        self._share_first_stage()
        if cond_stage is not None:
            for module in cond_stage.modules().values():
                module.train(options.cond_stage_trainable)
                module.requires_grad_(options.cond_stage_trainable)

    @classmethod
    def from_params(cls, params: Mapping, *, target: str | None = None, search_dirs=(), source: str = "config"):
        if target is not None and target != LATENT_TARGET:
            raise ConfigError(
                f"{source}: model.target={target!r}: latent training supports {LATENT_TARGET} (subclasses change "
                "get_input and the conditioning)"
            )
        options = LatentOptions.from_params(params, source)
        first_stage = build_first_stage(options.first_stage_config, options.scale_factor, options.scale_by_std, source)
        cond_stage = build_cond_stage(options.cond_stage_config, None, search_dirs, source)
        return cls(options, first_stage, cond_stage, search_dirs=search_dirs, source=source)

    def _share_first_stage(self) -> None:
        # __is_first_stage__: the original's cond_stage_model *is* first_stage_model (encode, then mode())
        if self.options.cond_stage_config == FIRST_STAGE and self.cond_stage is not None:
            self.cond_stage.first_stage = self.first_stage.model

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def shorten_cond(self) -> bool:
        return self.options.num_timesteps_cond > 1

    @property
    def is_kl(self) -> bool:
        return not self.first_stage.spec.is_vq

    @property
    def scale_factor(self) -> float:
        return self.first_stage.scale_factor

    def trainable_cond_modules(self) -> dict[str, nn.Module]:
        """The cond stage's modules when ``cond_stage_trainable`` (their parameters join the optimizer)."""
        if not self.options.cond_stage_trainable or self.cond_stage is None:
            return {}
        return self.cond_stage.modules()

    def to(self, device) -> LatentModel:
        self.first_stage.model.to(device)
        if self.cond_stage is not None:
            self.cond_stage.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.first_stage.model.parameters()).device

    # ---------------------------------------------------------------------------------------------- first stage
    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor):
        """The posterior (KL) or ``quant_conv(encoder(x))`` (VQModelInterface), in float32, without gradients."""
        return self.first_stage.encode_first_stage(x.to(self.device, torch.float32))

    def posterior_from_moments(self, moments: torch.Tensor):
        """What ``encode_first_stage`` returns, from the cached encoder output (``latent_cache``)."""
        from ldm_compat.models.first_stage import LDMDiagonalGaussian

        moments = moments.to(self.device, torch.float32)
        return LDMDiagonalGaussian(moments) if self.is_kl else moments

    @torch.no_grad()
    def get_first_stage_encoding(self, posterior, draw: Draw | None = None) -> torch.Tensor:
        """``scale_factor * z``; a KL ``z`` is ``mean + std * eps`` with ``eps = draw(mean.shape)`` (default this
        process's share of the original's ``torch.randn(mean.shape)`` on the CPU), moved to the posterior's device."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if isinstance(posterior, DiagonalGaussianDistribution):
            eps = (draw or self.draws.cpu)(tuple(posterior.mean.shape))
            posterior = posterior.mean + posterior.std * eps.to(posterior.mean.device)
        return self.first_stage.get_first_stage_encoding(posterior)

    @torch.no_grad()
    def get_input(self, batch: Mapping[str, Any], draw: Draw | None = None) -> torch.Tensor:
        """``z`` of ``LatentDiffusion.get_input``: from the cached moments when the batch has them, else encoded."""
        if CACHED_MOMENTS in batch:
            posterior = self.posterior_from_moments(batch[CACHED_MOMENTS])
        else:
            posterior = self.encode_first_stage(self.pixels(batch))
        return self.get_first_stage_encoding(posterior, draw)

    def pixels(self, batch: Mapping[str, Any]) -> torch.Tensor:
        from ldm_compat.training.batch import get_input

        return get_input(batch, self.options.first_stage_key).to(self.device)

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage.decode_first_stage(z.to(self.device, torch.float32))

    # ---------------------------------------------------------------------------------------------- cond stage
    def get_learned_conditioning(self, c):
        """The original ``get_learned_conditioning``: the cond stage's forward (every ``cond_stage_forward`` accepted,
        ``encode``/``forward``, is that forward in the original encoders)."""
        if self.cond_stage is None:
            raise ValueError(f"{self.source}: {UNCONDITIONAL}: there is no cond stage to encode with")
        return self.cond_stage.encode(c)

    def conditioning(self, batch: Mapping[str, Any]):
        """``c`` of ``LatentDiffusion.get_input``: ``None`` without conditioning; with a trainable cond stage the raw
        input (``LatentTrainModule`` encodes it, after ``t`` is drawn, as ``forward`` does); else encoded."""
        o = self.options
        if o.conditioning_key is None:
            return None
        if CACHED_COND in batch and not o.cond_stage_trainable:
            return self._cached_conditioning(batch)
        xc = conditioning_source(batch, o.cond_stage_key, o.first_stage_key, self._lazy_pixels(batch), self.device)
        if isinstance(xc, torch.Tensor):
            xc = xc.to(self.device)
        if o.cond_stage_trainable:
            return xc
        with torch.no_grad():
            return self.get_learned_conditioning(xc)

    def encoded_conditioning(self, batch: Mapping[str, Any]):
        """``conditioning`` encoded also when the cond stage is trained (for sampling), without gradients."""
        c = self.conditioning(batch)
        if c is not None and self.options.cond_stage_trainable:
            with torch.no_grad():
                c = self.get_learned_conditioning(c)
        return c

    def _lazy_pixels(self, batch):
        if self.options.cond_stage_key == self.options.first_stage_key:
            return self.pixels(batch)
        return None

    @torch.no_grad()
    def _cached_conditioning(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The cached encodings; rows whose text changed since (``ucg_training``) are encoded again."""
        c = batch[CACHED_COND].to(self.device)
        texts, cached = list(batch[self.options.cond_stage_key]), list(batch[CACHED_COND_TEXT])
        changed = [i for i, (a, b) in enumerate(zip(texts, cached)) if a != b]
        if changed:
            c = c.clone()
            c[changed] = self.get_learned_conditioning([texts[i] for i in changed]).to(c.dtype)
        return c

    def cond_kwargs(self, c) -> dict[str, torch.Tensor]:
        """An encoded conditioning in the pipeline's (diffusers) names, for sampling."""
        from ldm_compat.models.conditioning import wrap_conditioning

        key = self.options.conditioning_key
        if key is None or c is None:
            return {}
        wrapped = {k: [v] if isinstance(v, torch.Tensor) else v for k, v in wrap_conditioning(c, key).items()}
        out = {}
        if wrapped.get("c_concat"):
            out["concat"] = torch.cat(list(wrapped["c_concat"]), dim=1)
        if wrapped.get("c_crossattn"):
            if key == "adm":  # class labels travel in c_crossattn (DiffusionWrapper)
                out["class_labels"] = wrapped["c_crossattn"][0]
            else:
                out["encoder_hidden_states"] = torch.cat(list(wrapped["c_crossattn"]), dim=1)
        if wrapped.get("c_adm") is not None:
            out["class_labels"] = wrapped["c_adm"][0]
        return out

    # ---------------------------------------------------------------------------------------------- scale_by_std
    def needs_std_rescaling(self, global_step: int, epoch: int, batch_idx: int) -> bool:
        """``on_train_batch_start``'s condition: ``scale_by_std``, the very first batch, not restarted."""
        o = self.options
        return o.scale_by_std and global_step == 0 and epoch == 0 and batch_idx == 0 and not self.restarted_from_ckpt

    @torch.no_grad()
    def rescale_by_std(self, batch: Mapping[str, Any], draw: Draw | None = None) -> torch.Tensor:
        """``scale_factor = 1 / z.flatten().std()`` of this batch's encoding (``z`` with the current factor, 1)."""
        if self.scale_factor != 1.0:
            raise ValueError(f"scale_by_std: scale_factor is {self.scale_factor}, the original requires 1.0 here")
        value = std_scale_factor(self.get_input(batch, draw))
        self.set_scale_factor(value)
        return value

    def on_train_batch_start(self, batch, state, accelerator) -> None:
        """The original's ``on_train_batch_start``: on the very first batch process 0 sets ``scale_factor`` from its
        encodings; every process draws the same posterior noise (so their random streams stay together) and takes
        process 0's value (the original's buffer reached the other processes through DDP)."""
        if not self.needs_std_rescaling(state.global_step, state.epoch, state.batch_in_epoch):
            return
        value = self.rescale_by_std(batch).to(accelerator.device)
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            value = broadcast(value.reshape(1), from_process=0)
        self.set_scale_factor(value.cpu())
        accelerator.print(f"scale_by_std: scale_factor set to {self.scale_factor!r}")

    def validation_inputs(self, batch, generator: torch.Generator):
        """``(z, c)`` with the posterior noise from ``generator``, so that validating never changes the run."""
        return self.get_input(batch, lambda shape: torch.randn(shape, generator=generator)), self.conditioning(batch)

    def set_scale_factor(self, value) -> None:
        """``value``: the float32 buffer (``scale_by_std``); kept exactly (float32 → float → float32 is lossless)."""
        self.first_stage.scale_factor = float(torch.as_tensor(value, dtype=torch.float32).item())
        self.std_rescaled = True

    def scale_factor_tensor(self) -> torch.Tensor | None:
        """The ``scale_factor`` buffer of a ``scale_by_std`` model (0-dim float32), else ``None``."""
        if not self.options.scale_by_std:
            return None
        return torch.tensor(self.first_stage.scale_factor, dtype=torch.float32)

    # Accelerate's register_for_checkpointing
    def state_dict(self) -> dict:
        return {"scale_factor": self.first_stage.scale_factor, "std_rescaled": self.std_rescaled,
                "restarted_from_ckpt": self.restarted_from_ckpt}  # fmt: skip

    def load_state_dict(self, state: Mapping) -> None:
        self.first_stage.scale_factor = float(state["scale_factor"])
        self.std_rescaled = bool(state["std_rescaled"])
        self.restarted_from_ckpt = bool(state["restarted_from_ckpt"])

    # ---------------------------------------------------------------------------------------------- checkpoints
    def load_original_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """The first/cond-stage and ``scale_factor`` part of an original checkpoint, ``strict=False`` as the original
        ``init_from_ckpt``: returns ``(loaded, unexpected)`` original keys."""
        first = {k[len(FIRST_STAGE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(FIRST_STAGE_PREFIX)}
        cond = {k[len(COND_STAGE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(COND_STAGE_PREFIX)}
        loaded, unexpected = [], []
        self.stage_key_order = [k for k in state_dict if k.startswith((FIRST_STAGE_PREFIX, COND_STAGE_PREFIX))]
        if first:
            self.first_stage, extra = update_first_stage(self.first_stage, self.options.first_stage_config, first)
            self.first_stage.model.requires_grad_(False)
            self._share_first_stage()
            unexpected += [FIRST_STAGE_PREFIX + k for k in extra]
            loaded += [FIRST_STAGE_PREFIX + k for k in first if k not in extra]
        if cond:
            if self.cond_stage is None:
                unexpected += [COND_STAGE_PREFIX + k for k in cond]
            else:
                current = self.cond_stage.original_state_dict()
                extra = [k for k in cond if k not in current]
                current.update({k: v for k, v in cond.items() if k in current})
                self.cond_stage = build_cond_stage(self.options.cond_stage_config, current, self.search_dirs,
                                                    self.source)  # fmt: skip
                for module in self.cond_stage.modules().values():
                    module.train(self.options.cond_stage_trainable)
                    module.requires_grad_(self.options.cond_stage_trainable)
                unexpected += [COND_STAGE_PREFIX + k for k in extra]
                loaded += [COND_STAGE_PREFIX + k for k in cond if k not in extra]
        if "scale_factor" in state_dict:
            if self.options.scale_by_std:
                self.set_scale_factor(state_dict["scale_factor"])
                loaded.append("scale_factor")
            else:
                unexpected.append("scale_factor")  # a plain attribute in the original: not loaded
        self.restarted_from_ckpt = True
        return loaded, unexpected

    def init_from_ckpt(self, ckpt_path, unet, *, ema=None, objective=None, ignore_keys=(), load_only_unet=False,
                       make_it_fit=False):  # fmt: skip
        """``LatentDiffusion``'s ``ckpt_path``: UNet, EMA and ``logvar`` through ``init_from_ckpt``, then the first and
        cond stage and ``scale_factor``. ``ckpt_path`` is an original ``.ckpt``/``.safetensors`` or a converted
        folder. ``load_only_unet`` has no effect, as in the original (LatentDiffusion loads the whole model)."""
        from ldm_compat.training.init_ckpt import init_from_ckpt

        if load_only_unet:
            logger.warning("%s: load_only_unet has no effect in LatentDiffusion (the original ignores it)", self.source)
        state_dict = read_original_state_dict(ckpt_path)
        ignore = tuple(ignore_keys or ())
        ignored = [k for k in state_dict if ignore and k.startswith(ignore)]
        state_dict = {k: v for k, v in state_dict.items() if k not in set(ignored)}
        report = init_from_ckpt(ckpt_path, unet, ema=ema, objective=objective, make_it_fit=make_it_fit,
                                state_dict=state_dict)  # fmt: skip
        report.ignored = ignored
        loaded, unexpected = self.load_original_state_dict(state_dict)
        ours = set(loaded) | set(unexpected)
        report.unexpected = [k for k in report.unexpected if k not in ours] + unexpected
        report.loaded += loaded
        return report

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """``scale_factor`` (``scale_by_std``), ``first_stage_model.*``, ``cond_stage_model.*`` as the original."""
        from ldm_compat.models.first_stage import to_original_state_dict

        out: dict[str, torch.Tensor] = {}
        scale = self.scale_factor_tensor()
        if scale is not None:
            out["scale_factor"] = scale
        model = self.first_stage.model
        first = to_original_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, model)
        out.update((FIRST_STAGE_PREFIX + k, v) for k, v in first.items())
        if self.cond_stage is not None:
            cond = self.cond_stage.original_state_dict()
            out.update((COND_STAGE_PREFIX + k, cond[k]) for k in module_tree_order(cond))
        stages = [k for k in out if k != "scale_factor"]
        if sorted(stages) == sorted(self.stage_key_order):  # the checkpoint we started from knows the order
            out = {**({"scale_factor": out["scale_factor"]} if "scale_factor" in out else {}),
                   **{k: out[k] for k in self.stage_key_order}}  # fmt: skip
        return out

    def train_module(self, unet, objective) -> LatentTrainModule:
        return LatentTrainModule(unet, objective, self)


def build_latent_model(config: Mapping, params: Mapping, source: str, accelerator) -> LatentModel:
    """The trainer's ``LatentModel``: local files (tokenizers, open_clip configs) are looked up beside the YAML
    ``source`` and in the working directory; the stages go to the accelerator's device."""
    from ldm_compat.training.loop import count_params

    search_dirs = [Path(source).parent] if Path(source).is_file() else []
    search_dirs.append(Path.cwd())
    target = (to_plain(config).get("model") or {}).get("target")
    latent = LatentModel.from_params(params, target=target, search_dirs=search_dirs, source=source)
    latent.draws = ProcessDraws(accelerator.num_processes, accelerator.process_index)
    accelerator.print(count_params(latent.first_stage.model, type(latent.first_stage.model).__name__))
    if latent.cond_stage is not None:
        for name, module in latent.cond_stage.modules().items():
            accelerator.print(count_params(module, name))
    return latent.to(accelerator.device)


class LatentTrainModule(nn.Module):
    """``LatentDiffusion.forward`` after ``t`` is drawn, as one module for Accelerate/DDP: encodes a trainable cond
    stage's input, applies the ``num_timesteps_cond`` noise, draws the loss noise (unless given), then ``p_losses``.
    Its draws are ``latent.draws.like`` (``randn_like``, this process's slice of the global batch's draw).
    """

    def __init__(self, unet: nn.Module, objective: nn.Module, latent: LatentModel):
        super().__init__()
        self.unet = unet
        self.objective = objective
        trainable = latent.trainable_cond_modules()
        # registered only when trained, so DDP synchronises (and checkpoints hold) exactly the trained weights
        self.cond_stage_model = nn.ModuleDict(trainable) if trainable else None
        self.latent = latent  # not a Module: not registered
        if latent.cond_ids is not None:
            self.register_buffer("cond_ids", latent.cond_ids.clone(), persistent=False)
        else:
            self.cond_ids = None

    def _randn_like(self, like: torch.Tensor) -> torch.Tensor:
        return self.latent.draws.like(like)

    def forward(self, x_start, t, noise=None, cond=None):
        if cond is not None and self.latent.options.cond_stage_trainable:
            cond = self.latent.get_learned_conditioning(cond)
        if cond is not None and self.cond_ids is not None:
            # LatentDiffusion.forward's shorten_cond_schedule: noise the conditioning to the timestep's cond_ids
            tc = self.cond_ids[t].to(x_start.device)
            cond = self.objective.q_sample(cond, tc, self._randn_like(cond.float()))
        if noise is None:
            noise = self._randn_like(x_start)
        return self.objective.p_losses(self.unet, x_start, t, noise=noise, cond=cond)


__all__ = [
    "CACHED_COND",
    "CACHED_COND_TEXT",
    "CACHED_MOMENTS",
    "LATENT_TARGET",
    "LatentModel",
    "LatentOptions",
    "LatentTrainModule",
    "build_latent_model",
    "is_latent",
]
