"""The training objective of the original latent-diffusion ``DDPM``: ``p_losses``, ``get_loss``, ``lvlb_weights``.

``DDPMObjective`` is a small ``ModelMixin``: its config holds the loss options of the original ``model.params`` and
the schedule it was built with; its only state is ``logvar`` (a parameter when ``learn_logvar``, otherwise a
non-persistent buffer that moves with ``.to(device)``) plus non-persistent schedule buffers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ldm_compat.config import model_params
from ldm_compat.schedulers.common import extract

LOSS_TYPES = ("l1", "l2")
PARAMETERIZATIONS = ("eps", "x0", "v")
# model.params keys that DDPMObjective reads; the schedule keys are passed on to LDMDDPMScheduler.from_ldm_config
OBJECTIVE_KEYS = (
    "loss_type",
    "l_simple_weight",
    "original_elbo_weight",
    "parameterization",
    "learn_logvar",
    "logvar_init",
    "conditioning_key",
)
SCHEDULE_KEYS = ("timesteps", "beta_schedule", "linear_start", "linear_end", "cosine_s", "given_betas", "v_posterior")

_ORIGINAL_MODULE = "ldm.models.diffusion.ddpm."
# model.target → whether that original class's p_losses weights the simple loss by logvar. DDPM.p_losses never
# reads logvar (with learn_logvar it is a parameter without gradient); LatentDiffusion.p_losses (and every
# subclass in latent-diffusion and stablediffusion: none overrides p_losses) always does, learned or not.
ORIGINAL_LOGVAR_WEIGHTING = {
    _ORIGINAL_MODULE + "DDPM": False,
    **{
        _ORIGINAL_MODULE + name: True
        for name in (
            "LatentDiffusion", "Layout2ImgDiffusion", "LatentUpscaleDiffusion", "LatentFinetuneDiffusion",
            "LatentInpaintDiffusion", "LatentDepth2ImageDiffusion", "LatentUpscaleFinetuneDiffusion",
            "ImageEmbeddingConditionedLatentDiffusion",
        )
    },
}  # fmt: skip


def lvlb_weights_from_buffers(
    buffers: Mapping[str, torch.Tensor], alphas: torch.Tensor, parameterization: str, ldm_bug_compat: bool = False
) -> torch.Tensor:
    """The original ``lvlb_weights`` (latent-diffusion ``register_schedule``), in float32 from the float32 buffers.

    ``alphas`` is ``1 - betas`` computed in float64 and cast to float32, as the original's ``to_torch(alphas)``.
    - eps: ``β² / (2·σ²_post·α·(1-ᾱ))``
    - x0: intended ``0.5·√ᾱ / (2·(1-ᾱ))``; the original computes ``0.5·√ᾱ / (2.*1 - ᾱ)`` (operator precedence bug,
      CompVis/latent-diffusion PR #404) — reproduced only with ``ldm_bug_compat=True``.
    - v: ones (stablediffusion).
    The first entry copies the second (for eps it is inf: the posterior variance is 0 at t=0).
    """
    alphas_cumprod = buffers["alphas_cumprod"]
    if parameterization == "eps":
        weights = buffers["betas"] ** 2 / (2 * buffers["posterior_variance"] * alphas * (1 - alphas_cumprod))
    elif parameterization == "x0":
        denominator = (2.0 * 1 - alphas_cumprod) if ldm_bug_compat else 2.0 * (1 - alphas_cumprod)
        weights = 0.5 * torch.sqrt(alphas_cumprod) / denominator
    elif parameterization == "v":
        weights = torch.ones_like(buffers["betas"])
    else:
        raise ValueError(f"parameterization={parameterization!r}: expected one of {PARAMETERIZATIONS}")
    weights = weights.clone()
    weights[0] = weights[1]
    return weights


class DDPMObjective(ModelMixin, ConfigMixin):
    """The loss of the original ``DDPM.p_losses`` (and ``LatentDiffusion.p_losses`` with ``learn_logvar``).

    Args:
        loss_type: ``"l2"`` or ``"l1"`` — as in latent-diffusion ``DDPM`` (``get_loss``).
        l_simple_weight: weight of the simple loss — as in latent-diffusion.
        original_elbo_weight: weight of the variational bound term ``loss_vlb`` — as in latent-diffusion.
        parameterization: ``"eps"``, ``"x0"`` or ``"v"`` — the model's prediction target, as in latent-diffusion
            (``v`` from stablediffusion).
        learn_logvar: make ``logvar`` (one value per timestep) a trained parameter — as in latent-diffusion.
        logvar_init: initial value of ``logvar`` — as in latent-diffusion.
        conditioning_key: ``DiffusionWrapper`` routing of ``cond`` (None, concat, crossattn, hybrid, adm,
            crossattn-adm, hybrid-adm). The original pixel-space ``DDPM`` ignored conditioning; here ``cond`` is
            routed like ``LatentDiffusion.apply_model``.
        logvar_weighting: apply ``loss_simple / exp(logvar_t) + logvar_t`` (``LatentDiffusion.p_losses``). ``None``
            (default) means "when ``learn_logvar``"; ``False`` is the pixel-space ``DDPM.p_losses``, which never
            used ``logvar`` in the loss (a learned ``logvar`` then keeps ``logvar_init``: ``requires_grad=False``);
            ``True`` is ``LatentDiffusion.p_losses``. With a constant ``logvar`` of 0 all give the same loss.
            Training takes the default of ``model.target``'s class (``training.settings.objective_flags``).
        ldm_bug_compat: reproduce the original x0 ``lvlb_weights`` precedence bug (``2.*1 - ᾱ``).
        timesteps, beta_schedule, linear_start, linear_end, cosine_s, given_betas, v_posterior: the schedule, in
            the original's names and with its defaults (see ``LDMDDPMScheduler.from_ldm_config``); ``timesteps``
            defaults to 1000, or to the number of ``given_betas``.
    """

    config_name = "objective_config.json"

    @register_to_config
    def __init__(
        self,
        loss_type: str = "l2",
        l_simple_weight: float = 1.0,
        original_elbo_weight: float = 0.0,
        parameterization: str = "eps",
        learn_logvar: bool = False,
        logvar_init: float = 0.0,
        conditioning_key: str | None = None,
        logvar_weighting: bool | None = None,
        ldm_bug_compat: bool = False,
        timesteps: int | None = None,
        beta_schedule: str = "linear",
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas: list[float] | None = None,
        v_posterior: float = 0.0,
    ):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization={parameterization!r}: expected one of {PARAMETERIZATIONS}")
        from ldm_compat.models.conditioning import CONDITIONING_KEYS

        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"conditioning_key={conditioning_key!r}: expected one of {CONDITIONING_KEYS}")
        self.scheduler = self._build_scheduler()
        buffers = self.scheduler.ldm_buffers()
        num_timesteps = buffers["betas"].shape[0]
        self.register_buffer("sqrt_alphas_cumprod", buffers["sqrt_alphas_cumprod"], persistent=False)
        self.register_buffer(
            "sqrt_one_minus_alphas_cumprod", buffers["sqrt_one_minus_alphas_cumprod"], persistent=False
        )
        alphas = self.scheduler.ldm_alphas()
        weights = lvlb_weights_from_buffers(buffers, alphas, parameterization, ldm_bug_compat)
        if torch.isnan(weights).all():
            raise ValueError("lvlb_weights are all NaN: the schedule is degenerate")
        self.register_buffer("lvlb_weights", weights, persistent=False)
        logvar = torch.full((num_timesteps,), float(logvar_init))
        if learn_logvar:
            # a loss that never reads logvar leaves it at logvar_init, as the original DDPM did; no gradient is
            # expected of it then, so multi-process training does not wait for one
            self.logvar = nn.Parameter(logvar, requires_grad=self.weights_by_logvar)
        else:
            # the original kept a plain CPU tensor that crashed when indexed by CUDA timesteps; a buffer moves
            self.register_buffer("logvar", logvar, persistent=False)

    def _build_scheduler(self):
        from ldm_compat.schedulers.scheduling_ldm_ddpm import LDMDDPMScheduler

        keys = SCHEDULE_KEYS + ("parameterization",)
        return LDMDDPMScheduler.from_ldm_config({k: self.config[k] for k in keys if self.config[k] is not None})

    @classmethod
    def from_ldm_config(cls, params: Mapping, ldm_bug_compat: bool = False, **overrides) -> DDPMObjective:
        """Build from the original ``model.params`` (or a whole config); other keys are ignored."""
        params = model_params(params)
        kwargs = {k: params[k] for k in OBJECTIVE_KEYS + SCHEDULE_KEYS if params.get(k) is not None}
        if "given_betas" in kwargs:
            kwargs["given_betas"] = [float(b) for b in kwargs["given_betas"]]
        kwargs.update(ldm_bug_compat=ldm_bug_compat, **overrides)
        return cls(**kwargs)

    @property
    def num_timesteps(self) -> int:
        return self.lvlb_weights.shape[0]

    @property
    def weights_by_logvar(self) -> bool:
        weighting = self.config.logvar_weighting
        return self.config.learn_logvar if weighting is None else bool(weighting)

    def deviations(self, target: str | None) -> list[str]:
        """What this objective does differently from the original class ``target`` (a ``model.target``), one
        sentence each; empty when it computes the original's loss."""
        out = []
        config = self.config
        if config.parameterization == "x0" and not config.ldm_bug_compat:
            effect = "changes the loss" if config.original_elbo_weight else "changes only the logged loss_vlb"
            out.append(
                "x0 lvlb_weights use the intended 0.5·√ᾱ/(2·(1-ᾱ)), not the original's 0.5·√ᾱ/(2.*1-ᾱ) precedence "
                f"bug ({effect}; ldm_compat.objective.ldm_bug_compat: true reproduces it)"
            )
        original = ORIGINAL_LOGVAR_WEIGHTING.get(target)
        if original is not None and original != self.weights_by_logvar:
            cls = target.rpartition(".")[2]
            weighted, done = ("", "never does") if self.weights_by_logvar else ("not ", "always does")
            out.append(
                f"logvar_weighting={self.weights_by_logvar}: the simple loss is {weighted}weighted by logvar "
                f"(loss / exp(logvar_t) + logvar_t), which {cls} {done}"
            )
        if target == _ORIGINAL_MODULE + "DDPM" and config.conditioning_key is not None:
            out.append(
                f"conditioning_key={config.conditioning_key!r}: the conditioning reaches the UNet as in "
                "LatentDiffusion.apply_model (the original DDPM.p_losses passes none)"
            )
        return out

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``√ᾱ_t·x0 + √(1-ᾱ_t)·ε`` — the original ``q_sample`` (same operation order, same bits)."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise
        )

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``√ᾱ_t·ε - √(1-ᾱ_t)·x0`` — the stablediffusion ``get_v``."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x.ndim) * noise
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x.ndim) * x
        )

    def get_loss(self, pred: torch.Tensor, target: torch.Tensor, mean: bool = True) -> torch.Tensor:
        """The original ``get_loss``: l1 ``|target - pred|`` or l2 ``mse_loss(target, pred)``."""
        if self.config.loss_type == "l1":
            loss = (target - pred).abs()
            return loss.mean() if mean else loss
        return F.mse_loss(target, pred) if mean else F.mse_loss(target, pred, reduction="none")

    def target(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        parameterization = self.config.parameterization
        if parameterization == "eps":
            return noise
        if parameterization == "x0":
            return x_start
        return self.get_v(x_start, noise, t)

    def sample_timesteps(self, batch_size: int, device=None, generator: torch.Generator | None = None):
        """Uniform ``t ~ U{0, …, T-1}`` per sample, as the original ``DDPM.forward``."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator).long()

    def p_losses(self, unet, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None, cond=None):
        """The original ``p_losses``: returns ``(loss, loss_dict)`` with keys ``{train|val}/loss_simple``,
        ``…/loss_vlb``, ``…/loss`` (and ``…/loss_gamma``, ``…/logvar`` when ``learn_logvar``); the prefix is
        ``train`` in training mode and ``val`` in eval mode, as the original.
        """
        from ldm_compat.models.conditioning import apply_model

        if noise is None:
            noise = torch.randn_like(x_start)
        t = t.to(device=x_start.device, dtype=torch.long)
        x_noisy = self.q_sample(x_start, t, noise)
        model_out = apply_model(unet, x_noisy, t, cond, self.config.conditioning_key)
        target = self.target(x_start, noise, t)
        per_sample = self.get_loss(model_out, target, mean=False).mean(dim=list(range(1, x_start.ndim)))
        prefix = "train" if self.training else "val"
        loss_dict = {f"{prefix}/loss_simple": per_sample.mean()}
        if self.weights_by_logvar:
            # LatentDiffusion.p_losses: the simple loss weighted by a per-timestep (learned) log-variance
            logvar_t = self.logvar[t]
            weighted = per_sample / torch.exp(logvar_t) + logvar_t
            if self.config.learn_logvar:
                loss_dict[f"{prefix}/loss_gamma"] = weighted.mean()
                loss_dict[f"{prefix}/logvar"] = self.logvar.detach().mean()
            loss = self.config.l_simple_weight * weighted.mean()
        else:
            loss = per_sample.mean() * self.config.l_simple_weight
        loss_vlb = (self.lvlb_weights[t] * per_sample).mean()
        loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.config.original_elbo_weight * loss_vlb
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    def forward(self, unet, x_start: torch.Tensor, cond=None, noise=None, generator: torch.Generator | None = None):
        """The original ``DDPM.forward``: uniform random timesteps, then ``p_losses``."""
        t = self.sample_timesteps(x_start.shape[0], device=x_start.device, generator=generator)
        return self.p_losses(unet, x_start, t, noise=noise, cond=cond)
