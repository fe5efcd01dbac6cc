"""Model cards for pushed pipeline folders, rendered from ``model_card_template.md`` (Jinja2).

The template ships inside the package (``ldm_compat/model_card_template.md``, package data); the copy at the
repository root is the same file, kept identical by a test. Everything the card shows is read from the folder
itself — ``model_index.json``, ``unet/config.json``, ``scheduler/scheduler_config.json`` and the reserved
``ldm_extras/config.yaml`` (original YAML) and ``ldm_extras/training.json`` (training facts) — plus what the caller
passes (license, description, extra training facts). No weights are loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ldm_compat.pipelines import folder as folder_format

TEMPLATE_NAME = "model_card_template.md"

PARAMETERIZATION_NAMES = {
    "eps": "the UNet predicts the noise ε",
    "x0": "the UNet predicts the clean sample x₀",
    "v": "the UNet predicts v = √ᾱ·ε − √(1−ᾱ)·x₀",
}
_PARAMETERIZATION_OF_PREDICTION_TYPE = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}

# UNet settings worth a line on the card, in this order (original openaimodel names; diffusers UNets' own names)
_UNET_SUMMARY_KEYS = (
    "model_channels",
    "channel_mult",
    "num_res_blocks",
    "attention_resolutions",
    "num_heads",
    "num_head_channels",
    "use_spatial_transformer",
    "transformer_depth",
    "use_scale_shift_norm",
    "resblock_updown",
    "dropout",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
)

PIPELINE_TAG_UNCONDITIONAL = "unconditional-image-generation"


def template_text() -> str:
    """The model card template shipped in the package."""
    return resources.files("ldm_compat").joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def _read_original_config(folder: Path) -> tuple[str | None, dict]:
    path = folder / folder_format.ORIGINAL_CONFIG_FILE
    if not path.is_file():
        return None, {}
    text = path.read_text()
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not a readable YAML file ({type(err).__name__})") from None
    params = config.get("model", {}).get("params", {}) if isinstance(config, dict) else {}
    return text.strip(), params if isinstance(params, dict) else {}


def _schedule(scheduler_config: dict, original_params: dict) -> dict:
    """The original schedule keys: from the original YAML when present, else translated from the scheduler config."""
    keys = ("timesteps", "beta_schedule", "linear_start", "linear_end", "cosine_s", "given_betas")
    keys += ("v_posterior", "parameterization", "clip_denoised", "log_every_t")
    schedule: dict[str, Any] = {}
    if scheduler_config:
        try:
            from ldm_compat.schedulers.ldm_config import config_to_ldm_params

            schedule = config_to_ldm_params(scheduler_config)
        except (ImportError, KeyError, ValueError):
            # a stock diffusers scheduler: show its own keys under their diffusers names
            schedule = {
                "timesteps": scheduler_config.get("num_train_timesteps"),
                "beta_schedule (diffusers name)": scheduler_config.get("beta_schedule"),
                "beta_start": scheduler_config.get("beta_start"),
                "beta_end": scheduler_config.get("beta_end"),
                "parameterization": _PARAMETERIZATION_OF_PREDICTION_TYPE.get(
                    scheduler_config.get("prediction_type"), scheduler_config.get("prediction_type")
                ),
            }
    schedule.update({k: original_params[k] for k in keys if k in original_params})
    if schedule.get("given_betas") is not None:
        schedule["given_betas"] = f"{len(schedule['given_betas'])} values (in the scheduler config)"
    return {k: v for k, v in schedule.items() if v is not None}


def _format(value) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_format(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value)
    return str(value)


def card_context(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    license: str | None = None,
    training: Mapping | None = None,
    model_description: str | None = None,
    export_command: str | None = None,
) -> dict[str, Any]:
    """Everything the template needs, read from a pipeline folder (see the module docstring)."""
    folder = Path(folder)
    index = folder_format.read_model_index(folder)
    unet_config = _read_json(folder / "unet" / "config.json")
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
    original_yaml, original_params = _read_original_config(folder)
    facts = {**_read_json(folder / folder_format.TRAINING_FACTS_FILE), **dict(training or {})}

    key = index.get("conditioning_key")
    image_size = index.get("image_size") or unet_config.get("sample_size") or original_params.get("image_size")
    channels = index.get("channels")
    if channels is None:
        concat_model = key in ("concat", "hybrid", "hybrid-adm")
        channels = unet_config.get("out_channels" if concat_model else "in_channels")
    in_channels = unet_config.get("in_channels")
    concat_channels = (in_channels - channels) if key in ("concat", "hybrid", "hybrid-adm") and in_channels else None
    num_classes = unet_config.get("num_classes", unet_config.get("num_class_embeds"))
    context_dim = unet_config.get("context_dim", unet_config.get("cross_attention_dim"))

    schedule = _schedule(scheduler_config, original_params)
    parameterization = schedule.get("parameterization", "eps")
    license = license or facts.pop("license", None)
    facts.pop("license", None)
    return {
        "repo_id": repo_id,
        "model_description": model_description,
        "pipeline_class": folder_format.pipeline_class_name(index),
        # plain diffusers needs trust_remote_code=True exactly when model_index.json names a loader file
        "remote_code": folder_format.names_loader_files(index),
        "scheduler_class": (index.get("scheduler") or [None, "?"])[1],
        "unet": {
            "class_name": (index.get("unet") or [None, "?"])[1],
            "summary": {k: _format(unet_config[k]) for k in _UNET_SUMMARY_KEYS if unet_config.get(k) is not None},
        },
        "conditioning": {
            "key": key,
            "image_size": image_size,
            "channels": channels,
            "context_dim": context_dim,
            "num_classes": num_classes,
            "concat_channels": concat_channels,
        },
        "schedule": schedule,
        "parameterization": parameterization,
        "parameterization_name": PARAMETERIZATION_NAMES.get(parameterization, parameterization),
        "training": {k: _format(v) for k, v in facts.items() if v is not None},
        "original_config_yaml": original_yaml,
        "sample_grid": folder_format.SAMPLE_GRID_FILE if (folder / folder_format.SAMPLE_GRID_FILE).is_file() else None,
        "license": license,
        "export_command": export_command,  # None: the template's `hf download` + `ldm-compat export` lines
        "datasets": [facts["dataset"]] if isinstance(facts.get("dataset"), str) else None,
    }


def render_model_card(folder: str | os.PathLike, repo_id: str, **kwargs):
    """Render the card for a pipeline folder: a ``huggingface_hub.ModelCard`` (``str(card)`` is the README).

    Keyword arguments are those of ``card_context``. The YAML header carries ``library_name: diffusers``, the
    license, tags (``ldm_compat``, ``latent-diffusion``, the parameterization and conditioning) and, for
    unconditional models, ``pipeline_tag: unconditional-image-generation``.
    """
    from huggingface_hub import ModelCard, ModelCardData

    context = card_context(folder, repo_id, **kwargs)
    key = context["conditioning"]["key"]
    tags = ["ldm_compat", "latent-diffusion", "ddpm", f"parameterization-{context['parameterization']}"]
    tags.append(f"conditioning-{key}" if key else PIPELINE_TAG_UNCONDITIONAL)
    card_data = ModelCardData(
        library_name="diffusers",
        license=context["license"],
        tags=tags,
        datasets=context.pop("datasets"),
        pipeline_tag=PIPELINE_TAG_UNCONDITIONAL if key is None else None,
    )
    return ModelCard.from_template(card_data, template_str=template_text(), **context)


def write_card_extras(
    folder: str | os.PathLike,
    *,
    training: Mapping | None = None,
    original_config: Mapping | str | None = None,
    samples=None,
) -> None:
    """Store card inputs in a pipeline folder: ``ldm_extras/training.json``, ``ldm_extras/config.yaml`` and
    ``sample_grid.png`` (a grid of ``samples``, a list of PIL images; square-ish layout)."""
    folder = Path(folder)
    if training:
        path = folder / folder_format.TRAINING_FACTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read_json(path), **dict(training)}
        path.write_text(json.dumps(merged, indent=2, sort_keys=True, default=str) + "\n")
    if original_config is not None:
        path = folder / folder_format.ORIGINAL_CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        if not isinstance(original_config, str):
            from ldm_compat.config import to_plain

            original_config = yaml.safe_dump(to_plain(original_config), sort_keys=False)
        path.write_text(original_config)
    if samples is not None:
        sample_grid(samples).save(folder / folder_format.SAMPLE_GRID_FILE)


def sample_grid(images):
    """A grid (rows ≤ columns) of PIL images."""
    from diffusers.utils import make_image_grid

    images = list(images)
    if not images:
        raise ValueError("samples: expected at least one image for the sample grid")
    cols = 1
    while cols * cols < len(images):
        cols += 1
    rows = -(-len(images) // cols)
    blank = images[0].copy()
    blank.paste(0, (0, 0, *blank.size))
    return make_image_grid(images + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)
