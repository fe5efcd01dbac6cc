"""``LDMUNetModel`` → a stock diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (the ``convert --native`` output).

The original openaimodel ``UNetModel`` and the diffusers UNets compute the same function for a subset of the
original configs. This module decides whether a config is in that subset (``native_unet_config``), renames and
reshapes the weights (``ldm_to_native_state_dict``) and writes a folder that loads with diffusers alone
(``write_native_unet``). Configs outside the subset are refused with a ``ValueError`` naming the option and why;
nothing is ever approximated. See ``docs/native_export.md`` for the full table.

The layout is read from the original module tree itself: an ``LDMUNetModel`` is built on the meta device (no memory,
no compute) and walked block by block, so head counts, attention placement and skip widths are the original's,
not a re-derivation of them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm_compat.config import to_plain
from ldm_compat.convert.atomic_dir import atomic_directory
from ldm_compat.models.attention import AttentionBlock, SpatialTransformer
from ldm_compat.models.resnet import ResBlock, Upsample
from ldm_compat.models.unet_config import ALL_PARAMS, ORIGINAL_DEFAULTS, per_level
from ldm_compat.models.unet_ldm import ORIGINAL_PREFIX, LDMUNetModel

#: Subfolder of a pipeline folder that ``ldm-compat convert --native`` writes.
NATIVE_SUBFOLDER = "native_unet"

# ResBlock (openaimodel) → ResnetBlock2D (diffusers) submodule names; SiLU/Dropout slots hold no weights
_RESNET_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


@dataclass
class _Entry:
    """One original module and where its weights go: ``kind`` selects the key/tensor transform."""

    ldm: str
    native: str
    kind: str  # "same" | "resnet" | "downsample" | "upsample" | "attention_block" | "transformer"
    module: nn.Module


@dataclass
class _Layout:
    """The original UNet walked level by level (level 0 = full resolution, as ``channel_mult``)."""

    params: dict
    skeleton: LDMUNetModel
    widths: list[int]
    num_res_blocks: list[int]
    entries: list[_Entry] = field(default_factory=list)
    # per level: the attention module after each encoder / decoder ResBlock (None where there is none)
    encoder_attn: list[list] = field(default_factory=list)
    decoder_attn: list[list] = field(default_factory=list)
    mid_attn: nn.Module | None = None


# ---------------------------------------------------------------------------------------------------- config
def _ldm_params(ldm_unet_config: Mapping[str, Any]) -> dict:
    """The full original ``UNetModel`` argument dict from ``{target, params}``, bare ``params`` or an
    ``LDMUNetModel.config`` (its ``sample_size`` alias and ``_``-prefixed bookkeeping are dropped)."""
    cfg = to_plain(ldm_unet_config)
    if not isinstance(cfg, Mapping):
        raise ValueError(f"ldm_unet_config: expected a mapping (the original unet_config), got {type(cfg).__name__}")
    if "params" in cfg and "target" in cfg:
        target = cfg["target"]
        if not isinstance(target, str) or not target.endswith("openaimodel.UNetModel"):
            raise ValueError(f"unet_config.target: expected the openaimodel UNetModel, got {target!r}")
        cfg = to_plain(cfg["params"])
    params = {k: v for k, v in cfg.items() if not str(k).startswith("_")}
    sample_size = params.pop("sample_size", None)
    unknown = sorted(set(params) - set(ALL_PARAMS))
    if unknown:
        raise ValueError(f"unet_config.params: unknown UNetModel arguments {unknown}")
    p = {**ORIGINAL_DEFAULTS, **{name: None for name in ALL_PARAMS if name not in ORIGINAL_DEFAULTS}, **params}
    if p["image_size"] is None:
        p["image_size"] = sample_size
    return p


def _refuse_options(p: dict) -> None:
    """Options with no diffusers counterpart, refused before anything is built (one clear line each)."""
    spatial = p["use_spatial_transformer"]
    if p["dims"] != 2:
        raise ValueError(f"dims: diffusers UNet2DModel/UNet2DConditionModel are 2-D only, got dims={p['dims']}")
    if p["n_embed"] is not None:
        raise ValueError("n_embed: the codebook-prediction head (id_predictor) has no diffusers equivalent")
    if not p["conv_resample"]:
        raise ValueError(
            "conv_resample: False (average pooling / nearest upsampling without a convolution) cannot be "
            "expressed; diffusers down/up blocks always resample with a convolution or a ResnetBlock2D"
        )
    mult = list(p["channel_mult"] or [])
    if mult and mult[0] != 1:
        raise ValueError(
            f"channel_mult: the first multiplier must be 1 (diffusers sizes conv_in and the time embedding by "
            f"block_out_channels[0], the original by model_channels), got {mult}"
        )
    if p["num_classes"] == "continuous":
        raise ValueError("num_classes: 'continuous' (Linear(1, 4·model_channels) on y) has no diffusers equivalent")
    if p["num_classes"] == "sequential" and not spatial:
        raise ValueError(
            "num_classes: 'sequential' (ADM projection) needs UNet2DConditionModel's class_embed_type='projection', "
            "which only exists with use_spatial_transformer=True; UNet2DModel cannot express it"
        )
    if p["resblock_updown"] and spatial:
        raise ValueError(
            "resblock_updown: resampling ResBlocks exist in diffusers only for UNet2DModel (downsample_type="
            "'resnet'); CrossAttnDownBlock2D/CrossAttnUpBlock2D always resample with a convolution"
        )
    if p["disable_middle_self_attn"]:
        raise ValueError("disable_middle_self_attn: UNetMidBlock2DCrossAttn always uses self-attention in attn1")
    if mult:
        nrb = per_level("num_res_blocks", p["num_res_blocks"], len(mult))
        if any(isinstance(n, int) and n == 0 for n in nrb):
            raise ValueError(f"num_res_blocks: a level without ResBlocks cannot be expressed, got {nrb}")
        if not spatial and len(set(nrb)) > 1:
            raise ValueError(
                f"num_res_blocks: UNet2DModel has one layers_per_block for every level, got per-level {nrb}"
            )


def _attention_all_or_none(layout: _Layout) -> None:
    p = layout.params
    for level, (enc, dec) in enumerate(zip(layout.encoder_attn, layout.decoder_attn)):
        present = [a is not None for a in enc + dec]
        if any(present) and not all(present):
            raise ValueError(
                f"num_attention_blocks: level {level} has attention after only some ResBlocks (encoder {_count(enc)}/"
                f"{len(enc)}, decoder {_count(dec)}/{len(dec)}; num_attention_blocks={p['num_attention_blocks']}); "
                f"diffusers blocks put attention after every ResBlock of a level or none"
            )


def _count(blocks: list) -> int:
    return sum(a is not None for a in blocks)


def _level_has_attention(layout: _Layout, level: int) -> bool:
    return any(a is not None for a in layout.encoder_attn[level] + layout.decoder_attn[level])


def _attention_modules(layout: _Layout) -> list[tuple[str, nn.Module]]:
    found = [(e.ldm, e.module) for e in layout.entries if e.kind in ("attention_block", "transformer")]
    return found


def _unet2d_config(layout: _Layout) -> dict:
    """``UNet2DModel`` config for a config whose attention layers are ``AttentionBlock``s."""
    p, levels = layout.params, len(layout.widths)
    widths = {name: (m.channels // m.num_heads, m.num_heads) for name, m in _attention_modules(layout)}
    head_dims = sorted({dim for dim, _ in widths.values()})
    if len(head_dims) == 1:
        attention_head_dim = head_dims[0]
    elif all(heads == 1 for _, heads in widths.values()):
        attention_head_dim = None  # UNet2DModel then gives every block one head of its own width
    else:
        detail = ", ".join(f"{name}: {h}×{d}" for name, (d, h) in widths.items())
        raise ValueError(
            f"num_heads/num_head_channels/num_heads_upsample: UNet2DModel has one attention_head_dim for every "
            f"attention layer, but this config's head widths differ ({detail}, heads×width)"
        )
    resnet_resample = bool(p["resblock_updown"])
    down, up = [], []
    for level in range(levels):
        attn = _level_has_attention(layout, level)
        down.append("AttnDownBlock2D" if attn else ("ResnetDownsampleBlock2D" if resnet_resample else "DownBlock2D"))
    for level in reversed(range(levels)):
        attn = _level_has_attention(layout, level)
        up.append("AttnUpBlock2D" if attn else ("ResnetUpsampleBlock2D" if resnet_resample else "UpBlock2D"))
    num_classes = p["num_classes"]
    return {
        "sample_size": p["image_size"],
        "in_channels": p["in_channels"],
        "out_channels": p["out_channels"],
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,  # the original embedding is [cos, sin]
        "freq_shift": 0,
        "down_block_types": down,
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": up,
        "block_out_channels": list(layout.widths),
        "layers_per_block": layout.num_res_blocks[0],
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "resnet" if resnet_resample else "conv",
        "upsample_type": "resnet" if resnet_resample else "conv",
        "dropout": float(p["dropout"]),
        "act_fn": "silu",
        "attention_head_dim": attention_head_dim,
        "norm_num_groups": 32,
        # without it UNetMidBlock2D drops the attention GroupNorm when resnet_time_scale_shift='scale_shift'
        "attn_norm_num_groups": 32,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if p["use_scale_shift_norm"] else "default",
        "add_attention": True,  # the original middle block always has attention
        "class_embed_type": None,
        "num_class_embeds": num_classes,
    }


def _unet2d_condition_config(layout: _Layout) -> dict:
    """``UNet2DConditionModel`` config for a config whose attention layers are ``SpatialTransformer``s."""
    p, levels = layout.params, len(layout.widths)
    modules = _attention_modules(layout)
    for name, m in modules:
        block = m.transformer_blocks[0].attn1
        if block.dim_head != m.in_channels // block.heads:
            raise ValueError(
                f"num_head_channels/legacy: {name} uses {block.heads} heads of width {block.dim_head} on "
                f"{m.in_channels} channels; Transformer2DModel always uses width in_channels // heads"
            )
    context_dims = sorted({blk.attn2.to_k.in_features for _, m in modules for blk in m.transformer_blocks})
    if len(context_dims) != 1:
        raise ValueError(f"context_dim: UNet2DConditionModel has one cross_attention_dim, got {context_dims}")

    mid = layout.mid_attn
    mid_heads = mid.transformer_blocks[0].attn1.heads
    heads, only_cross = [], []
    for level in range(levels):
        attn = [a for a in layout.encoder_attn[level] + layout.decoder_attn[level] if a is not None]
        if not attn:
            heads.append(mid_heads)  # unused by DownBlock2D/UpBlock2D; the last entry also sizes the middle block
            only_cross.append(False)
            continue
        heads.append(attn[0].transformer_blocks[0].attn1.heads)
        only_cross.append(bool(attn[0].transformer_blocks[0].disable_self_attn))
    if heads[-1] != mid_heads:
        raise ValueError(
            f"num_heads/num_head_channels: the middle block uses {mid_heads} heads but the last level "
            f"{heads[-1]}; UNet2DConditionModel gives both the same count"
        )
    nrb = layout.num_res_blocks
    num_classes = p["num_classes"]
    sequential = num_classes == "sequential"
    return {
        "sample_size": p["image_size"],
        "in_channels": p["in_channels"],
        "out_channels": p["out_channels"],
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": [
            "CrossAttnDownBlock2D" if _level_has_attention(layout, lv) else "DownBlock2D" for lv in range(levels)
        ],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": [
            "CrossAttnUpBlock2D" if _level_has_attention(layout, lv) else "UpBlock2D" for lv in reversed(range(levels))
        ],
        "only_cross_attention": only_cross if any(only_cross) else False,
        "block_out_channels": list(layout.widths),
        "layers_per_block": nrb[0] if len(set(nrb)) == 1 else list(nrb),
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "dropout": float(p["dropout"]),
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": context_dims[0],
        "transformer_layers_per_block": p["transformer_depth"],
        # diffusers' historical naming: in UNet2DConditionModel attention_head_dim is the number of heads
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
        "use_linear_projection": bool(p["use_linear_in_transformer"]),
        "class_embed_type": "projection" if sequential else None,
        "num_class_embeds": None if sequential else num_classes,
        "projection_class_embeddings_input_dim": p["adm_in_channels"] if sequential else None,
        "upcast_attention": False,
        "resnet_time_scale_shift": "scale_shift" if p["use_scale_shift_norm"] else "default",
        "time_embedding_type": "positional",
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
    }


def _layout(ldm_unet_config: Mapping[str, Any]) -> _Layout:
    p = _ldm_params(ldm_unet_config)
    _refuse_options(p)
    build = {name: p[name] for name in ALL_PARAMS}
    with torch.device("meta"):
        skeleton = LDMUNetModel(**build)  # raises the original's own ValueErrors for configs it cannot build
    levels = len(p["channel_mult"])
    layout = _Layout(
        params=p,
        skeleton=skeleton,
        widths=[p["model_channels"] * m for m in p["channel_mult"]],
        num_res_blocks=per_level("num_res_blocks", p["num_res_blocks"], levels),
    )
    _walk(layout)
    _attention_all_or_none(layout)
    return layout


def _walk(layout: _Layout) -> None:
    """Fill ``entries`` and the per-level attention lists from the skeleton's module tree."""
    m, add = layout.skeleton, layout.entries.append
    nrb, levels = layout.num_res_blocks, len(layout.widths)

    def attention(prefix: str, native: str, module: nn.Module) -> nn.Module:
        kind = "transformer" if isinstance(module, SpatialTransformer) else "attention_block"
        add(_Entry(prefix, native, kind, module))
        return module

    add(_Entry("time_embed.0", "time_embedding.linear_1", "same", m.time_embed[0]))
    add(_Entry("time_embed.2", "time_embedding.linear_2", "same", m.time_embed[2]))
    if hasattr(m, "label_emb"):
        if isinstance(m.label_emb, nn.Embedding):
            add(_Entry("label_emb", "class_embedding", "same", m.label_emb))
        else:  # 'sequential': Sequential(Sequential(Linear, SiLU, Linear)) ↔ TimestepEmbedding(linear_1, act, linear_2)
            add(_Entry("label_emb.0.0", "class_embedding.linear_1", "same", m.label_emb[0][0]))
            add(_Entry("label_emb.0.2", "class_embedding.linear_2", "same", m.label_emb[0][2]))
    add(_Entry("input_blocks.0.0", "conv_in", "same", m.input_blocks[0][0]))

    index = 1
    for level in range(levels):
        found = []
        for j in range(nrb[level]):
            block, native = m.input_blocks[index], f"down_blocks.{level}"
            add(_Entry(f"input_blocks.{index}.0", f"{native}.resnets.{j}", "resnet", block[0]))
            has = len(block) > 1
            found.append(attention(f"input_blocks.{index}.1", f"{native}.attentions.{j}", block[1]) if has else None)
            index += 1
        layout.encoder_attn.append(found)
        if level != levels - 1:
            down = m.input_blocks[index][0]
            kind = "resnet" if isinstance(down, ResBlock) else "downsample"
            add(_Entry(f"input_blocks.{index}.0", f"down_blocks.{level}.downsamplers.0", kind, down))
            index += 1

    add(_Entry("middle_block.0", "mid_block.resnets.0", "resnet", m.middle_block[0]))
    layout.mid_attn = attention("middle_block.1", "mid_block.attentions.0", m.middle_block[1])
    add(_Entry("middle_block.2", "mid_block.resnets.1", "resnet", m.middle_block[2]))

    index = 0
    layout.decoder_attn = [[] for _ in range(levels)]
    for up_index, level in enumerate(reversed(range(levels))):
        native = f"up_blocks.{up_index}"
        for j in range(nrb[level] + 1):
            block = m.output_blocks[index]
            add(_Entry(f"output_blocks.{index}.0", f"{native}.resnets.{j}", "resnet", block[0]))
            pos, found = 1, None
            if len(block) > pos and isinstance(block[pos], (AttentionBlock, SpatialTransformer)):
                found = attention(f"output_blocks.{index}.{pos}", f"{native}.attentions.{j}", block[pos])
                pos += 1
            layout.decoder_attn[level].append(found)
            if len(block) > pos:  # the upsampler closes every level but the first
                kind = "upsample" if isinstance(block[pos], Upsample) else "resnet"
                add(_Entry(f"output_blocks.{index}.{pos}", f"{native}.upsamplers.0", kind, block[pos]))
            index += 1

    add(_Entry("out.0", "conv_norm_out", "same", m.out[0]))
    add(_Entry("out.2", "conv_out", "same", m.out[2]))


def native_unet_config(ldm_unet_config: Mapping[str, Any]) -> tuple[str, dict]:
    """The stock diffusers class name and its config for an original UNet config.

    ``ldm_unet_config`` is the original ``unet_config`` (``{target, params}``), its ``params``, or an
    ``LDMUNetModel.config``. Returns ``("UNet2DModel", config)`` for ``AttentionBlock`` UNets and
    ``("UNet2DConditionModel", config)`` for ``use_spatial_transformer`` ones. Raises ``ValueError`` naming the
    option when the config has no exact diffusers equivalent.
    """
    layout = _layout(ldm_unet_config)
    if layout.params["use_spatial_transformer"]:
        return "UNet2DConditionModel", _unet2d_condition_config(layout)
    return "UNet2DModel", _unet2d_config(layout)


# ---------------------------------------------------------------------------------------------------- weights
def _split_qkv(t: torch.Tensor, heads: int, new_order: bool) -> tuple[torch.Tensor, ...]:
    """``qkv`` rows → q, k, v. ``QKVAttentionLegacy`` lays the 3C rows out ``[head][q,k,v][channel]``,
    ``QKVAttention`` (``use_new_attention_order``) ``[q,k,v][head][channel]``; diffusers wants ``[head][channel]``."""
    rows, rest = t.shape[0], t.shape[1:]
    dim = rows // (3 * heads)
    parts = t.reshape(3, heads, dim, *rest) if new_order else t.reshape(heads, 3, dim, *rest).transpose(0, 1)
    return tuple(parts[i].reshape(heads * dim, *rest).clone() for i in range(3))


def _convert_module(entry: _Entry, tensors: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    """Write the native keys of one original module (``tensors`` holds its keys relative to ``entry.ldm``)."""
    for key, value in tensors.items():
        if entry.kind == "resnet":
            head, _, leaf = key.rpartition(".")
            out[f"{entry.native}.{_RESNET_NAMES[head]}.{leaf}"] = value.clone()
        elif entry.kind == "downsample":  # Downsample.op → Downsample2D.conv
            out[f"{entry.native}.conv.{key.split('.', 1)[1]}"] = value.clone()
        elif entry.kind == "attention_block":
            head, _, leaf = key.rpartition(".")
            if head == "qkv":
                q, k, v = _split_qkv(value.squeeze(-1), entry.module.num_heads, entry.module.use_new_attention_order)
                for name, part in zip(("to_q", "to_k", "to_v"), (q, k, v)):
                    out[f"{entry.native}.{name}.{leaf}"] = part
            elif head == "proj_out":  # Conv1d (C, C, 1) → Linear (C, C)
                out[f"{entry.native}.to_out.0.{leaf}"] = value.squeeze(-1).clone()
            else:  # norm → group_norm
                out[f"{entry.native}.group_norm.{leaf}"] = value.clone()
        else:  # "same", "upsample" (conv → conv) and "transformer" (SpatialTransformer keys equal Transformer2DModel's)
            out[f"{entry.native}.{key}"] = value.clone()


def ldm_to_native_state_dict(
    state_dict: Mapping[str, torch.Tensor], ldm_config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Original UNet weights (bare, or a whole checkpoint's ``model.diffusion_model.*``) → diffusers keys.

    ``ldm_config`` is anything ``native_unet_config`` accepts. The result holds fresh tensors (nothing shares memory
    with the input). Raises ``ValueError`` for configs diffusers cannot express and for missing, unexpected or
    wrongly shaped keys.
    """
    layout = _layout(ldm_config)
    if any(k.startswith(ORIGINAL_PREFIX) for k in state_dict):
        n = len(ORIGINAL_PREFIX)
        state_dict = {k[n:]: v for k, v in state_dict.items() if k.startswith(ORIGINAL_PREFIX)}
    expected = layout.skeleton.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = [
        f"{len(items)} {what}: {', '.join(items[:10])}"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("with wrong shapes", wrong))
        if items
    ]
    if problems:
        raise ValueError("state_dict: does not fit the UNet config: " + " | ".join(problems))

    out: dict[str, torch.Tensor] = {}
    used = 0
    for entry in layout.entries:
        local = {k[len(entry.ldm) + 1 :]: v for k, v in state_dict.items() if k.startswith(entry.ldm + ".")}
        used += len(local)
        _convert_module(entry, local, out)
    if used != len(state_dict):  # every original key belongs to exactly one mapped module
        raise RuntimeError(f"internal: mapped {used} of {len(state_dict)} original keys")
    return out


# ---------------------------------------------------------------------------------------------------- models, folders
def to_native_unet(unet: LDMUNetModel):
    """A stock ``diffusers.UNet2DModel`` / ``UNet2DConditionModel`` computing what ``unet`` computes.

    The weights are copies in ``unet``'s dtypes, on the CPU; the model is in ``unet``'s train/eval mode.
    """
    import diffusers

    class_name, config = native_unet_config(unet.config)
    weights = ldm_to_native_state_dict({k: v.detach().cpu() for k, v in unet.state_dict().items()}, unet.config)
    with torch.device("meta"):
        native = getattr(diffusers, class_name).from_config(config)
    expected = native.state_dict()
    if set(expected) != set(weights):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise RuntimeError(f"internal: native key mismatch, missing {missing[:10]}, unexpected {extra[:10]}")
    native.load_state_dict(weights, strict=True, assign=True)
    leftover = [name for name, t in [*native.named_parameters(), *native.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"internal: {class_name} tensors left uninitialised: {leftover[:10]}")
    return native.train(unet.training)


def write_native_unet(
    folder: str | os.PathLike, output: str | os.PathLike | None = None, *, overwrite: bool = False
) -> Path:
    """Read ``folder/unet`` (an ``LDMUNetModel``) and write the stock diffusers UNet to ``output`` atomically.

    ``output`` defaults to ``folder/native_unet``. It holds ``config.json`` and
    ``diffusion_pytorch_model.safetensors`` and loads with ``UNet2DModel.from_pretrained`` (or
    ``UNet2DConditionModel.from_pretrained``) without ldm_compat. Returns ``output``.
    """
    folder = Path(folder)
    output = Path(output) if output is not None else folder / NATIVE_SUBFOLDER
    if not (folder / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no unet/config.json (expected a pipeline folder written by convert)")
    unet = LDMUNetModel.from_pretrained(folder, subfolder="unet")
    native = to_native_unet(unet)  # refuses before anything is written
    with atomic_directory(output, overwrite=overwrite, option="native output") as tmp:
        native.save_pretrained(tmp, safe_serialization=True)
    return output
