"""``bench_train.py --latent MODEL``: LatentDiffusion training throughput with and without the latent cache.

Both contenders are the ``Trainer`` on the same ``configs/digits_latent.yaml``-based config (KL first stage with
posterior sampling, trainable class embedder, cross-attention UNet, EMA); ``cached`` reads the first-stage moments
from ``--latent_cache`` (built once before timing; the build time is reported), ``on-the-fly`` encodes every batch.
Contenders alternate, a fresh ``Trainer`` per round; a step is timed from one ``_after_step`` to the next.

- ``digits``: the shipped config (8×8 digits, 0.65M-parameter first stage, 4×4 latents);
- ``digits32``: the digits resized to 32×32 with a 4-level f8 first stage at ch 64 (4×4 latents), so that encoding
  costs what it does for real LDM first stages relative to the UNet.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _common import summarize, synchronize

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "digits": {},
    "digits32": {
        "data.params.train.params.image_size": 32,
        "model.params.first_stage_config.params.ddconfig.resolution": 32,
        "model.params.first_stage_config.params.ddconfig.ch": 64,
        "model.params.first_stage_config.params.ddconfig.ch_mult": [1, 2, 2, 2],
        "model.params.first_stage_config.params.ddconfig.num_res_blocks": 2,
    },
}
CONTENDERS = ("on-the-fly", "cached")


def latent_config(model: str, batch: int, timesteps: int) -> dict:
    config = yaml.safe_load((ROOT / "configs" / "digits_latent.yaml").read_text())
    changes = {"data.params.batch_size": batch, "model.params.timesteps": timesteps, "model.params.monitor": None,
               "data.params.validation": None, "lightning.trainer.val_check_interval": None,
               "lightning.callbacks.image_logger.params.batch_frequency": 0, **MODELS[model]}  # fmt: skip
    config = copy.deepcopy(config)
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return config


def _trainer(config, out: Path, cache: Path | None, device: torch.device, workers: int):
    from ldm_compat.training.loop import Trainer, TrainOptions

    options = TrainOptions(output_dir=str(out), report_to="none", checkpointing_steps=None,
                           dataloader_num_workers=workers, latent_cache=None if cache is None else str(cache),
                           mixed_precision="bf16" if device.type == "cuda" else "no")  # fmt: skip
    return Trainer(config, options, source="bench_train --latent")


def _timed_fit(trainer, device, warmup: int, steps: int) -> list[float]:
    times: list[float] = []
    original = trainer._after_step
    mark = [0.0]

    def after_step(batch, logs):
        original(batch, logs)
        synchronize(device)
        now = time.perf_counter()
        if trainer.state.global_step > warmup:
            times.append(now - mark[0])
        mark[0] = now

    trainer._after_step = after_step
    trainer.settings.max_steps = warmup + steps
    synchronize(device)
    mark[0] = time.perf_counter()
    trainer.fit()
    return times


def run(args, device: torch.device) -> dict:
    batch = args.batch or 64
    config = latent_config(args.latent, batch, args.timesteps)
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    with tempfile.TemporaryDirectory(prefix="bench_train_latent_") as root:
        cache = Path(root) / "cache"
        start = time.perf_counter()
        trainer = _trainer(config, Path(root) / "build", cache, device, args.workers)  # builds the cache
        build_s = time.perf_counter() - start
        first_stage_params = sum(p.numel() for p in trainer.latent.first_stage.model.parameters())
        unet_params = sum(p.numel() for p in trainer.unet.parameters())
        del trainer
        for round_ in range(args.rounds):
            order = CONTENDERS if round_ % 2 == 0 else CONTENDERS[::-1]
            for name in order:
                out = Path(root) / f"{name}-{round_}"
                trainer = _trainer(config, out, cache if name == "cached" else None, device, args.workers)
                times[name] += _timed_fit(trainer, device, args.warmup, args.iters)
    results = {}
    for name, samples in times.items():
        wall = summarize(samples)
        results[name] = {"wall": wall, "img_per_s": batch / (wall["median_ms"] / 1e3)}
    results["cached"]["speedup_vs_on_the_fly"] = statistics.median(times["on-the-fly"]) / statistics.median(
        times["cached"]
    )
    return {"model": f"latent:{args.latent}", "batch": batch, "first_stage_params": first_stage_params,
            "unet_params": unet_params, "cache_build_s": build_s, "workers": args.workers,
            "results": results}  # fmt: skip


def print_report(report: dict) -> None:
    from _common import format_table

    m, r = report["machine"], report["result"]
    print(f"\nLatentDiffusion training, --latent {r['model'].split(':')[1]} (first stage "
          f"{r['first_stage_params'] / 1e6:.2f}M, UNet {r['unet_params'] / 1e6:.2f}M params, batch {r['batch']}), "
          f"{m['device']} ({m['device_name']}, {m['torch_threads']} threads), load average {m['loadavg_start']}; "
          f"{report['rounds']} rounds × {report['iters']} steps after {report['warmup']} warm-up; cache built in "
          f"{r['cache_build_s']:.1f} s (Trainer start included)\n")  # fmt: skip
    rows = [[name, e["wall"]["median_ms"], e["wall"]["iqr_ms"], e["img_per_s"],
             f"{e.get('speedup_vs_on_the_fly', 1.0):.2f}"] for name, e in r["results"].items()]  # fmt: skip
    print(format_table(["contender", "median ms/step", "IQR ms", "img/s", "speed-up"], rows))
