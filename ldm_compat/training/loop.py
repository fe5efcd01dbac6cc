"""The training loop: what CompVis ``main.py`` + pytorch-lightning did for ``DDPM``, on Accelerate.

``Trainer`` builds everything from an original-style config (``TrainSettings``), then ``fit()`` runs the optimizer
steps. Differences from the original harness, each deliberate:
- EMA updates once per optimizer step (the original updated per micro-batch under gradient accumulation).
- The learning rate scales with ``accumulate × num_processes (all nodes) × batch_size`` (the original ignored
  ``num_nodes``); ``scale_lr=False`` uses ``base_learning_rate`` as given.
- ``scheduler_config`` is honoured for pixel-space DDPM too (the original only used it in LatentDiffusion).
- Checkpoints are written atomically; resume restores weights, EMA, optimizer, LR schedule, RNG and data position.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldm_compat.training.checkpoints import resolve_checkpoint, write_checkpoint
from ldm_compat.training.settings import TrainSettings

logger = logging.getLogger(__name__)


class DDPMTrainModule(nn.Module):
    """UNet + objective as one module, so DDP wraps (and syncs gradients of) both, ``logvar`` included."""

    def __init__(self, unet: nn.Module, objective: nn.Module):
        super().__init__()
        self.unet = unet
        self.objective = objective

    def forward(self, x_start, t, noise, cond=None):
        return self.objective.p_losses(self.unet, x_start, t, noise=noise, cond=cond)


@dataclass
class RunState:
    """Loop position, saved with every checkpoint (``accelerator.register_for_checkpointing``)."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class TrainOptions:
    """Command-line options of ``examples/train.py`` (everything else comes from the YAML)."""

    output_dir: str
    seed: int = 23  # main.py's default
    mixed_precision: str | None = None  # None: what `accelerate launch` configured
    resume_from_checkpoint: str | None = None
    checkpointing_steps: int | None = 500
    checkpoints_total_limit: int | None = None
    scale_lr: bool = True
    export_original: bool = False
    push_to_hub: bool = False
    hub_model_id: str | None = None
    report_to: str = "tensorboard"
    dataloader_num_workers: int = 0
    sample_steps: int | None = None  # inference steps for logged samples (default: all T, like the original)
    validation_batches: int = 4
    nan_policy: str = "stop"  # stop | skip


class Trainer:
    def __init__(self, config, options: TrainOptions, source: str = "config"):
        self.config = config
        self.options = options
        if options.nan_policy not in ("stop", "skip"):
            raise ValueError(f"--nan_policy {options.nan_policy!r}: expected 'stop' or 'skip'")
        self.settings = TrainSettings.from_config(config, source)
        self.output_dir = Path(options.output_dir)
        created = self._check_output_dir()
        try:
            self._setup(options)
        except BaseException:
            # bad input found while building (a checkpoint, the data, …): leave no empty output folder behind
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break
            raise

    def _setup(self, options: TrainOptions) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.accelerator = Accelerator(
            gradient_accumulation_steps=self.settings.accumulate_grad_batches,
            mixed_precision=options.mixed_precision,
            log_with=None if options.report_to in (None, "none") else options.report_to,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
        )
        set_seed(options.seed)
        self.state = RunState()
        self._build_model()
        self._build_data()
        self._build_optimization()

    # ----------------------------------------------------------------------------------------------- setup
    def _check_output_dir(self) -> list[Path]:
        """Create ``--output_dir`` and check it is writable; return the folders created (deepest first)."""
        created, folder = [], self.output_dir.absolute()
        while not folder.exists() and folder != folder.parent:
            created.append(folder)
            folder = folder.parent
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            probe = self.output_dir / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise PermissionError(f"--output_dir {self.output_dir}: not writable ({err.strerror})") from None
        return created

    def _build_model(self) -> None:
        from ldm_compat.models.unet_ldm import LDMUNetModel
        from ldm_compat.schedulers.scheduling_ldm_ddpm import LDMDDPMScheduler
        from ldm_compat.training.objective import DDPMObjective

        params = self.settings.params
        self.unet = LDMUNetModel.from_ldm_config(params["unet_config"])
        self.objective = DDPMObjective.from_ldm_config(params, **self.settings.objective_flags)
        self.accelerator.print(self.settings.deviation_report(self.objective))
        self.scheduler = LDMDDPMScheduler.from_ldm_config(params)
        self.ema = None
        if self.settings.use_ema:
            from ldm_compat.training.ema import LitEmaModel

            self.ema = LitEmaModel(self.unet)
        if params.get("ckpt_path"):
            from ldm_compat.training.init_ckpt import init_from_ckpt

            report = init_from_ckpt(
                params["ckpt_path"], self.unet, ema=self.ema, objective=self.objective,
                ignore_keys=params.get("ignore_keys") or (), load_only_unet=bool(params.get("load_only_unet")),
                make_it_fit=bool(params.get("make_it_fit")),
            )  # fmt: skip
            self.accelerator.print(report.summary())
            if self.ema is not None and params.get("reset_ema"):
                self.ema.reset_to(self.unet)
            if self.ema is not None and params.get("reset_num_ema_updates"):
                self.ema.reset_num_updates()
        self.accelerator.print(count_params(self.unet, "LDMUNetModel"))
        self.module = DDPMTrainModule(self.unet, self.objective)

    def _build_data(self) -> None:
        from ldm_compat.training.data import build_dataloader, build_dataset

        data = self.settings.data
        train = build_dataset(data, split="train", image_size=self.settings.params.get("image_size"))
        self.train_loader = build_dataloader(
            train, self.settings.batch_size, shuffle=True, num_workers=self.options.dataloader_num_workers,
            seed=self.options.seed,
        )  # fmt: skip
        self.val_loader = None
        if (data.get("params") or {}).get("validation") is not None:
            val = build_dataset(data, split="validation", image_size=self.settings.params.get("image_size"))
            self.val_loader = build_dataloader(val, self.settings.batch_size, shuffle=False)

    def _build_optimization(self) -> None:
        from ldm_compat.training.lr_schedulers import build_lr_scheduler, scaled_learning_rate

        s = self.settings
        self.learning_rate = scaled_learning_rate(
            s.base_learning_rate, s.batch_size, s.accumulate_grad_batches, self.accelerator.num_processes,
            scale_lr=self.options.scale_lr,
        )  # fmt: skip
        self.accelerator.print(
            f"learning rate {self.learning_rate:.2e} = {s.accumulate_grad_batches} (accumulate) × "
            f"{self.accelerator.num_processes} (processes) × {s.batch_size} (batch) × {s.base_learning_rate:.2e} (base)"
            if self.options.scale_lr
            else f"learning rate {self.learning_rate:.2e} (base_learning_rate, not scaled)"
        )
        # AdamW with torch defaults (weight_decay=0.01), as the original configure_optimizers
        parameters = list(self.unet.parameters())
        if self.objective.config.learn_logvar:
            parameters.append(self.objective.logvar)
        fused = torch.cuda.is_available() and self.accelerator.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(parameters, lr=self.learning_rate, fused=fused or None)
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer, s.params.get("scheduler_config"), num_training_steps=s.max_steps
        )
        self.module, self.optimizer, self.train_loader, self.lr_scheduler = self.accelerator.prepare(
            self.module, self.optimizer, self.train_loader, self.lr_scheduler
        )
        if self.val_loader is not None:
            self.val_loader = self.accelerator.prepare(self.val_loader)
        if self.ema is not None:
            self.ema.to(self.accelerator.device)
            self.accelerator.register_for_checkpointing(self.ema)
        self.accelerator.register_for_checkpointing(self.state)

    # ----------------------------------------------------------------------------------------------- loop
    @property
    def max_steps(self) -> int:
        s = self.settings
        if s.max_steps is not None:
            return s.max_steps
        epochs = s.max_epochs or 1000  # pytorch-lightning 1.4's default max_epochs
        per_epoch = math.ceil(len(self.train_loader) / s.accumulate_grad_batches)
        return epochs * per_epoch

    def get_input(self, batch):
        from ldm_compat.training.data import get_input

        return get_input(batch, self.settings.first_stage_key).to(self.accelerator.device)

    def get_cond_kwargs(self, batch) -> dict:
        """The batch's conditioning in the pipeline's (diffusers) names, on the device; ``{}`` if unconditional."""
        from ldm_compat.training.data import get_conditioning

        cond = get_conditioning(batch, self.objective.config.conditioning_key, self.settings.params) or {}
        return {k: v.to(self.accelerator.device) for k, v in cond.items()}

    def get_cond(self, batch):
        """The batch's conditioning in the original's dict form (``c_concat``/``c_crossattn``/``c_adm``)."""
        from ldm_compat.models.conditioning import original_cond

        return original_cond(self.objective.config.conditioning_key, **self.get_cond_kwargs(batch))

    def resume(self) -> None:
        spec = self.options.resume_from_checkpoint
        if not spec:
            return
        path = resolve_checkpoint(spec, self.output_dir / "checkpoints")
        if path is None:
            self.accelerator.print(f"--resume_from_checkpoint {spec}: no checkpoint yet, starting a new run")
            return
        self.accelerator.load_state(str(path))
        self.accelerator.print(f"resumed from {path} at step {self.state.global_step}")

    def fit(self) -> dict:
        from tqdm.auto import tqdm

        acc = self.accelerator
        if acc.is_main_process:
            acc.init_trackers("ldm_compat", config={"base_learning_rate": self.settings.base_learning_rate})
        self.resume()
        module = self.module
        module.train()
        progress = tqdm(total=self.max_steps, initial=self.state.global_step, disable=not acc.is_local_main_process,
                        desc="train", unit="step")  # fmt: skip
        last_logs: dict = {}
        while self.state.global_step < self.max_steps:
            loader = self.train_loader
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.state.epoch)
            if self.state.batch_in_epoch:
                loader = acc.skip_first_batches(loader, self.state.batch_in_epoch)
            for batch in loader:
                last_logs = self._train_batch(module, batch) or last_logs
                self.state.batch_in_epoch += 1
                if not acc.sync_gradients:
                    continue
                self.state.global_step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{last_logs.get('train/loss', float('nan')):.4f}")
                self._after_step(batch, last_logs)
                if self.state.global_step >= self.max_steps:
                    break
            else:
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                continue
            break
        progress.close()
        acc.wait_for_everyone()
        return last_logs

    def _train_batch(self, module, batch) -> dict | None:
        acc = self.accelerator
        with acc.accumulate(module):
            if self.settings.params.get("ucg_training"):
                from ldm_compat.training.ucg import apply_ucg

                # SD2's unconditional-guidance dropout; draws from torch's seeded (and checkpointed) global RNG
                batch, _ = apply_ucg(batch, self.settings.params["ucg_training"])
            x = self.get_input(batch)
            cond = self.get_cond(batch)
            t, noise = self._draw_t_and_noise(x)
            with acc.autocast():
                loss, loss_dict = module(x, t, noise, cond)
            finite = torch.isfinite(loss.detach()).all()
            if acc.num_processes > 1:
                # decide together: a process stopping or skipping alone would leave the others waiting in the
                # gradient all-reduce forever
                finite = acc.reduce(finite.float(), reduction="sum").item() == acc.num_processes
            if not finite:
                return self._non_finite(loss)
            acc.backward(loss)
            if acc.sync_gradients and self.settings.gradient_clip_val > 0:
                acc.clip_grad_norm_(module.parameters(), self.settings.gradient_clip_val)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients and self.ema is not None:
            self.ema.step(acc.unwrap_model(module).unet)
        if acc.sync_gradients:
            return {k: v.detach() for k, v in loss_dict.items()}
        return None

    def _draw_t_and_noise(self, x):
        """Timesteps and noise for this process's share of the global batch.

        Every process draws them for the whole global batch (same seed, so the same draws everywhere) and keeps its
        own slice: N processes × b samples get exactly the t and noise that one process × N·b samples gets (Accelerate
        hands process i the i-th of every N batches), so the runs agree. One process draws as ``randn_like(x)``.
        """
        acc, b = self.accelerator, x.shape[0]
        n, rank = acc.num_processes, acc.process_index
        t = torch.randint(0, self.objective.num_timesteps, (n * b,), device=x.device)
        noise = torch.randn((n * b, *x.shape[1:]), device=x.device, dtype=x.dtype)
        return t[rank * b : (rank + 1) * b], noise[rank * b : (rank + 1) * b]

    def _non_finite(self, loss):
        step, value = self.state.global_step, loss.item()
        # with several processes this one's loss may be finite while another's is not
        what = f"loss is {value} (not finite)" if not math.isfinite(value) else "another process's loss is not finite"
        if self.options.nan_policy == "skip":
            logger.warning("step %d: %s, batch skipped", step, what)
            self.optimizer.zero_grad(set_to_none=True)
            return None
        raise FloatingPointError(
            f"step {step}: {what}; stopped. The last good checkpoint is in "
            f"{self.output_dir / 'checkpoints'} (use --nan_policy skip to skip such batches)"
        )

    def _after_step(self, batch, logs: dict) -> None:
        acc, step = self.accelerator, self.state.global_step
        scalars = {k: float(v) for k, v in acc.reduce(logs, reduction="mean").items()} if logs else {}
        scalars["global_step"] = step
        scalars["lr_abs"] = self.optimizer.param_groups[0]["lr"]
        acc.log(scalars, step=step)
        if self.options.checkpointing_steps and step % self.options.checkpointing_steps == 0:
            self.save_checkpoint()
        if self.settings.image_log_frequency and (step % self.settings.image_log_frequency == 0):
            self.log_images(batch)
        interval = self.settings.val_check_interval
        if self.val_loader is not None and interval and step % interval == 0:
            self.validate()

    # ----------------------------------------------------------------------------------------------- outputs
    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        # every process saves (its RNG state is its own); the main one publishes the folder
        return write_checkpoint(
            self.output_dir / "checkpoints", self.state.global_step, acc.save_state,
            self.options.checkpoints_total_limit, is_main=acc.is_main_process, barrier=acc.wait_for_everyone,
        )  # fmt: skip

    @torch.no_grad()
    def validate(self) -> dict:
        """The original ``validation_step``: ``val/*`` with the training weights, ``val/*_ema`` with the EMA."""
        acc = self.accelerator
        module = acc.unwrap_model(self.module)
        module.eval()
        generator = torch.Generator(device="cpu").manual_seed(self.options.seed)
        totals: dict[str, float] = {}
        count = 0
        for index, batch in enumerate(self.val_loader):
            if index >= self.options.validation_batches:
                break
            x, cond = self.get_input(batch), self.get_cond(batch)
            t = torch.randint(0, self.objective.num_timesteps, (x.shape[0],), generator=generator).to(x.device)
            noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
            _, logs = module(x, t, noise, cond)
            scopes = [("", None)]
            if self.ema is not None:
                scopes.append(("_ema", self.ema))
            for suffix, ema in scopes:
                if ema is not None:
                    with ema.ema_scope(module.unet):
                        _, logs = module(x, t, noise, cond)
                for k, v in logs.items():
                    totals[k + suffix] = totals.get(k + suffix, 0.0) + float(v)
            count += 1
        module.train()
        metrics = {k: v / max(count, 1) for k, v in totals.items()}
        acc.log(metrics, step=self.state.global_step)
        monitor = self.settings.monitor
        if monitor in metrics and (self.state.best_metric is None or metrics[monitor] < self.state.best_metric):
            self.state.best_metric = metrics[monitor]
            path = self.save_checkpoint()
            if acc.is_main_process and path is not None:
                best = {"monitor": monitor, "value": metrics[monitor], "checkpoint": path.name}
                (self.output_dir / "checkpoints" / "best.json").write_text(json.dumps(best, indent=1))
        return metrics

    def sampling_pipeline(self):
        from ldm_compat.pipelines.pipeline_ldm_compat import LDMCompatPipeline

        unet = self.accelerator.unwrap_model(self.module).unet
        params = self.settings.params
        return LDMCompatPipeline(
            unet=unet, scheduler=self.scheduler, conditioning_key=params.get("conditioning_key"),
            image_size=params.get("image_size"), channels=params.get("channels"),
        )  # fmt: skip

    @torch.no_grad()
    def log_images(self, batch) -> list[str]:
        from ldm_compat.training.image_logging import log_images, write_image_log

        acc = self.accelerator
        if not acc.is_main_process:
            return []
        module = acc.unwrap_model(self.module)
        module.eval()
        generator = torch.Generator(device="cpu").manual_seed(self.options.seed + self.state.global_step)
        pipe = self.sampling_pipeline()
        # sampling all T steps takes a while on a CPU: a bar of its own, removed when done
        pipe.set_progress_bar_config(desc="image log: sampling", unit="step", leave=False)

        cond_kwargs = self.get_cond_kwargs(batch)

        def sample(n):
            kwargs = {k: v[:n] for k, v in cond_kwargs.items()}
            out = pipe(batch_size=n, generator=generator, output_type="latent", return_intermediates=True,
                       num_inference_steps=self.options.sample_steps, **kwargs)  # fmt: skip
            return out.images, out.intermediates

        x = self.get_input(batch)
        scope = self.ema.ema_scope(module.unet) if self.ema is not None else nullcontext()
        with scope:
            log = log_images(
                x, module.objective.q_sample, self.objective.num_timesteps,
                int(self.settings.params.get("log_every_t", 100)), sample=sample, generator=generator,
            )  # fmt: skip
        module.train()
        tracker = None
        try:
            tracker = acc.get_tracker("tensorboard")
        except Exception:  # no such tracker configured
            tracker = None
        return write_image_log(
            log, self.output_dir, "train", self.state.global_step, self.state.epoch, self.state.batch_in_epoch,
            self.settings.max_images, tracker=tracker,
        )  # fmt: skip

    def save_outputs(self) -> dict[str, str]:
        """The diffusers folder (EMA weights for sampling, everything else kept) and, if asked, the original ckpt."""
        from ldm_compat.convert.training_folder import write_training_folder

        acc = self.accelerator
        outputs: dict[str, str] = {}
        if acc.is_main_process:
            unet = acc.unwrap_model(self.module).unet
            folder = self.output_dir / "pipeline"
            write_training_folder(
                folder, unet=unet, scheduler=self.scheduler, objective=self.objective, ema=self.ema,
                config=self.config, global_step=self.state.global_step, epoch=self.state.epoch, overwrite=True,
            )  # fmt: skip
            outputs["pipeline"] = str(folder)
            if self.options.export_original:
                from ldm_compat.convert.export import diffusers_to_original

                ckpt = self.output_dir / "original" / "model.ckpt"
                diffusers_to_original(folder, ckpt, config_output=ckpt.with_suffix(".yaml"), overwrite=True)
                outputs["original_ckpt"] = str(ckpt)
            if self.options.push_to_hub:
                from ldm_compat.pipelines.hub import push_folder

                outputs["hub"] = push_folder(folder, self.options.hub_model_id or self.output_dir.name)
        acc.wait_for_everyone()
        acc.end_training()
        return outputs


def count_params(model: nn.Module, name: str) -> str:
    """The original ``count_params(model, verbose=True)`` line."""
    total = sum(p.numel() for p in model.parameters())
    return f"{name} has {total * 1.0e-6:.2f} M params."


def train(config, options: TrainOptions, source: str = "config") -> dict[str, str]:
    """Run a whole training job; returns the paths it wrote."""
    trainer = Trainer(config, options, source)
    trainer.fit()
    if trainer.options.checkpointing_steps:
        trainer.save_checkpoint()
    return trainer.save_outputs()


__all__ = ["DDPMTrainModule", "RunState", "TrainOptions", "Trainer", "count_params", "train"]
