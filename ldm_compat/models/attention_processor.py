"""The attention core of ``AttentionBlock`` and ``CrossAttention``, run through diffusers' attention dispatcher.

Both modules are diffusers ``AttentionModuleMixin`` modules whose ``processor`` is an ``LDMAttnProcessor``, so the
diffusers calls work as on diffusers' own models:

* ``model.set_attention_backend(name)`` / ``reset_attention_backend()`` and the ``attention_backend(name)`` context
  manager pick any backend of ``diffusers.models.attention_dispatch`` (``native`` = SDPA, the default; ``flash``,
  ``_native_cudnn``, ``sage``, ``xformers``, …). A backend whose package is missing raises diffusers' own error;
* ``enable_xformers_memory_efficient_attention()`` selects the ``xformers`` backend, or raises diffusers'
  ``ModuleNotFoundError`` when xformers is not installed; ``disable_…`` goes back to the default backend.

A processor gets ``q``, ``k``, ``v`` already split into heads, in the dispatcher's ``(batch, tokens, heads, dim)``
layout, and returns the same layout: the two modules build q/k/v differently (fused legacy-ordered ``qkv`` rows, or
``to_q``/``to_k``/``to_v``), so the projections stay in the modules and the processor only attends. The scale is
the backend's default ``dim^-1/2``, which equals the original's ``q·s``, ``k·s`` with ``s = dim^-1/4``.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn


class LDMAttnProcessor:
    """``softmax(q·kᵀ/√d)·v`` through ``dispatch_attention_fn`` with this processor's ``_attention_backend``
    (``None``: the active backend, SDPA unless ``DIFFUSERS_ATTN_BACKEND`` or ``attention_backend(...)`` says
    otherwise). Subclass it to compute attention another way (``set_processor``)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        return dispatch_attention_fn(
            query, key, value, backend=self._attention_backend, parallel_config=self._parallel_config
        )


class LDMAttentionModuleMixin(AttentionModuleMixin):
    """``AttentionModuleMixin`` for the original's attention modules: one ``LDMAttnProcessor`` per module."""

    _default_processor_cls = LDMAttnProcessor
    _available_processors = [LDMAttnProcessor]
    # AttentionBlock's qkv is one projection already; CrossAttention keeps the original's to_q/to_k/to_v keys
    _supports_qkv_fusion = False

    def _init_processor(self) -> None:
        self.processor = LDMAttnProcessor()

    def set_processor(self, processor) -> None:
        if not isinstance(processor, LDMAttnProcessor):
            raise TypeError(
                f"{type(self).__name__}.set_processor: expected an LDMAttnProcessor (it attends over q, k, v), got "
                f"{type(processor).__name__}; diffusers' AttnProcessor classes need diffusers' Attention module"
            )
        super().set_processor(processor)

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op=None) -> None:
        if valid:
            super().set_use_memory_efficient_attention_xformers(True, attention_op)
        else:  # diffusers' mixin leaves the backend as it was; disabling goes back to the default here
            self.processor._attention_backend = None

    def set_attention_slice(self, slice_size) -> None:
        raise NotImplementedError(f"{type(self).__name__}: sliced attention is not supported; use an attention backend")

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return self.processor(self, query, key, value)
