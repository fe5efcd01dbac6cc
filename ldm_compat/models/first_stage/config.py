"""An original ``first_stage_config`` (``ldm.models.autoencoder.*``) → the config of a stock diffusers autoencoder.

``AutoencoderKL`` → diffusers ``AutoencoderKL``; ``VQModelInterface`` / ``VQModel`` → diffusers ``VQModel``. The
original ``Encoder``/``Decoder`` (``ldm/modules/diffusionmodules/model.py``) and diffusers' ``Encoder``/``Decoder``
(``diffusers/models/autoencoders/vae.py``) compute the same function for the configs accepted here:

- per level ``num_res_blocks`` ResnetBlocks (decoder: one more), each followed by a vanilla ``AttnBlock`` when the
  level's resolution is in ``attn_resolutions``: diffusers' ``AttnDownEncoderBlock2D`` / ``AttnUpDecoderBlock2D``
  (one single-head ``Attention`` after every resnet), else ``DownEncoderBlock2D`` / ``UpDecoderBlock2D``;
- the mid block (resnet, attention, resnet), GroupNorm(32, eps 1e-6), swish, 3x3 convs, stride-2 downsampling with
  the original's (0, 1, 0, 1) padding, nearest ×2 upsampling with a conv.

Anything else is refused by name (``UnsupportedFirstStage``): nothing is approximated.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from ldm_compat.config import to_plain

logger = logging.getLogger(__name__)

KL_TARGET = "ldm.models.autoencoder.AutoencoderKL"
VQ_INTERFACE_TARGET = "ldm.models.autoencoder.VQModelInterface"
VQ_TARGET = "ldm.models.autoencoder.VQModel"
SUPPORTED_TARGETS = (KL_TARGET, VQ_INTERFACE_TARGET, VQ_TARGET)

# the original Encoder/Decoder keyword arguments and their defaults (None: required)
_DDCONFIG_DEFAULTS: dict[str, Any] = {
    "ch": None, "out_ch": None, "ch_mult": (1, 2, 4, 8), "num_res_blocks": None, "attn_resolutions": None,
    "dropout": 0.0, "resamp_with_conv": True, "in_channels": None, "resolution": None, "z_channels": None,
    "double_z": True, "use_linear_attn": False, "attn_type": "vanilla", "give_pre_end": False, "tanh_out": False,
}  # fmt: skip
# "vanilla-xformers" (Stability-AI fork) is the same AttnBlock computed by xformers, with the same weights
_ATTN_TYPES = ("vanilla", "vanilla-xformers", "none")
_GROUPS = 32  # the original Normalize(): GroupNorm(num_groups=32, eps=1e-6)


class UnsupportedFirstStage(ValueError):
    """A first stage the stock diffusers autoencoders cannot represent; the message names the option."""


@dataclass(frozen=True)
class FirstStageSpec:
    """What the original ``first_stage_config`` says, checked: enough to build the diffusers model and to run it
    like the original ``LatentDiffusion`` does."""

    target: str
    ddconfig: dict
    embed_dim: int
    n_embed: int | None = None  # VQ only
    remap: str | None = None  # VQ: the .npy path the original loaded into the ``quantize.used`` buffer
    sane_index_shape: bool = False  # VQ: indices returned as b x h x w
    params: dict = field(default_factory=dict)  # every original param, verbatim

    @property
    def is_vq(self) -> bool:
        return self.target != KL_TARGET

    @property
    def vq_interface(self) -> bool:
        """``VQModelInterface``: encode stops before quantization, decode quantizes (``force_not_quantize``)."""
        return self.target == VQ_INTERFACE_TARGET

    @property
    def num_levels(self) -> int:
        return len(self.ddconfig["ch_mult"])

    def encoder_attention(self) -> list[bool]:
        """Per level: does the original Encoder put an attention block after each resnet (resolution halves)."""
        res = self.ddconfig["resolution"]
        out = []
        for _ in range(self.num_levels):
            out.append(res in self.ddconfig["attn_resolutions"])
            res //= 2
        return out

    def decoder_attention(self) -> list[bool]:
        """Per level (level 0 = full resolution): the original Decoder counts up from ``resolution // 2**(n-1)``,
        which differs from the encoder's halving when ``resolution`` is not a multiple of ``2**(n-1)``."""
        res = self.ddconfig["resolution"] // 2 ** (self.num_levels - 1)
        out = [False] * self.num_levels
        for level in reversed(range(self.num_levels)):
            out[level] = res in self.ddconfig["attn_resolutions"]
            res *= 2
        return out

    @property
    def has_attention(self) -> bool:
        return self.ddconfig["attn_type"] != "none"


def parse_first_stage_config(first_stage_config: Mapping, source: str = "first_stage_config") -> FirstStageSpec:
    """Check an original ``first_stage_config`` (``{target, params}``) and return its ``FirstStageSpec``.

    Raises ``UnsupportedFirstStage`` naming the option for anything diffusers' ``AutoencoderKL``/``VQModel``
    cannot represent, and ``ValueError`` for a config the original itself would not build.
    """
    cfg = to_plain(first_stage_config)
    if not isinstance(cfg, Mapping) or "target" not in cfg:
        raise ValueError(f"{source}: expected a mapping with 'target' and 'params', got {cfg!r}")
    target = cfg["target"]
    if target not in SUPPORTED_TARGETS:
        raise UnsupportedFirstStage(
            f"{source}.target={target!r}: not a supported first stage (supported: {', '.join(SUPPORTED_TARGETS)})"
        )
    params = dict(cfg.get("params") or {})
    for key in ("ddconfig", "embed_dim") + (("n_embed",) if target != KL_TARGET else ()):
        if key not in params:
            raise ValueError(f"{source}.params.{key}: required by {target.rsplit('.', 1)[-1]}")
    given = dict(params["ddconfig"])
    missing = [k for k, v in _DDCONFIG_DEFAULTS.items() if v is None and k not in given]
    if missing:
        raise ValueError(f"{source}.params.ddconfig: missing {', '.join(missing)} (required by the original Encoder)")
    ignored = sorted(set(given) - set(_DDCONFIG_DEFAULTS))
    if ignored:  # the original Encoder/Decoder swallow unknown keys (**ignore_kwargs); say so instead of silently
        logger.warning("%s.params.ddconfig: %s not used by the original Encoder/Decoder (ignored)", source, ignored)
    dd = {k: given.get(k, v) for k, v in _DDCONFIG_DEFAULTS.items()}
    dd["ch_mult"] = [int(m) for m in dd["ch_mult"]]
    dd["attn_resolutions"] = [int(r) for r in dd["attn_resolutions"]]
    spec = FirstStageSpec(
        target=target,
        ddconfig=dd,
        embed_dim=int(params["embed_dim"]),
        n_embed=int(params["n_embed"]) if target != KL_TARGET else None,
        remap=params.get("remap"),
        sane_index_shape=bool(params.get("sane_index_shape", False)),
        params=params,
    )
    _check_representable(spec, f"{source}.params")
    return spec


def _check_representable(spec: FirstStageSpec, source: str) -> None:
    dd = spec.ddconfig
    where = f"{source}.ddconfig"

    def refuse(option: str, why: str) -> None:
        raise UnsupportedFirstStage(f"{where}.{option}={dd[option]!r}: {why}")

    if dd["use_linear_attn"]:
        refuse("use_linear_attn", "LinAttnBlock has no diffusers counterpart (diffusers' VAE attention is softmax)")
    if dd["attn_type"] not in _ATTN_TYPES:
        refuse("attn_type", f"only {', '.join(_ATTN_TYPES)} have a diffusers counterpart")
    if dd["ch_mult"][0] != 1:
        refuse("ch_mult", "ch_mult[0] must be 1: the original conv_in outputs `ch` channels and widens them in the "
                          "first resnet, diffusers' conv_in outputs block_out_channels[0] directly")  # fmt: skip
    if not dd["resamp_with_conv"]:
        refuse("resamp_with_conv", "diffusers' encoder/decoder blocks always resample with a conv (the original "
                                   "would average-pool / upsample without one)")  # fmt: skip
    if dd["give_pre_end"]:
        refuse("give_pre_end", "diffusers' Decoder always applies norm_out, swish and conv_out")
    if dd["tanh_out"]:
        refuse("tanh_out", "diffusers' Decoder has no tanh output")
    if isinstance(dd["num_res_blocks"], (list, tuple)):
        refuse("num_res_blocks", "the original takes one int (diffusers' layers_per_block)")
    if dd["dropout"]:
        # diffusers' Encoder/Decoder build their resnets without dropout. LatentDiffusion freezes its first stage in
        # eval mode (instantiate_first_stage), so the original never applies it there either.
        logger.warning(
            "%s.dropout=%s is not representable in diffusers' Encoder/Decoder (no dropout); LatentDiffusion runs its "
            "first stage in eval mode, so encoding and decoding are unaffected, but fine-tuning this autoencoder in "
            "diffusers would train without dropout", where, dd["dropout"],
        )  # fmt: skip
    if spec.is_vq:
        if dd["double_z"]:
            refuse("double_z", "a VQ first stage needs double_z: false (its quant_conv takes z_channels inputs)")
        if spec.embed_dim <= 0 or spec.n_embed is None or spec.n_embed <= 0:
            raise ValueError(f"{source}: embed_dim and n_embed must be positive")
    else:
        if not dd["double_z"]:
            refuse("double_z", "the original AutoencoderKL asserts double_z (the encoder gives mean and logvar)")
        if spec.embed_dim != dd["z_channels"]:
            raise UnsupportedFirstStage(
                f"{source}.embed_dim={spec.embed_dim}: diffusers' AutoencoderKL needs embed_dim == ddconfig.z_channels "
                f"({dd['z_channels']}): its quant_conv maps 2*latent_channels to 2*latent_channels"
            )
    widths = [dd["ch"] * m for m in dd["ch_mult"]]
    bad = [w for w in widths if w % _GROUPS]
    if bad:
        refuse("ch", f"every level width (ch * ch_mult = {widths}) must be a multiple of 32 (GroupNorm(32))")


def resolve_scale_factor(params: Mapping, state_dict: Mapping[str, torch.Tensor] | None = None) -> float:
    """LatentDiffusion's ``scale_factor``: the checkpoint's ``scale_factor`` buffer (``scale_by_std`` models store
    the value they computed there), else ``model.params.scale_factor``, else 1.0 (LatentDiffusion's default)."""
    if state_dict is not None and "scale_factor" in state_dict:
        value = state_dict["scale_factor"]
        if value.numel() != 1:
            raise ValueError(f"scale_factor: expected a scalar buffer, got shape {tuple(value.shape)}")
        return float(value.reshape(()).item())
    return float(params.get("scale_factor", 1.0))


def diffusers_config(spec: FirstStageSpec, scaling_factor: float) -> dict:
    """The ``AutoencoderKL`` / ``VQModel`` ``__init__`` arguments for ``spec``."""
    dd = spec.ddconfig
    attn = spec.has_attention
    enc = ["AttnDownEncoderBlock2D" if attn and a else "DownEncoderBlock2D" for a in spec.encoder_attention()]
    dec = ["AttnUpDecoderBlock2D" if attn and a else "UpDecoderBlock2D" for a in spec.decoder_attention()]
    config = {
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": enc,
        "up_block_types": dec[::-1],  # diffusers lists up blocks from the lowest resolution up
        "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
        "layers_per_block": dd["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": dd["z_channels"],
        "norm_num_groups": _GROUPS,
        "sample_size": dd["resolution"],
        "scaling_factor": float(scaling_factor),
        "mid_block_add_attention": attn,
    }
    if spec.is_vq:
        config.update(num_vq_embeddings=spec.n_embed, vq_embed_dim=spec.embed_dim)
    return config


def build_model(spec: FirstStageSpec, scaling_factor: float = 1.0, *, device: str | torch.device | None = None):
    """The stock diffusers model for ``spec`` (random weights; ``device="meta"`` builds only the layout)."""
    from diffusers import AutoencoderKL, VQModel

    cls = VQModel if spec.is_vq else AutoencoderKL
    with torch.device(device) if device is not None else nullcontext():
        return cls(**diffusers_config(spec, scaling_factor))
