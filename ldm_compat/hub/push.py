"""Pushing a pipeline folder to the Hugging Face Hub with a rendered model card (``ldm-compat push DIR REPO_ID``).

Only the pipeline is uploaded — ``model_index.json``, the pipeline loader file, the component folders it names,
``ldm_extras/`` and the sample grid — never training state (``checkpoint-*/``, optimizer files, logs, original
``.ckpt`` files) that a training output folder may also contain. Pickle-based weight files inside those paths are
refused, and so is any ``.py`` file that is not one of ldm_compat's loader files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ldm_compat.pipelines import folder as folder_format


def files_to_push(folder: str | os.PathLike) -> list[str]:
    """Relative paths (POSIX) of the files ``push_folder`` uploads, besides the rendered ``README.md``."""
    folder = Path(folder)
    index = folder_format.read_model_index(folder)
    folder_format.check_loader_files(folder)  # the only code a pushed folder may hold is our loader files
    roots = [*folder_format.component_folders(index), folder_format.EXTRAS_DIR]
    paths = [folder_format.MODEL_INDEX]
    if isinstance(index["_class_name"], list) and (folder / f"{index['_class_name'][0]}.py").is_file():
        paths.append(f"{index['_class_name'][0]}.py")
    if (folder / folder_format.SAMPLE_GRID_FILE).is_file():
        paths.append(folder_format.SAMPLE_GRID_FILE)
    for root in roots:
        base = folder / root
        if not base.is_dir():
            if root != folder_format.EXTRAS_DIR:
                raise FileNotFoundError(f"{base}: component folder named in model_index.json is missing")
            continue
        for path in sorted(base.rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts or path.name.startswith("."):
                continue
            rel = path.relative_to(folder).as_posix()
            if path.suffix in folder_format.PICKLE_SUFFIXES:
                raise ValueError(f"{rel}: pickle-based weights are not pushed; save with safetensors instead")
            paths.append(rel)
    return paths


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    license: str | None = None,
    training: Mapping | None = None,
    model_description: str | None = None,
    export_command: str | None = None,
):
    """Create ``repo_id`` if needed and upload the pipeline folder plus a model card, in one commit.

    The card is rendered from the folder (``ldm_compat.hub.model_card.render_model_card``); a ``README.md`` already
    in the folder is replaced in the repo, not modified on disk. Returns the ``huggingface_hub.CommitInfo`` (a
    ``str`` whose value is the commit URL).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from ldm_compat.hub.model_card import render_model_card

    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"repo_id: expected 'name' or 'namespace/name', got {repo_id!r}")
    folder = Path(folder)
    paths = files_to_push(folder)
    card = render_model_card(
        folder,
        repo_id,
        license=license,
        training=training,
        model_description=model_description,
        export_command=export_command,
    )
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p in paths]
    operations.append(
        CommitOperationAdd(path_in_repo=folder_format.MODEL_CARD_FILE, path_or_fileobj=str(card).encode())
    )
    return api.create_commit(
        repo_url.repo_id,
        operations,
        commit_message=commit_message or "Upload ldm_compat pipeline",
        revision=revision,
        create_pr=create_pr,
    )


def run(args) -> int:
    """``ldm-compat push DIR REPO_ID``: the CLI entry (see ``ldm_compat.cli``)."""
    import json

    folder = Path(args.folder)
    folder_format.read_model_index(folder)  # a one-line error before anything else when DIR is not a pipeline
    training = json.loads(args.training) if args.training else None
    if training is not None and not isinstance(training, dict):
        raise ValueError('--training: expected a JSON object, e.g. \'{"steps": 10000, "hardware": "1x A100"}\'')
    if args.samples:
        write_sample_grid(folder, args.samples, args.num_inference_steps, args.seed)
    info = push_folder(
        folder,
        args.repo_id,
        token=args.token,
        private=args.private,
        revision=args.revision,
        commit_message=args.message,
        create_pr=args.create_pr,
        license=args.license,
        training=training,
    )
    print(f"ldm-compat push: {folder} -> {info}")
    return 0


def write_sample_grid(
    folder: str | os.PathLike, num_samples: int, num_inference_steps: int | None = None, seed: int = 0
) -> Path:
    """Sample ``num_samples`` images with the folder's pipeline and store them as the card's ``sample_grid.png``.

    Only unconditional models (conditioning inputs cannot be invented). Returns the grid's path.
    """
    import torch

    from ldm_compat.hub.model_card import write_card_extras
    from ldm_compat.pipelines import LDMCompatPipeline

    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"--samples: expected a positive number of images, got {num_samples!r}")
    pipe = LDMCompatPipeline.from_pretrained(folder)
    if pipe.config.conditioning_key is not None:
        raise ValueError("--samples: only unconditional models can be sampled without conditioning inputs")
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = pipe(batch_size=num_samples, num_inference_steps=num_inference_steps, generator=generator).images
    write_card_extras(folder, samples=images)
    return Path(folder) / folder_format.SAMPLE_GRID_FILE
