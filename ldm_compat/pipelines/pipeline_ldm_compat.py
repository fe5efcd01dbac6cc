"""``LDMCompatPipeline``: sampling a latent-diffusion ``DDPM`` the way the original code does, as a diffusers pipeline.

With ``LDMDDPMScheduler`` the loop is the original ``DDPM.p_sample_loop`` (every one of the T steps from t = T-1 to
0, ``clip_denoised``, ``intermediates`` every ``log_every_t``); with ``LDMDDIMScheduler`` it is the original
``DDIMSampler.sample``; any diffusers scheduler can be swapped in (``DDIMScheduler``, ``DPMSolverMultistepScheduler``,
``EulerDiscreteScheduler``, ``UniPCMultistepScheduler``, …) through ``Scheduler.from_config(pipe.scheduler.config)``.
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ldm_compat.models.conditioning import apply_model
from ldm_compat.pipelines import folder as folder_format
from ldm_compat.pipelines.conditioning_inputs import (
    check_conditioning_key,
    infer_batch_size,
    needs_concat,
    prepare_conditioning,
)
from ldm_compat.pipelines.output import LDMCompatPipelineOutput, check_output_type, postprocess
from ldm_compat.pipelines.stock import stock_pipeline_for

logger = logging.getLogger(__name__)

#: the original ``DDPM``'s default ``log_every_t``
DEFAULT_LOG_EVERY_T = 100


class LDMCompatPipeline(DiffusionPipeline):
    r"""Sample an original latent-diffusion ``DDPM`` (CompVis / Stability-AI) with diffusers components.

    Args:
        unet: the denoiser, normally ``LDMUNetModel`` (a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` works
            too: it is called as ``unet(sample, t, encoder_hidden_states=..., class_labels=...).sample`` with only
            the arguments the model's conditioning needs).
        scheduler: normally ``LDMDDPMScheduler`` (ancestral sampling = ``p_sample_loop``) or ``LDMDDIMScheduler``;
            any diffusers scheduler works.
        conditioning_key: the original ``DDPM``'s ``conditioning_key`` (the ``DiffusionWrapper`` routing): ``None``,
            ``"concat"``, ``"crossattn"``, ``"hybrid"``, ``"adm"``, ``"crossattn-adm"`` or ``"hybrid-adm"``.
        image_size: the original ``DDPM``'s ``image_size`` (sampling height = width); ``None`` takes the UNet's
            ``sample_size``.
        channels: the original ``DDPM``'s ``channels`` (channels of the sample); ``None`` takes the UNet's
            ``in_channels`` (``out_channels`` for concat models, whose ``in_channels`` include the concat).

    The three settings are pipeline config (``pipe.config``) and are written to ``model_index.json``.
    """

    model_cpu_offload_seq = "unet"

    def __init__(
        self,
        unet: ModelMixin,
        scheduler: SchedulerMixin,
        conditioning_key: str | None = None,
        image_size: int | None = None,
        channels: int | None = None,
    ):
        super().__init__()
        check_conditioning_key(conditioning_key)
        for name, value in (("image_size", image_size), ("channels", channels)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}: expected a positive int or None, got {value!r}")
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(conditioning_key=conditioning_key, image_size=image_size, channels=channels)

    @classmethod
    def from_ldm_config(cls, config) -> LDMCompatPipeline:
        """A pipeline with freshly initialised weights from an original config (the whole YAML or ``model.params``).

        Builds ``LDMUNetModel.from_ldm_config(unet_config)`` and ``LDMDDPMScheduler.from_ldm_config(params)`` and
        takes ``conditioning_key``, ``image_size`` and ``channels`` with the original ``DDPM`` defaults (None, 256,
        3). Load weights afterwards (``pipe.unet.load_original_state_dict(...)``) or use the conversion helpers.
        """
        from ldm_compat.config import model_params
        from ldm_compat.models.unet_ldm import LDMUNetModel
        from ldm_compat.schedulers.scheduling_ldm_ddpm import LDMDDPMScheduler

        params = model_params(config)
        if "unet_config" not in params:
            raise ValueError("config: expected 'unet_config' in model.params (an original DDPM config)")
        return cls(
            LDMUNetModel.from_ldm_config(params["unet_config"]),
            LDMDDPMScheduler.from_ldm_config(params),
            conditioning_key=params.get("conditioning_key"),
            image_size=int(params.get("image_size", 256)),
            channels=int(params.get("channels", 3)),
        )

    # ------------------------------------------------------------------------------------------------ shape
    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one sample, from the pipeline config or the UNet's."""
        unet_config = self.unet.config
        channels = self.config.channels
        if channels is None:
            key = self.config.conditioning_key
            channels = unet_config.out_channels if needs_concat(key) else unet_config.in_channels
        size = self.config.image_size if self.config.image_size is not None else unet_config.sample_size
        if size is None:
            raise ValueError("image_size: neither the pipeline config nor the UNet config (sample_size) sets it")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return int(channels), int(height), int(width)

    @property
    def stock_pipeline(self) -> str | None:
        """The diffusers pipeline class that samples this model identically (saved folders name it), else ``None``.

        See ``ldm_compat.pipelines.stock.stock_pipeline_for``.
        """
        c = self.config
        components = {k: v for k, v in self.components.items() if k not in ("unet", "scheduler")}
        return stock_pipeline_for(
            c.conditioning_key,
            dict(self.unet.config),
            image_size=c.image_size,
            channels=c.channels,
            scheduler=type(self.scheduler),
            **components,
        )

    @property
    def runs_as_stock_ddpm(self) -> bool:
        """Whether diffusers' ``DDPMPipeline`` samples this model identically."""
        return self.stock_pipeline == "DDPMPipeline"

    # ------------------------------------------------------------------------------------------------ sampling
    def _set_timesteps(self, num_inference_steps: int | None, device: torch.device) -> None:
        params = inspect.signature(self.scheduler.set_timesteps).parameters
        if num_inference_steps is None and not type(self.scheduler).__module__.startswith("ldm_compat."):
            # diffusers schedulers need a count; the original p_sample_loop runs every training step. Our
            # schedulers choose their own default (LDMDDPMScheduler: every training step).
            num_inference_steps = self.scheduler.config.num_train_timesteps
        elif num_inference_steps is not None and (
            not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1
        ):
            raise ValueError(f"num_inference_steps: expected a positive int or None, got {num_inference_steps!r}")
        kwargs = {"device": device} if "device" in params else {}
        if num_inference_steps is None:
            self.scheduler.set_timesteps(**kwargs)
        else:
            self.scheduler.set_timesteps(num_inference_steps, **kwargs)

    def _step_kwargs(self, eta: float, generator, variance_noise) -> dict:
        params = inspect.signature(self.scheduler.step).parameters
        name = type(self.scheduler).__name__
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        elif eta:
            raise ValueError(f"eta: {name}.step takes no eta (use a DDIM scheduler for eta={eta})")
        if "generator" in params:
            kwargs["generator"] = generator
        if variance_noise is not None and "variance_noise" not in params:
            raise ValueError(f"variance_noise: {name}.step takes no variance_noise")
        return kwargs

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | Sequence[int] | None = None,
        concat: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_intermediates: bool = False,
        *,
        log_every_t: int | None = None,
        variance_noise: Sequence[torch.Tensor] | None = None,
    ) -> LDMCompatPipelineOutput | tuple:
        r"""Draw samples.

        Args:
            batch_size: number of samples. When left at 1, a batch carried by ``latents`` or the conditioning is
                used; conditioning with batch 1 is broadcast.
            num_inference_steps: sampler steps. ``None``: the scheduler's default — every training step for
                ``LDMDDPMScheduler`` (the original ``p_sample_loop``); ``num_train_timesteps`` for schedulers that
                need a number.
            generator: ``torch.Generator`` (or one per sample) for the initial noise and the scheduler's noise.
            latents: the initial noise ``x_T`` (``(B, channels, H, W)``); drawn from ``generator`` when ``None``.
                Multiplied by ``scheduler.init_noise_sigma`` (1 for DDPM/DDIM) like diffusers pipelines do.
            eta: DDIM ``eta`` (schedulers whose ``step`` takes ``eta``); nonzero for another scheduler is an error.
            encoder_hidden_states: cross-attention context ``(B, tokens, context_dim)`` — the original
                ``c_crossattn`` (already concatenated along tokens) for ``crossattn``/``hybrid``/``*-adm`` models.
            class_labels: class labels ``(B,)`` — the original ``y`` / ``c_adm`` for ``adm`` models (a
                ``(B, adm_in_channels)`` tensor when the UNet's ``num_classes`` is ``"sequential"``).
            concat: ``(B, C_concat, H, W)`` — the original ``c_concat``, concatenated to the sample along channels
                before every UNet call (``concat``/``hybrid`` models).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (raw samples; see the output class).
            return_dict: return a ``LDMCompatPipelineOutput`` instead of a tuple.
            return_intermediates: also return the original ``intermediates`` (see the output class).
            log_every_t: spacing of the intermediates; default: the scheduler config's ``log_every_t`` (the
                original ``DDPM`` setting), else 100.
            variance_noise: optional list with one noise tensor per step, handed to ``scheduler.step`` instead of
                noise from ``generator`` — to replay a recorded chain (e.g. the original sampler's noise).

        Returns:
            ``LDMCompatPipelineOutput``, or ``(images,)`` / ``(images, intermediates)`` when ``return_dict=False``.
        """
        check_output_type(output_type)
        batch = infer_batch_size(batch_size, latents, encoder_hidden_states, class_labels, concat)
        shape = self.sample_shape
        device, dtype = self._execution_device, self.unet.dtype
        cond = prepare_conditioning(
            self.config.conditioning_key,
            self.unet.config,
            batch_size=batch,
            sample_shape=shape,
            encoder_hidden_states=encoder_hidden_states,
            class_labels=class_labels,
            concat=concat,
            device=device,
            dtype=dtype,
        )
        if log_every_t is None:
            log_every_t = self.scheduler.config.get("log_every_t", None) or DEFAULT_LOG_EVERY_T
        if not isinstance(log_every_t, int) or log_every_t < 1:
            raise ValueError(f"log_every_t: expected a positive int, got {log_every_t!r}")

        if latents is None:
            latents = randn_tensor((batch, *shape), generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != (batch, *shape):
            raise ValueError(f"latents: expected shape {(batch, *shape)}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=dtype)

        self._set_timesteps(num_inference_steps, device)
        timesteps = self.scheduler.timesteps
        num_steps = len(timesteps)
        step_kwargs = self._step_kwargs(eta, generator, variance_noise)
        if variance_noise is not None and len(variance_noise) != num_steps:
            raise ValueError(f"variance_noise: expected one tensor per step ({num_steps}), got {len(variance_noise)}")

        sample = latents * self.scheduler.init_noise_sigma
        intermediates, pred_intermediates, logged_t = [], [], []
        if return_intermediates:
            intermediates.append(sample)
            pred_intermediates.append(sample)
            logged_t.append(None)
        have_pred = True
        for k, t in enumerate(self.progress_bar(timesteps)):
            model_input = self.scheduler.scale_model_input(sample, t)
            t_batch = (
                t.to(device).reshape(-1).expand(batch) if torch.is_tensor(t) else torch.full((batch,), t, device=device)
            )
            # the original DiffusionWrapper routing (concat / cross-attention context / adm labels)
            model_output = apply_model(self.unet, model_input, t_batch, cond.cond, self.config.conditioning_key)
            if variance_noise is not None:
                step_kwargs["variance_noise"] = variance_noise[k].to(device=device, dtype=sample.dtype)
            out = self.scheduler.step(model_output, t, sample, **step_kwargs)
            sample = out.prev_sample
            index = num_steps - 1 - k  # the original counts steps down; for the full chain it equals t
            if return_intermediates and (index % log_every_t == 0 or index == num_steps - 1):
                intermediates.append(sample)
                pred = getattr(out, "pred_original_sample", None)
                have_pred = have_pred and pred is not None
                pred_intermediates.append(pred)
                logged_t.append(int(t))

        images = postprocess(sample, output_type)
        result = {"images": images}
        if return_intermediates:
            result["intermediates"] = [postprocess(x, output_type) for x in intermediates]
            result["pred_original_intermediates"] = (
                [postprocess(x, output_type) for x in pred_intermediates] if have_pred else None
            )
            result["intermediate_timesteps"] = logged_t
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, result["intermediates"]) if return_intermediates else (images,)
        return LDMCompatPipelineOutput(**result)

    # ------------------------------------------------------------------------------------------------ saving / loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> LDMCompatPipeline:
        """Load a pipeline folder or Hub repo written by ``save_pretrained`` (any conditioning, old folders too).

        ``DiffusionPipeline.from_pretrained`` does the loading, so its keyword arguments work as for any diffusers
        pipeline (``dtype`` / ``torch_dtype`` including the per-component dict, ``device_map``, ``variant``,
        ``low_cpu_mem_usage``, component overrides, …); ``custom_pipeline`` is refused (this is the pipeline).
        A repo id is downloaded with ``download`` (diffusers' own download refuses our components:
        huggingface/diffusers#5553). The folder's ``.py`` files must be ldm_compat's loader files
        (``folder.check_loader_files``) and none of them is run: ``load_config`` names our components by the
        package (``folder.importable_index``), so no ``trust_remote_code`` is needed.
        """
        if kwargs.get("custom_pipeline") is not None:
            raise ValueError("custom_pipeline: not supported by LDMCompatPipeline.from_pretrained (it is the pipeline)")
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            path = cls.download(path, **kwargs)
        folder_format.check_loader_files(path)
        index = folder_format.read_model_index(path)  # a one-line error when the folder is not a pipeline
        pipe = super().from_pretrained(path, **kwargs)
        unlisted = folder_format.unlisted_stage_folders(path, index)
        if unlisted:
            logger.warning(
                "%s: %s (the LatentDiffusion first/cond stage) are not used by LDMCompatPipeline yet: it runs the "
                "UNet in latent space only; load them with their own classes (e.g. AutoencoderKL.from_pretrained("
                "folder, subfolder='vae'), or ldm_compat.convert.latent.load_folder_first_stage(folder))",
                path, ", ".join(f"{name}/" for name in unlisted),
            )  # fmt: skip
        if path != os.fspath(pretrained_model_name_or_path):
            pipe.register_to_config(_name_or_path=os.fspath(pretrained_model_name_or_path))
        return pipe

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``ConfigMixin.load_config``, with our components made importable (``folder.importable_index``).

        ``from_pretrained`` reads the pipeline class and the component libraries from here: a ``[file, class]``
        ``_class_name`` becomes the class name and loader-file libraries the modules they name, so diffusers
        imports neither file.
        """
        result = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        path = os.fspath(pretrained_model_name_or_path)
        converted = folder_format.importable_index(path if os.path.isdir(path) else None, config)
        config.clear()
        config.update(converted)
        return result

    @classmethod
    def download(cls, pretrained_model_name, **kwargs) -> str:
        """Download a Hub repo (configs, safetensors weights, loader files, ``ldm_extras/``); returns the folder.

        See ``ldm_compat.pipelines.folder.download``.
        """
        return folder_format.download(pretrained_model_name, **kwargs)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """``DiffusionPipeline.save_pretrained``, then the ldm_compat folder format (``ldm_compat.pipelines.folder``).

        ``model_index.json`` names the stock diffusers pipeline that samples this model identically
        (``stock_pipeline``; plain ``DiffusionPipeline.from_pretrained(folder)`` then loads it), else this class
        through its loader file. ``safe_serialization=False`` writes pickle-based ``.bin`` weights as diffusers
        does (loadable, but never pushed). With ``push_to_hub=True`` the folder is then pushed with
        ``ldm_compat.hub.push_folder`` (``repo_id`` defaults to the folder name; ``token``, ``private``,
        ``commit_message``, ``create_pr`` are passed on).
        """
        push_options = {
            k: kwargs.pop(k) for k in ("repo_id", "token", "private", "commit_message", "create_pr") if k in kwargs
        }
        super().save_pretrained(
            save_directory,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            **kwargs,
        )
        folder_format.finalize_folder(save_directory, type(self), self.stock_pipeline)
        if push_to_hub:
            from ldm_compat.hub import push_folder

            repo_id = push_options.pop("repo_id", None) or Path(save_directory).resolve().name
            push_folder(save_directory, repo_id, **push_options)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        *,
        revision: str | None = None,
        license: str | None = None,
        training: dict | None = None,
        original_config: dict | str | None = None,
        model_description: str | None = None,
        samples=None,
    ):
        """Save the pipeline to a temporary folder and push it with a model card (``ldm_compat.hub.push_folder``).

        ``training`` (facts for the card: steps, data, hardware, EMA, …) and ``original_config`` (the original YAML
        as text or a mapping) are stored in ``ldm_extras/`` and shown on the card; ``samples`` (PIL images) become
        the card's ``sample_grid.png``. Returns the commit info (a ``str`` URL subclass) of the upload.
        """
        from ldm_compat.hub import push_folder, write_card_extras

        if not safe_serialization:
            raise ValueError("safe_serialization=False: ldm_compat pushes safetensors weights only")
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, safe_serialization=safe_serialization, variant=variant)
            write_card_extras(tmp, training=training, original_config=original_config, samples=samples)
            return push_folder(
                tmp,
                repo_id,
                token=token,
                private=private,
                commit_message=commit_message,
                create_pr=create_pr,
                revision=revision,
                license=license,
                model_description=model_description,
            )
