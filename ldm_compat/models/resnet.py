"""Residual and resampling blocks of the original openaimodel UNet (``ResBlock``, ``Upsample``, ``Downsample``).

Module and attribute names follow the original so that state-dict keys are identical: ``in_layers.{0,2}``,
``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection``, ``op`` and ``conv``. Parameterless layers (SiLU,
Dropout) keep their positions in the ``nn.Sequential`` containers for the same reason. Weightless resampling adds
no keys, so it is a function (``resample``) rather than a module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import CheckpointMixin, GroupNorm32, conv_nd, zero_module

_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def resample_factors(dims: int) -> tuple[int, ...]:
    """The 2× resampling factor of each spatial dimension: a 3-D signal keeps its first one (frames)."""
    return (1, 2, 2) if dims == 3 else (2,) * dims


def resample(x: torch.Tensor, direction: str, dims: int) -> torch.Tensor:
    """Parameterless 2× resampling of the spatial dimensions (``resample_factors``): ``"up"`` repeats every element
    (nearest neighbour: copies, so the same bits however it is written), ``"down"`` averages each cell with torch's
    ``avg_pool`` (what the original's ``AvgPoolNd`` modules call)."""
    factors = resample_factors(dims)
    if direction == "up":
        return F.interpolate(x, scale_factor=factors, mode="nearest")
    if direction == "down":
        return _AVG_POOL[dims](x, kernel_size=factors, stride=factors)
    raise ValueError(f"direction={direction!r}: expected 'up' or 'down'")


class Upsample(nn.Module):
    """2× nearest-neighbour upsampling (``resample``), followed by the 3×3 convolution ``conv`` if ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding=1):
        super().__init__()
        self.channels, self.dims = channels, dims
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        # registered only when used, so that the state dict has conv.* exactly when the original has them
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = resample(x, "up", self.dims)
        return self.conv(wide) if self.use_conv else wide


class Downsample(nn.Module):
    """2× downsampling: the strided 3×3 convolution ``op`` if ``use_conv``, else 2× average pooling
    (``resample``), which has no weights and so cannot change the channel count."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding=1):
        super().__init__()
        self.channels, self.dims = channels, dims
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if not use_conv and self.out_channels != channels:
            raise ValueError(
                f"Downsample without convolution (conv_resample=False) cannot change channels "
                f"{channels} -> {self.out_channels}"
            )
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=resample_factors(dims), padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x) if self.use_conv else resample(x, "down", self.dims)


class ResBlock(CheckpointMixin, nn.Module):
    """The original ``ResBlock``: GroupNorm-SiLU-conv, timestep embedding added (or FiLM with
    ``use_scale_shift_norm``), GroupNorm-SiLU-Dropout-conv (zero-initialised), plus a skip connection.

    ``up``/``down`` resample both branches 2× without weights (``resblock_updown``, see ``resample``).
    ``use_conv`` selects a 3×3 instead of a 1×1 skip convolution when the channel count changes.
    ``use_checkpoint`` recomputes the block in the backward pass.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self._init_checkpointing(use_checkpoint)

        self.in_layers = nn.Sequential(
            GroupNorm32(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        if up and down:
            raise ValueError("ResBlock: up and down exclude each other")
        # resblock_updown: both branches are resampled without weights, so nothing of it is in the state dict
        self.dims = dims
        self.resample = "up" if up else ("down" if down else None)

        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            GroupNorm32(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self._maybe_checkpoint(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample is None:
            h = self.in_layers(x)
        else:
            # the main branch is resampled after its activation, right before its convolution
            norm, act, conv = self.in_layers
            h = conv(resample(act(norm(x)), self.resample, self.dims))
            x = resample(x, self.resample, self.dims)
        emb_out = self.emb_layers(emb).to(h.dtype)
        emb_out = emb_out.reshape(emb_out.shape + (1,) * (h.ndim - emb_out.ndim))
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h
