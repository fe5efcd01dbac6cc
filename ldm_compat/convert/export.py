"""diffusers folder → original ``.ckpt``/``.safetensors`` (+ YAML) that the original code loads.

For folders written by ``original_to_diffusers`` or by training, the manifest in ``ldm_extras/`` gives the exact
original key order, the EMA buffer names, the stored extras and the LatentDiffusion stages' subfolders (read back
through their key maps, ``convert/latent.py``), so the export is bit-exact. A folder without
``ldm_extras/`` (e.g. a pipeline saved by hand) exports its UNet weights and recomputed schedule buffers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from ldm_compat.convert.checkpoint_io import atomic_write, save_checkpoint
from ldm_compat.convert.latent import read_stages
from ldm_compat.convert.layout import EMA_PREFIX, UNET_PREFIX, OriginalStateDict
from ldm_compat.convert.nested import unflatten
from ldm_compat.convert.to_diffusers import (
    CONFIG_FILE,
    DDPM_TARGET,
    ENTRIES_FILE,
    EXTRA_TENSORS_FILE,
    FORMAT,
    MANIFEST_FILE,
    TRAINING_WEIGHTS_FILE,
    UNET_TARGET,
)

UNET_WEIGHTS_FILE = "unet/diffusion_pytorch_model.safetensors"


def _load(folder: Path, name: str) -> dict[str, torch.Tensor]:
    path = folder / name
    return load_file(str(path)) if path.is_file() else {}


def _schedule_buffers(folder: Path) -> dict[str, torch.Tensor]:
    from ldm_compat.schedulers.scheduling_ldm_ddpm import LDMDDPMScheduler

    return LDMDDPMScheduler.from_pretrained(folder, subfolder="scheduler").ldm_buffers()


def _module_order(folder: Path, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet weights in the original module order (safetensors files store keys sorted), as ``torch.save`` of
    the original model would write them."""
    from ldm_compat.models.unet_ldm import LDMUNetModel

    with torch.device("meta"):
        order = list(LDMUNetModel.from_config(LDMUNetModel.load_config(folder, subfolder="unet")).state_dict())
    if set(order) != set(weights):
        return weights  # not our layout: keep what the file has
    return {k: weights[k] for k in order}


def read_original_checkpoint(folder: str | os.PathLike) -> dict:
    """The original checkpoint a folder stands for: ``{'state_dict': …, 'global_step': …}`` (same top-level order
    as the converted file) or, for a bare state dict, the state dict itself."""
    state_dict, entries, manifest = read_original_state_dict(folder)
    if manifest.get("container", "lightning") == "bare":
        return state_dict
    items = list(entries.items())
    items.insert(min(manifest.get("state_dict_position", 0), len(items)), ("state_dict", state_dict))
    return dict(items)


def read_original_state_dict(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """The original-layout state dict, top-level entries and manifest a folder stands for."""
    folder = Path(folder)
    if not (folder / UNET_WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder}: not an ldm_compat pipeline folder (no {UNET_WEIGHTS_FILE})")
    sampling = load_file(str(folder / UNET_WEIGHTS_FILE))
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        parts = OriginalStateDict(unet=_module_order(folder, sampling), schedule=_schedule_buffers(folder))
        return parts.join(), {}, {}
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
    training = _load(folder, TRAINING_WEIGHTS_FILE) or sampling
    extra = _load(folder, EXTRA_TENSORS_FILE)
    tensors: dict[str, torch.Tensor] = {UNET_PREFIX + k: v for k, v in training.items()}
    tensors.update({EMA_PREFIX + s: sampling[p] for p, s in manifest["ema_shadows"].items()})
    tensors.update(extra)
    tensors.update(read_stages(folder, manifest, extra))  # vae/ | vqvae/ and the cond stage's components
    if manifest["schedule"] == "recomputed" and manifest["schedule_keys"]:
        buffers = _schedule_buffers(folder)
        tensors.update({k: buffers[k] for k in manifest["schedule_keys"]})
    missing = [k for k in manifest["key_order"] if k not in tensors]
    if missing:
        raise ValueError(f"{folder}: incomplete folder, {len(missing)} original keys missing (e.g. {missing[:5]})")
    state_dict = {k: tensors[k] for k in manifest["key_order"]}
    entries = {}
    if manifest.get("entries") is not None:
        entries = unflatten(manifest["entries"], _load(folder, ENTRIES_FILE))
    return state_dict, entries, manifest


def original_config(folder: str | os.PathLike) -> str:
    """The original YAML of a folder: stored verbatim, or rebuilt from the UNet and scheduler configs."""
    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file():
        return (folder / CONFIG_FILE).read_text()
    from ldm_compat.models.unet_ldm import LDMUNetModel
    from ldm_compat.schedulers.scheduling_ldm_ddpm import LDMDDPMScheduler

    scheduler = LDMDDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    unet_config = LDMUNetModel.load_config(folder, subfolder="unet")
    params = {k: v for k, v in scheduler.to_ldm_config().items() if v is not None}
    params["use_ema"] = False  # such a folder has no EMA weights: the original's LitEma keys would be missing
    unet_params = {k: v for k, v in unet_config.items() if not k.startswith("_") and k != "sample_size"}
    params["unet_config"] = {"target": UNET_TARGET, "params": unet_params}
    text = yaml.safe_dump({"model": {"target": DDPM_TARGET, "params": params}})
    if scheduler.config.get("rescale_betas_zero_snr"):
        text = ZERO_SNR_NOTE + text
    return text


# the original DDPM cannot take given_betas from a YAML list (`1. - betas` raises TypeError), so a zero-SNR model's
# YAML keeps the schedule before rescaling and its checkpoint the rescaled buffers, which load_state_dict puts in place
ZERO_SNR_NOTE = (
    "# ldm_compat: this model was trained with this schedule rescaled to zero terminal SNR (Lin et al. 2023).\n"
    "# The original code has no option for it: the checkpoint's schedule buffers hold the rescaled schedule and\n"
    "# replace the ones built from this file when the checkpoint is loaded.\n"
)


def diffusers_to_original(
    input_dir: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    config_output: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the original checkpoint a folder stands for (``.ckpt`` via torch.save, or ``.safetensors``)."""
    output_path = Path(output_path)
    if output_path.suffix not in (".ckpt", ".safetensors"):
        raise ValueError(f"--output {output_path}: expected a .ckpt or .safetensors file name")
    for path in (output_path, config_output):
        if path is not None and Path(path).exists() and not overwrite:
            raise FileExistsError(f"{path}: already exists (pass --overwrite to replace it)")
    checkpoint = read_original_checkpoint(input_dir)
    if output_path.suffix == ".safetensors" and "state_dict" in checkpoint:
        # safetensors holds tensors only; scalar entries (global_step, epoch) go into its metadata
        checkpoint = {k: v for k, v in checkpoint.items() if k == "state_dict" or isinstance(v, (int, float, str))}
    save_checkpoint(checkpoint, output_path)
    if config_output is not None:
        text = original_config(input_dir)
        atomic_write(config_output, lambda tmp: Path(tmp).write_text(text))
    return output_path


__all__ = ["diffusers_to_original", "original_config", "read_original_checkpoint", "read_original_state_dict"]
