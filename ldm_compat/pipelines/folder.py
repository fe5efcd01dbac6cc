"""The pipeline folder format: what ``LDMCompatPipeline.save_pretrained`` writes and what loading accepts.

A folder is a standard diffusers pipeline folder (every tensor in safetensors)::

    model_index.json                     _class_name, components, and the pipeline config (see below)
    unet/config.json                     LDMUNetModel config (the original unet_config params)
    unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json      LDMDDPMScheduler config
    ldm_extras/                          reserved for ldm_compat (conversion/export, model card facts)
    sample_grid.png                      reserved: the model card's sample image
    README.md                            the model card (written when pushing)

``_class_name`` is ``"DDPMPipeline"`` when a stock ``DDPMPipeline`` samples the model the same way (unconditional,
sample shape = the UNet's ``sample_size`` × ``in_channels``), so ``DiffusionPipeline.from_pretrained(folder)`` works
with only ``diffusers`` imported; otherwise it is ``"LDMCompatPipeline"``. ``LDMCompatPipeline.from_pretrained``
ignores ``_class_name`` (diffusers uses the class it is called on), so it loads both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MODEL_INDEX = "model_index.json"
EXTRAS_DIR = "ldm_extras"
ORIGINAL_CONFIG_FILE = f"{EXTRAS_DIR}/config.yaml"
TRAINING_FACTS_FILE = f"{EXTRAS_DIR}/training.json"
SAMPLE_GRID_FILE = "sample_grid.png"
MODEL_CARD_FILE = "README.md"

#: pipeline-level config keys (``register_to_config`` on the pipeline), with the original ``DDPM`` names
PIPELINE_CONFIG_KEYS = ("conditioning_key", "image_size", "channels")

#: what ``LDMCompatPipeline.download`` fetches from a Hub repo: configs, safetensors weights and the extras
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", f"{EXTRAS_DIR}/*"]

#: weight formats that unpickle on load; never written, pushed or downloaded by ldm_compat
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")

STOCK_CLASS_NAME = "DDPMPipeline"


def runs_as_stock_ddpm(conditioning_key, image_size, channels, unet_config) -> bool:
    """Whether diffusers' ``DDPMPipeline`` draws the same samples: unconditional, shape taken from the UNet config."""
    if conditioning_key is not None:
        return False
    sample_size = unet_config.get("sample_size")
    if isinstance(sample_size, (list, tuple)):
        sample_size = tuple(sample_size)
    size_ok = (
        image_size is None
        or image_size == sample_size
        or (isinstance(sample_size, tuple) and (image_size, image_size) == sample_size)
    )
    channels_ok = channels is None or channels == unet_config.get("in_channels")
    return bool(size_ok and channels_ok)


def rewrite_model_index(save_directory: str | os.PathLike, stock: bool) -> dict:
    """Set ``_class_name`` in a freshly saved ``model_index.json``; for the stock name, drop the pipeline-only keys.

    The dropped keys are all at their defaults in that case (``runs_as_stock_ddpm``), so nothing is lost, and
    ``DDPMPipeline`` would otherwise be handed config keys it does not take.
    """
    path = Path(save_directory) / MODEL_INDEX
    index = json.loads(path.read_text())
    if stock:
        index["_class_name"] = STOCK_CLASS_NAME
        for key in PIPELINE_CONFIG_KEYS:
            index.pop(key, None)
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def read_model_index(folder: str | os.PathLike) -> dict:
    """``model_index.json`` of a pipeline folder, with a one-line error when the folder is not one."""
    path = Path(folder) / MODEL_INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a pipeline folder (no {MODEL_INDEX})")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(index, dict) or "_class_name" not in index:
        raise ValueError(f"{path}: expected a diffusers model_index.json with '_class_name'")
    return index


def component_folders(index: dict) -> list[str]:
    """The component subfolders named in ``model_index.json`` (entries ``[library, class]`` that are not null)."""
    return sorted(
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None
    )


def download(repo_id: str, **kwargs) -> str:
    """Download a pipeline repo (configs, safetensors weights, ``ldm_extras/``) and return the local folder.

    This replaces ``DiffusionPipeline.download``, which refuses components whose library is not diffusers /
    transformers (huggingface/diffusers#5553). Accepted keyword arguments are those of ``from_pretrained``
    (``cache_dir``, ``force_download``, ``proxies``, ``local_files_only``, ``token``, ``revision``); the others are
    ignored here and handled by ``from_pretrained``.
    """
    from huggingface_hub import snapshot_download

    if kwargs.get("custom_pipeline") is not None:
        raise ValueError("custom_pipeline: not supported by LDMCompatPipeline.from_pretrained (it is the pipeline)")
    if kwargs.get("use_safetensors") is False:
        raise ValueError("use_safetensors=False: ldm_compat folders hold safetensors weights only")
    keep = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
    options = {k: kwargs[k] for k in keep if kwargs.get(k) is not None}
    return snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS, **options)
