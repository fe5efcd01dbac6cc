"""The ``ldm-compat`` command line. Each subcommand's work lives in the package; this file only parses arguments."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

# name -> (help, function that adds arguments, "module:function" run with the parsed args)
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, help: str, target: str):
    """Register a subcommand: the decorated function adds its arguments; ``target`` runs it (imported lazily)."""

    def register(add_arguments):
        _COMMANDS[name] = (help, add_arguments, target)
        return add_arguments

    return register


@command("demo", "run the offline demo end to end", "ldm_compat.demo:run")
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="demo_output", help="folder for everything the demo writes")
    p.add_argument("--config", default=None, help="original-style YAML (default: configs/digits_ddpm.yaml)")
    p.add_argument("--seed", type=int, default=23)
    p.add_argument("--num-samples", type=int, default=256, help="samples drawn for the grid and the scores")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: robust when shared)")
    p.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. lightning.trainer.max_steps=50")


@command("evaluate", "score generated digits (classifier, Fréchet distance)", "ldm_compat.evaluation.evaluate:run")
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="a pipeline folder (model_index.json) to sample, or a folder of images")
    p.add_argument("--num-samples", type=int, default=256, help="images to sample (or to read) and score")
    p.add_argument("--batch-size", type=int, default=64, help="images per pipeline call")
    p.add_argument("--num-inference-steps", type=int, default=None, help="sampler steps (default: the scheduler's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--output", default=None, help="also write the scores to this JSON file")


@command("push", "upload a pipeline folder to the Hugging Face Hub with a model card", "ldm_compat.hub.push:run")
def _push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", metavar="DIR", help="pipeline folder (model_index.json, unet/, scheduler/, ldm_extras/)")
    p.add_argument("repo_id", metavar="REPO_ID", help="'name' or 'namespace/name' on the Hub")
    p.add_argument("--token", default=None, help="Hub token (default: the stored login / HF_TOKEN)")
    p.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    p.add_argument("--revision", default=None, help="branch to push to (default: main)")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of pushing to the branch")
    p.add_argument("--license", default=None, help="license for the card metadata, e.g. mit, openrail")
    p.add_argument("--training", default=None, help="JSON object of training facts for the card (steps, data, …)")
    p.add_argument("--samples", type=int, default=0, help="sample N images into DIR/sample_grid.png for the card")
    p.add_argument("--num-inference-steps", type=int, default=None, help="sampler steps for --samples")
    p.add_argument("--seed", type=int, default=0, help="seed for --samples")


@command(
    "convert", "original .ckpt/.safetensors (+ YAML) → diffusers pipeline folder", "ldm_compat.convert.cli:convert"
)
def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="ORIGINAL", help="original .ckpt (read with weights_only) or .safetensors")
    p.add_argument("--config", default=None, help="the original YAML (default: infer the UNet config from weights)")
    p.add_argument("--output", required=True, metavar="DIR", help="pipeline folder to write (atomically)")
    p.add_argument("--no-ema", action="store_true", help="sample with the training weights (EMA kept for export)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--schedule-mismatch", choices=["error", "trained_betas"], default="error",
                   help="schedule buffers differ from the config: refuse, or use the checkpoint's betas")  # fmt: skip
    p.add_argument("--num-heads", type=int, default=None, help="without --config: attention heads (not in weights)")
    p.add_argument("--num-head-channels", type=int, default=None, help="without --config: channels per head")
    p.add_argument("--use-new-attention-order", action="store_true", help="without --config: qkv split order")
    p.add_argument("--image-size", type=int, default=None, help="without --config: sample size")
    p.add_argument(
        "--scale-factor",
        type=float,
        default=None,
        help="without --config: LatentDiffusion's scale_factor (when the checkpoint has no buffer)",
    )
    p.add_argument("--tokenizer", default=None, metavar="PATH", help="cond stage tokenizer folder (overrides version)")
    p.add_argument("--open-clip-config", default=None, metavar="PATH", help="open_clip model config JSON for arch")
    p.add_argument("--native", action="store_true",
                   help="also write a stock diffusers UNet2DModel/UNet2DConditionModel in DIR/native_unet")  # fmt: skip


@command("export", "diffusers pipeline folder → original .ckpt/.safetensors (+ YAML)", "ldm_compat.convert.cli:export")
def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", metavar="DIR", help="pipeline folder written by convert or by training")
    p.add_argument("--output", required=True, metavar="ORIGINAL", help="output .ckpt or .safetensors")
    p.add_argument("--config-output", default=None, metavar="YAML", help="also write the original YAML")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def build_parser() -> argparse.ArgumentParser:
    from ldm_compat import __version__

    parser = argparse.ArgumentParser(prog="ldm-compat", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ldm-compat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, _) in _COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, function_name = _COMMANDS[args.command][2].split(":")
    from importlib import import_module

    try:
        result = getattr(import_module(module_name), function_name)(args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotImplementedError) as err:
        # our errors are one line that names the file/key/option; no traceback for bad input
        print(f"ldm-compat {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
