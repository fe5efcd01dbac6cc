"""What stock diffusers pipelines pass to a UNet and read from its config, for ``LDMUNetModel``.

``StableDiffusionPipeline`` / ``StableDiffusionInpaintPipeline`` call ``unet(x, t, encoder_hidden_states=…,
timestep_cond=…, cross_attention_kwargs=…, added_cond_kwargs=…, return_dict=False)[0]`` and read
``unet.config.in_channels``, ``sample_size`` and ``time_cond_proj_dim``; ``LDMTextToImagePipeline``,
``LDMPipeline`` and ``LDMSuperResolutionPipeline`` call ``unet(x, t[, encoder_hidden_states=…]).sample`` and read
``in_channels`` and ``sample_size``. The original ``UNetModel`` has none of the extra inputs: they are accepted at
the values those pipelines pass when they do not use the feature (``None``, an empty dict) and refused in one line
otherwise — never silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping

from diffusers.configuration_utils import FrozenDict

#: config entries of diffusers' ``UNet2DConditionModel`` that stock pipelines read, at the only value this UNet has
STOCK_CONFIG_DEFAULTS = {"time_cond_proj_dim": None}

_WHY = {
    "timestep_cond": "a guidance-scale (LCM) timestep embedding: the original UNet has no time_cond_proj_dim",
    "attention_mask": "the original UNet's attention takes no mask",
    "encoder_attention_mask": "the original UNet's cross-attention takes no mask",
    "cross_attention_kwargs": "the original UNet has no attention processors or LoRA layers (e.g. 'scale')",
    "added_cond_kwargs": "the original UNet has no added conditioning (IP-Adapter image_embeds, SDXL text_embeds)",
}


class StockPipelineConfig(FrozenDict):
    """``LDMUNetModel.config``: the model's own keys (saved, round-tripped), plus read-only attributes for the
    ``UNet2DConditionModel`` keys stock pipelines read (``STOCK_CONFIG_DEFAULTS``). Those are not keys: they are not
    saved, and ``dict(config)`` holds the original params and ``sample_size`` only."""

    def __getattr__(self, name: str):
        if name in STOCK_CONFIG_DEFAULTS:
            return STOCK_CONFIG_DEFAULTS[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


def stock_view(config: FrozenDict) -> StockPipelineConfig:
    return config if isinstance(config, StockPipelineConfig) else StockPipelineConfig(config)


def check_stock_call(**arguments) -> None:
    """Refuse a diffusers UNet argument this model cannot honour (``None`` and empty dicts pass)."""
    for name, value in arguments.items():
        if value is None or (isinstance(value, Mapping) and not value):
            continue
        shown = sorted(value) if isinstance(value, Mapping) else type(value).__name__
        raise ValueError(f"{name}={shown}: not supported by LDMUNetModel ({_WHY[name]})")
