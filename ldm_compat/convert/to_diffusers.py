"""Original ``.ckpt``/``.safetensors`` (+ YAML) → diffusers pipeline folder, losslessly.

Folder contents (see ``ldm_compat.pipelines.folder`` for the diffusers part)::

    unet/                                  the weights that sample: LitEma's shadows when the checkpoint has them
    scheduler/                             LDMDDPMScheduler built from the config (verified against the buffers)
    vae/ | vqvae/                          LatentDiffusion: the first stage, diffusers AutoencoderKL / VQModel
    text_encoder/, tokenizer/, bert/, …    LatentDiffusion: the cond stage's components (see convert/latent.py)
    ldm_extras/config.yaml                 the original YAML (verbatim when given, else the inferred one)
    ldm_extras/training.json               facts: global_step, epoch, EMA decay/num_updates, which weights sample
    ldm_extras/conversion.json             the manifest export uses: original key order, EMA names, entries
    ldm_extras/training_unet.safetensors   the non-EMA (training) UNet weights, when unet/ holds the EMA
    ldm_extras/extra_tensors.safetensors   every other tensor: model_ema.decay/num_updates (all of model_ema.* with
                                           --no-ema), logvar, scale_factor, the first/cond-stage tensors no component
                                           holds (all of them when a stage is not converted), unknown keys, and the
                                           schedule buffers when they cannot be recomputed bit for bit
    ldm_extras/checkpoint_entries.safetensors  tensors of non-state_dict entries (optimizer_states, loops, …)

``diffusers_to_original`` (``export.py``) reads exactly these files back into the original checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ldm_compat.config import load_ldm_config, to_plain
from ldm_compat.convert.atomic_dir import atomic_directory
from ldm_compat.convert.checkpoint_io import load_checkpoint, state_dict_of
from ldm_compat.convert.latent import INPAINT_KEYS, LATENT_TARGETS, LatentStages, convert_stages, search_dirs_for
from ldm_compat.convert.layout import (
    EMA_PREFIX,
    FIRST_STAGE_PREFIX,
    SCHEDULE_BUFFER_NAMES,
    UNET_PREFIX,
    OriginalStateDict,
    ema_shadow_map,
)
from ldm_compat.convert.nested import flatten

logger = logging.getLogger(__name__)

EXTRAS = "ldm_extras"
MANIFEST_FILE = f"{EXTRAS}/conversion.json"
CONFIG_FILE = f"{EXTRAS}/config.yaml"
TRAINING_FILE = f"{EXTRAS}/training.json"
TRAINING_WEIGHTS_FILE = f"{EXTRAS}/training_unet.safetensors"
EXTRA_TENSORS_FILE = f"{EXTRAS}/extra_tensors.safetensors"
ENTRIES_FILE = f"{EXTRAS}/checkpoint_entries.safetensors"
FORMAT = "ldm_compat.conversion/1"
PROGRESS_BAR_BYTES = 256 * 2**20  # show a progress bar for checkpoints larger than this
DDPM_TARGET = "ldm.models.diffusion.ddpm.DDPM"
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"

# well-known original schedules, tried in order when no config says which one a checkpoint used
_KNOWN_SCHEDULES = [
    {"beta_schedule": "linear", "linear_start": 0.0015, "linear_end": 0.0195},
    {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012},
    {"beta_schedule": "linear", "linear_start": 1e-4, "linear_end": 2e-2},
    {"beta_schedule": "cosine", "cosine_s": 8e-3},
    {"beta_schedule": "sqrt_linear", "linear_start": 1e-4, "linear_end": 2e-2},
    {"beta_schedule": "squaredcos_cap_v2"},
]


# LatentDiffusion's own arguments (CompVis ddpm.py, Stability-AI SD2 adds force_null_conditioning): known, not DDPM's
LATENT_DIFFUSION_KEYS = frozenset(
    {
        "first_stage_config", "cond_stage_config", "num_timesteps_cond", "cond_stage_key", "cond_stage_trainable",
        "concat_mode", "cond_stage_forward", "scale_factor", "scale_by_std", "force_null_conditioning",
    }
) | INPAINT_KEYS  # fmt: skip


def check_model_params(params: Mapping, source: str) -> None:
    """Check a config's ``model.params`` before converting: a wrong type is a one-line ``ConfigError`` naming the key;
    keys neither ``DDPM`` nor ``LatentDiffusion`` takes are listed in one warning (a typo should not pass silently)."""
    import warnings

    from ldm_compat.training.settings import DDPM_KEYS, check_ddpm_params

    known = {k: v for k, v in params.items() if k in DDPM_KEYS}
    known.setdefault("unet_config", {})  # conversion infers it from the weights when the YAML has none
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # only the type checks; unknown keys are reported below
        check_ddpm_params(known, source)
    unknown = sorted(set(params) - DDPM_KEYS - LATENT_DIFFUSION_KEYS)
    if unknown:
        warnings.warn(f"{source}: model.params keys not used by DDPM (ignored): {', '.join(unknown)}", stacklevel=3)


def conditioning_key_of(params: Mapping) -> str | None:
    """The DiffusionWrapper key a config implies (LatentDiffusion derives it from ``concat_mode``)."""
    key = params.get("conditioning_key")
    if key is not None:
        return key
    cond_stage = params.get("cond_stage_config")
    if cond_stage is None or cond_stage == "__is_unconditional__":
        return None
    return "concat" if params.get("concat_mode", True) else "crossattn"


def build_scheduler(params: dict, buffers: Mapping[str, torch.Tensor], schedule_mismatch: str, source: str):
    """The scheduler for ``params``, verified bit for bit against the checkpoint's ``buffers``.

    Returns ``(scheduler, params, stored_buffers)``: ``stored_buffers`` is empty when the buffers are reproduced
    exactly; otherwise (with ``schedule_mismatch="trained_betas"``) the scheduler uses the checkpoint's ``betas``
    and the original buffers are stored so export stays lossless.
    """
    from ldm_compat.schedulers.scheduling_ldm_ddpm import LDMDDPMScheduler, zero_snr_candidates

    if schedule_mismatch not in ("error", "trained_betas"):
        raise ValueError(f"schedule_mismatch={schedule_mismatch!r}: expected 'error' or 'trained_betas'")
    if not buffers:
        params = {k: v for k, v in params.items() if k != "_inferred_schedule"}
        return LDMDDPMScheduler.from_ldm_config(params), params, {}
    candidates = [params]
    if params.get("_inferred_schedule"):
        timesteps = buffers["betas"].shape[0] if "betas" in buffers else params.get("timesteps", 1000)
        candidates = [{**params, **known, "timesteps": timesteps} for known in _KNOWN_SCHEDULES]
    mismatch: list[str] = []
    for candidate in candidates:
        candidate = {k: v for k, v in candidate.items() if k != "_inferred_schedule"}
        # a zero-SNR model's YAML holds the schedule before rescaling (the original has no option for it)
        for overrides in zero_snr_candidates(buffers):
            scheduler = LDMDDPMScheduler.from_ldm_config(candidate, **overrides)
            mismatch = [name for name in scheduler.schedule_mismatches(buffers) if name in buffers]
            if not mismatch:
                return scheduler, candidate, {}
    if schedule_mismatch == "error":
        raise ValueError(
            f"{source}: the checkpoint's schedule buffers differ from the config's schedule: {', '.join(mismatch)}; "
            "fix the config, or pass --schedule-mismatch trained_betas to use the checkpoint's betas"
        )
    logger.warning("%s: schedule buffers differ from the config (%s); using the checkpoint's betas", source, mismatch)
    params = {k: v for k, v in candidates[0].items() if k != "_inferred_schedule"}
    scheduler = LDMDDPMScheduler.from_betas(buffers["betas"], params)
    params.update(timesteps=len(buffers["betas"]), given_betas=scheduler.to_ldm_config()["given_betas"])
    return scheduler, params, dict(buffers)


def _unet_params(config: dict, unet_sd: Mapping[str, torch.Tensor], unet_options: Mapping | None) -> dict:
    unet_config = config["model"]["params"].get("unet_config")
    if unet_config is not None:
        return dict(unet_config.get("params", unet_config))
    from ldm_compat.convert.infer_config import infer_unet_params

    return infer_unet_params(unet_sd, **dict(unet_options or {}))


def _build_unet(unet_params: dict, weights: Mapping[str, torch.Tensor], source: str):
    from ldm_compat.models.unet_ldm import LDMUNetModel

    with torch.device("meta"):
        unet = LDMUNetModel(**unet_params)
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [f"{k}: weights {tuple(weights[k].shape)}, config {tuple(v.shape)}" for k, v in expected.items()
             if k in weights and weights[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches ({'; '.join(wrong[:6])}{' …' if len(wrong) > 6 else ''})")
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(UNET_PREFIX + k for k in missing[:6])} …)")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(UNET_PREFIX + k for k in unexpected[:6])} …)")
        raise ValueError(f"{source}: the UNet weights do not fit the config: {'; '.join(parts)}")
    unet.load_state_dict(dict(weights), assign=True, strict=True)
    return unet


def save_pipeline(directory: Path, unet, scheduler, params: Mapping, stages: LatentStages | None = None) -> None:
    """Write the diffusers part of the folder with ``LDMCompatPipeline.save_pretrained`` (+ each latent stage
    component's own ``save_pretrained``: they are not pipeline components yet, so model_index.json omits them)."""
    from ldm_compat.pipelines.pipeline_ldm_compat import LDMCompatPipeline

    pipe = LDMCompatPipeline(
        unet=unet,
        scheduler=scheduler,
        conditioning_key=conditioning_key_of(params),
        image_size=params.get("image_size"),
        channels=params.get("channels"),
    )
    if stages is not None and stages.components:
        # a latent folder names LDMCompatPipeline, never a stock pipeline that would run the UNet alone (choosing a
        # stock latent pipeline is issue 15): the diffusers save, then our folder format without a stock class
        from diffusers import DiffusionPipeline

        from ldm_compat.pipelines.folder import finalize_folder

        DiffusionPipeline.save_pretrained(pipe, directory, safe_serialization=True)
        finalize_folder(directory, LDMCompatPipeline, None)
        stages.save(directory)
    else:
        pipe.save_pretrained(directory, safe_serialization=True)


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    if tensors:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def write_folder(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping,
    output_dir: str | os.PathLike,
    *,
    entries: Mapping[str, Any] | None = None,
    config_text: str | None = None,
    use_ema: bool = True,
    overwrite: bool = False,
    schedule_mismatch: str = "error",
    unet_options: Mapping | None = None,
    source: str = "checkpoint",
    container: str = "lightning",
    state_dict_position: int = 0,
    search_dirs: list[Path] = (),
    tokenizer_path: str | os.PathLike | None = None,
    open_clip_config: str | os.PathLike | None = None,
) -> Path:
    """Write an original-layout ``state_dict`` (+ its ``config``) as a diffusers folder; see the module docstring.

    ``entries`` are the checkpoint's other top-level entries (``global_step``, ``epoch``, ``optimizer_states``…);
    ``container`` is ``"lightning"`` (``{'state_dict': …, …}``, ``state_dict`` at ``state_dict_position``) or
    ``"bare"`` (the file was the state dict itself), so export writes the same container back.
    ``use_ema=False`` samples with the training weights; the EMA is still kept (verbatim) for export.
    ``search_dirs`` / ``tokenizer_path`` / ``open_clip_config``: where a cond stage finds its local files.
    """
    config = to_plain(config)
    params = dict(config["model"].get("params") or {})
    parts = OriginalStateDict.split(state_dict)
    if not parts.unet:
        raise ValueError(f"{source}: no {UNET_PREFIX}* weights (not a latent-diffusion DDPM checkpoint?)")
    unet_params = _unet_params(config, parts.unet, unet_options)
    scheduler, params, stored_schedule = build_scheduler(params, parts.schedule, schedule_mismatch, source)

    shadows = ema_shadow_map(parts.unet)
    has_ema = any(name in parts.ema for name in shadows.values())
    sampling = dict(parts.unet)
    if has_ema and use_ema:
        sampling.update({p: parts.ema[s] for p, s in shadows.items() if s in parts.ema})
    unet = _build_unet(unet_params, sampling, source)
    stages = convert_stages(
        params, parts.first_stage, parts.cond_stage, state_dict, source=source, search_dirs=search_dirs,
        tokenizer_path=tokenizer_path, open_clip_config=open_clip_config,
    )  # fmt: skip

    manifest = {
        "format": FORMAT,
        "key_order": list(state_dict),
        "sampling_weights": "ema" if has_ema and use_ema else "training",
        "ema_shadows": {p: s for p, s in shadows.items() if s in parts.ema} if use_ema else {},
        "schedule": "stored" if stored_schedule else "recomputed",
        "schedule_keys": [k for k in SCHEDULE_BUFFER_NAMES if k in parts.schedule],
        "ddpm_params": {k: v for k, v in params.items() if k != "unet_config"},
        "entries": None,
        "container": container,
        "state_dict_position": state_dict_position,
        **stages.manifest,
    }
    # the EMA buffers unet/ does not hold (all of them with use_ema=False) are kept verbatim
    extra = {EMA_PREFIX + k: v for k, v in parts.ema.items() if k not in manifest["ema_shadows"].values()}
    if parts.logvar is not None:
        extra["logvar"] = parts.logvar
    if parts.scale_factor is not None:
        extra["scale_factor"] = parts.scale_factor
    extra.update(stages.extra)
    extra.update(parts.other)
    extra.update(stored_schedule)
    entry_tensors: dict[str, torch.Tensor] = {}
    if entries:
        manifest["entries"] = flatten(dict(entries), entry_tensors, "entries")

    full_config = {**config, "model": {**config["model"], "params": {**params, "unet_config": {
        "target": (params.get("unet_config") or {}).get("target", UNET_TARGET), "params": unet_params}}}}  # fmt: skip
    ema = parts.ema
    training_facts = {
        "global_step": (entries or {}).get("global_step"),
        "epoch": (entries or {}).get("epoch"),
        "sampling_weights": manifest["sampling_weights"],
        "ema": {"decay": float(ema["decay"]), "num_updates": int(ema["num_updates"])}
        if "decay" in ema and "num_updates" in ema
        else None,
        "target": config["model"].get("target", DDPM_TARGET),
    }
    total_bytes = sum(t.numel() * t.element_size() for t in state_dict.values())
    progress = tqdm(total=4, desc=f"writing {Path(output_dir).name}", unit="part",
                    disable=total_bytes < PROGRESS_BAR_BYTES)  # fmt: skip
    with atomic_directory(output_dir, overwrite=overwrite) as tmp, progress:
        save_pipeline(tmp, unet, scheduler, params, stages)
        progress.update()
        (tmp / EXTRAS).mkdir(exist_ok=True)
        (tmp / CONFIG_FILE).write_text(config_text if config_text is not None else yaml.safe_dump(full_config))
        (tmp / TRAINING_FILE).write_text(json.dumps(training_facts, indent=1) + "\n")
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
        if manifest["sampling_weights"] == "ema":
            _save_tensors(tmp / TRAINING_WEIGHTS_FILE, parts.unet)
        progress.update()
        _save_tensors(tmp / EXTRA_TENSORS_FILE, extra)
        progress.update()
        _save_tensors(tmp / ENTRIES_FILE, entry_tensors)
        progress.update()
    return Path(output_dir)


def original_to_diffusers(
    ckpt_path: str | os.PathLike,
    config_path: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    use_ema: bool = True,
    overwrite: bool = False,
    schedule_mismatch: str = "error",
    unet_options: Mapping | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    open_clip_config: str | os.PathLike | None = None,
    scale_factor: float | None = None,
) -> Path:
    """Convert an original checkpoint (``.ckpt`` or ``.safetensors``) and its YAML into a diffusers folder.

    With ``config_path`` nothing is guessed from key names: the YAML says what each part is. Without it the UNet
    config is inferred from the weights (``unet_options`` supplies what the weights cannot say, e.g. ``num_heads``),
    the schedule is identified among the published ones (else the checkpoint's betas are used), and a
    LatentDiffusion's first stage is inferred from its weights (``scale_factor``: LatentDiffusion's, needed unless
    the checkpoint has a ``scale_factor`` buffer); its cond stage is then kept verbatim (its class is not in the
    weights). ``tokenizer_path`` / ``open_clip_config`` override the cond stage's local-file lookups.
    """
    if output_dir is None:
        raise ValueError("output_dir is required")
    checkpoint = load_checkpoint(ckpt_path)
    state_dict = state_dict_of(checkpoint, ckpt_path)
    container = "lightning" if "state_dict" in checkpoint else "bare"
    entries = {k: v for k, v in checkpoint.items() if k != "state_dict"} if container == "lightning" else {}
    position = list(checkpoint).index("state_dict") if container == "lightning" else 0
    if config_path is not None:
        config = to_plain(load_ldm_config(config_path))
        check_model_params(config["model"]["params"], str(config_path))
        config_text = Path(config_path).read_text()
    else:
        config = inferred_config(state_dict, unet_options, scale_factor, str(ckpt_path))
        config_text = None
    return write_folder(
        state_dict, config, output_dir, entries=entries, config_text=config_text, use_ema=use_ema,
        overwrite=overwrite, schedule_mismatch=schedule_mismatch, unet_options=unet_options, source=str(ckpt_path),
        container=container, state_dict_position=position, search_dirs=search_dirs_for(config_path),
        tokenizer_path=tokenizer_path, open_clip_config=open_clip_config,
    )  # fmt: skip


def inferred_config(state_dict: Mapping[str, torch.Tensor], unet_options: Mapping | None, scale_factor: float | None,
                    source: str) -> dict:  # fmt: skip
    """The config the weights determine (no YAML): a DDPM, or a LatentDiffusion when there is a first stage."""
    from ldm_compat.convert.infer_config import infer_conditioning_key, infer_first_stage_config, infer_unet_params

    timesteps = int(state_dict["betas"].shape[0]) if "betas" in state_dict else 1000
    params: dict[str, Any] = {"timesteps": timesteps, "_inferred_schedule": True}
    parts = OriginalStateDict.split(state_dict)
    if not parts.first_stage:
        return {"model": {"target": DDPM_TARGET, "params": params}}
    if parts.scale_factor is None and scale_factor is None:
        raise ValueError(
            f"{source}: LatentDiffusion's scale_factor is not in the weights (no scale_factor buffer): pass "
            "--scale-factor (SD 1.x/2.x: 0.18215; the LDM VQ models: 1.0) or give the original YAML with --config"
        )
    if parts.scale_factor is not None and scale_factor is not None:
        logger.warning("%s: the checkpoint's scale_factor buffer (%s) is used, not --scale-factor %s", source,
                       float(parts.scale_factor), scale_factor)  # fmt: skip
    unet_params = infer_unet_params(parts.unet, **dict(unet_options or {}))
    first_stage = {k[len(FIRST_STAGE_PREFIX) :]: v for k, v in parts.first_stage.items()}
    params.update(
        first_stage_config=infer_first_stage_config(first_stage),
        unet_config={"target": UNET_TARGET, "params": unet_params},
        conditioning_key=infer_conditioning_key(unet_params),
        scale_by_std=parts.scale_factor is not None,  # the original registers the buffer only then
        scale_factor=1.0 if parts.scale_factor is not None else float(scale_factor),
        image_size=unet_params.get("image_size"),
        channels=unet_params["out_channels"],
    )
    if not parts.cond_stage and params["conditioning_key"] is None:
        params["cond_stage_config"] = "__is_unconditional__"
    return {"model": {"target": LATENT_TARGETS[0], "params": params}}
