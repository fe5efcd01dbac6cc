"""Which stock diffusers pipeline class runs a model, i.e. what ``model_index.json``'s ``_class_name`` says.

A folder whose ``_class_name`` is a diffusers pipeline loads with plain ``DiffusionPipeline.from_pretrained(folder)``
(no ``trust_remote_code``): diffusers finds the pipeline class in itself and our components in the ``ldm_compat``
package (see ``ldm_compat.pipelines.folder``). A stock class is named only when its loop is ``LDMCompatPipeline``'s
for the model — same inputs, same UNet calls, same guidance, same decoding (the float32 arithmetic may differ in
the last bits: diffusers' autoencoder numerics, ``z / s`` for ``1 / s * z``); otherwise the folder names
``LDMCompatPipeline`` through its loader file.

This is the one place that decision is made:

==================================  =================================================================================
``DDPMPipeline``                    pixel space, unconditional, sample shape = the UNet's
``StableDiffusionPipeline``         ``crossattn``, a KL ``vae``, ``FrozenCLIPEmbedder`` (layer ``last``) or
                                    ``FrozenOpenCLIPEmbedder`` (``text_encoder`` + ``tokenizer``)
``StableDiffusionInpaintPipeline``  the same with ``hybrid`` and ``LatentInpaintDiffusion``'s default ``concat_keys``
                                    (UNet input ``[x, mask, masked-image latents]``)
``LDMTextToImagePipeline``          ``crossattn``, ``BERTEmbedder`` (``bert`` + ``tokenizer``, 77 tokens), an f8
                                    ``vqvae`` (the pipeline hard-codes ``height // 8``)
``LDMPipeline``                     unconditional latent model (``vqvae``)
``LDMSuperResolutionPipeline``      ``concat`` with a ``torch.nn.Identity`` cond stage (the low-res image),
                                    ``scale_factor`` 1 (it decodes without rescaling), concat width = latent width
==================================  =================================================================================

and only with the schedulers those loops run like ours (``*_SCHEDULERS`` below). Class-conditional models
(``ClassEmbedder``) have no stock pipeline. ``DROPPED_KEYS`` names the ``LDMCompatPipeline`` config keys a stock
class does not take (kept under ``_ldm_compat`` in ``model_index.json``, which diffusers ignores), and
``STOCK_ENTRIES`` what the stock class expects besides our components.
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
#: the LDM pipelines pass no ``generator`` to ``step`` (and ``LDMTextToImagePipeline`` neither scales ``x_T`` nor
#: the UNet input): only schedulers that are deterministic at ``eta=0`` with ``init_noise_sigma`` 1 and an identity
#: ``scale_model_input`` run as in ``LDMCompatPipeline``
LDM_PIPELINE_SCHEDULERS = {
    ("ldm_compat", "LDMDDIMScheduler"),
    ("ldm_compat", "LDMPLMSScheduler"),
    ("diffusers", "DDIMScheduler"),
    ("diffusers", "PNDMScheduler"),
    ("diffusers", "DPMSolverMultistepScheduler"),
}
#: the Stable Diffusion pipelines run any scheduler as ``LDMCompatPipeline`` does (``init_noise_sigma``,
#: ``scale_model_input``, ``eta`` and ``generator`` when ``step`` takes them) — but their ``__init__`` rewrites a
#: scheduler config with ``steps_offset != 1`` or ``clip_sample=True``, which changes these schedulers' sampling
SD_CONFIG_SENSITIVE = {
    ("ldm_compat", "LDMDDPMScheduler"),
    ("diffusers", "DDPMScheduler"),
    ("diffusers", "DDIMScheduler"),
    ("diffusers", "PNDMScheduler"),
    ("diffusers", "DDIMInverseScheduler"),
}

PIPELINE_KEYS = ("conditioning_key", "image_size", "channels")
LATENT_KEYS = ("first_stage_config", "cond_stage_config", "scale_by_std", "concat_keys", "masked_image_key")
#: ``LDMCompatPipeline`` config keys left out of a stock class's ``model_index.json`` (the stock class takes none;
#: ``stock_pipeline_for`` only picks the class when they are at values it reproduces)
DROPPED_KEYS = {
    name: PIPELINE_KEYS + LATENT_KEYS
    for name in ("DDPMPipeline", "StableDiffusionPipeline", "StableDiffusionInpaintPipeline",
                 "LDMTextToImagePipeline", "LDMPipeline", "LDMSuperResolutionPipeline")
}  # fmt: skip
_SD_ENTRIES = {"safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
               "requires_safety_checker": False}  # fmt: skip
#: what a stock class's ``model_index.json`` holds besides our components (as diffusers writes it for a pipeline
#: without a safety checker)
STOCK_ENTRIES = {"StableDiffusionPipeline": _SD_ENTRIES, "StableDiffusionInpaintPipeline": _SD_ENTRIES}

CLIP = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
OPEN_CLIP = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
BERT = "ldm.modules.encoders.modules.BERTEmbedder"
IDENTITY = "torch.nn.Identity"
UNCONDITIONAL = "__is_unconditional__"
INPAINT_CONCAT_KEYS = ["mask", "masked_image"]
_COMPONENTS = {
    "StableDiffusionPipeline": {"vae", "text_encoder", "tokenizer"},
    "StableDiffusionInpaintPipeline": {"vae", "text_encoder", "tokenizer"},
    "LDMTextToImagePipeline": {"vqvae", "bert", "tokenizer"},
    "LDMPipeline": {"vqvae"},
    "LDMSuperResolutionPipeline": {"vqvae"},
}


def first_stage_component(first_stage_class: str, cond_stage_target: str | None) -> str:
    """The component name of a converted first stage: ``vqvae`` for VQ models and for the models of diffusers' LDM
    pipelines (BERT, unconditional, super-resolution), which call their first stage so whatever its class; else
    ``vae`` (Stable Diffusion; also when the cond stage is not known)."""
    ldm_family = cond_stage_target in (BERT, UNCONDITIONAL, IDENTITY)
    return "vqvae" if first_stage_class == "VQModel" or ldm_family else "vae"


def _key(cls) -> tuple[str, str]:
    return cls.__module__.split(".")[0], cls.__name__


def _size_matches(image_size, sample_size) -> bool:
    if image_size is None:
        return True
    if isinstance(sample_size, (list, tuple)):
        return tuple(sample_size) == (image_size, image_size)
    return image_size == sample_size


def _cond_stage(pipeline_config: Mapping, components: Mapping) -> tuple[str | None, dict]:
    """The cond stage's original target and params; without a config, what the components are (as
    ``latent_inputs.cond_stage_target``)."""
    config = pipeline_config.get("cond_stage_config")
    if isinstance(config, str):
        return config, {}
    if config is not None:
        return config.get("target"), dict(config.get("params") or {})
    if "text_encoder" in components:
        return CLIP, {}
    if "bert" in components:
        return BERT, {}
    return ("ldm.modules.encoders.modules.ClassEmbedder" if "class_embedder" in components else None), {}


def _cfg(obj, name, default=None):
    config = getattr(obj, "config", None)
    return getattr(config, name, default) if config is not None else default


def _sd_text_stage(target, params, components) -> bool:
    """A text stage the Stable Diffusion pipelines encode as the original: the tokenizer pads to its
    ``model_max_length`` = the original's context, ``text_encoder(ids)[0]`` is the original's output."""
    tokenizer = components.get("tokenizer")
    if target == CLIP:
        if params.get("layer", "last") != "last":
            return False  # pooled / hidden: the pipeline's clip_skip applies the final norm, the original not
        return getattr(tokenizer, "model_max_length", None) == int(params.get("max_length", 77))
    if target == OPEN_CLIP:  # open_clip.tokenize: 77 tokens, zero padding = our tokenizer's pad "!" (id 0)
        return getattr(tokenizer, "model_max_length", None) == 77 and getattr(tokenizer, "pad_token_id", None) == 0
    return False


def _latent_stock(conditioning_key, unet_config, image_size, channels, scheduler, scheduler_config,
                  pipeline_config, components) -> str | None:  # fmt: skip
    target, params = _cond_stage(pipeline_config, components)
    names = set(components)
    first = components.get("vae") or components.get("vqvae")
    if first is None or unet_config.get("num_classes") is not None:
        return None
    latent = _cfg(first, "latent_channels")
    in_channels = unet_config.get("in_channels")
    channels = latent if channels is None else channels
    kl = hasattr(first, "encode") and not hasattr(first, "quantize")
    f8 = len(_cfg(first, "block_out_channels", ())) == 4
    sized = _size_matches(image_size, unet_config.get("sample_size"))
    sched = None if scheduler is None else _key(scheduler)
    ldm_scheduler = sched is None or sched in LDM_PIPELINE_SCHEDULERS
    sd_scheduler = sched is None or sched not in SD_CONFIG_SENSITIVE or (
        (scheduler_config or {}).get("steps_offset", 1) == 1 and not (scheduler_config or {}).get("clip_sample", False)
    )  # fmt: skip
    inpaint = pipeline_config.get("concat_keys") is not None
    candidates = []
    if kl and sd_scheduler and sized and channels == latent and _sd_text_stage(target, params, components):
        if conditioning_key == "crossattn" and not inpaint and in_channels == latent:
            candidates.append("StableDiffusionPipeline")
        masked_key = pipeline_config.get("masked_image_key") or "masked_image"
        if (conditioning_key == "hybrid" and list(pipeline_config.get("concat_keys") or []) == INPAINT_CONCAT_KEYS
                and masked_key == "masked_image" and in_channels == 2 * latent + 1):  # fmt: skip
            candidates.append("StableDiffusionInpaintPipeline")
    if ldm_scheduler:
        bert = components.get("bert")
        if (target in (None, BERT) and conditioning_key == "crossattn" and bert is not None and f8 and sized
                and channels == latent == in_channels and params.get("use_tokenizer", True)
                and int(params.get("max_seq_len", _cfg(bert, "max_position_embeddings", 77))) == 77):  # fmt: skip
            candidates.append("LDMTextToImagePipeline")
        if target in (None, UNCONDITIONAL) and conditioning_key is None and sized and channels == latent == in_channels:
            candidates.append("LDMPipeline")
        scale = _cfg(first, "scaling_factor")
        if target == IDENTITY and conditioning_key == "concat" and scale == 1.0 and in_channels == 2 * latent:
            candidates.append("LDMSuperResolutionPipeline")
    for name in candidates:
        if names == _COMPONENTS[name]:
            return name
    return None


def stock_pipeline_for(
    conditioning_key: str | None,
    unet_config: Mapping,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    scheduler: type | None = None,
    scheduler_config: Mapping | None = None,
    pipeline_config: Mapping | None = None,
    **components,
) -> str | None:
    """The diffusers pipeline class name whose loop is ``LDMCompatPipeline``'s for this model, else ``None``.

    ``scheduler``: its class (``None``: an ldm_compat one); ``scheduler_config``: its config (the Stable Diffusion
    pipelines rewrite some values); ``pipeline_config``: the latent keys of ``LDMCompatPipeline``'s config
    (``cond_stage_config``, ``concat_keys``, …); ``components``: the pipeline's other components by their
    ``model_index.json`` names (``vae``, ``text_encoder``, …). See the module docstring for the rules.

    ``DDPMPipeline``: an unconditional pixel model whose sample shape is the UNet's (``sample_size`` ×
    ``in_channels``), with a scheduler of ``DDPM_PIPELINE_SCHEDULERS``. Its loop is then ours: the same
    ``randn_tensor`` draw of ``x_T`` from the generator, ``unet(x, t).sample`` and ``scheduler.step(...,
    generator=generator)`` for every timestep, then ``(x / 2 + 0.5).clamp(0, 1)``.
    """
    components = {k: v for k, v in components.items() if v is not None}
    if components:
        pipeline_config = dict(pipeline_config or {})
        return _latent_stock(conditioning_key, unet_config, image_size, channels, scheduler, scheduler_config,
                             pipeline_config, components)  # fmt: skip
    if scheduler is not None and _key(scheduler) not in DDPM_PIPELINE_SCHEDULERS:
        return None
    if conditioning_key is not None:
        return None
    if not _size_matches(image_size, unet_config.get("sample_size")):
        return None
    if channels is not None and channels != unet_config.get("in_channels"):
        return None
    return "DDPMPipeline"
