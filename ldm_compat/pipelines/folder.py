"""The pipeline folder format: what ``LDMCompatPipeline.save_pretrained`` writes and what loading accepts.

A folder is a standard diffusers pipeline folder (every tensor in safetensors)::

    model_index.json                         _class_name, components, the pipeline config (see below)
    ldm_compat_pipeline.py                   loader file (not for DDPMPipeline folders, see below)
    unet/config.json                         LDMUNetModel config (the original unet_config params)
    unet/diffusion_pytorch_model.safetensors
    unet/ldm_compat_LDMUNetModel.py          loader file
    scheduler/scheduler_config.json          LDMDDPMScheduler config
    scheduler/ldm_compat_LDMDDPMScheduler.py loader file
    ldm_extras/                              reserved for ldm_compat (conversion/export, model card facts)
    sample_grid.png                          reserved: the model card's sample image
    README.md                                the model card (written when pushing)

Loader files. diffusers (0.42) imports a component's class only from diffusers/transformers or from a module the
caller has already imported — or from a ``<component>/<module>.py`` file in the folder when the caller passes
``trust_remote_code=True``. Each loader file is one line, ``from ldm_compat.<module> import <Class>``, so plain
``DiffusionPipeline.from_pretrained(folder_or_repo_id, trust_remote_code=True)`` works with only ``diffusers``
imported (``ldm_compat`` must be installed), for local folders and Hub repos alike. ``LDMCompatPipeline.
from_pretrained`` needs no flag: it checks that every ``.py`` file in the folder is exactly such a loader file
before diffusers runs it (``check_loader_files``).

``_class_name`` is ``"DDPMPipeline"`` when a stock ``DDPMPipeline`` samples the model the same way (unconditional,
sample shape = the UNet's ``sample_size`` × ``in_channels``); otherwise ``["ldm_compat_pipeline",
"LDMCompatPipeline"]`` (diffusers' notation for a pipeline class in a folder file). ``LDMCompatPipeline.
from_pretrained`` loads both.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

MODEL_INDEX = "model_index.json"
EXTRAS_DIR = "ldm_extras"
ORIGINAL_CONFIG_FILE = f"{EXTRAS_DIR}/config.yaml"
TRAINING_FACTS_FILE = f"{EXTRAS_DIR}/training.json"
SAMPLE_GRID_FILE = "sample_grid.png"
MODEL_CARD_FILE = "README.md"

#: pipeline-level config keys (``register_to_config`` on the pipeline), with the original ``DDPM`` names
PIPELINE_CONFIG_KEYS = ("conditioning_key", "image_size", "channels")

#: what ``LDMCompatPipeline.download`` fetches from a Hub repo: configs, safetensors weights, loader files, extras
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.py", f"{EXTRAS_DIR}/*"]

#: weight formats that unpickle on load; never written, pushed or downloaded by ldm_compat
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")

STOCK_CLASS_NAME = "DDPMPipeline"
PIPELINE_LOADER_MODULE = "ldm_compat_pipeline"
LOADER_PREFIX = "ldm_compat_"

_LOADER_HEADER = (
    '"""Loader file written by ldm_compat. diffusers runs it (trust_remote_code=True) to find {name};\n'
    'it only imports the installed ldm_compat package (pip install ldm_compat)."""\n\n'
)
_LOADER_LINE = re.compile(r"from (ldm_compat(?:\.[a-z_][a-z0-9_]*)+) import ([A-Za-z_][A-Za-z0-9_]*)  # noqa: F401\n\Z")


def loader_text(module: str, name: str) -> str:
    """The content of a loader file that re-exports ``module.name``."""
    return _LOADER_HEADER.format(name=name) + f"from {module} import {name}  # noqa: F401\n"


def check_loader_files(folder: str | os.PathLike) -> None:
    """Raise ``ValueError`` unless every ``.py`` file in the folder is an ldm_compat loader file.

    A loader file is exactly ``loader_text(module, name)`` with ``module`` inside the ``ldm_compat`` package, so
    running it only imports installed ldm_compat code. This is what lets ``LDMCompatPipeline.from_pretrained`` pass
    ``trust_remote_code=True`` to diffusers safely.
    """
    folder = Path(folder)
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(folder).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = ""
        match = _LOADER_LINE.search(text)
        if match is None or text != loader_text(match.group(1), match.group(2)):
            raise ValueError(
                f"{rel}: not an ldm_compat loader file; refusing to run code from the folder "
                "(load it with diffusers and trust_remote_code=True only if you trust it)"
            )


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


def component_class(folder: str | os.PathLike, index: dict, name: str) -> type | None:
    """The ldm_compat class of component ``name`` (via its checked loader file or its module path), else ``None``.

    Call ``check_loader_files`` first: only verified ``from ldm_compat.… import …`` lines are followed.
    """
    import importlib

    library, class_name = index[name]
    if library.startswith(LOADER_PREFIX):
        path = Path(folder) / name / f"{library}.py"
        match = _LOADER_LINE.search(path.read_text(encoding="utf-8")) if path.is_file() else None
        if match is None or match.group(2) != class_name:
            raise ValueError(f"{name}/{library}.py: missing, or it does not provide {class_name} (model_index.json)")
        library = match.group(1)
    elif not library.startswith("ldm_compat."):
        return None
    module = importlib.import_module(library)
    if not hasattr(module, class_name):
        raise ValueError(f"model_index.json: {library} has no class {class_name!r} (component {name!r})")
    return getattr(module, class_name)


def alias_loader_modules(folder: str | os.PathLike, index: dict) -> None:
    """Make the loader-file module names of a checked folder importable as the modules they re-export.

    diffusers checks a component passed to ``from_pretrained`` by importing the library named in
    ``model_index.json`` from ``sys.modules``; for a loader file that library is the file's module name.
    """
    import sys

    for name in component_folders(index):
        library = index[name][0]
        if library.startswith(LOADER_PREFIX) and library not in sys.modules:
            cls = component_class(folder, index, name)
            sys.modules[library] = sys.modules[cls.__module__]


def finalize_folder(save_directory: str | os.PathLike, pipeline_class: type, stock: bool) -> dict:
    """Turn a folder freshly written by ``DiffusionPipeline.save_pretrained`` into the ldm_compat format.

    Writes the loader files and points ``model_index.json`` at them; sets ``_class_name`` (``DDPMPipeline`` when
    ``stock``, whose pipeline-only keys are then dropped: they are at their defaults, and ``DDPMPipeline`` takes none).
    Components from other libraries (diffusers' own, or user code) are left as diffusers wrote them.
    """
    folder = Path(save_directory)
    path = folder / MODEL_INDEX
    index = json.loads(path.read_text())
    for name in component_folders(index):
        library, class_name = index[name]
        if library.startswith("ldm_compat."):
            module = LOADER_PREFIX + class_name
            (folder / name / f"{module}.py").write_text(loader_text(library, class_name))
            index[name] = [module, class_name]
    if stock:
        index["_class_name"] = STOCK_CLASS_NAME
        for key in PIPELINE_CONFIG_KEYS:
            index.pop(key, None)
    elif pipeline_class.__module__.startswith("ldm_compat."):
        (folder / f"{PIPELINE_LOADER_MODULE}.py").write_text(
            loader_text(pipeline_class.__module__, pipeline_class.__name__)
        )
        index["_class_name"] = [PIPELINE_LOADER_MODULE, pipeline_class.__name__]
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def pipeline_class_name(index: dict) -> str:
    """The pipeline class named by ``model_index.json`` (``_class_name`` may be ``[module, class]``)."""
    name = index["_class_name"]
    return name[1] if isinstance(name, (list, tuple)) else name


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


#: subfolders ``ldm-compat convert`` writes for a LatentDiffusion's first and cond stage; not pipeline components
#: yet (model_index.json does not list them), each loads with its own class (``AutoencoderKL.from_pretrained(folder,
#: subfolder="vae")``, ``CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")``, …)
LATENT_STAGE_FOLDERS = ("vae", "vqvae", "text_encoder", "tokenizer", "bert", "class_embedder")


def unlisted_stage_folders(folder: str | os.PathLike, index: dict) -> list[str]:
    """The latent-stage subfolders present in ``folder`` that ``model_index.json`` does not list."""
    listed = set(component_folders(index))
    return [name for name in LATENT_STAGE_FOLDERS if name not in listed and (Path(folder) / name).is_dir()]


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
