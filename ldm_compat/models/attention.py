"""Attention modules of the original UNet: ``AttentionBlock`` (openaimodel) and ``SpatialTransformer`` (attention.py).

Attention runs through diffusers' attention dispatcher (``attention_processor.LDMAttnProcessor``; SDPA by default)
with q/k/v that are contiguous ``(B, heads, tokens, head_dim)`` tensors, handed over as transposed views in the
dispatcher's ``(B, tokens, heads, head_dim)`` layout: the native backend transposes them back, so SDPA gets
contiguous inputs (a non-contiguous layout gives SDPA no speed-up). The head orderings of the original are kept
exactly:

* ``QKVAttentionLegacy`` (default): the ``qkv`` rows are laid out ``[head][q, k, v][channel]``;
* ``QKVAttention`` (``use_new_attention_order=True``): ``[q, k, v][head][channel]``.

The original computes ``softmax((q·s)(k·s)ᵀ)`` with ``s = head_dim^-1/4`` and a float32 softmax; SDPA's default
``1/sqrt(head_dim)`` scale is the same product, and its kernels accumulate half inputs in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention_processor import LDMAttentionModuleMixin
from .layers import CheckpointMixin, GroupNorm32, zero_module


def attention_block_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Head count of an ``AttentionBlock``: ``num_heads`` if ``num_head_channels == -1`` else
    ``channels // num_head_channels`` (which must divide ``channels``), as the original."""
    if num_head_channels == -1:
        heads = num_heads
    else:
        if num_head_channels <= 0 or channels % num_head_channels:
            raise ValueError(
                f"num_head_channels: attention width {channels} is not divisible by the head width {num_head_channels}"
            )
        heads = channels // num_head_channels
    if heads <= 0 or channels % heads:
        raise ValueError(f"num_heads: attention width {channels} cannot be split into {heads} heads")
    return heads


class AttentionBlock(CheckpointMixin, LDMAttentionModuleMixin, nn.Module):
    """Self-attention over all positions: ``norm``, ``qkv`` (Conv1d, 3C rows), attention, ``proj_out`` (zero-init).

    Unlike the original, which always recomputes this block in the backward pass (``checkpoint(..., True)``), it is
    checkpointed only when ``use_checkpoint`` (or ``enable_gradient_checkpointing()``) asks for it; the values are the
    same either way.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.num_heads = attention_block_heads(channels, num_heads, num_head_channels)
        self.use_new_attention_order = use_new_attention_order
        self._init_checkpointing(use_checkpoint)
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))
        self._init_processor()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._maybe_checkpoint(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))  # (B, 3C, T)
        heads, length = self.num_heads, x.shape[-1]
        head_dim = c // heads
        if self.use_new_attention_order:
            qkv = qkv.view(b, 3, heads, head_dim, length).permute(1, 0, 2, 4, 3)
        else:
            qkv = qkv.view(b, heads, 3, head_dim, length).permute(2, 0, 1, 4, 3)
        # one copy makes q, k and v contiguous (B, heads, T, head_dim) slices
        q, k, v = qkv.contiguous().transpose(2, 3).unbind(0)  # (B, T, heads, head_dim) views
        a = self._attend(q, k, v)  # (B, T, heads, head_dim)
        # back to the original's (B, heads·head_dim, T) channel order, which both orderings share
        a = a.permute(0, 2, 3, 1).reshape(b, c, length)
        return (x + self.proj_out(a)).reshape(b, c, *spatial)


class CrossAttention(LDMAttentionModuleMixin, nn.Module):
    """Multi-head attention of ``x`` over ``context`` (self-attention when ``context`` is None), as the original
    ``CrossAttention``: ``to_q``/``to_k``/``to_v`` without bias, ``to_out.0`` Linear and ``to_out.1`` Dropout."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64, dropout=0.0):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self._init_processor()

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, N, heads·dim)`` → a ``(B, N, heads, dim)`` view of a contiguous ``(B, heads, N, dim)`` copy."""
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2).contiguous().transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = self._heads(self.to_q(x))
        k = self._heads(self.to_k(context))
        v = self._heads(self.to_v(context))
        out = self._attend(q, k, v)  # (B, N, heads, dim_head)
        b, n = out.shape[:2]
        return self.to_out(out.reshape(b, n, self.heads * self.dim_head))


class GEGLU(nn.Module):
    """``proj`` to twice the width; the first half gated by GELU of the second."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """The original gated feed-forward (``gated_ff=True``, ``mult=4``): ``net.0`` GEGLU, ``net.1`` Dropout,
    ``net.2`` Linear."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(CheckpointMixin, nn.Module):
    """Pre-norm ``attn1`` (self-attention, or cross-attention with ``disable_self_attn``), ``attn2`` (cross-attention
    to ``context``) and ``ff``, each with a residual connection.

    CompVis always checkpoints this block (``checkpoint=True`` regardless of ``use_checkpoint``); Stability-AI passes
    ``use_checkpoint``, and so do we.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        checkpoint: bool = False,
        disable_self_attn: bool = False,
    ):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self._init_checkpointing(checkpoint)
        self.attn1 = CrossAttention(
            dim, context_dim if disable_self_attn else None, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self._maybe_checkpoint(x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """The original ``SpatialTransformer``: GroupNorm (eps 1e-6, *not* float32-forced), ``proj_in``, ``depth``
    transformer blocks over the ``H·W`` tokens, ``proj_out`` (zero-init), residual.

    ``proj_in``/``proj_out`` are 1×1 convolutions, or Linear layers with ``use_linear`` (Stability-AI). Deliberate
    fixes of Stability-AI bugs (neither changes a public checkpoint's keys or shapes):

    * a scalar ``context_dim`` with ``depth > 1`` is used for every block (Stability-AI indexes ``context_dim[d]`` and
      raises IndexError; CompVis uses the scalar for every block);
    * the ``use_linear`` ``proj_out`` maps ``inner_dim → in_channels`` (Stability-AI builds
      ``Linear(in_channels, inner_dim)``, which only works when the two are equal, as in every public config).

    ``context`` may be one tensor (given to every block, as CompVis) or a sequence with one tensor per block
    (Stability-AI's ``sequential_crossattn``).
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | Sequence[int] | None = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        if context_dim is None or isinstance(context_dim, int):
            context_dims = [context_dim] * depth
        else:
            context_dims = list(context_dim)
            if len(context_dims) < depth:
                raise ValueError(f"context_dim: got {len(context_dims)} entries for transformer_depth={depth}")
        self.in_channels = in_channels
        self.depth = depth
        self.use_linear = use_linear
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim,
                n_heads,
                d_head,
                dropout=dropout,
                context_dim=context_dims[d],
                checkpoint=use_checkpoint,
                disable_self_attn=disable_self_attn,
            )
            for d in range(depth)
        )
        if use_linear:
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0))

    def _contexts(self, context) -> list:
        if context is None or isinstance(context, torch.Tensor):
            return [context] * self.depth
        context = list(context)
        if len(context) < self.depth:
            raise ValueError(
                f"encoder_hidden_states: got a list of {len(context)} tensors for transformer_depth={self.depth}"
            )
        return context

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        contexts = self._contexts(context)
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if self.use_linear:
            x = self.proj_in(x.flatten(2).transpose(1, 2))
        else:
            x = self.proj_in(x).flatten(2).transpose(1, 2).contiguous()
        for block, ctx in zip(self.transformer_blocks, contexts):
            x = block(x, context=ctx)
        if self.use_linear:
            x = self.proj_out(x).transpose(1, 2).reshape(b, -1, h, w)
        else:
            x = self.proj_out(x.transpose(1, 2).reshape(b, -1, h, w))
        return x + x_in
