"""The pipeline a converted ``LatentDiffusion`` folder holds (used by ``ldm-compat convert``).

- the components: ``unet``, the sampler, the first stage (``vae`` / ``vqvae``) and the cond stage's components;
- the sampler is ``LDMDDIMScheduler`` (the original ``scripts/txt2img.py`` / ``log_images`` sample with
  ``DDIMSampler``; ``LDMPLMSScheduler`` and the ancestral ``LDMDDPMScheduler`` build from its config). Its config keeps
  the ``LDMDDPMScheduler`` keys for export, except ``clip_sample=True``, the original default, which diffusers'
  Stable Diffusion pipelines would rewrite (with a deprecation warning) and DDIM never uses;
- the UNet's ``sample_size`` is the model's ``image_size`` (the latent size stock pipelines sample at; the original
  UNet's own ``image_size``, e.g. 32 in every SD config, is stored but unused);
- the pipeline config: ``conditioning_key``, ``image_size``, ``channels`` and the original ``first_stage_config``,
  ``cond_stage_config``, ``scale_by_std``, ``concat_keys`` / ``masked_image_key`` (``LatentInpaintDiffusion``).
"""

from __future__ import annotations

from collections.abc import Mapping

INPAINT_TARGET = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"


def sampling_scheduler(scheduler):
    """``LDMDDIMScheduler`` on ``scheduler``'s schedule (see the module docstring for ``clip_sample``)."""
    from ldm_compat.schedulers.scheduling_ldm_ddim import LDMDDIMScheduler

    config = {k: v for k, v in scheduler.config.items() if not (k == "clip_sample" and v is True)}
    return LDMDDIMScheduler.from_config(config)


def latent_pipeline(unet, scheduler, params: Mapping, components: Mapping, *, target: str | None,
                    conditioning_key: str | None, first_stage_config=None, cond_stage_config=None):  # fmt: skip
    """An ``LDMCompatPipeline`` for a ``LatentDiffusion``'s converted parts: ``params`` is its ``model.params``,
    ``target`` its ``model.target``; ``first_stage_config`` / ``cond_stage_config`` are given for the stages that
    were converted (``None`` for one kept verbatim)."""
    from ldm_compat.pipelines.pipeline_ldm_compat import LDMCompatPipeline

    image_size = params.get("image_size")
    if image_size is not None and unet.config.sample_size != image_size:
        unet.register_to_config(sample_size=int(image_size))
    inpaint = target == INPAINT_TARGET
    return LDMCompatPipeline(
        unet=unet,
        scheduler=sampling_scheduler(scheduler),
        conditioning_key=conditioning_key,
        image_size=image_size,
        channels=params.get("channels"),
        first_stage_config=first_stage_config,
        cond_stage_config=cond_stage_config,
        scale_by_std=bool(params.get("scale_by_std", False)),
        concat_keys=list(params.get("concat_keys", ("mask", "masked_image"))) if inpaint else None,
        masked_image_key=params.get("masked_image_key", "masked_image") if inpaint else None,
        **components,
    )
