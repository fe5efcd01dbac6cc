"""``LDMUNetModel``: the original latent-diffusion ``openaimodel.UNetModel`` as a diffusers ``ModelMixin``.

Same module tree as the original, so ``state_dict()`` keys and shapes equal the original's
``model.diffusion_model.*`` keys with that prefix removed, for every CompVis and Stability-AI config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.models.attention import AttentionMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..config import to_plain
from .attention import AttentionBlock, SpatialTransformer
from .layers import GroupNorm32, conv_nd, timestep_embedding, zero_module
from .resnet import Downsample, ResBlock, Upsample
from .unet_config import (
    ALL_PARAMS,
    ORIGINAL_DEFAULTS,
    ORIGINAL_TARGET,
    REQUIRED_PARAMS,
    attention_heads,
    per_level,
    validate_unet_params,
)
from .unet_stock_call import check_stock_call, stock_view

#: Prefix of the UNet's keys in an original LatentDiffusion/DDPM checkpoint (``DiffusionWrapper.diffusion_model``).
ORIGINAL_PREFIX = "model.diffusion_model."

#: ``unet_config`` keys next to ``target``/``params`` that belong to the DiffusionWrapper, not the UNet.
WRAPPER_KEYS = ("sequential_crossattn",)


@dataclass
class LDMUNetOutput(BaseOutput):
    """Output of ``LDMUNetModel``: ``sample`` (``(B, out_channels, …)``, or ``(B, n_embed, …)`` logits with
    ``n_embed``), as diffusers' ``UNet2DOutput``."""

    sample: torch.Tensor


class TimestepEmbedSequential(nn.Sequential):
    """A container that gives the timestep embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context=None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _same(a, b) -> bool:
    return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)


class LDMUNetModel(ModelMixin, AttentionMixin, ConfigMixin):
    """The original openaimodel ``UNetModel`` (CompVis latent-diffusion and Stability-AI stablediffusion).

    Takes the original ``unet_config.params`` verbatim (see ``docs/unet.md`` for every option). ``sample_size`` is
    the size stock diffusers pipelines sample at (default: ``image_size``, which the original UNet stores but never
    uses; a LatentDiffusion's own ``image_size`` may differ, e.g. SD 1.x: 64 latents, UNet ``image_size`` 32).
    ``config.time_cond_proj_dim`` (``None``, not a key) is what diffusers' Stable Diffusion pipelines read
    (``ldm_compat.models.unet_stock_call``).

    Deliberate differences from the original, none of which changes a value or a state-dict key:

    * attention runs through diffusers' attention dispatcher (SDPA by default; ``set_attention_backend``);
    * ``use_checkpoint`` recomputes every ResBlock, AttentionBlock and transformer block in the backward pass
      (``torch.utils.checkpoint``, ``use_reentrant=False``); the original always recomputes AttentionBlocks (and,
      in CompVis, transformer blocks) even when it is off;
    * ``use_fp16``/``use_bf16`` run the forward pass under ``torch.autocast`` with that dtype when no autocast is
      active (the original only casts the input, which fails without autocast);
    * configs the original builds but cannot run (``channel_mult[0] != 1``, head counts that do not divide the
      width) raise ``ValueError`` at construction.
    """

    _supports_gradient_checkpointing = True

    def __init__(
        self,
        image_size: int | None = None,
        in_channels: int | None = None,
        model_channels: int | None = None,
        out_channels: int | None = None,
        num_res_blocks: int | list[int] | None = None,
        attention_resolutions: list[int] | None = None,
        dropout: float = 0,
        channel_mult: tuple[int, ...] | list[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | str | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        use_bf16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | list[int] | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        disable_self_attentions: list[bool] | None = None,
        num_attention_blocks: list[int] | None = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        adm_in_channels: int | None = None,
        sample_size: int | None = None,
    ):
        args = dict(locals())
        super().__init__()
        p = {name: to_plain(args[name]) for name in ALL_PARAMS}
        if p["image_size"] is None:
            p["image_size"] = to_plain(sample_size)
        validate_unet_params(p)
        sample_size = p["image_size"] if sample_size is None else to_plain(sample_size)
        self.register_to_config(**p, sample_size=sample_size)

        levels = len(p["channel_mult"])
        self._nrb = per_level("num_res_blocks", p["num_res_blocks"], levels)
        self._num_classes = p["num_classes"]
        self._predict_codebook_ids = p["n_embed"] is not None
        self._compute_dtype = torch.float16 if use_fp16 else (torch.bfloat16 if use_bf16 else None)
        self._model_channels = model_channels
        self._p = p
        self._build(p)
        del self._p

    def register_to_config(self, **kwargs) -> None:
        """diffusers' ``register_to_config``; the config (a ``FrozenDict``) also answers the stock-pipeline reads
        (``unet_stock_call``). Set here, never when read: a type change of ``_internal_dict`` inside a compiled
        forward would make dynamo recompile."""
        super().register_to_config(**kwargs)
        self._internal_dict = stock_view(self._internal_dict)

    # ------------------------------------------------------------------ construction
    def _resblock(self, ch: int, out_ch: int | None = None, **kw) -> ResBlock:
        p = self._p
        return ResBlock(
            ch,
            self._time_embed_dim,
            p["dropout"],
            out_channels=out_ch,
            dims=p["dims"],
            use_checkpoint=p["use_checkpoint"],
            use_scale_shift_norm=p["use_scale_shift_norm"],
            **kw,
        )

    def _attention(self, ch: int, disable_self_attn: bool, decoder: bool) -> nn.Module:
        """The attention layer the original puts after a ResBlock of width ``ch`` (or in the middle block)."""
        p = self._p
        heads, dim_head = attention_heads(
            ch, p["num_heads"], p["num_head_channels"], p["legacy"], p["use_spatial_transformer"]
        )
        if p["use_spatial_transformer"]:
            return SpatialTransformer(
                ch,
                heads,
                dim_head,
                depth=p["transformer_depth"],
                context_dim=p["context_dim"],
                disable_self_attn=disable_self_attn,
                use_linear=p["use_linear_in_transformer"],
                use_checkpoint=p["use_checkpoint"],
            )
        # decoder AttentionBlocks take num_heads_upsample (defaulting to num_heads); dim_head wins when it is set
        block_heads = p["num_heads_upsample"] if p["num_heads_upsample"] != -1 else p["num_heads"]
        return AttentionBlock(
            ch,
            num_heads=block_heads if decoder else heads,
            num_head_channels=dim_head,
            use_checkpoint=p["use_checkpoint"],
            use_new_attention_order=p["use_new_attention_order"],
        )

    def _level_attention(self, ch: int, ds: int, level: int, nr: int, decoder: bool) -> list[nn.Module]:
        p = self._p
        if ds not in p["attention_resolutions"]:
            return []
        if p["num_attention_blocks"] is not None and nr >= p["num_attention_blocks"][level]:
            return []
        disabled = bool(p["disable_self_attentions"][level]) if p["disable_self_attentions"] is not None else False
        return [self._attention(ch, disabled, decoder)]

    def _build(self, p: dict) -> None:
        mc, dims, mults = p["model_channels"], p["dims"], list(p["channel_mult"])
        ted = self._time_embed_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        num_classes = p["num_classes"]
        if num_classes == "continuous":
            self.label_emb = nn.Linear(1, ted)
        elif num_classes == "sequential":
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(p["adm_in_channels"], ted), nn.SiLU(), nn.Linear(ted, ted))
            )
        elif num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, ted)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, p["in_channels"], mc, 3, padding=1))])
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(mults):
            for nr in range(self._nrb[level]):
                layers = [self._resblock(ch, mult * mc)]
                ch = mult * mc
                layers += self._level_attention(ch, ds, level, nr, decoder=False)
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(mults) - 1:
                down = (
                    self._resblock(ch, ch, down=True)
                    if p["resblock_updown"]
                    else Downsample(ch, p["conv_resample"], dims=dims, out_channels=ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            self._resblock(ch),
            self._attention(ch, p["disable_middle_self_attn"], decoder=False),
            self._resblock(ch),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(mults))[::-1]:
            for i in range(self._nrb[level] + 1):
                layers = [self._resblock(ch + chans.pop(), mc * mult)]
                ch = mc * mult
                layers += self._level_attention(ch, ds, level, i, decoder=True)
                if level and i == self._nrb[level]:
                    layers.append(
                        self._resblock(ch, ch, up=True)
                        if p["resblock_updown"]
                        else Upsample(ch, p["conv_resample"], dims=dims, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        out_conv = conv_nd(dims, mc, p["out_channels"], 3, padding=1)
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), zero_module(out_conv))
        if p["n_embed"] is not None:
            self.id_predictor = nn.Sequential(GroupNorm32(ch), conv_nd(dims, mc, p["n_embed"], 1))

    def fuse_qkv_projections(self):
        raise NotImplementedError(
            "LDMUNetModel: fuse_qkv_projections is not supported (AttentionBlock's qkv is one projection already; "
            "CrossAttention keeps the original's to_q/to_k/to_v weights)"
        )

    unfuse_qkv_projections = fuse_qkv_projections

    # ------------------------------------------------------------------ original-format helpers
    @classmethod
    def from_ldm_config(cls, unet_config: Mapping[str, Any], **overrides) -> LDMUNetModel:
        """Build from an original ``unet_config`` mapping ``{target, params}`` (a dict or OmegaConf node).

        ``target`` must name the openaimodel ``UNetModel``; ``sequential_crossattn`` (read by the original
        DiffusionWrapper, not the UNet) is accepted and ignored here. ``overrides`` replace entries of ``params``.
        """
        cfg = to_plain(unet_config)
        if not isinstance(cfg, Mapping) or not isinstance(cfg.get("params"), Mapping):
            raise ValueError("unet_config: expected a mapping with 'target' and 'params' (the original unet_config)")
        target = cfg.get("target")
        if not isinstance(target, str) or not target.endswith("openaimodel.UNetModel"):
            raise ValueError(f"unet_config.target: expected {ORIGINAL_TARGET!r}, got {target!r}")
        extra = sorted(set(cfg) - {"target", "params", *WRAPPER_KEYS})
        if extra:
            raise ValueError(f"unet_config: unexpected keys {extra} (expected 'target' and 'params')")
        params = {**cfg["params"], **overrides}
        unknown = sorted(set(params) - set(ALL_PARAMS))
        if unknown:
            raise ValueError(f"unet_config.params: unknown UNetModel arguments {unknown}")
        return cls(**params)

    def to_ldm_config(self) -> dict[str, Any]:
        """The original ``unet_config`` mapping ``{target, params}`` for this model.

        ``params`` holds the required arguments and every argument that differs from the original default, so a
        model that uses no Stability-AI-only option also builds with CompVis' code.
        """
        params = {name: self.config[name] for name in REQUIRED_PARAMS}
        for name, default in ORIGINAL_DEFAULTS.items():
            if not _same(self.config[name], default):
                params[name] = self.config[name]
        return {"target": ORIGINAL_TARGET, "params": params}

    def load_original_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
        """Load original UNet weights: a bare UNet state dict, or a whole LDM/DDPM ``state_dict`` whose
        ``model.diffusion_model.*`` entries are taken (prefix stripped; every other key ignored).

        Raises ``ValueError`` listing the offending keys when shapes differ, or (``strict``) keys are missing or
        unexpected. Returns torch's ``(missing_keys, unexpected_keys)``.
        """
        if any(k.startswith(ORIGINAL_PREFIX) for k in state_dict):
            n = len(ORIGINAL_PREFIX)
            state_dict = {k[n:]: v for k, v in state_dict.items() if k.startswith(ORIGINAL_PREFIX)}
        own = self.state_dict()
        problems = []
        wrong = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in state_dict.items()
            if k in own and tuple(v.shape) != tuple(own[k].shape)
        ]
        if wrong:
            problems.append(f"{len(wrong)} with wrong shapes: " + "; ".join(wrong[:20]))
        if strict:
            missing = sorted(set(own) - set(state_dict))
            unexpected = sorted(set(state_dict) - set(own))
            if missing:
                problems.append(f"{len(missing)} missing: " + ", ".join(missing[:20]))
            if unexpected:
                problems.append(f"{len(unexpected)} unexpected: " + ", ".join(unexpected[:20]))
        if problems:
            raise ValueError("state_dict does not fit this LDMUNetModel config: " + " | ".join(problems))
        return self.load_state_dict(state_dict, strict=strict)

    def original_state_dict(self, prefix: str = ORIGINAL_PREFIX) -> dict[str, torch.Tensor]:
        """``state_dict()`` with the original checkpoint's ``model.diffusion_model.`` prefix (or ``prefix``)."""
        return {prefix + k: v for k, v in self.state_dict().items()}

    # ------------------------------------------------------------------ forward
    def _timesteps(self, timestep, batch: int, device: torch.device) -> torch.Tensor:
        t = timestep if isinstance(timestep, torch.Tensor) else torch.as_tensor(timestep)
        t = t.to(device)
        if t.ndim == 0:
            t = t.reshape(1)
        if t.ndim != 1 or t.shape[0] not in (1, batch):
            raise ValueError(f"timestep: expected a scalar or {batch} values (one per sample), got {tuple(t.shape)}")
        return t.expand(batch) if t.shape[0] != batch else t

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | list[torch.Tensor] | None = None,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        added_cond_kwargs: dict | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> LDMUNetOutput | tuple[torch.Tensor]:
        """Predict from a noisy ``sample`` ``(B, in_channels, …)`` at ``timestep`` (scalar or ``(B,)``).

        ``encoder_hidden_states`` is the original's ``context`` (cross-attention; a list gives one tensor per
        transformer block, as Stability-AI's ``sequential_crossattn``); models without ``use_spatial_transformer``
        ignore it, as the original. ``class_labels`` is the original's ``y``, required iff ``num_classes`` is set.
        Concat conditioning is the caller's ``torch.cat([x, c], 1)``. The keyword-only arguments are those stock
        diffusers pipelines pass (``unet_stock_call``): only ``None`` / empty, anything else is a ``ValueError``.
        """
        check_stock_call(timestep_cond=timestep_cond, attention_mask=attention_mask,
                         cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs,
                         encoder_attention_mask=encoder_attention_mask)  # fmt: skip
        autocast_on = torch.is_autocast_enabled(sample.device.type)
        cdt = self._compute_dtype
        if cdt is not None and not autocast_on and self.time_embed[0].weight.dtype != cdt:
            with torch.autocast(sample.device.type, dtype=cdt):
                out = self._forward(sample, timestep, encoder_hidden_states, class_labels)
        else:
            out = self._forward(sample, timestep, encoder_hidden_states, class_labels)
        if not return_dict:
            return (out,)
        return LDMUNetOutput(sample=out)

    def _check_sample(self, x: torch.Tensor) -> None:
        """One clear line for a sample the UNet cannot take (else: an error deep in a conv or a skip concat)."""
        dims, channels, levels = self.config.dims, self.config.in_channels, len(self.config.channel_mult)
        if x.ndim != dims + 2 or x.shape[1] != channels:
            raise ValueError(
                f"sample: expected shape (batch, {channels}, {', '.join(['size'] * dims)}) (in_channels={channels}, "
                f"dims={dims}), got {tuple(x.shape)}"
            )
        # every downsampling halves the size (dims=3: the last two axes) and the skip connections need it back
        factor = 2 ** (levels - 1)
        spatial = tuple(x.shape[3:] if dims == 3 else x.shape[2:])
        if any(size % factor for size in spatial):
            raise ValueError(
                f"sample: spatial size {spatial} must be divisible by {factor} ({levels - 1} downsamplings, "
                f"channel_mult={list(self.config.channel_mult)}), got shape {tuple(x.shape)}"
            )

    def _forward(self, x: torch.Tensor, timestep, context, y) -> torch.Tensor:
        if (y is None) != (self._num_classes is None):
            raise ValueError(
                f"class_labels: must be given if and only if the model is class-conditional (num_classes="
                f"{self._num_classes!r}), got {'None' if y is None else 'a tensor'}"
            )
        self._check_sample(x)
        batch = x.shape[0]
        weight_dtype = self.time_embed[0].weight.dtype
        t_emb = timestep_embedding(self._timesteps(timestep, batch, x.device), self._model_channels)
        emb = self.time_embed(t_emb.to(weight_dtype))
        if y is not None:
            if y.shape[0] != batch:
                raise ValueError(f"class_labels: expected {batch} entries (one per sample), got shape {tuple(y.shape)}")
            emb = emb + self.label_emb(y)

        # the original casts the input to its compute dtype (float32 unless use_fp16/use_bf16)
        h = x.to(self._compute_dtype or weight_dtype)
        hs = []
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        # ... and back to the input's dtype before the output layer; skipped when that would only make a model
        # whose weights are in another dtype fail outside autocast
        if torch.is_autocast_enabled(x.device.type) or x.dtype == weight_dtype:
            h = h.to(x.dtype)
        if self._predict_codebook_ids:
            return self.id_predictor(h)
        return self.out(h)
