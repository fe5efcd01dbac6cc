"""Residual and resampling blocks of the original openaimodel UNet (``ResBlock``, ``Upsample``, ``Downsample``).

Module and attribute names follow the original so that state-dict keys are identical: ``in_layers.{0,2}``,
``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection``, ``op`` and ``conv``. Parameterless layers (SiLU,
Dropout) keep their positions in the ``nn.Sequential`` containers for the same reason.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import CheckpointMixin, GroupNorm32, avg_pool_nd, conv_nd, zero_module


class Upsample(nn.Module):
    """Nearest-neighbour 2× upsampling, then a 3×3 convolution (``conv``) when ``use_conv``.

    For ``dims=3`` only the inner two dimensions are upsampled, as in the original.
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """2× downsampling: a stride-2 3×3 convolution when ``use_conv``, else average pooling (both named ``op``).

    For ``dims=3`` only the inner two dimensions are downsampled, as in the original.
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.channels != self.out_channels:
                raise ValueError(
                    f"Downsample without convolution (conv_resample=False) cannot change channels "
                    f"{self.channels} -> {self.out_channels}"
                )
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(CheckpointMixin, nn.Module):
    """The original ``ResBlock``: GroupNorm-SiLU-conv, timestep embedding added (or FiLM with
    ``use_scale_shift_norm``), GroupNorm-SiLU-Dropout-conv (zero-initialised), plus a skip connection.

    ``up``/``down`` resample both branches without parameters (``resblock_updown``). ``use_conv`` selects a 3×3
    instead of a 1×1 skip convolution when the channel count changes. ``use_checkpoint`` recomputes the block in the
    backward pass.
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
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

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
        if self.updown:
            # resample between the activation and the convolution, as the original does
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
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
