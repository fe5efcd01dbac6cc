"""The training loop: what CompVis ``main.py`` + pytorch-lightning did for ``DDPM``, on Accelerate.

``Trainer`` builds everything from an original-style config (``TrainSettings``), then ``fit()`` runs the optimizer
steps. Differences from the original harness, each deliberate:
- EMA updates once per optimizer step (the original updated per micro-batch under gradient accumulation).
- The learning rate scales with ``accumulate × num_processes (all nodes) × batch_size`` (the original ignored
  ``num_nodes``); ``scale_lr=False`` uses ``base_learning_rate`` as given.
- ``scheduler_config`` is honoured for pixel-space DDPM too (the original only used it in LatentDiffusion).
- Checkpoints are written atomically; resume restores weights, EMA, optimizer, LR schedule, RNG and data position.
- A training step never waits for the device: losses and the non-finite check stay there until a check point (a log
  step, checkpoint, image log, validation, the last step; ``step_log``), so ``--nan_policy stop`` stops there.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldm_compat.training import distributed
from ldm_compat.training.checkpoints import resolve_checkpoint, write_checkpoint
from ldm_compat.training.outputs import TrainerOutputs
from ldm_compat.training.settings import TrainSettings
from ldm_compat.training.step_log import Position, StepLog, all_finite, describe_loss

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
    compile: bool = False  # torch.compile the UNet (in place: state-dict keys unchanged)
    channels_last: bool = False  # UNet weights (and so activations) in channels_last memory format
    latent_cache: str | None = None  # LatentDiffusion: folder of the first-stage/cond-stage cache (latent_cache.py)


class Trainer(TrainerOutputs):
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
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

        self.accelerator = Accelerator(
            gradient_accumulation_steps=self.settings.accumulate_grad_batches,
            mixed_precision=options.mixed_precision,
            # batches from pinned memory are copied without blocking the host (a blocking copy is a sync)
            dataloader_config=DataLoaderConfiguration(non_blocking=True),
            log_with=None if options.report_to in (None, "none") else options.report_to,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
            **distributed.accelerator_kwargs(),
        )
        s = self.settings  # FSDP2 on the CPU, refusals, DeepSpeed's accumulation and clipping, a shared output folder
        distributed.check_distributed_setup(
            self.accelerator, self.output_dir, s.accumulate_grad_batches, s.gradient_clip_val
        )
        set_seed(options.seed)
        self.state = RunState()
        self.step_log = StepLog()
        self.last_logged: dict = {}
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
            probe = self.output_dir / f".write_test-{uuid.uuid4().hex}"  # one per process: they may share the folder
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
        self.latent = None  # LatentDiffusion: first stage, cond stage, scale factor (training/latent_model.py)
        if self.settings.is_latent:
            from ldm_compat.training.latent_model import build_latent_model

            self.latent = build_latent_model(self.config, params, self.settings.source, self.accelerator)
        self.unet = LDMUNetModel.from_ldm_config(params["unet_config"])
        if self.options.channels_last:
            if self.unet.config.dims != 2:
                raise ValueError(
                    f"--channels_last: needs a 2-D UNet (unet_config.params.dims), got {self.unet.config.dims}"
                )
            # before the EMA is built, so its shadows get the same strides (the fused update wants them equal)
            self.unet.to(memory_format=torch.channels_last)
        if self.latent is not None:
            from ldm_compat.training.latent_objective import LatentDiffusionObjective as DDPMObjective
        self.objective = DDPMObjective.from_ldm_config(params, **self.settings.objective_flags)
        self.accelerator.print(self.settings.deviation_report(self.objective))
        self.scheduler = LDMDDPMScheduler.from_ldm_config(params)
        self.ema = None
        if self.settings.use_ema:
            from ldm_compat.training.ema import LitEmaModel

            self.ema = LitEmaModel(self.unet)
        if params.get("ckpt_path"):
            from ldm_compat.training.init_ckpt import init_from_ckpt

            if self.latent is not None:
                init_from_ckpt = self.latent.init_from_ckpt  # also the first and cond stage, scale_factor
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
        if self.options.compile:
            self.unet.compile()  # in place: the module, its parameters and state-dict keys stay what they are
        if self.latent is None:
            self.module = DDPMTrainModule(self.unet, self.objective)
        else:
            self.module = self.latent.train_module(self.unet, self.objective)

    def _build_data(self) -> None:
        from ldm_compat.training.data import build_dataloader, build_dataset

        data = self.settings.data
        image_size = self.settings.params.get("image_size")
        if self.latent is not None and image_size is not None:
            image_size = image_size * 2**self.latent.options.num_downs  # the model's image_size counts latents
        train = build_dataset(data, split="train", image_size=image_size)
        if self.latent is not None and self.options.latent_cache:
            from ldm_compat.training.latent_cache import cached_dataset

            train = cached_dataset(train, self.latent, self.options.latent_cache, self.accelerator)
        self.train_loader = build_dataloader(
            train, self.settings.batch_size, shuffle=True, num_workers=self.options.dataloader_num_workers,
            seed=self.options.seed,
        )  # fmt: skip
        self.val_loader = None
        if (data.get("params") or {}).get("validation") is not None:
            val = build_dataset(data, split="validation", image_size=image_size)
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
        if self.latent is not None:
            # cond_stage_trainable: the original's "Also optimizing conditioner params!"
            parameters += [p for m in self.latent.trainable_cond_modules().values() for p in m.parameters()]
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
            ema_state = distributed.ema_checkpoint_object(self.accelerator, self.ema, self.module)  # FSDP2: sharded
            self.accelerator.register_for_checkpointing(ema_state)
        if self.latent is not None:
            self.accelerator.register_for_checkpointing(self.latent)
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
        """The model's ``x_start``: the image as ``b c h w``; for LatentDiffusion its encoding ``z``."""
        if self.latent is not None:
            return self.latent.get_input(batch)
        from ldm_compat.training.data import get_input

        return get_input(batch, self.settings.first_stage_key).to(self.accelerator.device)

    def get_cond_kwargs(self, batch) -> dict:
        """The batch's conditioning in the pipeline's (diffusers) names, on the device; ``{}`` if unconditional."""
        if self.latent is not None:
            return self.latent.cond_kwargs(self.latent.encoded_conditioning(batch))
        from ldm_compat.training.data import get_conditioning

        cond = get_conditioning(batch, self.objective.config.conditioning_key, self.settings.params) or {}
        return {k: v.to(self.accelerator.device) for k, v in cond.items()}

    def get_cond(self, batch):
        """The batch's conditioning in the original's dict form (``c_concat``/``c_crossattn``/``c_adm``); for
        LatentDiffusion ``c`` of its ``get_input`` (the raw input when the cond stage is trained)."""
        if self.latent is not None:
            return self.latent.conditioning(batch)
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
        distributed.load_state(self.accelerator, self.ema, str(path))
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
        shown = None
        while self.state.global_step < self.max_steps:
            loader = self.train_loader
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.state.epoch)
            if self.state.batch_in_epoch:
                loader = acc.skip_first_batches(loader, self.state.batch_in_epoch)
            for batch in loader:
                logs = self._train_batch(module, batch)
                self.state.batch_in_epoch += 1
                if not acc.sync_gradients:
                    continue
                self.state.global_step += 1
                progress.update(1)
                self._after_step(batch, logs or {})
                if self.last_logged is not shown and "train/loss" in self.last_logged:
                    shown = self.last_logged
                    progress.set_postfix(loss=f"{shown['train/loss']:.4f}")
                if self.state.global_step >= self.max_steps:
                    break
            else:
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                continue
            break
        progress.close()
        self._check_finite()  # (the last step is a check point; this covers a loop that ended otherwise)
        acc.wait_for_everyone()
        return self.last_logged

    def _train_batch(self, module, batch) -> dict | None:
        acc = self.accelerator
        if self.latent is not None:
            self.latent.on_train_batch_start(batch, self.state, acc)  # scale_by_std
        with acc.accumulate(module):
            if self.settings.params.get("ucg_training"):
                from ldm_compat.training.ucg import apply_ucg

                # SD2's unconditional-guidance dropout; draws from torch's seeded (and checkpointed) global RNG
                batch, _ = apply_ucg(batch, self.settings.params["ucg_training"], num_processes=acc.num_processes,
                                     process_index=acc.process_index)  # fmt: skip
            x = self.get_input(batch)
            cond = self.get_cond(batch)
            t, noise = self._draw_t_and_noise(x)
            with acc.autocast():
                loss, loss_dict = module(x, t, noise, cond)
            if self.options.nan_policy == "stop":
                # read at the next check point (no sync now): nothing this run does after a bad batch is saved
                self.step_log.watch(loss, Position(self.state.global_step, self.state.epoch, self.state.batch_in_epoch))
            acc.backward(loss)
            # skip must decide now whether the optimizer, LR schedule and EMA step: the one read per step, made
            # after the backward pass is queued so the device is busy while the host waits
            if self.options.nan_policy == "skip" and not all_finite(loss, acc):
                logger.warning("step %d: %s, batch skipped", self.state.global_step, describe_loss(loss.item()))
                self.optimizer.zero_grad(set_to_none=True)
                return None
            if acc.sync_gradients and self.settings.gradient_clip_val > 0:
                acc.clip_grad_norm_(module.parameters(), self.settings.gradient_clip_val)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients and self.ema is not None:
            self.ema.step(acc.unwrap_model(module).unet)
        if acc.sync_gradients:
            return loss_dict
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
        if self.latent is not None:
            # LatentDiffusion draws the noise later, after what the cond stage draws (LatentTrainModule)
            return t[rank * b : (rank + 1) * b], None
        noise = torch.randn((n * b, *x.shape[1:]), device=x.device, dtype=x.dtype)
        return t[rank * b : (rank + 1) * b], noise[rank * b : (rank + 1) * b]

    def _check_finite(self) -> None:
        """``--nan_policy stop``: raise if a loss since the last check point was not finite (``StepLog.check``)."""
        self.step_log.check(self.accelerator.gather, self.state, self.output_dir / "checkpoints")

    def _is_check_point(self, step: int) -> bool:
        """Steps at which the loop reads the device: logging, and where it writes or samples anyway."""
        s = self.settings
        val = s.val_check_interval if self.val_loader is not None else None
        every = (s.log_every_n_steps, self.options.checkpointing_steps, s.image_log_frequency, val)
        return step >= self.max_steps or any(n and step % n == 0 for n in every)

    def _after_step(self, batch, logs: dict) -> None:
        """Per optimizer step: keep ``logs`` on the device; at a check point, check, log and write."""
        acc, step = self.accelerator, self.state.global_step
        if logs:
            self.step_log.add({k: v.detach() for k, v in logs.items()})
        if not self._is_check_point(step):
            return
        self._check_finite()
        # the mean of each value over the steps since the last log (every process's), then the step's LR
        scalars = self.step_log.means(lambda values: acc.reduce(values, reduction="mean"))
        scalars["global_step"] = step
        scalars["lr_abs"] = self.optimizer.param_groups[0]["lr"]
        acc.log(scalars, step=step)
        self.last_logged = scalars
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
            self.output_dir / "checkpoints", self.state.global_step, lambda d: distributed.save_state(acc, self.ema, d),
            self.options.checkpoints_total_limit, is_main=acc.is_main_process, barrier=acc.wait_for_everyone,
        )  # fmt: skip


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
