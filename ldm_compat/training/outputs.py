"""What a training run writes besides checkpoints: validation metrics, image logs, the final folder and exports.

A mixin of ``Trainer`` (``loop.py``): it uses the trainer's accelerator, module, EMA, settings and run state.
"""

from __future__ import annotations

import json
from contextlib import nullcontext

import torch

from ldm_compat.training import distributed


class TrainerOutputs:
    """``validate``, ``log_images``, ``sampling_pipeline`` and ``save_outputs`` of ``Trainer``."""

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
            if self.latent is None:
                x, cond = self.get_input(batch), self.get_cond(batch)
            else:  # the posterior noise from the validation generator: validating never changes the run
                x, cond = self.latent.validation_inputs(batch, generator)
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
            unet=unet, scheduler=self.scheduler, conditioning_key=self.objective.config.conditioning_key,
            image_size=params.get("image_size"), channels=params.get("channels"),
        )  # fmt: skip

    @torch.no_grad()
    def log_images(self, batch) -> list[str]:
        from ldm_compat.training.image_logging import log_images, write_image_log

        acc = self.accelerator
        if not acc.is_main_process and not acc.is_fsdp2:  # FSDP2: every process joins the sampling forward passes
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

        q_sample = module.objective.q_sample
        if self.latent is not None:
            from ldm_compat.training.latent_images import decoding_log_inputs, finish_latent_log

            x, q_sample, sample = decoding_log_inputs(self.latent, batch, q_sample, sample, generator)
        else:
            x = self.get_input(batch)
        scope = self.ema.ema_scope(module.unet) if self.ema is not None else nullcontext()
        with scope:
            log = log_images(
                x, q_sample, self.objective.num_timesteps,
                int(self.settings.params.get("log_every_t", 100)), sample=sample, generator=generator,
            )  # fmt: skip
        if self.latent is not None:
            log = finish_latent_log(self.latent, log, batch, x)
        module.train()
        if not acc.is_main_process:
            return []
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
        unet, objective, ema = distributed.unsharded_components(acc, self.module, self.ema)  # FSDP2: gathered once
        if acc.is_main_process:
            folder = self.output_dir / "pipeline"
            write_training_folder(
                folder, unet=unet, scheduler=self.scheduler, objective=objective, ema=ema,
                config=self.config, global_step=self.state.global_step, epoch=self.state.epoch, overwrite=True,
                extras=self.latent.original_state_dict() if self.latent is not None else None,
                search_dirs=self.latent.search_dirs if self.latent is not None else (),
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
