"""Attention through diffusers' dispatcher: ``set_attention_backend``, ``attention_backend(...)``, xformers, processors.

Every ``AttentionBlock`` and ``CrossAttention`` is a diffusers ``AttentionModuleMixin`` whose ``LDMAttnProcessor``
calls ``dispatch_attention_fn``. The default (native SDPA) is what the fixture tests check against the original; here:
the stock calls do what they do on diffusers' own models, backends that cannot run raise diffusers' own errors, and
the original's einsum/softmax attention (a processor written from the original formulas) equals SDPA to 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend
from diffusers.models.attention_processor import AttnProcessor2_0

from ldm_compat import LDMUNetModel
from ldm_compat.models.attention import AttentionBlock, CrossAttention
from ldm_compat.models.attention_processor import LDMAttnProcessor

BASE = dict(image_size=8, model_channels=32, num_res_blocks=1, channel_mult=[1, 2], attention_resolutions=[1, 2])
LAYOUTS = {
    "attention_block": dict(BASE, in_channels=3, out_channels=3, num_head_channels=8),
    "new_attention_order": dict(BASE, in_channels=3, out_channels=3, num_heads=2, use_new_attention_order=True),
    "spatial_transformer": dict(BASE, in_channels=4, out_channels=4, num_heads=2, use_spatial_transformer=True,
                                context_dim=12, legacy=False),
    "linear_transformer": dict(BASE, in_channels=4, out_channels=4, num_head_channels=8, use_spatial_transformer=True,
                               context_dim=12, use_linear_in_transformer=True, transformer_depth=2),
}  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_active_backend():
    # diffusers' ModelMixin.set_attention_backend also sets the process-wide active backend; put it back
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


def build(name: str) -> tuple[LDMUNetModel, tuple]:
    params = LAYOUTS[name]
    model = LDMUNetModel(**params)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random everywhere (the original zero-initialises output layers)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x = torch.randn(2, params["in_channels"], 8, 8, generator=g)
    context = torch.randn(2, 5, 12, generator=g) if params.get("context_dim") else None
    return model.eval(), (x, torch.tensor([3, 71]), context)


def run(model, inputs):
    x, t, context = inputs
    return model(x, t, encoder_hidden_states=context).sample


class OriginalEinsumAttention(LDMAttnProcessor):
    """The original's attention, written out from its formulas (dispatcher layout ``(B, tokens, heads, dim)``).

    ``QKVAttention(Legacy)``: ``softmax((q·s)ᵀ(k·s))`` with ``s = dim^-1/4`` and the softmax in float32;
    ``CrossAttention``: ``softmax(q·kᵀ · dim^-1/2)`` in the input dtype.
    """

    calls = 0

    def __call__(self, attn, query, key, value):
        OriginalEinsumAttention.calls += 1
        dim = query.shape[-1]
        if isinstance(attn, AttentionBlock):
            s = 1 / math.sqrt(math.sqrt(dim))
            weight = torch.einsum("bthd,bshd->bhts", query * s, key * s)
            weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        else:
            assert isinstance(attn, CrossAttention)
            weight = (torch.einsum("bthd,bshd->bhts", query, key) * dim**-0.5).softmax(dim=-1)
        return torch.einsum("bhts,bshd->bthd", weight, value)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_original_einsum_attention_equals_sdpa(name):
    model, inputs = build(name)
    sdpa = run(model, inputs)
    OriginalEinsumAttention.calls = 0
    model.set_attn_processor(OriginalEinsumAttention())
    einsum = run(model, inputs)
    assert OriginalEinsumAttention.calls == len(model.attn_processors)  # every attention module, once
    scale = sdpa.abs().max().item()
    assert 1.0 < scale < 100.0, scale  # informative outputs, so 1e-5 is a float32-rounding-level tolerance
    torch.testing.assert_close(einsum, sdpa, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["attention_block", "linear_transformer"])
def test_native_backend_is_the_default(name):
    model, inputs = build(name)
    default = run(model, inputs)
    processors = model.attn_processors
    assert processors and all(type(p) is LDMAttnProcessor and p._attention_backend is None for p in processors.values())
    model.set_attention_backend("native")
    assert all(p._attention_backend == AttentionBackendName.NATIVE for p in model.attn_processors.values())
    assert torch.equal(run(model, inputs), default)  # the same SDPA call on the same tensors
    model.set_attention_backend("_native_math")  # another kernel: equal to float32 rounding
    torch.testing.assert_close(run(model, inputs), default, atol=1e-5, rtol=0)
    model.reset_attention_backend()
    assert all(p._attention_backend is None for p in model.attn_processors.values())


def test_the_active_backend_and_its_context_manager_are_followed(monkeypatch):
    model, inputs = build("spatial_transformer")
    calls = []
    math_backend = _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH]

    def spy(**kwargs):
        calls.append(tuple(kwargs["query"].shape))
        return math_backend(**kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName._NATIVE_MATH, spy)
    default = run(model, inputs)
    assert calls == []
    with attention_backend("_native_math"):
        out = run(model, inputs)
    # every attention call went there (self and cross attention of each block), in (B, tokens, heads, dim)
    assert len(calls) == len(model.attn_processors)
    assert all(len(shape) == 4 and shape[0] == 2 and shape[2] == 2 for shape in calls)
    torch.testing.assert_close(out, default, atol=1e-5, rtol=0)
    calls.clear()
    run(model, inputs)
    assert calls == []  # the context manager restored the default


@pytest.mark.parametrize(
    ("backend", "error", "match"),
    [
        ("flash", RuntimeError, "flash-attn"),
        ("sage", RuntimeError, "sageattention"),
        ("xformers", RuntimeError, "xformers"),
        ("no-such-backend", ValueError, "must be one of the following"),
    ],
)
def test_a_backend_that_cannot_run_is_refused_with_diffusers_error(backend, error, match):
    if backend == "flash" and _can_use("flash_attn"):
        pytest.skip("flash-attn is installed here")
    model, inputs = build("attention_block")
    with pytest.raises(error, match=match):
        model.set_attention_backend(backend)
    assert all(p._attention_backend is None for p in model.attn_processors.values())  # left as it was


def test_xformers_enable_raises_when_missing_and_disable_restores_the_default():
    if _can_use("xformers"):
        pytest.skip("xformers is installed here")
    model, inputs = build("linear_transformer")
    with pytest.raises(ModuleNotFoundError, match="xformers"):
        model.enable_xformers_memory_efficient_attention()
    model.set_attention_backend("_native_math")
    model.disable_xformers_memory_efficient_attention()
    assert all(p._attention_backend is None for p in model.attn_processors.values())


def test_unsupported_attention_calls_are_refused_in_one_line():
    model, _ = build("spatial_transformer")
    with pytest.raises(TypeError, match="expected an LDMAttnProcessor"):
        model.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(NotImplementedError, match="fuse_qkv_projections is not supported"):
        model.fuse_qkv_projections()
    block = next(m for m in model.modules() if isinstance(m, CrossAttention))
    with pytest.raises(NotImplementedError, match="sliced attention"):
        block.set_attention_slice(2)
    assert not [k for k in model.state_dict() if "processor" in k]  # processors hold no weights


def _can_use(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
