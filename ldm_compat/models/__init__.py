"""Models: a ``ModelMixin`` port of the original openaimodel ``UNetModel`` with identical state-dict keys."""

from .conditioning import CONDITIONING_KEYS, apply_model, validate_conditioning, wrap_conditioning
from .unet_ldm import ORIGINAL_PREFIX, LDMUNetModel, LDMUNetOutput

__all__ = [
    "CONDITIONING_KEYS",
    "ORIGINAL_PREFIX",
    "LDMUNetModel",
    "LDMUNetOutput",
    "apply_model",
    "validate_conditioning",
    "wrap_conditioning",
]
