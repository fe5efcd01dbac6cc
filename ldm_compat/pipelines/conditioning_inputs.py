"""Check and prepare a pipeline call's conditioning for the original ``DiffusionWrapper`` routing.

The pipeline takes conditioning the diffusers way — ``encoder_hidden_states`` (cross-attention context),
``class_labels`` and ``concat`` — and the model's original ``conditioning_key`` says which of them it needs:

=================  =======================  =================  ==========
conditioning_key   encoder_hidden_states    class_labels       concat
=================  =======================  =================  ==========
None               –                        –                  –
concat             –                        –                  required
crossattn          required                 –                  –
hybrid             required                 –                  required
adm                –                        required           –
crossattn-adm      required                 required           –
hybrid-adm         required                 required           required
=================  =======================  =================  ==========

Everything is checked here, before the first UNet call, and every problem is a one-line ``ValueError`` naming the
argument and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ldm_compat.models.conditioning import CONDITIONING_KEYS, original_cond

_NEEDS_CONTEXT = {"crossattn", "hybrid", "crossattn-adm", "hybrid-adm"}
_NEEDS_LABELS = {"adm", "crossattn-adm", "hybrid-adm"}
_NEEDS_CONCAT = {"concat", "hybrid", "hybrid-adm"}


def check_conditioning_key(conditioning_key) -> str | None:
    """Return ``conditioning_key`` if the original ``DiffusionWrapper`` knows it, else raise a ``ValueError``."""
    if conditioning_key not in CONDITIONING_KEYS:
        raise ValueError(f"conditioning_key: expected one of {list(CONDITIONING_KEYS)}, got {conditioning_key!r}")
    return conditioning_key


def needs_concat(conditioning_key: str | None) -> bool:
    """Whether the key concatenates ``concat`` to the sample along channels (``c_concat`` in the original)."""
    return conditioning_key in _NEEDS_CONCAT


@dataclass
class PreparedConditioning:
    """The checked conditioning in the original ``cond`` form for ``ldm_compat.models.conditioning.apply_model``:
    ``c_concat`` (list), ``c_crossattn`` (list; the class labels for ``adm``, as the original) and ``c_adm``."""

    cond: dict


def _cfg(unet_config: Mapping, *names, default=None):
    for name in names:
        value = unet_config.get(name) if isinstance(unet_config, Mapping) else getattr(unet_config, name, None)
        if value is not None:
            return value
    return default


def _batch_of(name: str, value: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Accept a batch of 1 (broadcast) or ``batch_size``; anything else is an error."""
    if value.shape[0] == batch_size:
        return value
    if value.shape[0] == 1:
        return value.expand(batch_size, *value.shape[1:])
    raise ValueError(f"{name}: batch dimension {value.shape[0]} does not match the batch size {batch_size} (or 1)")


def infer_batch_size(batch_size: int, latents, encoder_hidden_states, class_labels, concat) -> int:
    """The call's batch size: ``batch_size`` unless left at 1 while ``latents`` or conditioning carry a batch.

    Every given batch dimension must be 1 or the same number B; that B is the batch size.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    sizes = {"batch_size": batch_size}
    for name, value in (
        ("latents", latents),
        ("encoder_hidden_states", encoder_hidden_states),
        ("class_labels", class_labels),
        ("concat", concat),
    ):
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            sizes[name] = int(value.shape[0])
        elif isinstance(value, (list, tuple)):
            sizes[name] = len(value)
    batch = max(sizes.values())
    for name, size in sizes.items():
        if size not in (1, batch):
            raise ValueError(f"{name}: batch size {size} does not match {batch} (batch sizes must be 1 or equal)")
    if latents is not None and sizes.get("latents") != batch:
        raise ValueError(f"latents: batch size {sizes.get('latents')} does not match {batch}")
    return batch


def prepare_conditioning(
    conditioning_key: str | None,
    unet_config: Mapping,
    *,
    batch_size: int,
    sample_shape: tuple[int, ...],
    encoder_hidden_states=None,
    class_labels=None,
    concat=None,
    device: torch.device,
    dtype: torch.dtype,
) -> PreparedConditioning:
    """Validate the conditioning of one pipeline call against the model and move it to ``device``.

    ``sample_shape`` is ``(channels, height, width)`` of the sample being denoised; ``unet_config`` is the UNet's
    config (``in_channels``, ``context_dim`` and ``num_classes`` are read when present; diffusers UNets'
    ``cross_attention_dim`` / ``num_class_embeds`` are understood too).
    """
    key = check_conditioning_key(conditioning_key)
    given = {
        "encoder_hidden_states": encoder_hidden_states is not None,
        "class_labels": class_labels is not None,
        "concat": concat is not None,
    }
    needed = {
        "encoder_hidden_states": key in _NEEDS_CONTEXT,
        "class_labels": key in _NEEDS_LABELS,
        "concat": key in _NEEDS_CONCAT,
    }
    for name in given:
        if needed[name] and not given[name]:
            raise ValueError(f"{name}: required by this model (conditioning_key={key!r}) but not given")
        if given[name] and not needed[name]:
            raise ValueError(f"{name}: this model (conditioning_key={key!r}) takes no {name}")

    num_classes = _cfg(unet_config, "num_classes", "num_class_embeds")
    if num_classes is not None and key not in _NEEDS_LABELS:
        raise ValueError(
            f"conditioning_key: {key!r} passes no class labels, but the UNet is class-conditional "
            f"(num_classes={num_classes!r}); the original routes them only for 'adm', 'crossattn-adm', 'hybrid-adm'"
        )
    kwargs: dict = {}
    channels, height, width = sample_shape
    if needed["encoder_hidden_states"]:
        kwargs["encoder_hidden_states"] = _prepare_context(
            encoder_hidden_states, unet_config, batch_size, device, dtype
        )
    if needed["class_labels"]:
        kwargs["class_labels"] = _prepare_labels(class_labels, unet_config, batch_size, device, dtype)
    prepared_concat = None
    if needed["concat"]:
        if not isinstance(concat, torch.Tensor) or concat.ndim != 4:
            raise ValueError(f"concat: expected a (batch, channels, {height}, {width}) tensor, got {_describe(concat)}")
        if tuple(concat.shape[2:]) != (height, width):
            raise ValueError(
                f"concat: spatial size {tuple(concat.shape[2:])} does not match the sample's {(height, width)}"
            )
        in_channels = _cfg(unet_config, "in_channels")
        if in_channels is not None and channels + concat.shape[1] != in_channels:
            raise ValueError(
                f"concat: {concat.shape[1]} channels + {channels} sample channels != the UNet's in_channels "
                f"{in_channels} (expected {in_channels - channels} concat channels)"
            )
        prepared_concat = _batch_of("concat", concat, batch_size).to(device=device, dtype=dtype)
    else:
        in_channels = _cfg(unet_config, "in_channels")
        if in_channels is not None and in_channels != channels:
            raise ValueError(
                f"channels: the sample has {channels} channels but the UNet expects in_channels={in_channels} "
                f"(conditioning_key={key!r} concatenates nothing)"
            )
    cond = original_cond(
        key,
        encoder_hidden_states=kwargs.get("encoder_hidden_states"),
        class_labels=kwargs.get("class_labels"),
        concat=prepared_concat,
    )
    cond = cond or {}
    return PreparedConditioning(cond)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _prepare_context(context, unet_config, batch_size, device, dtype) -> torch.Tensor:
    if not isinstance(context, torch.Tensor) or context.ndim != 3:
        raise ValueError(f"encoder_hidden_states: expected a (batch, tokens, dim) tensor, got {_describe(context)}")
    context_dim = _cfg(unet_config, "context_dim", "cross_attention_dim")
    if isinstance(context_dim, (list, tuple)):  # SD2 allows one context_dim per transformer depth; all must agree
        dims = set(context_dim)
        context_dim = dims.pop() if len(dims) == 1 else None
    if context_dim is not None and context.shape[-1] != context_dim:
        raise ValueError(
            f"encoder_hidden_states: last dimension {context.shape[-1]} != the UNet's context_dim {context_dim}"
        )
    return _batch_of("encoder_hidden_states", context, batch_size).to(device=device, dtype=dtype)


def _prepare_labels(labels, unet_config, batch_size, device, dtype) -> torch.Tensor:
    num_classes = _cfg(unet_config, "num_classes", "num_class_embeds")
    if num_classes is None:
        raise ValueError("class_labels: the UNet has no class embedding (num_classes is None)")
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if num_classes == "sequential":  # SD2 ADM vectors, e.g. noise-level or image embeddings
        adm_in = _cfg(unet_config, "adm_in_channels")
        if labels.ndim != 2 or (adm_in is not None and labels.shape[1] != adm_in):
            raise ValueError(
                f"class_labels: expected a (batch, {adm_in}) tensor for num_classes='sequential', "
                f"got {_describe(labels)}"
            )
        return _batch_of("class_labels", labels, batch_size).to(device=device, dtype=dtype)
    if num_classes == "continuous":
        raise ValueError("class_labels: num_classes='continuous' UNets are not supported by the original code either")
    if labels.ndim == 0:
        labels = labels.reshape(1)
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"class_labels: expected a 1-D integer tensor (one label per sample), "
            f"got {_describe(labels)} of {labels.dtype}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= int(num_classes)):
        raise ValueError(f"class_labels: values must lie in [0, {int(num_classes) - 1}], got {labels.tolist()}")
    return _batch_of("class_labels", labels, batch_size).to(device=device, dtype=torch.long)
