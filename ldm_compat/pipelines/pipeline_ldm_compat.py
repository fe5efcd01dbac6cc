"""``LDMCompatPipeline``: sampling a latent-diffusion ``DDPM`` / ``LatentDiffusion`` the way the original code does.

With ``LDMDDPMScheduler`` the loop is the original ``DDPM.p_sample_loop`` (every one of the T steps from t = T-1 to
0, ``clip_denoised``, ``intermediates`` every ``log_every_t``); with ``LDMDDIMScheduler`` / ``LDMPLMSScheduler`` it
is the original ``DDIMSampler.sample`` / ``PLMSSampler.sample``, classifier-free guidance included; any diffusers
scheduler can be swapped in (``DDIMScheduler``, ``DPMSolverMultistepScheduler``, ``EulerDiscreteScheduler``, …)
through ``Scheduler.from_config(pipe.scheduler.config)``. Latent models decode through their first stage
(``first_stage_io``); prompts, class labels and images are encoded by the cond stage (``latent_inputs``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ldm_compat.models.conditioning import apply_model
from ldm_compat.pipelines import first_stage_io, latent_inputs
from ldm_compat.pipelines import folder as folder_format
from ldm_compat.pipelines.conditioning_inputs import (
    check_conditioning_key,
    infer_batch_size,
    needs_concat,
    prepare_conditioning,
)
from ldm_compat.pipelines.guidance import guided_model_output
from ldm_compat.pipelines.loop import set_timesteps, step_kwargs
from ldm_compat.pipelines.output import LDMCompatPipelineOutput, check_output_type, postprocess
from ldm_compat.pipelines.stock import stock_pipeline_for

logger = logging.getLogger(__name__)

#: the original ``DDPM``'s default ``log_every_t``
DEFAULT_LOG_EVERY_T = 100
#: the latent components (first stage, cond stage), all optional; a pixel-space model has none
LATENT_COMPONENTS = (*first_stage_io.FIRST_STAGE_COMPONENTS, *latent_inputs.COND_STAGE_COMPONENTS)


class LDMCompatPipeline(DiffusionPipeline):
    r"""Sample an original latent-diffusion ``DDPM`` or ``LatentDiffusion`` (CompVis / Stability-AI) with diffusers
    components.

    Args:
        unet: the denoiser, normally ``LDMUNetModel`` (a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` works
            too: it is called as ``unet(sample, t, encoder_hidden_states=..., class_labels=...).sample`` with only
            the arguments the model's conditioning needs).
        scheduler: ``LDMDDPMScheduler`` (ancestral sampling = ``p_sample_loop``), ``LDMDDIMScheduler``,
            ``LDMPLMSScheduler``; any diffusers scheduler works.
        conditioning_key: the original ``conditioning_key`` (the ``DiffusionWrapper`` routing): ``None``,
            ``"concat"``, ``"crossattn"``, ``"hybrid"``, ``"adm"``, ``"crossattn-adm"`` or ``"hybrid-adm"``.
        image_size: the original ``image_size`` (sampling height = width, latents for a ``LatentDiffusion``);
            ``None`` takes the UNet's ``sample_size``.
        channels: the original ``channels`` (channels of the sample); ``None`` takes the UNet's ``in_channels``
            (``out_channels`` for concat models, whose ``in_channels`` include the concat).
        vae, vqvae: the first stage, a stock ``AutoencoderKL`` or ``VQModel`` (one of the two names; diffusers'
            LDM pipelines call it ``vqvae`` whatever its class).
        text_encoder, tokenizer, bert, class_embedder: the cond stage's components (``ldm_compat.models.cond_stage``).
        first_stage_config, cond_stage_config: the original YAML entries (``{target, params}``) saying which
            original classes the components stand for; ``None``: inferred from the components.
        scale_by_std: the original ``scale_by_std`` (its ``scale_factor`` is then a float32 buffer).
        concat_keys, masked_image_key: ``LatentInpaintDiffusion``'s (inpainting models; ``None`` otherwise).

    Every setting is pipeline config (``pipe.config``), written to ``model_index.json``.
    """

    model_cpu_offload_seq = "text_encoder->bert->class_embedder->unet->vae->vqvae"
    _optional_components = list(LATENT_COMPONENTS)

    def __init__(
        self,
        unet: ModelMixin,
        scheduler: SchedulerMixin,
        conditioning_key: str | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        vae: ModelMixin | None = None,
        vqvae: ModelMixin | None = None,
        text_encoder=None,
        tokenizer=None,
        bert=None,
        class_embedder: ModelMixin | None = None,
        first_stage_config: dict | None = None,
        cond_stage_config: dict | str | None = None,
        scale_by_std: bool = False,
        concat_keys: list[str] | None = None,
        masked_image_key: str | None = None,
    ):
        super().__init__()
        check_conditioning_key(conditioning_key)
        for name, value in (("image_size", image_size), ("channels", channels)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}: expected a positive int or None, got {value!r}")
        first_stage_io.first_stage_component({"vae": vae, "vqvae": vqvae})  # one first stage at most
        if concat_keys is not None and not needs_concat(conditioning_key):
            raise ValueError(f"concat_keys: conditioning_key={conditioning_key!r} concatenates nothing")
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, vqvae=vqvae, text_encoder=text_encoder,
                              tokenizer=tokenizer, bert=bert, class_embedder=class_embedder)  # fmt: skip
        self.register_to_config(
            conditioning_key=conditioning_key,
            image_size=image_size,
            channels=channels,
            first_stage_config=first_stage_io.trim_first_stage_config(first_stage_config),
            cond_stage_config=cond_stage_config,
            scale_by_std=bool(scale_by_std),
            concat_keys=None if concat_keys is None else list(concat_keys),
            masked_image_key=masked_image_key,
        )

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
        components = {k: v for k, v in self.components.items() if k not in ("unet", "scheduler") and v is not None}
        return stock_pipeline_for(
            c.conditioning_key,
            dict(self.unet.config),
            image_size=c.image_size,
            channels=c.channels,
            scheduler=type(self.scheduler),
            scheduler_config=dict(self.scheduler.config),
            pipeline_config={k: c.get(k) for k in folder_format.LATENT_CONFIG_KEYS},
            **components,
        )

    @property
    def runs_as_stock_ddpm(self) -> bool:
        """Whether diffusers' ``DDPMPipeline`` samples this model identically."""
        return self.stock_pipeline == "DDPMPipeline"

    # ------------------------------------------------------------------------------------------------ latent stages
    @property
    def first_stage(self):
        """The first stage with the original semantics (``ldm_compat.models.first_stage.FirstStage``), or ``None``."""
        _, model = first_stage_io.first_stage_component(self.components)
        if model is None:
            return None
        return first_stage_io.original_first_stage(model, self.config.first_stage_config, self.config.scale_by_std)

    @property
    def cond_stage(self):
        """The cond stage with the original ``get_learned_conditioning`` (``ldm_compat.models.cond_stage``), or
        ``None``."""
        components = {k: getattr(self, k, None) for k in latent_inputs.COND_STAGE_COMPONENTS}
        first = self.first_stage if self.config.cond_stage_config == latent_inputs.FIRST_STAGE else None
        return latent_inputs.build_cond_stage(self.config.cond_stage_config, components, first and first.model)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The original ``decode_first_stage(latents)`` (images in [-1, 1], not clamped); pixel models: as given."""
        first_stage = self.first_stage
        if first_stage is None:
            return latents
        return first_stage.decode_first_stage(latents.to(first_stage.model.dtype))

    def _to_output(self, sample: torch.Tensor, output_type: str):
        return postprocess(sample if output_type == "latent" else self.decode_latents(sample), output_type)

    # ------------------------------------------------------------------------------------------------ sampling
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
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        image=None,
        mask_image=None,
        negative_encoder_hidden_states: torch.Tensor | None = None,
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
                ``c_crossattn`` (already concatenated along tokens), instead of a ``prompt``.
            class_labels: class labels ``(B,)``: embedded by a ``class_embedder`` (the original ClassEmbedder, a
                cross-attention context), else the UNet's ``y`` / ``c_adm`` for ``adm`` models (a
                ``(B, adm_in_channels)`` tensor when the UNet's ``num_classes`` is ``"sequential"``).
            concat: ``(B, C_concat, H, W)`` — the original ``c_concat``, concatenated to the sample along channels
                before every UNet call (``concat``/``hybrid`` models), instead of ``image`` / ``mask_image``.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` (decoded by the first stage for latent models) or ``"latent"``
                (the raw samples; see the output class).
            return_dict: return a ``LDMCompatPipelineOutput`` instead of a tuple.
            return_intermediates: also return the original ``intermediates`` (see the output class).
            prompt, negative_prompt: text for a text cond stage; the negative prompt replaces ``""`` as the
                unconditional conditioning.
            guidance_scale: classifier-free guidance ``e_u + s·(e_c − e_u)`` as the original samplers, one UNet call
                on ``[uc, c]`` (``pipelines.guidance``); 1: no guidance, one call on ``c``.
            num_images_per_prompt: samples per prompt / class label / image (each row repeated, in order).
            image, mask_image: inpainting (``LatentInpaintDiffusion``): the image in [-1, 1] and the mask in [0, 1]
                (1 = repaint), tensors or PIL images; super-resolution / ``__is_first_stage__`` models: the
                conditioning image. The sample size then follows the image.
            negative_encoder_hidden_states: the unconditional context for guidance with ``encoder_hidden_states``.
            log_every_t: spacing of the intermediates; default: the scheduler config's ``log_every_t`` (the
                original ``DDPM`` setting), else 100.
            variance_noise: optional list with one noise tensor per step, handed to ``scheduler.step`` instead of
                noise from ``generator`` — to replay a recorded chain (e.g. the original sampler's noise).

        Returns:
            ``LDMCompatPipelineOutput``, or ``(images,)`` / ``(images, intermediates)`` when ``return_dict=False``.
        """
        check_output_type(output_type)
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool):
            raise ValueError(f"guidance_scale: expected a number, got {guidance_scale!r}")
        device, dtype = self._execution_device, self.unet.dtype
        c = self.config
        inputs = latent_inputs.call_conditioning(
            conditioning_key=c.conditioning_key, cond_stage=self.cond_stage, first_stage=self.first_stage,
            target=latent_inputs.cond_stage_target(c.cond_stage_config, self.components),
            concat_keys=c.concat_keys, masked_image_key=c.masked_image_key, prompt=prompt,
            negative_prompt=negative_prompt, class_labels=class_labels, image=image, mask_image=mask_image,
            encoder_hidden_states=encoder_hidden_states, negative_encoder_hidden_states=negative_encoder_hidden_states,
            concat=concat, num_images_per_prompt=num_images_per_prompt, guidance_scale=float(guidance_scale),
            generator=generator, device=device,
        )  # fmt: skip
        batch = infer_batch_size(batch_size, latents, inputs.encoder_hidden_states, inputs.class_labels, inputs.concat)
        shape = self.sample_shape
        if inputs.sample_size is not None:
            shape = (shape[0], *inputs.sample_size)
        prepare = dict(batch_size=batch, sample_shape=shape, class_labels=inputs.class_labels, concat=inputs.concat,
                       device=device, dtype=dtype)  # fmt: skip
        cond = prepare_conditioning(
            c.conditioning_key, self.unet.config, encoder_hidden_states=inputs.encoder_hidden_states, **prepare
        ).cond
        uncond = None
        if inputs.has_uncond and guidance_scale != 1.0:
            uncond = prepare_conditioning(
                c.conditioning_key,
                self.unet.config,
                encoder_hidden_states=inputs.negative_encoder_hidden_states,
                **prepare,
            ).cond
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

        set_timesteps(self.scheduler, num_inference_steps, device)
        timesteps = self.scheduler.timesteps
        num_steps = len(timesteps)
        kwargs = step_kwargs(self.scheduler, eta, generator, variance_noise)
        if variance_noise is not None and len(variance_noise) != num_steps:
            raise ValueError(f"variance_noise: expected one tensor per step ({num_steps}), got {len(variance_noise)}")

        def model(x, t, conditioning):  # the original DiffusionWrapper routing (concat / context / adm labels)
            return apply_model(self.unet, x, t, conditioning, c.conditioning_key)

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
            model_output = guided_model_output(model, model_input, t_batch, cond, uncond, float(guidance_scale))
            if variance_noise is not None:
                kwargs["variance_noise"] = variance_noise[k].to(device=device, dtype=sample.dtype)
            out = self.scheduler.step(model_output, t, sample, **kwargs)
            sample = out.prev_sample
            index = num_steps - 1 - k  # the original counts steps down; for the full chain it equals t
            if return_intermediates and (index % log_every_t == 0 or index == num_steps - 1):
                intermediates.append(sample)
                pred = getattr(out, "pred_original_sample", None)
                have_pred = have_pred and pred is not None
                pred_intermediates.append(pred)
                logged_t.append(int(t))

        images = self._to_output(sample, output_type)
        result = {"images": images}
        if return_intermediates:
            result["intermediates"] = [self._to_output(x, output_type) for x in intermediates]
            result["pred_original_intermediates"] = (
                [self._to_output(x, output_type) for x in pred_intermediates] if have_pred else None
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
