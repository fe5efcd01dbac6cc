"""ldm_compat — the original latent-diffusion ``DDPM`` as numerically exact HuggingFace Diffusers components.

Public names are imported lazily so that ``import ldm_compat`` stays cheap and a command-line call pays only for
the pieces it uses.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "LDMDDPMScheduler": "ldm_compat.schedulers.scheduling_ldm_ddpm",
    "LDMDDIMScheduler": "ldm_compat.schedulers.scheduling_ldm_ddim",
    "LDMPLMSScheduler": "ldm_compat.schedulers.scheduling_ldm_plms",
    "LDMUNetModel": "ldm_compat.models.unet_ldm",
    "ClassEmbedderModel": "ldm_compat.models.cond_stage.class_embedder",
    "DDPMObjective": "ldm_compat.training.objective",
    "LitEmaModel": "ldm_compat.training.ema",
    "LDMCompatPipeline": "ldm_compat.pipelines.pipeline_ldm_compat",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

# diffusers loads a component named ["ldm_compat", "LDMUNetModel"] in model_index.json by finding the class *and*
# its loadable base classes in this namespace (pipeline_loading_utils.get_class_obj_and_candidates), as it finds
# them in ``diffusers`` itself; not public names of ldm_compat
_EXPORTS.update(ModelMixin="diffusers", SchedulerMixin="diffusers")


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ldm_compat' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
