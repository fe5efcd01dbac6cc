#!/usr/bin/env python
"""Train a latent-diffusion ``DDPM`` or ``LatentDiffusion`` from an original-style YAML with Accelerate.

    accelerate launch examples/train.py --config configs/digits_ddpm.yaml --output_dir runs/digits \
        [--export-original] [--ldm_bug_compat] [--logvar_weighting true|false] [key=value ...]

Trailing ``key=value`` items are OmegaConf dotlist overrides, as in CompVis ``main.py``
(e.g. ``lightning.trainer.max_steps=4 model.params.timesteps=500``). Writes into OUTPUT_DIR: ``pipeline/`` (a
diffusers folder: ``LDMCompatPipeline.from_pretrained``), ``checkpoints/`` (resumable Accelerate states),
``images/`` (sample grids), ``logs/`` (tensorboard) and, with ``--export-original``, ``original/model.ckpt``.
"""

import argparse
import sys

from ldm_compat.config import load_ldm_config
from ldm_compat.training.loop import TrainOptions, train


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="original-style YAML (model / data / lightning sections)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=23, help="as CompVis main.py (default 23)")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: what `accelerate launch` was configured with, else no")  # fmt: skip
    p.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--no_scale_lr", action="store_true", help="use model.base_learning_rate as the learning rate")
    p.add_argument("--export-original", "--export_original", dest="export_original", action="store_true",
                   help="also write an original-style .ckpt + .yaml the original code can load")  # fmt: skip
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", default=None)
    p.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, or none")
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    p.add_argument("--sample_steps", type=int, default=None, help="steps for logged samples (default: all T)")
    p.add_argument("--nan_policy", choices=["stop", "skip"], default="stop",
                   help="stop: end the run (found at the next log/checkpoint step; no sync per step); skip: skip "
                   "the batch (reads one flag per step)")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (state-dict keys unchanged)")
    p.add_argument("--channels_last", action="store_true", help="UNet weights and activations in channels_last")
    p.add_argument("--ldm_bug_compat", action="store_true",
                   help="reproduce the original x0 lvlb_weights bug (YAML: ldm_compat.objective)")  # fmt: skip
    p.add_argument("--logvar_weighting", choices=["true", "false"], default=None,
                   help="weight the simple loss by logvar (default: what model.target's original class does: "
                        "LatentDiffusion true, DDPM false)")  # fmt: skip
    p.add_argument("--latent_cache", default=None, metavar="DIR",
                   help="LatentDiffusion: cache the first-stage encodings (and frozen text encodings) in DIR, "
                        "computed once and reused by later runs (docs/training.md)")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, key=value")
    return p.parse_args(argv)


def main(argv=None) -> int:
    try:
        return run(parse_args(argv))
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, FloatingPointError) as err:
        # bad input (config, checkpoint, data, output folder) or a non-finite loss: one line, no traceback
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2


def objective_overrides(args) -> list[str]:
    """The objective flags as dotlist overrides of the YAML's ``ldm_compat.objective`` (they win over it)."""
    out = []
    if args.ldm_bug_compat:
        out.append("ldm_compat.objective.ldm_bug_compat=true")
    if args.logvar_weighting is not None:
        out.append(f"ldm_compat.objective.logvar_weighting={args.logvar_weighting}")
    return out


def run(args) -> int:
    config = load_ldm_config(args.config, args.overrides + objective_overrides(args))
    options = TrainOptions(
        output_dir=args.output_dir,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        resume_from_checkpoint=args.resume_from_checkpoint,
        checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit,
        scale_lr=not args.no_scale_lr,
        export_original=args.export_original,
        push_to_hub=args.push_to_hub,
        hub_model_id=args.hub_model_id,
        report_to=args.report_to,
        dataloader_num_workers=args.dataloader_num_workers,
        sample_steps=args.sample_steps,
        nan_policy=args.nan_policy,
        compile=args.compile,
        channels_last=args.channels_last,
        latent_cache=args.latent_cache,
    )
    outputs = train(config, options, source=args.config)
    for name, path in outputs.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
