"""Small building blocks shared by the UNet modules: the original ``diffusionmodules/util.py`` helpers.

Each helper reproduces one function of the original (named in its docstring) without copying its code.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """``normalization(channels)`` of the original: ``GroupNorm(32, channels)`` (eps 1e-5) computed in float32.

    The original upcasts every input to float32 and casts the result back to the input's dtype.
    """

    def __init__(self, num_channels: int):
        super().__init__(32, num_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Half inputs are normalised in float32; float32 (and float64, where the original's ``.float()`` would
        # only break a double model) is used as is, so the float32 case costs nothing extra. The cast back is
        # skipped when the dtype already matches (under autocast F.group_norm may return another dtype, which the
        # original's ``.type(x.dtype)`` undoes).
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        weight, bias = self.weight, self.bias
        if weight.dtype != xf.dtype:  # half weights (e.g. from_pretrained(torch_dtype=...)): normalise in float32 too
            weight, bias = weight.to(xf.dtype), bias.to(xf.dtype)
        out = F.group_norm(xf, self.num_groups, weight, bias, self.eps)
        return out if out.dtype == x.dtype else out.to(x.dtype)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """``conv_nd``: a 1-D, 2-D or 3-D convolution."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")


def zero_module(module: nn.Module) -> nn.Module:
    """``zero_module``: zero every parameter of ``module`` in place and return it."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


_FREQUENCIES: dict[tuple, torch.Tensor] = {}


def _frequencies(half: int, max_period: int, device: torch.device) -> torch.Tensor:
    """``exp(-ln(max_period) · i / half)``, float32, on ``device``."""
    if torch.compiler.is_compiling():
        # in a compiled graph: made on the device, folded into the graph (exp may round differently there)
        return torch.exp(torch.arange(0, half, dtype=torch.float32, device=device) * (-math.log(max_period)) / half)
    key = (half, max_period, device)
    freqs = _FREQUENCIES.get(key)
    if freqs is None:
        # made on the CPU as the original does (the same bits), copied to the device once: the original's copy per
        # call is a host-to-device copy from pageable memory, which waits for the device every step
        freqs = torch.exp(torch.arange(0, half, dtype=torch.float32) * (-math.log(max_period)) / half).to(device)
        _FREQUENCIES[key] = freqs
    return freqs


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal timestep embedding ``[cos, sin]`` of ``t · exp(-ln(max_period) · i / half)`` (``repeat_only=False``).

    The frequencies are built in float32 and the timesteps cast with ``.float()`` exactly as the original does, so the
    result is bit-identical. An odd ``dim`` gets a zero column appended. Equal to diffusers' ``get_timestep_embedding``
    with ``flip_sin_to_cos=True, downscale_freq_shift=0``.
    """
    half = dim // 2
    args = timesteps[:, None].float() * _frequencies(half, max_period, timesteps.device)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def default_checkpoint(function: Callable, *args):
    """Gradient checkpointing used for ``use_checkpoint=True``: ``torch.utils.checkpoint`` without re-entrance."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


class CheckpointMixin:
    """Lets a block recompute its ``_forward`` in the backward pass.

    ``gradient_checkpointing`` starts at the original's ``use_checkpoint``; diffusers'
    ``ModelMixin.enable_gradient_checkpointing()`` / ``disable_gradient_checkpointing()`` set it (and
    ``_gradient_checkpointing_func``) on every module that has the attribute.
    """

    gradient_checkpointing: bool = False
    _gradient_checkpointing_func: Callable | None = None

    def _init_checkpointing(self, enabled: bool) -> None:
        self.gradient_checkpointing = bool(enabled)
        self._gradient_checkpointing_func = default_checkpoint

    def _maybe_checkpoint(self, *args):
        # Only worth it (and only meaningful) when autograd records the graph.
        if self.gradient_checkpointing and torch.is_grad_enabled():
            func = self._gradient_checkpointing_func or default_checkpoint
            return func(_Forward(self), *args)
        return self._forward(*args)


class _Forward:
    """``block._forward`` as a plain callable object. diffusers' ``enable_gradient_checkpointing()`` checkpoints
    ``module.__call__``; for a bound method that is a C method-wrapper, which ``torch.compile`` cannot trace (a graph
    break), while this object's ``__call__`` is Python."""

    __slots__ = ("block",)

    def __init__(self, block):
        self.block = block

    def __call__(self, *args):
        return self.block._forward(*args)
