"""The original ``UNetModel.__init__`` arguments: defaults, validation and the per-level attention bookkeeping.

Every argument of CompVis ``latent-diffusion`` and Stability-AI ``stablediffusion``
``ldm/modules/diffusionmodules/openaimodel.py:UNetModel`` is accepted under its original name. The checks here
turn the original's ``assert``s (and the configs that would only fail later, in ``forward``) into one-line
``ValueError``s that name the option.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

ORIGINAL_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"

#: Arguments without a default in the original signature.
REQUIRED_PARAMS = (
    "image_size",
    "in_channels",
    "model_channels",
    "out_channels",
    "num_res_blocks",
    "attention_resolutions",
)

#: Defaults of the original signature (Stability-AI's, a superset of CompVis').
ORIGINAL_DEFAULTS: dict[str, Any] = {
    "dropout": 0,
    "channel_mult": (1, 2, 4, 8),
    "conv_resample": True,
    "dims": 2,
    "num_classes": None,
    "use_checkpoint": False,
    "use_fp16": False,
    "use_bf16": False,
    "num_heads": -1,
    "num_head_channels": -1,
    "num_heads_upsample": -1,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "use_new_attention_order": False,
    "use_spatial_transformer": False,
    "transformer_depth": 1,
    "context_dim": None,
    "n_embed": None,
    "legacy": True,
    "disable_self_attentions": None,
    "num_attention_blocks": None,
    "disable_middle_self_attn": False,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
}

ALL_PARAMS = REQUIRED_PARAMS + tuple(ORIGINAL_DEFAULTS)

#: ``num_classes`` strings of Stability-AI (an int gives an ``nn.Embedding``).
NUM_CLASSES_MODES = ("continuous", "sequential")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def per_level(name: str, value, levels: int) -> list:
    """An int (or None) repeated per level, or a per-level list whose length must equal ``len(channel_mult)``."""
    if value is None or _is_int(value) or isinstance(value, bool):
        return [value] * levels
    value = list(value)
    if len(value) != levels:
        raise ValueError(f"{name}: expected an int or {levels} entries (one per channel_mult level), got {value}")
    return value


def validate_unet_params(p: Mapping[str, Any]) -> None:
    """Raise a ``ValueError`` naming the option for every config the original rejects or cannot run."""
    for name in REQUIRED_PARAMS:
        if p.get(name) is None:
            raise ValueError(f"{name}: required by the original UNetModel, got None")
    for name in ("in_channels", "model_channels", "out_channels"):
        if not _is_int(p[name]) or p[name] <= 0:
            raise ValueError(f"{name}: expected a positive int, got {p[name]!r}")
    if p["dims"] not in (1, 2, 3):
        raise ValueError(f"dims: expected 1, 2 or 3, got {p['dims']!r}")
    channel_mult = list(p["channel_mult"])
    if not channel_mult or not all(_is_int(m) and m > 0 for m in channel_mult):
        raise ValueError(f"channel_mult: expected a non-empty list of positive ints, got {p['channel_mult']!r}")
    # The original builds it, but its final GroupNorm runs over model_channels·channel_mult[0] channels while the
    # output convolution expects model_channels: it cannot run a forward pass.
    if channel_mult[0] != 1:
        raise ValueError(f"channel_mult: the first multiplier must be 1 (the original's out layer), got {channel_mult}")
    nrb = per_level("num_res_blocks", p["num_res_blocks"], len(channel_mult))
    if not all(_is_int(n) and n >= 0 for n in nrb):
        raise ValueError(f"num_res_blocks: expected non-negative ints, got {p['num_res_blocks']!r}")
    ar = p["attention_resolutions"]
    if isinstance(ar, (str, bytes)) or not isinstance(ar, Sequence):
        raise ValueError(f"attention_resolutions: expected a list of downsampling factors, got {ar!r}")

    if p["use_spatial_transformer"] and p["context_dim"] is None:
        raise ValueError("context_dim: required with use_spatial_transformer=True (the cross-attention width)")
    if p["context_dim"] is not None and not p["use_spatial_transformer"]:
        raise ValueError("context_dim: given, but cross-attention needs use_spatial_transformer=True")
    if p["use_spatial_transformer"] and p["dims"] != 2:
        raise ValueError(f"dims: use_spatial_transformer works on 2-D feature maps only, got dims={p['dims']}")
    if not _is_int(p["transformer_depth"]) or p["transformer_depth"] < 1:
        raise ValueError(f"transformer_depth: expected a positive int, got {p['transformer_depth']!r}")
    if p["num_heads"] == -1 and p["num_head_channels"] == -1:
        raise ValueError("num_heads / num_head_channels: one of them has to be set (the other left at -1)")

    if p["disable_self_attentions"] is not None and len(p["disable_self_attentions"]) != len(channel_mult):
        raise ValueError(
            f"disable_self_attentions: expected {len(channel_mult)} entries (one per level), "
            f"got {p['disable_self_attentions']!r}"
        )
    nab = p["num_attention_blocks"]
    if nab is not None:
        if len(nab) != len(nrb) or any(n > r for n, r in zip(nab, nrb)):
            raise ValueError(
                f"num_attention_blocks: expected {len(nrb)} entries, each at most num_res_blocks {nrb}, got {nab!r}"
            )

    num_classes = p["num_classes"]
    if num_classes is not None:
        if isinstance(num_classes, str):
            if num_classes not in NUM_CLASSES_MODES:
                raise ValueError(f"num_classes: expected an int, 'continuous' or 'sequential', got {num_classes!r}")
            if num_classes == "sequential" and p["adm_in_channels"] is None:
                raise ValueError("adm_in_channels: required with num_classes='sequential'")
        elif not _is_int(num_classes) or num_classes <= 0:
            raise ValueError(f"num_classes: expected a positive int, 'continuous' or 'sequential', got {num_classes!r}")


def attention_heads(
    ch: int,
    num_heads: int,
    num_head_channels: int,
    legacy: bool,
    use_spatial_transformer: bool,
) -> tuple[int, int]:
    """``(num_heads, dim_head)`` the original computes for an attention layer of width ``ch``.

    With ``num_head_channels == -1`` the head count is ``num_heads`` and ``dim_head = ch // num_heads``; otherwise
    ``num_heads = ch // num_head_channels`` and ``dim_head = num_head_channels``. ``legacy=True`` then resets
    ``dim_head`` to ``ch // num_heads`` for a SpatialTransformer and to ``num_head_channels`` (possibly -1, meaning
    "use num_heads") for an AttentionBlock. An AttentionBlock receives ``dim_head`` as its ``num_head_channels``.
    """
    if num_head_channels == -1:
        if num_heads <= 0:
            raise ValueError(f"num_heads: expected a positive head count, got {num_heads}")
        dim_head = ch // num_heads
    else:
        if num_head_channels <= 0:
            raise ValueError(f"num_head_channels: expected a positive head width or -1, got {num_head_channels}")
        num_heads = ch // num_head_channels
        dim_head = num_head_channels
    if legacy:
        if use_spatial_transformer:
            if num_heads <= 0:
                raise ValueError(f"num_head_channels: {num_head_channels} is wider than the attention width {ch}")
            dim_head = ch // num_heads
        else:
            dim_head = num_head_channels
    if num_heads <= 0 or dim_head == 0:
        raise ValueError(
            f"num_heads/num_head_channels: cannot split attention width {ch} "
            f"(num_heads={num_heads}, num_head_channels={num_head_channels})"
        )
    return num_heads, dim_head
