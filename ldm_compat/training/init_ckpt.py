"""``init_from_ckpt`` of the original ``DDPM``: warm-start a UNet (+ EMA, logvar) from an original checkpoint.

Options keep the original names: ``ckpt_path``, ``ignore_keys`` (prefix match), ``load_only_unet`` and SD2's
``make_it_fit``. Differences from the original, each a fix of a documented bug:

- ``load_only_unet`` accepts ``model.diffusion_model.*`` keys too (the original expected ``diffusion_model.*`` and
  silently loaded nothing from a normal checkpoint).
- A checkpoint without ``model_ema.*`` resets the EMA to the loaded weights, with a warning (the original left the
  EMA at its random initialisation, so ``ema_scope`` sampling gave noise).
- ``make_it_fit`` divides tiled input columns by their use count; the original's counts start at 1, dividing by
  ``uses + 1`` — reproduced with ``ldm_bug_compat=True``.
- As in the pixel-space ``DDPM`` (which loaded before ``register_schedule``), the checkpoint's schedule buffers are
  not used: the config's schedule wins. They are listed in the report.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ldm_compat.convert.checkpoint_io import load_checkpoint, state_dict_of
from ldm_compat.convert.layout import EMA_PREFIX, UNET_PREFIX, WRAPPER_PREFIX, OriginalStateDict, strip_model_prefix

logger = logging.getLogger(__name__)


@dataclass
class InitReport:
    """What ``init_from_ckpt`` did, key by key (original key names)."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # dropped by ignore_keys
    fitted: list[str] = field(default_factory=list)  # reshaped by make_it_fit
    ema_reset: bool = False

    def summary(self) -> str:
        text = f"Restored from {self.path} with {len(self.missing)} missing and {len(self.unexpected)} unexpected keys"
        if self.ignored:
            text += f", {len(self.ignored)} ignored"
        if self.fitted:
            text += f", {len(self.fitted)} fitted by make_it_fit"
        if self.ema_reset:
            text += "; no model_ema.* in the checkpoint: EMA reset to the loaded weights"
        return text


def fit_tensor(old: torch.Tensor, new_shape: torch.Size, ldm_bug_compat: bool = False) -> torch.Tensor:
    """SD2 ``make_it_fit`` for one tensor: tile ``old`` over the first two axes to ``new_shape``.

    ``new[i, j] = old[i % o0, j % o1]``; for ≥2-D tensors each input column is then divided by how often its
    source column is used, so a widened input keeps the same response. The original's counts start at 1
    (dividing by ``uses + 1``, e.g. 1/3 instead of 1/2 when doubling); ``ldm_bug_compat=True`` reproduces that.
    """
    if old.ndim != len(new_shape) or tuple(old.shape[2:]) != tuple(new_shape[2:]):
        raise ValueError(f"make_it_fit: cannot fit shape {tuple(old.shape)} to {tuple(new_shape)}")
    rows = torch.arange(new_shape[0]) % old.shape[0]
    new = old.index_select(0, rows)
    if old.ndim == 1:
        return new
    cols = torch.arange(new_shape[1]) % old.shape[1]
    new = new.index_select(1, cols)
    uses = torch.bincount(cols, minlength=old.shape[1]).to(torch.float32)
    if ldm_bug_compat:
        uses = uses + 1
    divisor = uses[cols].reshape(1, -1, *([1] * (old.ndim - 2)))
    return (new / divisor).to(old.dtype)


def fit_state_dict(
    state_dict: Mapping[str, torch.Tensor], target_shapes: Mapping[str, torch.Size], ldm_bug_compat: bool = False
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fit every tensor whose shape differs from ``target_shapes[key]``; returns the new dict and the fitted keys."""
    out, fitted = dict(state_dict), []
    for key, shape in target_shapes.items():
        if key in out and tuple(out[key].shape) != tuple(shape):
            out[key] = fit_tensor(out[key], torch.Size(shape), ldm_bug_compat)
            fitted.append(key)
    return out, fitted


def _drop_ignored(state_dict: dict, ignore_keys: Iterable[str]) -> list[str]:
    ignore_keys = tuple(ignore_keys or ())
    dropped = [k for k in state_dict if ignore_keys and k.startswith(ignore_keys)]
    for k in dropped:
        del state_dict[k]
    return dropped


def _check_shapes(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str) -> None:
    expected = module.state_dict()
    wrong = [
        f"{prefix}{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in tensors.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if wrong:
        raise ValueError(
            f"checkpoint does not fit the configured model ({len(wrong)} shape mismatches; make_it_fit=True tiles "
            f"them): {'; '.join(wrong[:10])}{' …' if len(wrong) > 10 else ''}"
        )


@torch.no_grad()
def init_from_ckpt(
    ckpt_path,
    unet: torch.nn.Module,
    *,
    ema=None,
    objective=None,
    ignore_keys: Iterable[str] = (),
    load_only_unet: bool = False,
    make_it_fit: bool = False,
    ldm_bug_compat: bool = False,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> InitReport:
    """Load an original checkpoint into ``unet`` (and ``ema``: a ``LitEmaModel``; ``objective``: its ``logvar``).

    ``state_dict``: the checkpoint's state dict when the caller has read it already (``ckpt_path`` then only names
    it in the report)."""
    if state_dict is None:
        state_dict = state_dict_of(load_checkpoint(ckpt_path), ckpt_path)
    state_dict = dict(state_dict)
    report = InitReport(path=str(ckpt_path))
    report.ignored = _drop_ignored(state_dict, ignore_keys)

    if load_only_unet:
        # the original loaded into the DiffusionWrapper: UNet keys only, nothing else
        unet_keys = strip_model_prefix(state_dict)
        parts = OriginalStateDict(unet=unet_keys)
        report.unexpected += [k for k in state_dict if not k.startswith((UNET_PREFIX, WRAPPER_PREFIX))]
    else:
        if make_it_fit:
            targets = {UNET_PREFIX + k: v.shape for k, v in unet.state_dict().items()}
            targets.update(
                {EMA_PREFIX + (WRAPPER_PREFIX + n).replace(".", ""): p.shape for n, p in unet.named_parameters()}
            )
            state_dict, report.fitted = fit_state_dict(state_dict, targets, ldm_bug_compat)
        parts = OriginalStateDict.split(state_dict)
        # config schedule wins (pixel-space DDPM semantics); other top-level keys are not ours
        report.unexpected += list(parts.schedule) + list(parts.first_stage) + list(parts.cond_stage)
        report.unexpected += list(parts.other)
        if parts.scale_factor is not None:
            report.unexpected.append("scale_factor")

    if make_it_fit and load_only_unet:
        targets = {k: v.shape for k, v in unet.state_dict().items()}
        parts.unet, fitted = fit_state_dict(parts.unet, targets, ldm_bug_compat)
        report.fitted += [UNET_PREFIX + k for k in fitted]
    _check_shapes(unet, parts.unet, UNET_PREFIX)
    result = unet.load_state_dict(parts.unet, strict=False)
    report.missing += [UNET_PREFIX + k for k in result.missing_keys]
    report.unexpected += [UNET_PREFIX + k for k in result.unexpected_keys]
    report.loaded += [UNET_PREFIX + k for k in parts.unet if k not in result.unexpected_keys]

    if objective is not None and parts.logvar is not None:
        if objective.config.learn_logvar:
            if parts.logvar.shape != objective.logvar.shape:
                raise ValueError(
                    f"logvar: checkpoint shape {tuple(parts.logvar.shape)}, model {tuple(objective.logvar.shape)}"
                )
            objective.logvar.copy_(parts.logvar)
            report.loaded.append("logvar")
        else:
            report.unexpected.append("logvar")
    elif objective is not None and objective.config.learn_logvar and not load_only_unet:
        report.missing.append("logvar")

    if ema is not None:
        if parts.ema:
            ema.load_original_state_dict(unet, parts.ema, prefix="", module_prefix=WRAPPER_PREFIX)
            report.loaded += [EMA_PREFIX + k for k in parts.ema]
        else:
            logger.warning("%s: no model_ema.* weights; the EMA starts from the loaded weights", ckpt_path)
            ema.reset_to(unet)
            report.ema_reset = True
    elif parts.ema:
        report.unexpected += [EMA_PREFIX + k for k in parts.ema]
    logger.info(report.summary())
    return report
