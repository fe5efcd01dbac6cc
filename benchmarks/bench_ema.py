"""Micro-benchmark: one EMA update of a ~36M-parameter UNet, ``LitEmaModel`` against the per-parameter loop.

Contenders, all measured in the same run, interleaved round by round (so drifting machine load hits each alike):

- ``litema_loop``: the original ``LitEma.forward`` pattern: a Python loop over ``named_parameters()`` doing
  ``shadow.sub_(one_minus_decay * (shadow - param))`` per parameter (the baseline of the ratios);
- ``ours_exact``: ``LitEmaModel.step`` (default ``update="exact"``: three fused ``torch._foreach_*`` calls with
  LitEma's roundings, bit-identical to the loop);
- ``ours_lerp``: ``LitEmaModel(update="lerp")``: one ``torch._foreach_lerp_``;
- ``ema_model_loop`` / ``ema_model_foreach``: stock ``diffusers.training_utils.EMAModel`` with ``foreach`` off / on.

The model is diffusers' ``UNet2DModel`` with the DDPM CIFAR-10 configuration (35.7M parameters in 328 tensors),
built locally from its config (no download), or with ``--model celebahq64`` the published celebahq-ldm-vq-4
``LDMUNetModel`` (274M parameters, the issue's EMA target). Usage::

    python benchmarks/bench_ema.py [--device cuda] [--model cifar32|celebahq64] [--rounds 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from torch import nn

from ldm_compat.training.ema import LitEmaModel

BASELINE = "litema_loop"


def build_model(device: str, name: str = "cifar32") -> nn.Module:
    """The DDPM CIFAR-10 UNet (``google/ddpm-cifar10-32`` configuration), or a ``bench_unet`` model; random weights."""
    torch.manual_seed(0)
    if name != "cifar32":
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_unet import MODELS

        from ldm_compat.models.unet_ldm import LDMUNetModel

        return LDMUNetModel(**MODELS[name]["unet"]).to(device)
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ).to(device)  # fmt: skip


class LoopLitEma:
    """The original ``LitEma.forward`` update pattern (float32 tensor decay, int32 counter, one loop per parameter)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        self.decay = torch.tensor(decay, dtype=torch.float32)
        self.num_updates = torch.tensor(0, dtype=torch.int)
        self.shadows = {n.replace(".", ""): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def step(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        one_minus_decay = 1.0 - decay
        for name, param in dict(model.named_parameters()).items():
            if param.requires_grad:
                key = name.replace(".", "")
                shadow = self.shadows[key].type_as(param)
                shadow.sub_(one_minus_decay.to(shadow.device) * (shadow - param))


def contenders(model: nn.Module) -> dict[str, tuple[object, callable]]:
    params = list(model.parameters())
    loop = LoopLitEma(model)
    exact = LitEmaModel(model)
    lerp = LitEmaModel(model, update="lerp")
    stock = EMAModel(params, foreach=False)
    stock_fe = EMAModel(params, foreach=True)
    return {
        BASELINE: (loop, lambda: loop.step(model)),
        "ours_exact": (exact, lambda: exact.step(model)),
        "ours_lerp": (lerp, lambda: lerp.step(model)),
        "ema_model_loop": (stock, lambda: stock.step(params)),
        "ema_model_foreach": (stock_fe, lambda: stock_fe.step(params)),
    }


def shadows_of(name: str, obj) -> list[torch.Tensor]:
    return list(obj.shadows.values()) if name == BASELINE else list(obj.shadow_params)


def run(device: str, rounds: int, warmup: int, clock: str = "wall", model_name: str = "cifar32") -> dict:
    model = build_model(device, model_name)
    cases = contenders(model)
    with torch.no_grad():  # move the weights away from the shadows so every update does real work
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    # "cpu": this thread's CPU time (with one torch thread), robust when other processes share the cores
    timer = time.thread_time if clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(warmup + rounds):
        for name, (_, fn) in cases.items():
            sync()
            start = timer()
            fn()
            sync()
            if r >= warmup:
                times[name].append(timer() - start)
    ref = shadows_of(BASELINE, cases[BASELINE][0])
    base = statistics.median(times[BASELINE])
    results = {}
    for name, (obj, _) in cases.items():
        diff = max((a.double() - b.double()).abs().max().item() for a, b in zip(shadows_of(name, obj), ref))
        med = statistics.median(times[name])
        results[name] = {
            "median_ms": med * 1e3, "min_ms": min(times[name]) * 1e3, "speedup_vs_loop": base / med,
            "max_abs_diff_vs_loop": diff,
        }  # fmt: skip
    n_params = sum(p.numel() for p in model.parameters())
    if device.startswith("cuda"):
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    return {
        "benchmark": "ema_update", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device, "device_name": device_name, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "clock": clock, "model": model_name,
        "torch": torch.__version__, "parameters": n_params, "tensors": len(list(model.parameters())),
        "rounds": rounds, "warmup": warmup, "steps_each": warmup + rounds, "results": results,
    }  # fmt: skip


def print_table(report: dict) -> None:
    print(
        f"EMA update, {report['parameters'] / 1e6:.2f}M parameters in {report['tensors']} tensors, "
        f"{report['device']} ({report['device_name']}, {report['torch_threads']} threads), {report['rounds']} rounds, "
        f"{report['clock']} clock"
    )
    print(f"{'method':<20}{'median ms':>11}{'min ms':>9}{'vs loop':>9}{'max|Δ| vs loop':>17}")
    for name, r in report["results"].items():
        print(
            f"{name:<20}{r['median_ms']:>11.3f}{r['min_ms']:>9.3f}{r['speedup_vs_loop']:>8.2f}x"
            f"{r['max_abs_diff_vs_loop']:>17.3g}"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--model", default="cifar32", help="cifar32 (default, 35.7M), celebahq64 (274M) or tiny")
    parser.add_argument("--rounds", type=int, default=30, help="timed updates per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed updates per method first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="wall: elapsed time; cpu: this thread's CPU time with one torch thread (CPU only; for a loaded machine)",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.rounds < 1 or args.warmup < 0:
        raise SystemExit("--rounds must be >= 1 and --warmup >= 0")
    if args.clock == "cpu":
        if not args.device == "cpu":
            raise SystemExit("--clock cpu: only with --device cpu")
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args.device, args.rounds, args.warmup, args.clock, args.model)
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
