"""The pipeline folder format: what ``LDMCompatPipeline.save_pretrained`` writes and what loading accepts.

A folder is a standard diffusers pipeline folder (tensors in safetensors unless ``safe_serialization=False``)::

    model_index.json                         _class_name, components, the pipeline config (see below)
    unet/config.json                         LDMUNetModel config (the original unet_config params)
    unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json          LDMDDPMScheduler config
    ldm_compat_pipeline.py, unet/ldm_compat_LDMUNetModel.py, scheduler/ldm_compat_LDMDDPMScheduler.py
                                             loader files: only in folders no stock pipeline runs (below)
    ldm_extras/                              reserved for ldm_compat (conversion/export, model card facts)
    sample_grid.png                          reserved: the model card's sample image
    README.md                                the model card (written when pushing)

Two kinds of folder, chosen by ``stock.stock_pipeline_for``:

- **Stock** (e.g. unconditional pixel models): ``_class_name`` is the diffusers pipeline that runs the model
  (``"DDPMPipeline"``) and our components are named ``["ldm_compat", "LDMUNetModel"]`` /
  ``["ldm_compat", "LDMDDPMScheduler"]``. Plain ``DiffusionPipeline.from_pretrained(folder)`` loads it with no
  flag and no code in the folder: diffusers looks the classes (and their ``ModelMixin`` / ``SchedulerMixin`` bases)
  up in the ``ldm_compat`` package. diffusers up to 0.42.0 imports that package by name; 0.42.1 only takes it from
  ``sys.modules``, which is why ``ldm_compat`` registers ``ldm_compat_autoload`` as a ``torch.backends`` entry
  point: installed, it is imported together with torch (see ``ldm_compat_autoload``).
- **Own pipeline** (conditioning, a sample shape other than the UNet's): ``_class_name`` is
  ``["ldm_compat_pipeline", "LDMCompatPipeline"]`` (diffusers' notation for a pipeline class in a folder file) and
  each of our components is named after its loader file (``["ldm_compat_LDMUNetModel", "LDMUNetModel"]``). A loader
  file is one line, ``from ldm_compat.<module> import <Class>``; plain diffusers runs them with
  ``trust_remote_code=True`` (for local folders and Hub repos alike).

``LDMCompatPipeline.from_pretrained`` loads both kinds, and the older folders naming our modules directly
(``["ldm_compat.models.unet_ldm", "LDMUNetModel"]``), with no flag and without running folder code: it checks that
every ``.py`` file is exactly such a loader file (``check_loader_files``), points each of our components at the
package (``importable_index``) and hands the rest to ``DiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ldm_compat.pipelines.stock import DROPPED_KEYS, LATENT_KEYS, STOCK_ENTRIES

MODEL_INDEX = "model_index.json"
EXTRAS_DIR = "ldm_extras"
ORIGINAL_CONFIG_FILE = f"{EXTRAS_DIR}/config.yaml"
TRAINING_FACTS_FILE = f"{EXTRAS_DIR}/training.json"
SAMPLE_GRID_FILE = "sample_grid.png"
MODEL_CARD_FILE = "README.md"

#: pipeline-level config keys (``register_to_config`` on the pipeline), with the original ``DDPM`` names
PIPELINE_CONFIG_KEYS = ("conditioning_key", "image_size", "channels")
#: the latent-model config keys (original ``LatentDiffusion`` names); left out of ``model_index.json`` at their
#: defaults, so pixel-model folders are as before
LATENT_CONFIG_KEYS = LATENT_KEYS
LATENT_CONFIG_DEFAULTS = {"first_stage_config": None, "cond_stage_config": None, "scale_by_std": False,
                          "concat_keys": None, "masked_image_key": None}  # fmt: skip
#: the optional latent components; an absent one (``[null, null]``) is left out of ``model_index.json``
LATENT_COMPONENT_NAMES = ("vae", "vqvae", "text_encoder", "tokenizer", "bert", "class_embedder")
#: where a stock folder keeps the ``LDMCompatPipeline`` config its stock class does not take (diffusers ignores keys
#: starting with ``_``; ``LDMCompatPipeline.load_config`` puts them back)
STOCK_EXTRAS_KEY = "_ldm_compat"

#: what ``LDMCompatPipeline.download`` fetches from a Hub repo: configs, safetensors weights, loader files, extras;
#: tokenizer vocabularies are .json (CLIP vocab.json, tokenizer.json) and .txt (CLIP merges.txt, BERT vocab.txt),
#: and whatever else a tokenizer folder holds
DOWNLOAD_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.py", "tokenizer/*", f"{EXTRAS_DIR}/*"]

#: weight formats that unpickle on load; never written, pushed or downloaded by ldm_compat
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")

ROOT_LIBRARY = "ldm_compat"
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


def _root_export(class_name: str) -> type | None:
    """``ldm_compat.<class_name>`` when the package exports it (what a ``["ldm_compat", name]`` entry resolves to)."""
    import ldm_compat

    return getattr(ldm_compat, class_name) if class_name in ldm_compat.__all__ else None


def _entry_library(folder: Path | None, name: str, library: str, class_name: str) -> str | None:
    """The ldm_compat module a component entry points at (a loader file is followed), else ``None``."""
    if library.startswith(LOADER_PREFIX):
        if folder is None:
            return None
        path = folder / name / f"{library}.py"
        match = _LOADER_LINE.search(path.read_text(encoding="utf-8")) if path.is_file() else None
        if match is None or match.group(2) != class_name:
            raise ValueError(f"{name}/{library}.py: missing, or it does not provide {class_name} (model_index.json)")
        return match.group(1)
    if library == ROOT_LIBRARY or library.startswith(ROOT_LIBRARY + "."):
        return library
    return None


def component_class(folder: str | os.PathLike | None, index: dict, name: str) -> type | None:
    """The ldm_compat class of component ``name`` (by the package, its module or its loader file), else ``None``.

    Call ``check_loader_files`` first: only verified ``from ldm_compat.… import …`` lines are followed. ``folder``
    may be ``None`` (loader-file entries then give ``None``).
    """
    import importlib

    library, class_name = index[name]
    module_name = _entry_library(None if folder is None else Path(folder), name, library, class_name)
    if module_name is None:
        return None
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ValueError(f"model_index.json: {module_name} has no class {class_name!r} (component {name!r})")
    return cls


def importable_index(folder: str | os.PathLike | None, index: dict) -> dict:
    """A copy of ``model_index.json`` in which diffusers can import every ldm_compat component in this process.

    Each of our components is named ``["ldm_compat", class]`` when the package exports the class, else by the
    (imported) module that defines it — never by its loader file, so diffusers runs no folder code.
    ``_class_name`` becomes a plain class name (``[file, class]`` would make diffusers import the pipeline file).
    """
    index = dict(index)
    if isinstance(index.get("_class_name"), (list, tuple)):
        index["_class_name"] = index["_class_name"][1]
    for key, value in (index.pop(STOCK_EXTRAS_KEY, None) or {}).items():
        index.setdefault(key, value)
    for name in component_folders(index):
        cls = component_class(folder, index, name)
        if cls is not None:
            library = ROOT_LIBRARY if _root_export(cls.__name__) is cls else cls.__module__
            index[name] = [library, cls.__name__]
    return index


def finalize_folder(save_directory: str | os.PathLike, pipeline_class: type, stock_class: str | None) -> dict:
    """Turn a folder freshly written by ``DiffusionPipeline.save_pretrained`` into the ldm_compat format.

    ``stock_class`` (from ``stock.stock_pipeline_for``): the diffusers pipeline named as ``_class_name``; its
    ``DROPPED_KEYS`` leave the index (those not at their defaults are kept under ``_ldm_compat``), its
    ``STOCK_ENTRIES`` are added, and our components are named by the ``ldm_compat`` package (a component the
    package does not export gets a loader file). ``None``: ``_class_name`` names ``pipeline_class`` through its
    loader file, and so does every ldm_compat component. Components from other libraries (diffusers' own,
    transformers') are left as diffusers wrote them; absent latent components and latent keys at their defaults
    are left out.
    """
    folder = Path(save_directory)
    path = folder / MODEL_INDEX
    index = json.loads(path.read_text())
    for name in LATENT_COMPONENT_NAMES:
        if index.get(name) in ([None, None], None):
            index.pop(name, None)
    for key, default in LATENT_CONFIG_DEFAULTS.items():
        if key in index and index[key] == default:
            index.pop(key)
    for name in component_folders(index):
        library, class_name = index[name]
        if not library.startswith(ROOT_LIBRARY + "."):
            continue
        if stock_class is not None and _root_export(class_name) is component_class(folder, index, name):
            index[name] = [ROOT_LIBRARY, class_name]
            continue
        module = LOADER_PREFIX + class_name
        (folder / name / f"{module}.py").write_text(loader_text(library, class_name))
        index[name] = [module, class_name]
    if stock_class is not None:
        index["_class_name"] = stock_class
        kept = {key: index.pop(key) for key in DROPPED_KEYS[stock_class] if key in index}
        # image_size / channels: the stock class is only named when the UNet's sizes (the defaults) give them
        kept = {k: v for k, v in kept.items() if v is not None and k not in ("image_size", "channels")}
        if kept:
            index[STOCK_EXTRAS_KEY] = kept
        index.update(STOCK_ENTRIES.get(stock_class, {}))
    elif pipeline_class.__module__.startswith(ROOT_LIBRARY + "."):
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


def names_loader_files(index: dict) -> bool:
    """Whether ``model_index.json`` names a loader file (then plain diffusers asks for ``trust_remote_code``)."""
    if isinstance(index.get("_class_name"), (list, tuple)):
        return True
    return any(index[name][0].startswith(LOADER_PREFIX) for name in component_folders(index))


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
