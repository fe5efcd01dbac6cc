"""End-to-end training throughput of the ``Trainer`` (``examples/train.py``) against a plain loop, in one run.

Contenders, interleaved in blocks of ``--iters`` optimizer steps (the plain loops run inside the Trainer's step hook,
so the Trainer's ``fit()`` is entered once and never restarts its data loader):

- ``trainer``: ``ldm_compat.training.loop.Trainer`` on an original-style config: data loader, noise and timesteps,
  the ``DDPMObjective`` loss, Accelerate (backward, bf16 autocast on CUDA), AdamW (fused on CUDA), the LR schedule,
  ``LitEmaModel`` update, logging. One step = from the end of one step's ``_after_step`` to the end of the next;
- ``plain``: the same UNet (same weights) and optimizer in a hand-written loop: a stock ``DataLoader``,
  ``q_sample``, MSE on the noise, backward, AdamW; no EMA, no Accelerate;
- ``plain+ema``: ``plain`` plus one ``LitEmaModel`` update per step (so the EMA's share of the overhead is visible);
- ``diffusers+ema`` (with ``--diffusers``): the same plain loop with diffusers' own model of the same architecture
  (``to_native_unet``, same weights) and diffusers' ``EMAModel(foreach=True)``: what a diffusers user would run.

Data are random images held in memory (``_common.RandomImages``), so decoding is not timed. ``ratio`` is a
contender's median step time over ``plain``'s. Usage::

    python benchmarks/bench_train.py [--model small|tiny|cifar32|celebahq64] [--device cuda] [--json out.json]
    python benchmarks/bench_train.py --latent digits|digits32   # LatentDiffusion, with and without --latent_cache
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RandomImages,
    add_common_arguments,
    autocast,
    count_params,
    format_table,
    machine,
    setup_device,
    summarize,
    synchronize,
    write_json,
)

BASELINE = "plain"
_TINY_UNET = {"image_size": 8, "in_channels": 1, "out_channels": 1, "model_channels": 32, "num_res_blocks": 1,
              "attention_resolutions": [], "channel_mult": [1, 2], "num_heads": 1}  # fmt: skip
#: model name → (UNet params or a bench_unet model name, batch size); ``small`` is bench_unet's ``cpu_small``
MODELS = {"tiny": (_TINY_UNET, 4), "small": ("cpu_small", 8), "cifar32": ("cifar32", 128),
          "celebahq64": ("celebahq64", 48)}  # fmt: skip
#: the issue's H100 target for the whole step (noise, UNet, AdamW, EMA), img/s
CUDA_TARGETS = {"celebahq64": 400}


def unet_params(model: str) -> dict:
    params, _ = MODELS[model]
    if isinstance(params, str):
        from bench_unet import MODELS as UNETS

        params = UNETS[params]["unet"]
    return dict(params)


def train_config(model: str, batch: int, timesteps: int) -> dict:
    """An original-style pixel-space DDPM config (eps, l2, linear schedule, EMA on, no image logging/validation)."""
    unet = unet_params(model)
    size, channels = unet["image_size"], unet["in_channels"]
    return {
        "model": {
            "base_learning_rate": 1e-6, "target": "ldm.models.diffusion.ddpm.DDPM",
            "params": {"timesteps": timesteps, "beta_schedule": "linear", "image_size": size, "channels": channels,
                       "use_ema": True, "monitor": None,
                       "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                       "params": unet}},
        },
        "data": {"target": "main.DataModuleFromConfig", "params": {
            "batch_size": batch,
            "train": {"target": "_common.RandomImages",
                      "params": {"size": size, "channels": channels, "length": batch * 16}}}},
        "lightning": {"trainer": {"max_steps": 1}, "callbacks": {"image_logger": {"params": {"batch_frequency": 0}}}},
    }  # fmt: skip


class PlainLoop:
    """The hand-written baseline: stock DataLoader, ``q_sample``, eps MSE, backward, AdamW; ``ema`` optional."""

    def __init__(self, trainer, dataset, batch: int, workers: int, device: torch.device, diffusers: bool = False):
        from ldm_compat.models.unet_ldm import LDMUNetModel
        from ldm_compat.training.ema import LitEmaModel

        self.device = device
        if diffusers:
            from diffusers.training_utils import EMAModel

            from ldm_compat.convert.native import to_native_unet

            self.unet = to_native_unet(trainer.unet).to(device)
        else:
            self.unet = LDMUNetModel(**trainer.unet.config).to(device)
            self.unet.load_state_dict(trainer.unet.state_dict())
        self.unet.train()
        fused = True if device.type == "cuda" else None
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=trainer.learning_rate, fused=fused)
        # built from the on-device UNet, so the shadows are there too
        if diffusers:
            ema = EMAModel(self.unet.parameters(), foreach=True)
            self._ema_step = lambda: ema.step(self.unet.parameters())
        else:
            ema = LitEmaModel(self.unet)
            self._ema_step = lambda: ema.step(self.unet)
        self.ema = ema
        buffers = trainer.scheduler.ldm_buffers()
        self.sqrt_ac = buffers["sqrt_alphas_cumprod"].to(device)
        self.sqrt_1m_ac = buffers["sqrt_one_minus_alphas_cumprod"].to(device)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        )  # fmt: skip
        self._it = iter(self.loader)

    def _batch(self) -> torch.Tensor:
        try:
            batch = next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            batch = next(self._it)
        return batch["image"].to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()

    def step(self, with_ema: bool) -> None:
        x = self._batch()
        t = torch.randint(0, len(self.sqrt_ac), (x.shape[0],), device=self.device)
        noise = torch.randn_like(x)
        x_noisy = self.sqrt_ac[t].view(-1, 1, 1, 1) * x + self.sqrt_1m_ac[t].view(-1, 1, 1, 1) * noise
        with autocast(self.device):
            out = self.unet(x_noisy, t).sample
        loss = F.mse_loss(out.float(), noise)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if with_ema:
            self._ema_step()


class StepClock:
    """Times the Trainer's optimizer steps from its ``_after_step`` hook and runs the plain blocks in between."""

    def __init__(self, trainer, plains: dict[str, tuple[PlainLoop, bool]], device, warmup: int, iters: int):
        """``plains``: contender name → (its loop, whether it updates an EMA)."""
        self.trainer, self.plains, self.device = trainer, plains, device
        self.warmup, self.iters = warmup, iters
        self.times = {name: {"wall": [], "cpu": []} for name in ("trainer", *plains)}
        self.blocks = 0
        self._original = trainer._after_step
        trainer._after_step = self.after_step
        self._mark()

    def _mark(self) -> None:
        synchronize(self.device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def _record(self, name: str) -> None:
        synchronize(self.device)
        self.times[name]["wall"].append(time.perf_counter() - self._wall)
        self.times[name]["cpu"].append(time.process_time() - self._cpu)

    def after_step(self, batch, logs) -> None:
        self._original(batch, logs)
        step = self.trainer.state.global_step
        if step > self.warmup:
            self._record("trainer")
        if step >= self.warmup and (step - self.warmup) % self.iters == 0:
            # plain blocks between trainer blocks; their order rotates so none always follows the trainer
            names = list(self.plains)
            order = names[self.blocks % len(names) :] + names[: self.blocks % len(names)]
            for name in order:
                loop, with_ema = self.plains[name]
                for _ in range(self.iters if step > self.warmup else self.warmup):
                    self._mark()
                    loop.step(with_ema=with_ema)
                    if step > self.warmup:
                        self._record(name)
            self.blocks += 1
        self._mark()


def run(args, device: torch.device) -> dict:
    from ldm_compat.training.loop import Trainer, TrainOptions

    params, default_batch = MODELS[args.model]
    batch = args.batch or default_batch
    config = train_config(args.model, batch, args.timesteps)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as out:
        options = TrainOptions(
            output_dir=out, report_to="none", checkpointing_steps=None, dataloader_num_workers=args.workers,
            mixed_precision="bf16" if device.type == "cuda" else "no",
        )  # fmt: skip
        trainer = Trainer(config, options, source=f"bench_train --model {args.model}")
        if trainer.accelerator.device.type != device.type:
            raise SystemExit(f"--device {device}: the Trainer's Accelerator chose {trainer.accelerator.device}")
        dataset = RandomImages(**config["data"]["params"]["train"]["params"])
        plain = PlainLoop(trainer, dataset, batch, args.workers, device)
        plains = {"plain": (plain, False), "plain+ema": (plain, True)}
        if args.diffusers:
            plains["diffusers+ema"] = (PlainLoop(trainer, dataset, batch, args.workers, device, diffusers=True), True)
        trainer.settings.max_steps = args.warmup + args.rounds * args.iters
        clock = StepClock(trainer, plains, device, args.warmup, args.iters)
        trainer.fit()
        n_params = count_params(trainer.unet)
    base = statistics.median(clock.times[BASELINE]["wall"])
    results = {}
    for name, t in clock.times.items():
        wall, cpu = summarize(t["wall"]), summarize(t["cpu"])
        results[name] = {"wall": wall, "cpu": cpu, "img_per_s": batch / (wall["median_ms"] / 1e3),
                         "ratio_vs_plain": wall["median_ms"] / 1e3 / base}  # fmt: skip
    if "diffusers+ema" in results:
        theirs = results["diffusers+ema"]["wall"]["median_ms"]
        for entry in results.values():
            entry["ratio_vs_diffusers"] = entry["wall"]["median_ms"] / theirs
    return {"model": args.model, "batch": batch, "parameters": n_params, "unet_params": unet_params(args.model),
            "workers": args.workers, "results": results}  # fmt: skip


def print_report(report: dict) -> None:
    m, r = report["machine"], report["result"]
    print(f"\nTraining benchmark, --model {r['model']} ({r['parameters'] / 1e6:.2f}M params, batch {r['batch']}), "
          f"{m['device']} ({m['device_name']}, {m['torch_threads']} threads), torch {m['torch']}, load average "
          f"{m['loadavg_start']}; {report['rounds']} rounds × {report['iters']} steps after "
          f"{report['warmup']} warm-up\n")  # fmt: skip
    rows = [[name, e["wall"]["median_ms"], e["wall"]["iqr_ms"], e["img_per_s"], f"{e['ratio_vs_plain']:.3f}",
             e["cpu"]["median_ms"]] for name, e in r["results"].items()]  # fmt: skip
    print(format_table(["contender", "median ms/step", "IQR ms", "img/s", "ratio vs plain", "CPU ms/step"], rows))
    target = CUDA_TARGETS.get(r["model"]) if m["device"].startswith("cuda") else None
    if target is not None:
        got = r["results"]["trainer"]["img_per_s"]
        print(f"\ntarget: trainer ≥ {target} img/s: measured {got:.0f}, {'met' if got >= target else 'missed'}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(p)
    p.add_argument("--model", choices=list(MODELS), default="small", help="UNet + batch (default small)")
    p.add_argument("--batch", type=int, default=None, help="override the batch size")
    p.add_argument("--timesteps", type=int, default=1000, help="diffusion steps T of the config")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (both loops)")
    p.add_argument("--diffusers", action="store_true", help="add the diffusers+ema contender (diffusers' own UNet)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--iters", type=int, default=4, help="optimizer steps of each contender per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each contender first")
    p.add_argument("--latent", choices=["digits", "digits32"], default=None,
                   help="instead: LatentDiffusion with/without the latent cache (bench_train_latent.py)")  # fmt: skip
    args = p.parse_args(argv)
    if args.rounds < 1 or args.iters < 1 or args.warmup < 0 or args.workers < 0:
        p.error("--rounds/--iters must be ≥ 1, --warmup/--workers ≥ 0")
    if args.batch is not None and args.batch < 1:
        p.error("--batch: expected a positive integer")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = setup_device(args.device, args.threads if args.device == "cpu" else None)
    report = {"benchmark": "train", "machine": machine(device), "rounds": args.rounds, "iters": args.iters,
              "warmup": args.warmup}  # fmt: skip
    if args.latent:
        import bench_train_latent

        report["result"] = bench_train_latent.run(args, device)
        bench_train_latent.print_report(report)
        write_json(args.json, report)
        return report
    report["result"] = run(args, device)
    if device.type == "cuda" and args.model in CUDA_TARGETS:
        got = report["result"]["results"]["trainer"]["img_per_s"]
        report["target"] = {"img_per_s": CUDA_TARGETS[args.model], "measured": got}
    print_report(report)
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
