"""A call's prompts, class labels and images → the original conditioning, and its unconditional counterpart.

The pipeline's cond stage is its ``text_encoder`` + ``tokenizer`` (``FrozenCLIPEmbedder`` / ``FrozenOpenCLIPEmbedder``),
``bert`` + ``tokenizer`` (``BERTEmbedder``) or ``class_embedder`` (``ClassEmbedder``), run as the original
``get_learned_conditioning`` (``ldm_compat.models.cond_stage``); which original class it is comes from the pipeline
config ``cond_stage_config`` (the YAML entry), else from the components. ``torch.nn.Identity`` (super-resolution)
and ``__is_first_stage__`` take ``image``. The unconditional conditioning of classifier-free guidance is the
original's: the encoding of ``""`` (``negative_prompt`` replaces it) or the null class ``n_classes - 1``; concat
inputs are the same in both branches (``uc_full = {c_concat: c_concat, c_crossattn: uc}``).

Inpainting (``LatentInpaintDiffusion``, pipeline config ``concat_keys``): the original ``make_batch_sd`` and
``get_input``: the mask binarized at 0.5, ``masked_image = image * (mask < 0.5)``, then per ``concat_keys`` entry in
order the mask resized to the latent size (``interpolate``, nearest) or the masked image encoded by the first stage
(``get_first_stage_encoding(encode_first_stage(·))``, one posterior draw from ``generator``), concatenated along
channels. With the defaults the UNet input is ``[x (4), mask (1), masked-image latents (4)]``.

Everything is checked here, before any UNet call; each problem is a one-line ``ValueError`` naming the argument.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldm_compat.pipelines.first_stage_io import image_tensor, mask_tensor

COND_STAGE_COMPONENTS = ("text_encoder", "tokenizer", "bert", "class_embedder")
CLIP = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
OPEN_CLIP = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
BERT = "ldm.modules.encoders.modules.BERTEmbedder"
CLASS_EMBEDDER = "ldm.modules.encoders.modules.ClassEmbedder"
IDENTITY = "torch.nn.Identity"
FIRST_STAGE = "__is_first_stage__"
UNCONDITIONAL = "__is_unconditional__"
TEXT_TARGETS = (CLIP, OPEN_CLIP, BERT)
IMAGE_TARGETS = (IDENTITY, FIRST_STAGE)
DEFAULT_CONCAT_KEYS = ("mask", "masked_image")  # LatentInpaintDiffusion's defaults
DEFAULT_MASKED_IMAGE_KEY = "masked_image"


def cond_stage_target(cond_stage_config, components: Mapping) -> str | None:
    """The original cond-stage class: the config's ``target``, else what the components are."""
    if cond_stage_config is not None:
        from ldm_compat.models.cond_stage import target_and_params

        return target_and_params(cond_stage_config)[0]
    if components.get("text_encoder") is not None:
        return CLIP
    if components.get("bert") is not None:
        return BERT
    if components.get("class_embedder") is not None:
        return CLASS_EMBEDDER
    return None


def _params(cond_stage_config) -> dict:
    from ldm_compat.models.cond_stage import target_and_params

    return target_and_params(cond_stage_config)[1] if cond_stage_config is not None else {}


def _require(components: Mapping, target: str, *names: str) -> list:
    missing = [n for n in names if components.get(n) is None]
    if missing:
        raise ValueError(f"cond_stage_config: {target.rsplit('.', 1)[-1]} needs the pipeline component(s) "
                         f"{', '.join(missing)}")  # fmt: skip
    return [components[n] for n in names]


def build_cond_stage(cond_stage_config, components: Mapping, first_stage=None):
    """The ``CondStage`` (``ldm_compat.models.cond_stage``) around the pipeline's components, or ``None``.

    The CLIP text encoder is switched to the attention the original computed with (``eager``; ``sdpa`` differs in
    the last float32 bits), as ``FirstStage`` installs the original autoencoder arithmetic.
    """
    from ldm_compat.models import cond_stage as cs
    from ldm_compat.models.cond_stage import clip

    target, params = cond_stage_target(cond_stage_config, components), _params(cond_stage_config)
    if target is None or target == UNCONDITIONAL:
        return None
    if target == CLIP:
        encoder, tokenizer = _require(components, target, "text_encoder", "tokenizer")
        if getattr(encoder.config, "_attn_implementation", None) != clip.ATTN_IMPLEMENTATION:
            encoder.set_attn_implementation(clip.ATTN_IMPLEMENTATION)
        root = getattr(encoder.config, clip.LAYOUT_ATTR, clip.NESTED_ROOT)
        return cs.CLIPCondStage(params, encoder, tokenizer, {}, root)
    if target == OPEN_CLIP:
        return cs.OpenCLIPCondStage(params, *_require(components, target, "text_encoder", "tokenizer"), {})
    if target == BERT:
        (bert,) = _require(components, target, "bert")
        if cond_stage_config is None:
            params = {"max_seq_len": bert.config.max_position_embeddings, "use_tokenizer": True}
        tokenizer = components.get("tokenizer") if params.get("use_tokenizer", True) else None
        if params.get("use_tokenizer", True) and tokenizer is None:
            raise ValueError("tokenizer: the BERTEmbedder (use_tokenizer: true) needs the pipeline's tokenizer")
        return cs.BERTCondStage(params, bert, tokenizer)
    if target == CLASS_EMBEDDER:
        return cs.ClassEmbedderCondStage(params, *_require(components, target, "class_embedder"))
    if target == IDENTITY:
        return cs.IdentityCondStage(params, {}, {})
    if target == FIRST_STAGE:
        stage = cs.FirstStageCondStage(params, {}, {})
        stage.first_stage = first_stage
        return stage
    raise ValueError(f"cond_stage_config.target={target!r}: LDMCompatPipeline cannot run it; supported: "
                     f"{', '.join((*TEXT_TARGETS, CLASS_EMBEDDER, *IMAGE_TARGETS, UNCONDITIONAL))}")  # fmt: skip


@dataclass
class CallConditioning:
    """diffusers-style conditioning for the conditional and the unconditional branch (``None``: no guidance
    input), at the call's full batch; ``sample_size``: ``(H, W)`` the inputs fix (images), else ``None``."""

    encoder_hidden_states: torch.Tensor | None = None
    class_labels: torch.Tensor | None = None
    concat: torch.Tensor | None = None
    negative_encoder_hidden_states: torch.Tensor | None = None
    has_uncond: bool = False
    sample_size: tuple[int, int] | None = None


def _prompts(name: str, value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and value and all(isinstance(p, str) for p in value):
        return list(value)
    raise ValueError(f"{name}: expected a string or a non-empty list of strings, got {value!r}")


def _repeat(value: torch.Tensor | None, n: int, batch: int, name: str) -> torch.Tensor | None:
    """Broadcast a batch of 1 to ``batch`` (prompts / labels), then ``n`` copies of each row (num_images_per_prompt)."""
    if value is None:
        return None
    if value.shape[0] not in (1, batch):
        raise ValueError(f"{name}: batch {value.shape[0]} does not match the {batch} prompts/labels (or 1)")
    return value.expand(batch, *value.shape[1:]).repeat_interleave(n, dim=0)


def _rows(value, n: int):
    """A raw conditioning argument with each row repeated ``n`` times (left as given for ``n == 1``)."""
    if value is None or n == 1:
        return value
    value = torch.as_tensor(value)
    return (value.reshape(1) if value.ndim == 0 else value).repeat_interleave(n, dim=0)


def _labels(labels, n_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    labels = labels.reshape(1) if labels.ndim == 0 else labels
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool or not labels.numel():
        raise ValueError(f"class_labels: expected integer labels, one per sample, got {labels.tolist()!r}")
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise ValueError(f"class_labels: values must lie in [0, {n_classes - 1}] (the ClassEmbedder's n_classes="
                         f"{n_classes}; {n_classes - 1} is the null class), got {labels.tolist()}")  # fmt: skip
    return labels.long()


def _encode_images(first_stage, images: torch.Tensor, generator) -> torch.Tensor:
    """``get_first_stage_encoding(encode_first_stage(images))`` with one generator, or one per row."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != images.shape[0]:
            raise ValueError(f"generator: {len(generator)} generators for a batch of {images.shape[0]}")
        rows = [first_stage.get_first_stage_encoding(first_stage.encode_first_stage(images[i : i + 1]), g)
                for i, g in enumerate(generator)]  # fmt: skip
        return torch.cat(rows)
    return first_stage.get_first_stage_encoding(first_stage.encode_first_stage(images), generator)


def inpainting_concat(first_stage, image, mask_image, concat_keys, masked_image_key, batch, n, generator, device):
    """The original ``LatentInpaintDiffusion.get_input`` ``c_concat`` for ``image`` and ``mask_image``."""
    if first_stage is None:
        raise ValueError("concat_keys: an inpainting model needs its first stage (vae) to encode the masked image")
    if image is None or mask_image is None:
        missing = " and ".join(n for n, v in (("image", image), ("mask_image", mask_image)) if v is None)
        raise ValueError(f"{missing}: required by this inpainting model (concat_keys {list(concat_keys)})")
    dtype = first_stage.model.dtype
    image = image_tensor(image, "image").to(device=device, dtype=dtype)
    mask = mask_tensor(mask_image).to(device=device, dtype=dtype)
    if mask.shape[2:] != image.shape[2:]:
        raise ValueError(f"mask_image: size {tuple(mask.shape[2:])} differs from the image's {tuple(image.shape[2:])}")
    image, mask = _repeat(image, n, batch, "image"), _repeat(mask, n, batch, "mask_image")
    masked = image * (mask < 0.5)
    latents = _encode_images(first_stage, masked, generator)
    parts = []
    for key in concat_keys:
        if key == masked_image_key:
            parts.append(latents)
        elif key == "mask":
            parts.append(F.interpolate(mask, size=latents.shape[-2:]))
        else:
            raise ValueError(f"concat_keys: {key!r} is neither 'mask' nor the masked_image_key {masked_image_key!r}")
    return torch.cat(parts, dim=1)


def _text(cond_stage, prompt, negative_prompt, n: int, guided: bool):
    """The prompts' context and, for guidance or a negative prompt, the unconditional one (``""`` by default)."""
    prompts = _prompts("prompt", prompt)
    batch = len(prompts)
    context = _repeat(cond_stage.encode(prompts), n, batch, "prompt")
    if not guided and negative_prompt is None:
        return context, None
    negatives = [""] * batch if negative_prompt is None else _prompts("negative_prompt", negative_prompt)
    negatives = negatives * batch if len(negatives) == 1 else negatives
    if len(negatives) != batch:
        raise ValueError(f"negative_prompt: {len(negatives)} prompts for {batch} prompts")
    return context, _repeat(cond_stage.encode(negatives), n, batch, "negative_prompt")


def call_conditioning(
    *,
    conditioning_key: str | None,
    cond_stage,
    target: str | None,
    first_stage,
    concat_keys,
    masked_image_key: str | None,
    prompt,
    negative_prompt,
    class_labels,
    image,
    mask_image,
    encoder_hidden_states,
    negative_encoder_hidden_states,
    concat,
    num_images_per_prompt: int,
    guidance_scale: float,
    generator,
    device,
) -> CallConditioning:
    """Encode a call's inputs with the pipeline's cond stage (see the module docstring). Raw conditioning
    (``encoder_hidden_states``, ``class_labels`` of an ``adm`` UNet, ``concat``) passes through, each row repeated
    ``num_images_per_prompt`` times."""
    n = num_images_per_prompt
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_images_per_prompt: expected a positive int, got {n!r}")
    guided = guidance_scale != 1.0
    text = target in TEXT_TARGETS and cond_stage is not None
    if (prompt is not None or negative_prompt is not None) and not text:
        name = "prompt" if prompt is not None else "negative_prompt"
        raise ValueError(f"{name}: this model takes no text prompt (cond stage: {target or 'none'}, "
                         f"conditioning_key={conditioning_key!r})")  # fmt: skip
    if prompt is not None and encoder_hidden_states is not None:
        raise ValueError("prompt, encoder_hidden_states: give one of them (the prompt is encoded into the latter)")
    raw = {k: _rows(v, n) for k, v in (("context", encoder_hidden_states), ("negative", negative_encoder_hidden_states),
                                       ("labels", class_labels), ("concat", concat))}  # fmt: skip
    out = CallConditioning(raw["context"], raw["labels"], raw["concat"], raw["negative"])
    batch = 1
    with torch.no_grad():
        if text and prompt is not None:
            out.encoder_hidden_states, out.negative_encoder_hidden_states = _text(
                cond_stage, prompt, negative_prompt, n, guided
            )
            batch = len(_prompts("prompt", prompt))
        elif text and encoder_hidden_states is None:
            raise ValueError(f"prompt: required by this text-conditional model ({target.rsplit('.', 1)[-1]})")
        if target == CLASS_EMBEDDER and cond_stage is not None:
            if class_labels is None and encoder_hidden_states is None:
                raise ValueError("class_labels: required by this class-conditional model (ClassEmbedder)")
            if class_labels is not None:
                labels = _labels(class_labels, cond_stage.model.config.n_classes).to(device)
                batch = labels.shape[0]
                out.encoder_hidden_states = cond_stage.encode(labels.repeat_interleave(n))
                out.negative_encoder_hidden_states = cond_stage.unconditional(out.encoder_hidden_states.shape[0])
                out.class_labels = None
        if target in IMAGE_TARGETS and cond_stage is not None:
            if image is None:
                raise ValueError(f"image: required by this model (cond stage {target}: the image is its conditioning)")
            images = image_tensor(image, "image").to(device=device, dtype=torch.float32)
            c = cond_stage.encode(images.repeat_interleave(n, dim=0))
            out.sample_size = tuple(c.shape[-2:])
            if conditioning_key == "concat":
                out.concat = c
            else:
                out.encoder_hidden_states = c
            image = None
        elif concat_keys is not None and concat is None:
            key = masked_image_key or DEFAULT_MASKED_IMAGE_KEY
            out.concat = inpainting_concat(first_stage, image, mask_image, concat_keys, key, batch, n, generator,
                                           device)  # fmt: skip
            out.sample_size = tuple(out.concat.shape[-2:])
            image = mask_image = None
    for name, value in (("image", image), ("mask_image", mask_image)):
        if value is not None:
            raise ValueError(f"{name}: this model takes no {name} (it is not an inpainting or image-conditioned model)")
    out.has_uncond = out.negative_encoder_hidden_states is not None
    if guided and not out.has_uncond:
        raise ValueError(
            f"guidance_scale={guidance_scale}: needs an unconditional conditioning; this call has none (give a prompt "
            "to a text model, class_labels to a ClassEmbedder model, or negative_encoder_hidden_states)"
        )
    return out
