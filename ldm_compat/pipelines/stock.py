"""Which stock diffusers pipeline class runs a model, i.e. what ``model_index.json``'s ``_class_name`` says.

A folder whose ``_class_name`` is a diffusers pipeline loads with plain ``DiffusionPipeline.from_pretrained(folder)``
(no ``trust_remote_code``): diffusers finds the pipeline class in itself and our components in the ``ldm_compat``
package (see ``ldm_compat.pipelines.folder``). A stock class is named only when it samples the model exactly as
``LDMCompatPipeline`` does; otherwise the folder names ``LDMCompatPipeline`` through its loader file.

This is the one place that decision is made. To add a stock pipeline (e.g. for latent models), add a branch to
``stock_pipeline_for`` and name the pipeline-config keys that the stock class does not take in ``DROPPED_KEYS``
(they must then be at values the stock class reproduces), and test that it samples what ``LDMCompatPipeline``
samples.
"""

from __future__ import annotations

from collections.abc import Mapping

#: schedulers with which ``DDPMPipeline``'s loop is ours: ``init_noise_sigma`` 1, an identity ``scale_model_input``
#: (``DDPMPipeline`` calls neither), and a ``step`` that takes ``generator`` (``DDPMPipeline`` always passes it) and
#: whose other options are at the defaults ``LDMCompatPipeline`` passes (``eta=0``); by (package, class name)
DDPM_PIPELINE_SCHEDULERS = {
    ("ldm_compat", "LDMDDPMScheduler"),
    ("ldm_compat", "LDMDDIMScheduler"),
    ("diffusers", "DDPMScheduler"),
    ("diffusers", "DDIMScheduler"),
    ("diffusers", "DPMSolverMultistepScheduler"),
}

#: ``LDMCompatPipeline`` config keys left out of ``model_index.json`` for each stock class (the stock class takes
#: none of them; ``stock_pipeline_for`` only picks the class when they are at the values it reproduces)
DROPPED_KEYS = {"DDPMPipeline": ("conditioning_key", "image_size", "channels")}


def _size_matches(image_size, sample_size) -> bool:
    if image_size is None:
        return True
    if isinstance(sample_size, (list, tuple)):
        return tuple(sample_size) == (image_size, image_size)
    return image_size == sample_size


def stock_pipeline_for(
    conditioning_key: str | None,
    unet_config: Mapping,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    scheduler: type | None = None,
    **components,
) -> str | None:
    """The diffusers pipeline class name that samples this model exactly like ``LDMCompatPipeline``, else ``None``.

    ``DDPMPipeline``: an unconditional model whose sample shape is the UNet's (``sample_size`` × ``in_channels``),
    with a UNet and a scheduler (class ``scheduler``; ``None``: an ldm_compat one) of ``DDPM_PIPELINE_SCHEDULERS``
    only. Its loop is then ours: the same ``randn_tensor`` draw of ``x_T`` from the generator, ``unet(x,
    t).sample`` and ``scheduler.step(..., generator=generator)`` for every timestep, then ``(x / 2 +
    0.5).clamp(0, 1)``. ``components`` are any further components of the pipeline (first / cond stages of latent
    models, by their ``model_index.json`` names); no stock class is named for them yet.
    """
    if components:
        return None
    if (
        scheduler is not None
        and (scheduler.__module__.split(".")[0], scheduler.__name__) not in DDPM_PIPELINE_SCHEDULERS
    ):
        return None
    if conditioning_key is not None:
        return None
    if not _size_matches(image_size, unet_config.get("sample_size")):
        return None
    if channels is not None and channels != unet_config.get("in_channels"):
        return None
    return "DDPMPipeline"
