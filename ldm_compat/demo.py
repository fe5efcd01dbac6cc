"""The offline demo behind ``ldm-compat demo`` (README's first command).

1. trains the digits config (pixel-space DDPM on scikit-learn's 8×8 digits) with the Accelerate loop;
2. samples a grid from the trained pipeline folder (EMA weights);
3. exports an original-style ``.ckpt`` + YAML and converts it back, checking every tensor is bit-identical;
4. scores the samples with the in-package digits classifier and Fréchet distance.
"""

from __future__ import annotations

import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_ddpm.yaml"


def _same_tensors(folder_a: Path, folder_b: Path) -> tuple[int, list[str]]:
    """How many tensors two folders hold, and which differ (by file/key)."""
    from safetensors.torch import load_file

    files_a = {p.relative_to(folder_a) for p in folder_a.rglob("*.safetensors")}
    files_b = {p.relative_to(folder_b) for p in folder_b.rglob("*.safetensors")}
    differ = [f"{f} (missing)" for f in sorted(files_a ^ files_b)]
    count = 0
    for rel in sorted(files_a & files_b):
        a, b = load_file(folder_a / rel), load_file(folder_b / rel)
        count += len(a)
        differ += [f"{rel}:{k}" for k in a if k not in b or a[k].dtype != b[k].dtype or not a[k].equal(b[k])]
    return count, differ


def run(args) -> int:
    import torch

    from ldm_compat.config import load_ldm_config
    from ldm_compat.convert.to_diffusers import original_to_diffusers
    from ldm_compat.evaluation.evaluate import format_scores, sample_pipeline
    from ldm_compat.evaluation.metrics import evaluate_samples, real_reference_scores
    from ldm_compat.training.image_logging import make_grid, save_grid
    from ldm_compat.training.loop import TrainOptions, train

    # one intra-op thread unless asked: on a shared 2-core machine a second OpenMP thread waiting at every barrier
    # for a busy core made steps ~60× slower (measured 9 s vs 0.16 s per step); on an idle machine it gains little
    torch.set_num_threads(args.threads)
    started = time.time()
    output = Path(args.output).resolve()
    config_path = Path(args.config) if args.config else DEFAULT_CONFIG
    config = load_ldm_config(config_path, args.overrides)
    print(f"[demo] 1/4 training {config_path.name} on the embedded digits (CPU), output in {output}")
    options = TrainOptions(output_dir=str(output), seed=args.seed, export_original=True, report_to="tensorboard",
                           checkpointing_steps=None)  # fmt: skip
    outputs = train(config, options, source=str(config_path))
    folder = Path(outputs["pipeline"])

    print(f"[demo] 2/4 sampling {args.num_samples} digits from {folder} (EMA weights)")
    samples, _ = sample_pipeline(str(folder), args.num_samples, seed=args.seed, device="cpu", progress=True)
    grid_path = output / "samples.png"
    shown = samples[:64].repeat_interleave(4, dim=-1).repeat_interleave(4, dim=-2)  # 8×8 digits are tiny: 4× nearest
    save_grid(make_grid(shown, nrow=8), grid_path)

    print("[demo] 3/4 original checkpoint → diffusers folder round trip")
    converted = original_to_diffusers(outputs["original_ckpt"], Path(outputs["original_ckpt"]).with_suffix(".yaml"),
                                      output / "converted_back", overwrite=True)  # fmt: skip
    count, differ = _same_tensors(folder, converted)
    if differ:
        raise RuntimeError(f"round trip changed {len(differ)} tensors: {differ[:5]}")
    print(f"       {count} tensors, all bit-identical after export → convert")

    print("[demo] 4/4 scoring the samples")
    scores = evaluate_samples(samples)
    print(format_scores(scores, real_reference_scores(min(len(samples), 1797))))
    minutes = (time.time() - started) / 60
    print(f"\n[demo] done in {minutes:.1f} min. Where everything is:")
    for name, path in [
        ("pipeline folder (LDMCompatPipeline.from_pretrained)", folder),
        ("original checkpoint + YAML (loads in CompVis latent-diffusion)", outputs["original_ckpt"]),
        ("converted back from the checkpoint", converted),
        ("sample grid", grid_path),
        ("training images (inputs, diffusion_row, samples, denoise_row)", output / "images"),
        ("tensorboard logs", output / "logs"),
    ]:
        print(f"  {name:72s} {path}")
    return 0
