"""``torch.compile(LDMUNetModel, fullgraph=True)``: one graph, no break, no recompilation, the eager values.

Tiny versions of the published layout families (every option that changes the forward's Python control flow:
AttentionBlock with either head order, SpatialTransformer with 1×1-conv and Linear projections, cross-attention
context, class labels (``int`` and ``"sequential"``), scale-shift norm, ResBlock resampling, gradient checkpointing
both ways). Dynamo traces them with a counting backend (``eager``, or ``aot_eager`` for the one that also traces the
backward through AOTAutograd), which keeps the CPU time low; the numbers are compared with the eager model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from helpers.tiny_config import tiny_config, write_config

from ldm_compat import LDMCompatPipeline, LDMUNetModel
from ldm_compat.training.loop import Trainer

BASE = dict(image_size=8, model_channels=32, num_res_blocks=1, channel_mult=[1, 2], attention_resolutions=[2])
CASES = {
    # celebahq-ldm-vq-4 family, class-conditional, BigGAN-style resampling; trains with use_checkpoint
    "attention_block_class_checkpoint": (
        dict(BASE, in_channels=3, out_channels=3, num_head_channels=8, num_classes=5, use_scale_shift_norm=True,
             resblock_updown=True, use_checkpoint=True),
        "train", "aot_eager",
    ),
    "attention_block_new_order": (
        dict(BASE, in_channels=3, out_channels=3, num_heads=2, num_heads_upsample=1, use_new_attention_order=True),
        "infer", "eager",
    ),
    # SD-1.x / txt2img family: 1×1-conv projections, context
    "spatial_transformer_context": (
        dict(BASE, in_channels=4, out_channels=4, num_heads=2, use_spatial_transformer=True, context_dim=12,
             legacy=False, attention_resolutions=[2, 1]),
        "infer", "eager",
    ),
    # SD-2 family: Linear projections, head width, adm labels, diffusers' enable_gradient_checkpointing()
    "linear_transformer_adm_checkpoint": (
        dict(BASE, in_channels=4, out_channels=4, num_head_channels=8, use_spatial_transformer=True, context_dim=12,
             use_linear_in_transformer=True, legacy=False, num_classes="sequential", adm_in_channels=6),
        "train", "eager",
    ),
}  # fmt: skip


def inputs(params: dict, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, params["in_channels"], 8, 8, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    context = torch.randn(2, 5, params["context_dim"], generator=g) if params.get("context_dim") else None
    labels = None
    if params.get("num_classes") == "sequential":
        labels = torch.randn(2, params["adm_in_channels"], generator=g)
    elif params.get("num_classes") is not None:
        labels = torch.randint(0, params["num_classes"], (2,), generator=g)
    return x, t, context, labels


def forward(model, args) -> torch.Tensor:
    x, t, context, labels = args
    return model(x, t, encoder_hidden_states=context, class_labels=labels).sample


# diffusers' checkpointing function calls its lru_cache'd is_torch_version, which dynamo traces through (harmless)
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize("name", list(CASES))
def test_fullgraph_compile_has_one_graph_and_eager_values(name):
    params, mode, backend = CASES[name]
    torch._dynamo.reset()
    model = LDMUNetModel(**params)
    with torch.no_grad():  # informative outputs and gradients: the original zero-initialises the output layers
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    if name.endswith("adm_checkpoint"):
        model.enable_gradient_checkpointing()
    model.train(mode == "train")
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(model, fullgraph=True, backend=counter)  # fullgraph: any graph break raises

    for seed in (1, 2):  # the second call, with new values, must reuse the graph
        args = inputs(params, seed)
        with torch.set_grad_enabled(mode == "train"), torch._dynamo.config.patch(error_on_recompile=seed == 2):
            out = forward(compiled, args)
            if mode == "train":
                out.square().mean().backward()
                got = [p.grad.clone() for p in model.parameters()]
                model.zero_grad(set_to_none=True)
            ref = forward(model, args)
            if mode == "train":
                ref.square().mean().backward()
                want = [p.grad for p in model.parameters()]
                model.zero_grad(set_to_none=True)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        assert ref.abs().max() > 0.1
        if mode == "train":
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs"
    assert counter.op_count > 50


def test_train_py_compile_and_channels_last(tmp_path, monkeypatch):
    """``examples/train.py --compile --channels_last`` trains the same model as without them (inductor is swapped
    for a counting backend: it takes minutes on this CPU)."""
    counter = torch._dynamo.testing.CompileCounter()
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kw: compile_module(self, **{**kw, "backend": counter})
    )
    trainers, init = [], Trainer.__init__

    def keep(self, *args, **kwargs):
        init(self, *args, **kwargs)
        trainers.append(self)

    monkeypatch.setattr(Trainer, "__init__", keep)
    spec = importlib.util.spec_from_file_location("train_example", Path(__file__).parents[1] / "examples" / "train.py")
    train_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_py)
    # base lr 1e-5: Adam turns rounding-level gradient differences into steps of up to lr (see test_reliability_mp)
    changes = {"model.base_learning_rate": 1.0e-5, "lightning.trainer.max_steps": 3,
               "model.params.unet_config.params.attention_resolutions": [2]}  # fmt: skip
    config = write_config(tmp_path / "c.yaml", tiny_config(**changes))
    runs = {}
    for name, flags in (("fast", ["--compile", "--channels_last"]), ("plain", [])):
        argv = ["--config", str(config), "--output_dir", str(tmp_path / name), "--report_to", "none",
                "--checkpointing_steps", "2", *flags]  # fmt: skip
        assert train_py.main(argv) == 0
        runs[name] = trainers[-1]
    fast, plain = runs["fast"], runs["plain"]
    assert fast.options.compile and fast.options.channels_last and counter.frame_count >= 1
    convs = [p for p in fast.unet.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert all(s.stride() == p.stride() for s, p in zip(fast.ema.shadow_params, fast.unet.parameters()))
    a, b = fast.unet.state_dict(), plain.unet.state_dict()
    assert list(a) == list(b)  # compile in place: the same keys, no "_orig_mod." prefix
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)
    folder = LDMCompatPipeline.from_pretrained(tmp_path / "fast" / "pipeline").unet.state_dict()  # the EMA weights
    names = [n for n, _ in fast.unet.named_parameters()]
    assert all(torch.equal(folder[n], s) for n, s in zip(names, fast.ema.shadow_params))
