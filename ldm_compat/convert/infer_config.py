"""Infer an original ``UNetModel`` config from its state dict, where the weights determine it.

Determinable from shapes: in/out/model channels, dims, channel_mult, num_res_blocks, attention placement,
num_attention_blocks, spatial transformer depth, context_dim, linear projections, disabled self-attention,
use_scale_shift_norm, resblock_updown, conv_resample, num_classes/adm_in_channels, n_embed.
Not in the weights: head counts (``num_heads``/``num_head_channels``), ``use_new_attention_order`` and ``legacy``
— they change how attention splits channels, not any shape, so they must be given. Every candidate is verified by
building the model on the ``meta`` device and comparing every key and shape.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

NOT_IN_WEIGHTS = ("num_heads", "num_head_channels", "use_new_attention_order", "legacy", "num_heads_upsample")


def _blocks(keys, prefix: str) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for key in keys:
        m = re.match(rf"^{prefix}\.(\d+)\.(.*)$", key)
        if m:
            found.setdefault(int(m.group(1)), set()).add(m.group(2))
    return found


def _has(sub: set[str], start: str) -> bool:
    return any(k.startswith(start) for k in sub)


def _attention_params(sd: Mapping[str, torch.Tensor], prefix: str) -> dict:
    """What an attention block's weights say: spatial transformer or not, depth, context_dim, linear, self-attn."""
    keys = [k for k in sd if k.startswith(prefix)]
    if not any(".transformer_blocks." in k for k in keys):
        return {"use_spatial_transformer": False}
    depth = len({int(re.search(r"transformer_blocks\.(\d+)\.", k).group(1)) for k in keys if "transformer_blocks" in k})
    inner = sd[f"{prefix}transformer_blocks.0.attn1.to_q.weight"].shape[0]
    context_dim = sd[f"{prefix}transformer_blocks.0.attn2.to_k.weight"].shape[1]
    self_attn_in = sd[f"{prefix}transformer_blocks.0.attn1.to_k.weight"].shape[1]
    return {
        "use_spatial_transformer": True,
        "transformer_depth": depth,
        "context_dim": context_dim,
        "use_linear_in_transformer": sd[f"{prefix}proj_in.weight"].ndim == 2,
        "disable_self_attn": self_attn_in != inner,
    }


def _candidates(sd: Mapping[str, torch.Tensor], given: Mapping) -> list[dict]:
    conv_in = sd["input_blocks.0.0.weight"]
    mc = sd["time_embed.0.weight"].shape[1]
    base = {
        "image_size": given.get("image_size", 32),
        "in_channels": conv_in.shape[1],
        "model_channels": mc,
        "out_channels": sd["out.2.weight"].shape[0],
        "dims": conv_in.ndim - 2,
    }
    if "label_emb.weight" in sd:
        base["num_classes"] = sd["label_emb.weight"].shape[0]
    elif "label_emb.0.0.weight" in sd:
        base["num_classes"] = "sequential"
        base["adm_in_channels"] = sd["label_emb.0.0.weight"].shape[1]
    if "id_predictor.1.weight" in sd:
        base["n_embed"] = sd["id_predictor.1.weight"].shape[0]
    first_res = "input_blocks.1.0.emb_layers.1.weight"
    if first_res in sd:
        base["use_scale_shift_norm"] = sd[first_res].shape[0] == 2 * sd["input_blocks.1.0.out_layers.3.weight"].shape[0]

    inputs = _blocks(sd, "input_blocks")
    n_inputs = max(inputs) + 1
    out = []
    for nrb in range(1, 9):
        if n_inputs % (nrb + 1):
            continue
        levels = n_inputs // (nrb + 1)
        mult, attn_ds, attn_counts, attn_info = [], [], [], None
        ok = True
        for level in range(levels):
            first = 1 + level * (nrb + 1)
            if first not in inputs or not _has(inputs[first], "0.out_layers.3"):
                ok = False
                break
            mult.append(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] // mc)
            count = sum(1 for b in range(first, first + nrb) if _has(inputs.get(b, set()), "1."))
            attn_counts.append(count)
            if count:
                attn_ds.append(2**level)
                attn_info = attn_info or _attention_params(sd, f"input_blocks.{first}.1.")
        if not ok:
            continue
        down = inputs.get(nrb + 1, set()) if levels > 1 else set()
        resblock_updown = _has(down, "0.in_layers")
        conv_resample = True if resblock_updown or levels == 1 else _has(down, "0.op")
        candidate = {
            **base,
            "num_res_blocks": nrb,
            "channel_mult": mult,
            "attention_resolutions": attn_ds,
            "resblock_updown": resblock_updown,
            "conv_resample": conv_resample,
        }
        middle = attn_info or _attention_params(sd, "middle_block.1.")
        if middle.get("use_spatial_transformer"):
            candidate.update(
                use_spatial_transformer=True,
                transformer_depth=middle["transformer_depth"],
                context_dim=middle["context_dim"],
                use_linear_in_transformer=middle["use_linear_in_transformer"],
            )
            if middle["disable_self_attn"]:
                candidate["disable_self_attentions"] = [bool(c) for c in attn_counts]
        if any(0 < c < nrb for c in attn_counts):
            candidate["num_attention_blocks"] = attn_counts
        out.append(candidate)
    return out


def layout_of(params: Mapping) -> dict[str, tuple]:
    """Key → shape of ``LDMUNetModel(**params)``, built on the meta device (no memory, no init cost)."""
    from ldm_compat.models.unet_ldm import LDMUNetModel

    with torch.device("meta"):
        model = LDMUNetModel(**params)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def infer_unet_params(state_dict: Mapping[str, torch.Tensor], **given) -> dict:
    """The ``unet_config.params`` that build a UNet with exactly these keys and shapes.

    ``given`` supplies what the weights cannot say (``num_heads`` or ``num_head_channels``; optionally
    ``use_new_attention_order``, ``legacy``, ``image_size``) and overrides inferred values.
    """
    if "time_embed.0.weight" not in state_dict or "input_blocks.0.0.weight" not in state_dict:
        raise ValueError("cannot infer a UNet config: the state dict has no time_embed.0 / input_blocks.0.0 weights")
    has_attention = any(".1.norm.weight" in k or "middle_block.1." in k for k in state_dict)
    if has_attention and given.get("num_heads") is None and given.get("num_head_channels") is None:
        raise ValueError(
            "cannot infer the attention head count from weights: pass num_heads or num_head_channels "
            "(and use_new_attention_order / legacy if the model used them) — or give the original YAML with --config"
        )
    target = {k: tuple(v.shape) for k, v in state_dict.items()}
    tried = []
    for candidate in _candidates(state_dict, given):
        params = {**candidate, **{k: v for k, v in given.items() if v is not None}}
        params.setdefault("num_heads", -1)
        try:
            layout = layout_of(params)
        except (ValueError, AssertionError, NotImplementedError) as err:
            tried.append(f"{candidate.get('num_res_blocks')} res blocks: {err}")
            continue
        if layout == target:
            return params
        tried.append(f"{candidate.get('num_res_blocks')} res blocks: {len(set(layout) ^ set(target))} keys differ")
    raise ValueError(
        "could not infer a UNet config that reproduces every key and shape of this state dict "
        f"({'; '.join(tried) or 'no candidate'}); give the original YAML with --config"
    )


# ----------------------------------------------------------------------------------------------- first stage
#: ``resolution`` is not in an autoencoder's weights (it is fully convolutional); an inferred config uses the
#: published LDM / SD first stages' 256, which places the attention levels it found and changes no computation
NOMINAL_RESOLUTION = 256


def _levels(keys, prefix: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(rf"^{prefix}\.(\d+)\.", k))]
    return max(found) + 1 if found else 0


def infer_first_stage_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The ``first_stage_config`` (``{target, params}``) that the ``first_stage_model.*`` tensors (prefix stripped)
    determine: KL or VQ, channels, levels, res blocks, attention levels, latent and codebook sizes.

    Not in the weights: ``resolution`` (``NOMINAL_RESOLUTION``, which only places the attention levels),
    ``VQModel`` vs ``VQModelInterface`` (``VQModelInterface``, what every published LatentDiffusion uses) and the
    lossconfig (``torch.nn.Identity``; a real loss's ``loss.*`` tensors are kept verbatim)."""
    sd = state_dict
    needed = ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight", "post_quant_conv.weight")
    for key in needed:
        if key not in sd:
            raise ValueError(f"cannot infer the first stage: no first_stage_model.{key} (not an ldm autoencoder?)")
    ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
    levels = _levels(sd, "encoder.down")
    ch_mult = [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)]
    num_res_blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    if any(".to_qkv." in k for k in sd):
        attn_type = "linear"  # LinAttnBlock; refused by the conversion with its name
    else:
        attn_type = "vanilla" if "encoder.mid.attn_1.q.weight" in sd else "none"
    enc = [f"encoder.down.{i}.attn.0.norm.weight" in sd for i in range(levels)]
    dec = [f"decoder.up.{i}.attn.0.norm.weight" in sd for i in range(levels)]
    if enc != dec:
        raise ValueError(
            f"cannot infer the first stage: attention at encoder levels {enc} but decoder levels {dec} (one "
            "attn_resolutions at an unknown resolution); give the original YAML with --config"
        )
    z_channels = sd["decoder.conv_in.weight"].shape[1]
    ddconfig = {
        "double_z": sd["encoder.conv_out.weight"].shape[0] == 2 * z_channels,
        "z_channels": int(z_channels),
        "resolution": NOMINAL_RESOLUTION,
        "in_channels": int(in_channels),
        "out_ch": int(sd["decoder.conv_out.weight"].shape[0]),
        "ch": int(ch),
        "ch_mult": ch_mult,
        "num_res_blocks": num_res_blocks,
        "attn_resolutions": [NOMINAL_RESOLUTION // 2**i for i in range(levels) if enc[i]],
        "dropout": 0.0,
    }
    if attn_type != "vanilla":
        ddconfig["attn_type"] = attn_type
    params = {"embed_dim": int(sd["post_quant_conv.weight"].shape[1]), "ddconfig": ddconfig,
              "lossconfig": {"target": "torch.nn.Identity"}}  # fmt: skip
    if "quantize.embedding.weight" in sd:
        params["n_embed"] = int(sd["quantize.embedding.weight"].shape[0])
        return {"target": "ldm.models.autoencoder.VQModelInterface", "params": params}
    return {"target": "ldm.models.autoencoder.AutoencoderKL", "params": params}


def infer_conditioning_key(unet_params: Mapping) -> str | None:
    """The DiffusionWrapper routing a LatentDiffusion UNet's weights imply: cross-attention where it has a
    ``context_dim``, concatenation where it takes more input than output channels (both: ``hybrid``)."""
    crossattn = unet_params.get("context_dim") is not None
    concat = unet_params["in_channels"] > unet_params["out_channels"]
    return {(True, True): "hybrid", (True, False): "crossattn", (False, True): "concat"}.get((crossattn, concat))
