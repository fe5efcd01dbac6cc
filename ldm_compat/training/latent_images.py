"""Image logging of a ``LatentDiffusion`` run: the pixel-space ``log_images`` rows, decoded by the first stage.

As the original ``LatentDiffusion.log_images``: ``inputs`` (the images), ``reconstruction`` (decode of their
encoding), ``diffusion_row`` (the noised latents, decoded), ``samples`` and ``denoise_row`` (decoded). The posterior
noise comes from the logging generator, so logging never changes the training run.
"""

from __future__ import annotations

import torch


def decoding_log_inputs(latent, batch, q_sample, sample, generator: torch.Generator):
    """``(z, q_sample, sample)`` for ``image_logging.log_images``: the batch's encoding and the two callables with
    their outputs decoded."""
    z = latent.get_input(batch, lambda shape: torch.randn(shape, generator=generator))

    def decoded_q_sample(x_start, t, noise):
        return latent.decode_first_stage(q_sample(x_start, t, noise))

    def decoded_sample(n):
        samples, intermediates = sample(n)
        return latent.decode_first_stage(samples), [latent.decode_first_stage(i) for i in intermediates]

    return z, decoded_q_sample, decoded_sample


def finish_latent_log(latent, log: dict, batch, z: torch.Tensor) -> dict:
    """Replace the latent ``inputs`` by the images (when the batch has them: a latent cache may not) and add the
    ``reconstruction``."""
    n = log["inputs"].shape[0]
    out = {}
    if latent.options.first_stage_key in batch:
        out["inputs"] = latent.pixels(batch)[:n]
    out["reconstruction"] = latent.decode_first_stage(z[:n])
    out.update((k, v) for k, v in log.items() if k != "inputs")
    return out
