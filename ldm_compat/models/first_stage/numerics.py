"""The original ``LatentDiffusion`` first-stage steps on a stock diffusers ``AutoencoderKL`` / ``VQModel``.

``encode_first_stage``, ``get_first_stage_encoding``, ``decode_first_stage`` and the taming ``VectorQuantizer2``
(``quantize``) as the original computes them, for a pipeline or a trainer to call:

- KL: ``encode_first_stage`` gives the posterior (``LDMDiagonalGaussian``: diffusers' ``DiagonalGaussianDistribution``
  — the same mean, logvar clamped to [-30, 20], std, var, mode — whose ``sample`` draws like the original: one
  ``torch.randn(mean.shape)`` on the CPU (global RNG, or the ``generator`` given), moved to the parameters' device).
- VQ (``VQModelInterface``): ``encode_first_stage`` = ``quant_conv(encoder(x))`` before quantization; decoding
  re-quantizes unless ``force_not_quantize``. Quantization uses taming's distance ``|z|² + |e|² − 2 z·e`` (diffusers'
  ``VectorQuantizer`` uses ``cdist``, which can pick the other code of a near tie), the legacy loss
  ``mean((zq − z)²) + β mean((zq − z)²)`` and the straight-through ``z + (zq − z)``.
- ``FirstStage`` installs the original's activation and attention arithmetic (``original_ops``; no weights, the
  model stays a stock diffusers model); ``original_numerics=False`` keeps diffusers' SiLU and SDPA.
- plain ``VQModel`` as a first stage: ``encode`` returns the quantized ``(quant, loss, info)`` triple, which the
  original ``get_first_stage_encoding`` refuses, and ``decode`` never quantizes — kept as the original does it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ldm_compat.models.first_stage.config import FirstStageSpec
from ldm_compat.models.first_stage.original_ops import use_original_numerics

BETA = 0.25  # the original VQModel builds VectorQuantizer2(n_embed, embed_dim, beta=0.25) (legacy loss)


class LDMDiagonalGaussian(DiagonalGaussianDistribution):
    """diffusers' ``DiagonalGaussianDistribution`` whose ``sample`` draws the noise as the original does."""

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_posterior(self, generator)


def sample_posterior(posterior: DiagonalGaussianDistribution, generator: torch.Generator | None = None):
    """``mean + std * eps`` with ``eps = torch.randn(mean.shape)`` drawn on the CPU (or the generator's device) in
    the default dtype, then moved to the parameters' device: the original's one draw (it never passes a dtype, so a
    half-precision posterior gives a float32 sample there too)."""
    device = generator.device if generator is not None else torch.device("cpu")
    eps = torch.randn(posterior.mean.shape, generator=generator, device=device)
    return posterior.mean + posterior.std * eps.to(device=posterior.parameters.device)


class QuantizeOutput(NamedTuple):
    quant: torch.Tensor  # h snapped to the codebook (straight-through: h + (zq - h))
    loss: torch.Tensor  # legacy VQ loss
    indices: torch.Tensor  # b*h*w (remap: b*h*w x 1; sane_index_shape: b x h x w), int64


@dataclass
class FirstStage:
    """A diffusers first-stage model with the original ``LatentDiffusion`` semantics around it.

    ``model`` is the stock ``AutoencoderKL`` / ``VQModel``; ``scale_factor`` defaults to its config's
    ``scaling_factor``. ``scale_by_std``: the original then holds ``scale_factor`` as a float32 buffer, so
    ``1 / scale_factor`` is computed in float32 (with the YAML float it is a float64 division).
    ``remap_used``: the ``quantize.used`` buffer of a ``remap`` VQ model (from the kept tensors).
    ``original_numerics``: compute activations and attention with the original's operations (``original_ops``).
    """

    model: torch.nn.Module
    spec: FirstStageSpec
    scale_factor: float | None = None
    scale_by_std: bool = False
    remap_used: torch.Tensor | None = None
    original_numerics: bool = True

    def __post_init__(self):
        if self.original_numerics:
            use_original_numerics(self.model)
        if self.scale_factor is None:
            self.scale_factor = float(self.model.config.scaling_factor)
        if self.spec.remap is not None and self.remap_used is None:
            raise ValueError(f"remap={self.spec.remap!r}: the quantize.used buffer is needed (kept tensors)")

    # ------------------------------------------------------------------------------------------------- encode
    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor):
        """``LatentDiffusion.encode_first_stage``: the posterior (KL), ``h`` before quantization (VQModelInterface),
        or the ``(quant, loss, info)`` triple of a plain ``VQModel``."""
        if not self.spec.is_vq:
            return LDMDiagonalGaussian(self.model.encode(x).latent_dist.parameters)
        h = self.model.encode(x).latents
        if self.spec.vq_interface:
            return h
        q = self.quantize(h)
        return q.quant, q.loss, (None, None, q.indices)

    def get_first_stage_encoding(self, encoder_posterior, generator: torch.Generator | None = None) -> torch.Tensor:
        """``scale_factor * z``: ``z`` a posterior sample (one draw, see ``sample_posterior``) or the tensor itself."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = sample_posterior(encoder_posterior, generator)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise NotImplementedError(f"encoder_posterior of type '{type(encoder_posterior)}' not yet implemented")
        return self._scale() * z

    # ------------------------------------------------------------------------------------------------- decode
    @torch.no_grad()
    def decode_first_stage(
        self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False
    ) -> torch.Tensor:
        """``decode(1 / scale_factor * z)``; VQModelInterface re-quantizes unless ``force_not_quantize`` (or
        ``predict_cids``: ``z`` holds code logits or indices, looked up in the codebook first)."""
        return self.differentiable_decode_first_stage(z, predict_cids, force_not_quantize)

    def differentiable_decode_first_stage(
        self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False
    ) -> torch.Tensor:
        """``decode_first_stage`` with gradients (the original's ``differentiable_decode_first_stage``)."""
        if predict_cids:
            z = self.codebook_entry(z.exp().argmax(dim=1) if z.dim() == 4 else z)
        z = self._inverse_scale() * z
        if not self.spec.is_vq:
            return self.model.decode(z).sample
        if self.spec.vq_interface and not (predict_cids or force_not_quantize):
            z = self.quantize(z).quant
        return self.model.decode(z, force_not_quantize=True).sample

    # ----------------------------------------------------------------------------------------------- quantize
    def quantize(self, h: torch.Tensor) -> QuantizeOutput:
        """taming ``VectorQuantizer2.forward`` (legacy loss, beta 0.25) on the model's codebook."""
        codebook = self.model.quantize.embedding.weight
        z = h.permute(0, 2, 3, 1).contiguous()
        flat = z.view(-1, codebook.shape[1])
        distance = flat.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1) - 2 * (flat @ codebook.t())
        indices = distance.argmin(dim=1)
        zq = self.model.quantize.embedding(indices).view(z.shape)
        loss = torch.mean((zq.detach() - z) ** 2) + BETA * torch.mean((zq - z.detach()) ** 2)
        quant = (z + (zq - z).detach()).permute(0, 3, 1, 2).contiguous()
        if self.remap_used is not None:
            indices = self._remap(indices.reshape(z.shape[0], -1)).reshape(-1, 1)
        if self.spec.sane_index_shape:
            indices = indices.reshape(quant.shape[0], quant.shape[2], quant.shape[3])
        return QuantizeOutput(quant, loss, indices)

    def codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """``quantize.get_codebook_entry(indices, shape=None)`` as ``decode_first_stage(predict_cids=True)`` uses it:
        b x h x w indices → b x c x h x w codes."""
        if self.remap_used is not None:
            # the original reshapes with shape[0] of shape=None here and fails; say so instead
            raise NotImplementedError("predict_cids with remap: the original get_codebook_entry(shape=None) fails")
        return self.model.quantize.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def _remap(self, indices: torch.Tensor) -> torch.Tensor:
        used = self.remap_used.to(indices)
        match = (indices[:, :, None] == used[None, None, ...]).long()
        new = match.argmax(-1)
        unknown = match.sum(2) < 1
        # the original VQModel leaves unknown_index at "random": a code outside ``used`` gets a random one
        new[unknown] = torch.randint(0, used.shape[0], size=new[unknown].shape).to(device=new.device)
        return new

    # ------------------------------------------------------------------------------------------------ scaling
    def _scale(self):
        return torch.tensor(self.scale_factor, dtype=torch.float32) if self.scale_by_std else self.scale_factor

    def _inverse_scale(self):
        return 1.0 / self._scale()
