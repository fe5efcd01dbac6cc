"""The original cond stages (``LatentDiffusion.cond_stage_model``) as stock components, both ways.

``build_cond_stage(cond_stage_config, state, search_dirs=…)`` turns a YAML's ``cond_stage_config`` and the
checkpoint's ``cond_stage_model.*`` tensors (prefix stripped; ``None`` = random init, for training from scratch) into a
:class:`CondStage`: ``components`` (folder subdir → object with ``save_pretrained``), ``kept`` (original tensors no
component holds, verbatim), ``original_state_dict()`` (every original key back, bit for bit), ``encode`` (the
original ``get_learned_conditioning``), ``unconditional(batch_size)``, ``tokenize``. ``load_cond_stage`` rebuilds it
from a saved folder. See docs/cond_stage.md.

| original target | components |
|---|---|
| ``ldm.modules.encoders.modules.FrozenCLIPEmbedder`` | ``text_encoder`` CLIPTextModel, ``tokenizer`` CLIPTokenizer |
| ``ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder`` | ``text_encoder`` CLIPTextModel (SD2 layout), ``tokenizer`` |
| ``ldm.modules.encoders.modules.BERTEmbedder`` | ``bert`` LDMBertModel, ``tokenizer`` BertTokenizerFast |
| ``ldm.modules.encoders.modules.ClassEmbedder`` | ``class_embedder`` ClassEmbedderModel |
| ``torch.nn.Identity``, ``__is_unconditional__``, ``__is_first_stage__`` | none |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .base import CondStage, UnsupportedCondStage
from .bert import BERTCondStage
from .class_embedder import ClassEmbedderCondStage, ClassEmbedderModel
from .clip import CLIPCondStage
from .open_clip import OpenCLIPCondStage
from .tokenizers import TokenizerNotFoundError

UNCONDITIONAL = "__is_unconditional__"
FIRST_STAGE = "__is_first_stage__"
IDENTITY = "torch.nn.Identity"


class UnconditionalCondStage(CondStage):
    """``cond_stage_config: __is_unconditional__``: no cond stage (the original sets ``cond_stage_model = None``)."""

    target = UNCONDITIONAL

    def encode(self, cond):
        return None

    def unconditional(self, batch_size: int):
        return None


class IdentityCondStage(CondStage):
    """``torch.nn.Identity`` (bsr_sr, retrieval-augmented): the conditioning is the batch tensor itself."""

    target = IDENTITY

    def encode(self, cond):
        return cond


class FirstStageCondStage(CondStage):
    """``__is_first_stage__`` (inpainting_big): the cond stage *is* the first stage. Its ``cond_stage_model.*``
    tensors are the first stage's again; they stay in ``kept`` (the orchestrator may store them once). ``encode``
    needs ``first_stage`` (the folder's ``vae``/``vqvae``) set: the original takes a KL posterior's ``mode()`` and a VQ
    model's pre-quantization latents."""

    target = FIRST_STAGE
    first_stage: Any = None

    def encode(self, cond):
        if self.first_stage is None:
            raise NotImplementedError(f"{FIRST_STAGE}: set .first_stage to the first-stage model (vae/vqvae) to encode")
        out = self.first_stage.encode(cond)
        if hasattr(out, "latent_dist"):
            return out.latent_dist.mode()
        return out.latents if hasattr(out, "latents") else out


_ADAPTERS: dict[str, type[CondStage]] = {
    cls.target: cls for cls in (CLIPCondStage, OpenCLIPCondStage, BERTCondStage, ClassEmbedderCondStage)
}
_TRIVIAL: dict[str, type[CondStage]] = {
    cls.target: cls for cls in (IdentityCondStage, UnconditionalCondStage, FirstStageCondStage)
}
SUPPORTED_COND_STAGES: tuple[str, ...] = (*_ADAPTERS, *_TRIVIAL)


@dataclass
class Lookup:
    """Where local files are looked for: ``search_dirs`` (the YAML's folder first), overrides from the CLI."""

    search_dirs: list[Path] = field(default_factory=list)
    tokenizer_path: Path | None = None
    open_clip_config: Path | None = None


def target_and_params(cond_stage_config) -> tuple[str, dict]:
    """``(target, params)`` of a ``cond_stage_config`` (a mapping, an OmegaConf node, or one of the two strings)."""
    from ldm_compat.config import to_plain

    config = to_plain(cond_stage_config)
    if isinstance(config, str):
        return config, {}
    if not isinstance(config, Mapping) or not isinstance(config.get("target"), str):
        raise ValueError(
            f"cond_stage_config: expected a mapping with a 'target' (or {UNCONDITIONAL!r}), got {config!r}"
        )
    return config["target"], dict(config.get("params") or {})


def _adapter(target: str) -> type[CondStage]:
    cls = _ADAPTERS.get(target) or _TRIVIAL.get(target)
    if cls is None:
        raise UnsupportedCondStage(
            f"cond_stage_config.target {target!r} is not supported; supported: {', '.join(SUPPORTED_COND_STAGES)}"
        )
    return cls


def build_cond_stage(
    cond_stage_config,
    state: Mapping[str, torch.Tensor] | None,
    *,
    search_dirs: list[Path] = (),
    tokenizer_path=None,
    open_clip_config=None,
) -> CondStage:
    """The :class:`CondStage` of ``cond_stage_config`` holding ``state`` (``cond_stage_model.*``, prefix stripped).

    ``search_dirs`` are where ``version`` folders and ``open_clip_configs/`` are looked for (the YAML's folder);
    ``tokenizer_path`` / ``open_clip_config`` override the lookups (``--tokenizer``, ``--open-clip-config``).
    Raises :class:`UnsupportedCondStage` for an unknown target, :class:`TokenizerNotFoundError` when a tokenizer is
    not found locally, ``ValueError`` naming the key when the weights do not fit the config."""
    target, params = target_and_params(cond_stage_config)
    cls = _adapter(target)
    if cls in _TRIVIAL.values():
        return cls(params, {}, dict(state or {}))
    lookup = Lookup([Path(d) for d in search_dirs], None if tokenizer_path is None else Path(tokenizer_path),
                    None if open_clip_config is None else Path(open_clip_config))  # fmt: skip
    return cls.build(params, None if state is None else dict(state), lookup)


def load_cond_stage(folder, cond_stage_config, kept: Mapping[str, torch.Tensor]) -> CondStage:
    """A :class:`CondStage` from a saved folder (its component subdirs) and the ``kept`` tensors."""
    target, params = target_and_params(cond_stage_config)
    cls = _adapter(target)
    if cls in _TRIVIAL.values():
        return cls(params, {}, dict(kept))
    return cls.load(Path(folder), params, dict(kept))


__all__ = [
    "SUPPORTED_COND_STAGES",
    "BERTCondStage",
    "CLIPCondStage",
    "ClassEmbedderCondStage",
    "ClassEmbedderModel",
    "CondStage",
    "FirstStageCondStage",
    "IdentityCondStage",
    "OpenCLIPCondStage",
    "TokenizerNotFoundError",
    "UnconditionalCondStage",
    "UnsupportedCondStage",
    "build_cond_stage",
    "load_cond_stage",
]
