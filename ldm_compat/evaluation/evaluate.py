"""``ldm-compat evaluate DIR``: sample a trained digits pipeline (or read a folder of images) and score the images."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from ldm_compat.evaluation.metrics import METRIC_DESCRIPTIONS, evaluate_samples, real_reference_scores

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_image_folder(folder: str, limit: int | None = None) -> torch.Tensor:
    """Image files of ``folder`` (sorted by name; grey) as ``(n, 1, h, w)`` in [-1, 1]; all must share one size."""
    from PIL import Image

    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))[:limit]
    if not names:
        raise ValueError(f"{folder}: no pipeline (model_index.json) and no image files ({', '.join(IMAGE_SUFFIXES)})")
    arrays = []
    for name in names:
        try:
            with Image.open(os.path.join(folder, name)) as image:
                arrays.append(np.asarray(image.convert("L"), dtype=np.float64))
        except OSError as err:
            raise ValueError(f"{os.path.join(folder, name)}: cannot be read as an image ({err})") from None
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"{folder}: images have different sizes {sorted(sizes)[:4]}")
    return torch.from_numpy(np.stack(arrays) / 127.5 - 1.0).float()[:, None]


def sample_pipeline(
    folder: str,
    num_samples: int,
    *,
    batch_size: int = 64,
    num_inference_steps: int | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw ``num_samples`` images in [-1, 1] from the ``LDMCompatPipeline`` in ``folder``; class-conditional
    (``adm``) models get the labels ``i mod 10``, which are returned with the images (else ``None``).
    ``progress``: one progress bar per batch (the sampler's steps)."""
    from ldm_compat.pipelines.pipeline_ldm_compat import LDMCompatPipeline

    pipe = LDMCompatPipeline.from_pretrained(folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress)
    batches = -(-num_samples // batch_size)
    key = pipe.config.conditioning_key
    if key not in (None, "adm"):
        raise ValueError(
            f"{folder}: conditioning_key={key!r}; evaluate samples unconditional or class-conditional (adm) models"
        )
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images, labels = [], []
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        if progress:
            pipe.set_progress_bar_config(desc=f"sampling batch {start // batch_size + 1}/{batches}", unit="step")
        kwargs = {}
        if key == "adm":
            kwargs["class_labels"] = torch.arange(start, start + count) % 10
            labels.append(kwargs["class_labels"])
        output = pipe(
            batch_size=count, num_inference_steps=num_inference_steps, generator=generator, output_type="pt", **kwargs
        )
        images.append(output.images.float().cpu() * 2.0 - 1.0)  # "pt" is in [0, 1]
    return torch.cat(images), (torch.cat(labels) if labels else None)


def format_scores(scores: dict, reference: dict | None = None) -> str:
    """A readable table: one metric per line, with the real-data reference next to it when given."""
    lines = []
    for name, value in scores.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        if reference is not None and name in reference and name not in ("num_samples", "class_histogram"):
            ref = reference[name]
            shown += f"   (real digits: {ref:.4f})" if isinstance(ref, float) else f"   (real digits: {ref})"
        lines.append(f"  {name:28s} {shown}")
        if name in METRIC_DESCRIPTIONS:
            lines.append(f"  {'':28s} ↳ {METRIC_DESCRIPTIONS[name]}")
    return "\n".join(lines)


def run(args) -> int:
    """The ``evaluate`` subcommand (arguments in ``ldm_compat.cli``)."""
    folder = args.dir
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    if args.num_samples < 2:
        raise ValueError(f"--num-samples={args.num_samples}: expected at least 2")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        print(f"[evaluate] sampling {args.num_samples} images from the pipeline in {folder} (seed {args.seed})")
        images, labels = sample_pipeline(
            folder, args.num_samples, batch_size=args.batch_size, num_inference_steps=args.num_inference_steps,
            seed=args.seed, device=args.device,
        )  # fmt: skip
    else:
        images, labels = load_image_folder(folder, args.num_samples), None
        print(f"[evaluate] {len(images)} images from {folder}")
    scores = evaluate_samples(images, labels)
    reference = real_reference_scores(min(len(images), 1797)) if len(images) >= 2 else None
    print(format_scores(scores, reference))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"scores": scores, "real_digits_reference": reference, "source": folder}, handle, indent=2)
        print(f"[evaluate] scores written to {args.output}")
    return 0
