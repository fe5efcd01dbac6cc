"""The original autoencoder's activation and attention, installed into a stock diffusers model without changing it.

diffusers' ``AutoencoderKL``/``VQModel`` compute the original function, but with other floating-point operations:
``nn.SiLU`` for the original ``x * torch.sigmoid(x)``, and ``Linear`` projections + ``scaled_dot_product_attention``
for the original ``AttnBlock`` (1x1 convs, ``bmm``, ``* c**-0.5``, softmax, ``bmm``). The results agree to the last
bits of float32, but a decoder with a nearly constant channel ahead of a GroupNorm amplifies those bits: on the
reference fixtures one resnet turns 6e-8 into 1e-6 and the decoded image is off by 2e-4. ``use_original_numerics``
swaps in ``OriginalSwish`` and ``OriginalAttnBlockProcessor`` (diffusers' own attention-processor hook); neither
holds weights, so the model still saves and loads as the stock class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OriginalSwish(nn.Module):
    """The original ``nonlinearity(x) = x * torch.sigmoid(x)`` (``ldm/modules/diffusionmodules/model.py``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def _conv1x1(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    # the original projections are Conv2d(c, c, 1): the same weights seen as 1x1 kernels, the same conv kernel
    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)


class OriginalAttnBlockProcessor:
    """diffusers attention processor computing the original single-head ``AttnBlock`` on a VAE ``Attention``."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs) -> torch.Tensor:  # fmt: skip
        if encoder_hidden_states is not None or attention_mask is not None or attn.heads != 1:
            raise ValueError("OriginalAttnBlockProcessor: only the autoencoder's single-head self-attention")
        if attn.spatial_norm is not None or attn.group_norm is None or hidden_states.ndim != 4:
            raise ValueError("OriginalAttnBlockProcessor: expects a GroupNorm VAE attention on b x c x h x w input")
        x = hidden_states
        h_ = attn.group_norm(x)
        q, k, v = _conv1x1(h_, attn.to_q), _conv1x1(h_, attn.to_k), _conv1x1(h_, attn.to_v)
        b, c, h, w = q.shape
        weights = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w))
        weights = torch.softmax(weights * (int(c) ** (-0.5)), dim=2)
        out = torch.bmm(v.reshape(b, c, h * w), weights.permute(0, 2, 1)).reshape(b, c, h, w)
        out = _conv1x1(out, attn.to_out[0])
        if attn.residual_connection:
            out = x + out
        return out / attn.rescale_output_factor


def use_original_numerics(model: nn.Module) -> nn.Module:
    """Make ``model`` (a diffusers ``AutoencoderKL``/``VQModel``) compute like the original, in place."""
    from diffusers.models.attention_processor import Attention

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.SiLU):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, OriginalSwish())
        elif isinstance(module, Attention):
            module.set_processor(OriginalAttnBlockProcessor())
    return model
