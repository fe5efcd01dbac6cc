"""The pipeline's output dataclass and the conversion of samples to the requested ``output_type``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput
from diffusers.utils.pil_utils import numpy_to_pil

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class LDMCompatPipelineOutput(BaseOutput):
    """Output of ``LDMCompatPipeline``.

    Args:
        images: the samples as ``output_type`` asks: a list of PIL images (``"pil"``), a ``(B, H, W, C)`` float
            array in [0, 1] (``"np"``), a ``(B, C, H, W)`` tensor in [0, 1] (``"pt"``), or the raw ``(B, C, H, W)``
            tensor the sampler ended with, not clamped (``"latent"``; what the original ``p_sample_loop`` returns).
        intermediates: with ``return_intermediates=True``, the original ``intermediates`` list: the initial noise,
            then the sample after every step whose remaining-step index ``i`` has ``i % log_every_t == 0`` or is the
            first step (for the full ancestral chain ``i`` is the timestep, as in ``p_sample_loop``); each entry in
            the same ``output_type`` as ``images``. ``None`` otherwise.
        pred_original_intermediates: the scheduler's ``pred_original_sample`` at the same steps (the original
            ``DDIMSampler``'s ``pred_x0`` list, starting with the initial noise), when the scheduler reports it.
        intermediate_timesteps: the timestep after which each entry of ``intermediates`` was taken (``None`` for
            the initial noise).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    intermediates: list | None = None
    pred_original_intermediates: list | None = None
    intermediate_timesteps: list | None = None


def check_output_type(output_type: str) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type: expected one of {list(OUTPUT_TYPES)}, got {output_type!r}")
    return output_type


def postprocess(sample: torch.Tensor, output_type: str):
    """Samples in the model's [-1, 1] data range → ``output_type`` (see ``LDMCompatPipelineOutput.images``)."""
    if output_type == "latent":
        return sample
    image = (sample / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    array = image.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    return array if output_type == "np" else numpy_to_pil(array)
