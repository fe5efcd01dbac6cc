"""``first_stage_model.*`` (prefix stripped) ⇄ the state dict of diffusers' ``AutoencoderKL`` / ``VQModel``.

The map is read off the diffusers model itself: its blocks are walked in the original module order (encoder:
conv_in, per level ``block.j`` then ``attn.j`` then ``downsample``, mid ``block_1``/``attn_1``/``block_2``,
norm_out, conv_out; decoder likewise with ``up.i`` = diffusers ``up_blocks[n-1-i]``), and inside each pair of
modules the diffusers module's own ``state_dict()`` names the tensors; only the child names that the two code bases
spell differently are renamed (``_CHILD_NAMES``). The original attention projections are 1x1 ``Conv2d`` (4-D
weights), diffusers' are ``Linear`` (2-D): reshaped, which is lossless both ways.

Tensors the diffusers model does not hold (``loss.*`` of a real lossconfig, ``model_ema.*``, ``quantize.used`` of
``remap``, ``colorize``, anything unknown) are returned as ``kept``, verbatim, and put back on export.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

# child modules the original and diffusers name differently, per kind of module; all others are spelt the same
_CHILD_NAMES = {
    "resnet": {"conv_shortcut": "nin_shortcut"},
    "attention": {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"},
    "plain": {},
}
# the original autoencoders' top-level children in registration order (= torch state_dict order); direct buffers
# of the root (``colorize``) come before every child, as torch writes a module's own tensors first
_TOP_LEVEL = ("encoder", "decoder", "loss", "quantize", "quant_conv", "post_quant_conv", "model_ema")


@dataclass(frozen=True)
class KeyEntry:
    original: str
    diffusers: str
    reshape: bool  # Linear (diffusers) ⇄ 1x1 Conv2d (original)


def _pairs(model: nn.Module) -> Iterator[tuple[str, str, str]]:
    """(original module path, diffusers module path, kind) in the original module order."""
    enc, dec = model.encoder, model.decoder
    yield "encoder.conv_in", "encoder.conv_in", "plain"
    for i, block in enumerate(enc.down_blocks):
        yield from _level(f"encoder.down.{i}", f"encoder.down_blocks.{i}", block, "downsamplers", "downsample")
    yield from _mid("encoder", enc.mid_block)
    yield "encoder.norm_out", "encoder.conv_norm_out", "plain"
    yield "encoder.conv_out", "encoder.conv_out", "plain"
    yield "decoder.conv_in", "decoder.conv_in", "plain"
    yield from _mid("decoder", dec.mid_block)
    n = len(dec.up_blocks)
    for i in range(n):  # the original indexes up[] by level (0 = full resolution); diffusers runs them in order
        block = dec.up_blocks[n - 1 - i]
        yield from _level(f"decoder.up.{i}", f"decoder.up_blocks.{n - 1 - i}", block, "upsamplers", "upsample")
    yield "decoder.norm_out", "decoder.conv_norm_out", "plain"
    yield "decoder.conv_out", "decoder.conv_out", "plain"
    if hasattr(model, "quantize"):
        yield "quantize.embedding", "quantize.embedding", "plain"
    yield "quant_conv", "quant_conv", "plain"
    yield "post_quant_conv", "post_quant_conv", "plain"


def _level(original: str, diffusers: str, block: nn.Module, resamplers: str, resample: str):
    for j in range(len(block.resnets)):
        yield f"{original}.block.{j}", f"{diffusers}.resnets.{j}", "resnet"
    for j in range(len(getattr(block, "attentions", None) or ())):
        yield f"{original}.attn.{j}", f"{diffusers}.attentions.{j}", "attention"
    if getattr(block, resamplers, None) is not None:
        yield f"{original}.{resample}.conv", f"{diffusers}.{resamplers}.0.conv", "plain"


def _mid(prefix: str, mid: nn.Module):
    yield f"{prefix}.mid.block_1", f"{prefix}.mid_block.resnets.0", "resnet"
    if mid.attentions[0] is not None:
        yield f"{prefix}.mid.attn_1", f"{prefix}.mid_block.attentions.0", "attention"
    yield f"{prefix}.mid.block_2", f"{prefix}.mid_block.resnets.1", "resnet"


def key_map(model: nn.Module) -> list[KeyEntry]:
    """Every tensor of the diffusers ``model`` with its original name, in the original module order."""
    entries = []
    for original, diffusers, kind in _pairs(model):
        module = model.get_submodule(diffusers)
        renames = _CHILD_NAMES[kind]
        for name, tensor in module.state_dict(keep_vars=True).items():
            child, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            child = renames.get(child, child)
            entries.append(
                KeyEntry(
                    original=".".join(p for p in (original, child, leaf) if p),
                    diffusers=f"{diffusers}.{name}",
                    reshape=kind == "attention" and leaf == "weight" and tensor.ndim == 2,
                )
            )
    if len({e.diffusers for e in entries}) != len(model.state_dict()):
        raise AssertionError(f"{type(model).__name__}: the key map does not cover the model's state dict")
    return entries


def _slot(key: str) -> tuple[int, int]:
    head, _, rest = key.partition(".")
    if not rest:
        return (-1, 0)  # a buffer of the root module itself
    index = _TOP_LEVEL.index(head) if head in _TOP_LEVEL else len(_TOP_LEVEL)
    return (index, 1 if "." in rest else 0)


def original_order(keys) -> list[str]:
    """``keys`` in the order the original module's ``state_dict()`` writes them (stable within each top-level
    child, so mapped keys keep the module order and kept keys their given order)."""
    return sorted(keys, key=_slot)


def to_diffusers_state_dict(
    original: Mapping[str, torch.Tensor], model: nn.Module, source: str = "first_stage_model"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Original first-stage tensors (prefix stripped) → (the diffusers state dict of ``model``, the kept rest).

    A missing tensor or a shape that does not fit ``model``'s config is a ``ValueError`` naming the key.
    """
    expected = model.state_dict()
    entries = key_map(model)
    mapped = {e.original for e in entries}
    missing = [e.original for e in entries if e.original not in original]
    if missing:
        named = ", ".join(f"{source}.{k}" for k in missing[:5]) + (" …" if len(missing) > 5 else "")
        raise ValueError(f"{source}: {len(missing)} tensors the config needs are missing ({named})")
    out: dict[str, torch.Tensor] = {}
    for e in entries:
        tensor = original[e.original]
        shape = tuple(expected[e.diffusers].shape)
        want = shape + (1, 1) if e.reshape else shape
        if tuple(tensor.shape) != want:
            raise ValueError(f"{source}.{e.original}: shape {tuple(tensor.shape)}, the config gives {want}")
        out[e.diffusers] = tensor.reshape(shape) if e.reshape else tensor
    out = {k: out[k] for k in expected}  # diffusers' own order
    kept = {k: v for k, v in original.items() if k not in mapped}
    return out, kept


def to_original_state_dict(
    diffusers: Mapping[str, torch.Tensor],
    model: nn.Module,
    kept: Mapping[str, torch.Tensor] | None = None,
    key_order: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The diffusers state dict of ``model`` (+ the ``kept`` tensors) → original first-stage tensors (prefix
    stripped), in ``key_order`` when given, else in the original module order."""
    out: dict[str, torch.Tensor] = {}
    for e in key_map(model):
        if e.diffusers not in diffusers:
            raise ValueError(f"{type(model).__name__}: no tensor {e.diffusers!r} (the folder's weights are incomplete)")
        tensor = diffusers[e.diffusers]
        out[e.original] = tensor.reshape(*tensor.shape, 1, 1) if e.reshape else tensor
    out.update(kept or {})
    order = key_order if key_order is not None else original_order(out)
    if sorted(order) != sorted(out):
        raise ValueError(f"key_order: {len(set(order) ^ set(out))} keys differ from the first stage's tensors")
    return {k: out[k] for k in order}
