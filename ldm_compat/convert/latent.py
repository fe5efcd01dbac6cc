"""LatentDiffusion's first and cond stage in a converted folder, and back: orchestration only.

``first_stage_model.*`` → ``vae/`` (diffusers ``AutoencoderKL``) or ``vqvae/`` (diffusers ``VQModel``), see
``ldm_compat.models.first_stage``; ``cond_stage_model.*`` → the cond stage's components (``text_encoder/`` +
``tokenizer/``, ``bert/``, ``class_embedder/`` …), see ``ldm_compat.models.cond_stage``. What no component holds
(a real lossconfig's ``loss.*``, a first stage's own ``model_ema.*``, OpenCLIP's unused last block …) goes to
``ldm_extras/extra_tensors.safetensors`` under its original key. The manifest (``conversion.json``) records, per
stage, the subfolders, the kept keys and what export needs; ``read_stages`` puts every original tensor back.

A stage that cannot be converted (no config, a class we do not know) keeps its tensors verbatim, with a warning
naming it: the UNet still converts and export stays lossless.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ldm_compat.convert.layout import COND_STAGE_PREFIX, FIRST_STAGE_PREFIX

logger = logging.getLogger(__name__)

LATENT_TARGETS = (
    "ldm.models.diffusion.ddpm.LatentDiffusion",
    "ldm.models.diffusion.ddpm.LatentInpaintDiffusion",  # Stability-AI fork: SD2 inpainting (LatentDiffusion + mask)
)
# LatentInpaintDiffusion's own arguments (Stability-AI ddpm.py)
INPAINT_KEYS = frozenset({"concat_keys", "masked_image_key", "finetune_keys", "keep_finetune_dims",
                          "c_concat_log_start", "c_concat_log_end"})  # fmt: skip
_FIRST_STAGE_FOLDERS = {"AutoencoderKL": "vae", "VQModel": "vqvae"}


@dataclass
class LatentStages:
    """What ``convert_stages`` produced: components to save, tensors to keep verbatim, the manifest entries."""

    components: dict[str, object] = field(default_factory=dict)  # subfolder → object with save_pretrained
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # full original keys, stored verbatim
    manifest: dict = field(default_factory=dict)  # {"first_stage": …, "cond_stage": …}

    def save(self, directory: Path) -> None:
        for subfolder, component in self.components.items():
            component.save_pretrained(directory / subfolder)


def _strip(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items()}


def _keep_verbatim(stages: LatentStages, stage: str, tensors: Mapping[str, torch.Tensor], reason: str) -> None:
    stages.extra.update(tensors)
    stages.manifest[stage] = {"kept_verbatim": reason}


def convert_stages(
    params: Mapping,
    first_stage: Mapping[str, torch.Tensor],
    cond_stage: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    search_dirs: list[Path] = (),
    tokenizer_path=None,
    open_clip_config=None,
) -> LatentStages:
    """Convert the ``first_stage_model.*`` / ``cond_stage_model.*`` tensors (full keys) as ``params`` (the YAML's
    ``model.params``) describe them; ``state_dict`` is the whole checkpoint (for the ``scale_factor`` buffer)."""
    stages = LatentStages()
    _first_stage(stages, params, dict(first_stage), state_dict, source)
    _cond_stage(stages, params, dict(cond_stage), source, search_dirs, tokenizer_path, open_clip_config)
    return stages


def _first_stage(stages, params, tensors, state_dict, source) -> None:
    from ldm_compat.models.first_stage import (
        UnsupportedFirstStage,
        build_model,
        parse_first_stage_config,
        resolve_scale_factor,
        to_diffusers_state_dict,
    )

    config = params.get("first_stage_config")
    if config is None:
        if tensors:
            logger.warning("%s: no first_stage_config: first_stage_model.* kept verbatim (not converted)", source)
            _keep_verbatim(stages, "first_stage", tensors, "no first_stage_config")
        return
    try:
        spec = parse_first_stage_config(config, f"{source}: first_stage_config")
    except UnsupportedFirstStage as err:
        logger.warning("%s; first_stage_model.* kept verbatim for export (no vae/ in the folder)", err)
        _keep_verbatim(stages, "first_stage", tensors, str(err))
        return
    if not tensors:
        raise ValueError(
            f"{source}: first_stage_config is {spec.target} but the checkpoint has no first_stage_model.* weights "
            "(a first_stage_config ckpt_path is not read: put the weights into the checkpoint)"
        )
    scale_factor = resolve_scale_factor(params, state_dict)
    model = build_model(spec, scale_factor, device="meta")
    weights, kept = to_diffusers_state_dict(_strip(tensors, FIRST_STAGE_PREFIX), model, "first_stage_model")
    model.load_state_dict(weights, assign=True, strict=True)
    subfolder = _FIRST_STAGE_FOLDERS[type(model).__name__]
    stages.components[subfolder] = model
    stages.extra.update({FIRST_STAGE_PREFIX + k: v for k, v in kept.items()})
    stages.manifest["first_stage"] = {
        "subfolder": subfolder,
        "class_name": type(model).__name__,
        "target": spec.target,
        "scale_factor": scale_factor,
        "scale_factor_from": "checkpoint" if "scale_factor" in state_dict else "config",
        "kept": [FIRST_STAGE_PREFIX + k for k in kept],
    }


def _cond_stage(stages, params, tensors, source, search_dirs, tokenizer_path, open_clip_config) -> None:
    config = params.get("cond_stage_config")
    try:
        from ldm_compat.models.cond_stage import UnsupportedCondStage, build_cond_stage
    except ImportError:  # the cond-stage adapters are not part of this installation
        if tensors:
            _keep_verbatim(stages, "cond_stage", tensors, "no cond-stage adapters installed")
        return
    if config is None:
        if tensors:
            logger.warning("%s: no cond_stage_config (give the YAML with --config): cond_stage_model.* kept verbatim, "
                           "not converted (the encoder class is not determined by the weights)", source)  # fmt: skip
            _keep_verbatim(stages, "cond_stage", tensors, "no cond_stage_config")
        return
    try:
        cond = build_cond_stage(config, _strip(tensors, COND_STAGE_PREFIX), search_dirs=list(search_dirs),
                                tokenizer_path=tokenizer_path, open_clip_config=open_clip_config)  # fmt: skip
    except UnsupportedCondStage as err:
        logger.warning("%s: %s; the UNet is converted, cond_stage_model.* kept verbatim for export", source, err)
        _keep_verbatim(stages, "cond_stage", tensors, str(err))
        return
    clash = sorted(set(cond.components) & set(stages.components))
    if clash:
        raise ValueError(f"{source}: cond stage subfolders {clash} clash with the first stage's")
    stages.components.update(cond.components)
    stages.extra.update({COND_STAGE_PREFIX + k: v for k, v in cond.kept.items()})
    stages.manifest["cond_stage"] = {
        "target": config if isinstance(config, str) else config.get("target"),
        "config": config,
        "components": {name: type(obj).__name__ for name, obj in cond.components.items()},
        "kept": [COND_STAGE_PREFIX + k for k in cond.kept],
    }


# -------------------------------------------------------------------------------------------------------- export
def _load_weights(directory: Path, stem: str) -> dict[str, torch.Tensor]:
    """A component's safetensors weights as saved (one file, or shards listed in ``<stem>.safetensors.index.json``)."""
    single = directory / f"{stem}.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = directory / f"{stem}.safetensors.index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{directory}: no {single.name} (or its shard index): the folder is incomplete")
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out.update(load_file(str(directory / shard)))
    return out


def read_first_stage(folder: Path, entry: Mapping) -> dict[str, torch.Tensor]:
    """The original ``first_stage_model.*`` tensors held by the folder's ``vae/``/``vqvae/`` (kept ones excluded)."""
    from diffusers import AutoencoderKL, VQModel

    from ldm_compat.models.first_stage import to_original_state_dict

    cls = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}[entry["class_name"]]
    directory = folder / entry["subfolder"]
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(directory))
    weights = _load_weights(directory, "diffusion_pytorch_model")
    return {FIRST_STAGE_PREFIX + k: v for k, v in to_original_state_dict(weights, model).items()}


def read_cond_stage(folder: Path, entry: Mapping, extra: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every original ``cond_stage_model.*`` tensor, from the folder's cond-stage components and the kept ones."""
    from ldm_compat.models.cond_stage import load_cond_stage

    kept = {k[len(COND_STAGE_PREFIX) :]: extra[k] for k in entry["kept"]}
    stage = load_cond_stage(folder, entry["config"], kept)
    return {COND_STAGE_PREFIX + k: v for k, v in stage.original_state_dict().items()}


def read_stages(folder: str | os.PathLike, manifest: Mapping, extra: Mapping[str, torch.Tensor]) -> dict:
    """The original first- and cond-stage tensors a folder stands for (those kept verbatim are in ``extra``)."""
    folder = Path(folder)
    out: dict[str, torch.Tensor] = {}
    first = manifest.get("first_stage") or {}
    if "subfolder" in first:
        out.update(read_first_stage(folder, first))
    cond = manifest.get("cond_stage") or {}
    if "components" in cond:
        out.update(read_cond_stage(folder, cond, extra))
    return out


def search_dirs_for(config_path: str | os.PathLike | None) -> list[Path]:
    """Where a cond stage's local files (``version`` folders, ``open_clip_configs/``) are looked for: beside the
    YAML, then the working directory."""
    dirs = [Path(config_path).resolve().parent] if config_path is not None else []
    cwd = Path.cwd()
    return dirs + ([cwd] if cwd not in dirs else [])


def load_folder_first_stage(folder: str | os.PathLike):
    """The folder's first stage with the original ``LatentDiffusion`` semantics around it (a ``FirstStage``:
    ``encode_first_stage``, ``get_first_stage_encoding``, ``decode_first_stage``), or ``None`` without one."""
    from diffusers import AutoencoderKL, VQModel

    from ldm_compat.convert.to_diffusers import EXTRA_TENSORS_FILE, MANIFEST_FILE
    from ldm_compat.models.first_stage import REMAP_BUFFER, FirstStage, parse_first_stage_config

    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text()) if (folder / MANIFEST_FILE).is_file() else {}
    entry = manifest.get("first_stage") or {}
    if "subfolder" not in entry:
        return None
    params = manifest["ddpm_params"]
    cls = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}[entry["class_name"]]
    model = cls.from_pretrained(folder, subfolder=entry["subfolder"]).eval().requires_grad_(False)
    remap_key = FIRST_STAGE_PREFIX + REMAP_BUFFER
    remap = load_file(str(folder / EXTRA_TENSORS_FILE)).get(remap_key) if remap_key in entry["kept"] else None
    spec = parse_first_stage_config(params["first_stage_config"], f"{folder}: first_stage_config")
    return FirstStage(model, spec, scale_by_std=bool(params.get("scale_by_std", False)), remap_used=remap)
