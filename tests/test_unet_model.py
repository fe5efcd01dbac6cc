"""``LDMUNetModel`` behaviour beyond the fixtures: attention head orderings, options, checkpointing, dtypes,
diffusers integration (save/load, pipelines) and clear errors for bad configs and inputs."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from ldm_compat import LDMUNetModel
from ldm_compat.models.attention import AttentionBlock

TINY = dict(
    image_size=8,
    in_channels=3,
    out_channels=3,
    model_channels=32,
    num_res_blocks=1,
    attention_resolutions=[1, 2],
    channel_mult=[1, 2],
    num_heads=2,
)
TINY_ST = dict(TINY, num_heads=-1, num_head_channels=8, use_spatial_transformer=True, context_dim=12, legacy=False)


def _randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Random values everywhere, including the zero-initialised output layers, so every path shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _model(**overrides) -> LDMUNetModel:
    return _randomize(LDMUNetModel(**{**TINY, **overrides}))


def _inputs(batch: int = 2, channels: int = 3, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=g), torch.tensor([3, 71])[:batch]


# ---------------------------------------------------------------------------------------------- attention orderings
def _reference_qkv_attention(qkv: torch.Tensor, heads: int, new_order: bool) -> torch.Tensor:
    """The original QKVAttentionLegacy / QKVAttention formulas written out with einsum (float32 softmax)."""
    b, width, length = qkv.shape
    ch = width // (3 * heads)
    if new_order:
        q, k, v = (t.reshape(b * heads, ch, length) for t in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, length)


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("heads,head_channels", [(4, -1), (1, -1), (-1, 16)])
def test_attention_block_matches_original_formula(new_order, heads, head_channels):
    block = _randomize(AttentionBlock(64, heads, head_channels, use_new_attention_order=new_order))
    x = torch.randn(2, 64, 5, 3)
    with torch.no_grad():
        flat = x.reshape(2, 64, -1)
        qkv = block.qkv(block.norm(flat))
        expected = (flat + block.proj_out(_reference_qkv_attention(qkv, block.num_heads, new_order))).reshape(x.shape)
        out = block(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_new_attention_order_is_a_row_permutation_of_legacy():
    """Same weights with the qkv rows reordered [head][q,k,v][c] -> [q,k,v][head][c] give the same UNet output."""
    legacy = _model(num_heads=4)
    new = LDMUNetModel(**{**TINY, "num_heads": 4, "use_new_attention_order": True}).eval()
    sd = legacy.state_dict()
    for key in [k for k in sd if k.endswith(("qkv.weight", "qkv.bias"))]:
        rows = sd[key].shape[0]
        c = rows // 3 // 4
        # row index in legacy layout for (qkv j, head h, channel i) is h*3c + j*c + i
        order = [h * 3 * c + j * c + i for j in range(3) for h in range(4) for i in range(c)]
        sd[key] = sd[key][order]
    new.load_state_dict(sd)
    x, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(new(x, t).sample, legacy(x, t).sample, rtol=0, atol=1e-5)
        # and the two orderings really differ on the same (unpermuted) weights
        new.load_state_dict(legacy.state_dict())
        assert (new(x, t).sample - legacy(x, t).sample).abs().max() > 1e-3


def test_legacy_flag_changes_only_head_bookkeeping():
    """num_head_channels with legacy=True and legacy=False give the same keys (heads are not in the state dict)."""
    a = LDMUNetModel(**{**TINY_ST, "legacy": True})
    b = LDMUNetModel(**{**TINY_ST, "legacy": False})
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]


# ---------------------------------------------------------------------------------------------- forward conventions
def test_scalar_and_per_sample_timesteps_agree():
    model = _model()
    x, _ = _inputs()
    with torch.no_grad():
        ref = model(x, torch.tensor([7, 7])).sample
        for t in (7, 7.0, torch.tensor(7), torch.tensor([7])):
            torch.testing.assert_close(model(x, t).sample, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="timestep"):
        model(x, torch.tensor([1, 2, 3]))


def test_class_labels_required_iff_class_conditional():
    model = _model(num_classes=10)
    x, t = _inputs()
    y = torch.tensor([1, 9])
    with torch.no_grad():
        out = model(x, t, class_labels=y).sample
        assert (out - model(x, t, class_labels=torch.tensor([2, 9])).sample).abs().max() > 1e-4
    with pytest.raises(ValueError, match="class_labels"):
        model(x, t)
    with pytest.raises(ValueError, match="class_labels"):
        model(x, t, class_labels=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="class_labels"):
        _model()(x, t, class_labels=y)


@pytest.mark.parametrize("mode,labels", [("sequential", torch.randn(2, 7)), ("continuous", torch.randn(2, 1))])
def test_adm_label_embeddings(mode, labels):
    model = _model(num_classes=mode, adm_in_channels=7 if mode == "sequential" else None)
    x, t = _inputs()
    with torch.no_grad():
        assert model(x, t, class_labels=labels).sample.shape == x.shape


def test_context_is_ignored_without_spatial_transformer():
    """As the original: only SpatialTransformers read the context."""
    model = _model()
    x, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, t, encoder_hidden_states=torch.randn(2, 4, 12)).sample, model(x, t).sample, rtol=0, atol=0
        )


def test_spatial_transformer_context_per_block():
    model = _randomize(LDMUNetModel(**{**TINY_ST, "transformer_depth": 2}))
    x, t = _inputs()
    c = torch.randn(2, 5, 12)
    with torch.no_grad():
        same = model(x, t, encoder_hidden_states=c).sample
        torch.testing.assert_close(model(x, t, encoder_hidden_states=[c, c]).sample, same, rtol=0, atol=0)
        assert (model(x, t, encoder_hidden_states=[c, c * 0.5]).sample - same).abs().max() > 1e-4
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(x, t, encoder_hidden_states=[c])


def test_per_block_context_dims_and_disabled_self_attention():
    params = {
        **TINY_ST,
        "transformer_depth": 2,
        "context_dim": [12, 6],
        "use_linear_in_transformer": True,
        "disable_self_attentions": [True, False],
        "disable_middle_self_attn": True,
    }
    model = _randomize(LDMUNetModel(**params))
    sd = model.state_dict()
    assert sd["input_blocks.1.1.transformer_blocks.1.attn2.to_k.weight"].shape == (32, 6)
    assert sd["input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"].shape == (32, 12)  # attn1 cross-attends
    assert sd["input_blocks.1.1.proj_in.weight"].ndim == 2  # use_linear_in_transformer
    x, t = _inputs()
    with torch.no_grad():
        assert model(x, t, encoder_hidden_states=[torch.randn(2, 3, 12), torch.randn(2, 4, 6)]).sample.shape == x.shape


@pytest.mark.parametrize("dims,shape", [(1, (2, 3, 8)), (3, (2, 3, 2, 8, 8))])
def test_other_dims(dims, shape):
    model = _model(dims=dims)
    with torch.no_grad():
        assert model(torch.randn(shape), torch.tensor([1, 2])).sample.shape == shape


def test_n_embed_predicts_codebook_logits():
    model = _model(n_embed=16)
    x, t = _inputs()
    with torch.no_grad():
        assert model(x, t).sample.shape == (2, 16, 8, 8)


def test_resampling_options_change_keys_as_the_original():
    base = set(LDMUNetModel(**TINY).state_dict())
    no_conv = set(LDMUNetModel(**TINY, conv_resample=False).state_dict())
    assert base - no_conv == {"input_blocks.2.0.op.weight", "input_blocks.2.0.op.bias"} | {
        "output_blocks.1.2.conv.weight",
        "output_blocks.1.2.conv.bias",
    }
    updown = LDMUNetModel(**TINY, resblock_updown=True).state_dict()
    assert "input_blocks.2.0.in_layers.2.weight" in updown and "output_blocks.1.2.emb_layers.1.weight" in updown
    model = _model(resblock_updown=True, use_scale_shift_norm=True, conv_resample=False)
    x, t = _inputs()
    with torch.no_grad():
        assert model(x, t).sample.shape == x.shape


# ---------------------------------------------------------------------------------------------- training features
def _grads(model, x, t, **kw):
    model.zero_grad(set_to_none=True)
    model.train()
    model(x, t, **kw).sample.pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_use_checkpoint_recomputes_every_block_with_same_gradients(monkeypatch):
    params = {**TINY_ST, "dropout": 0.0}
    plain = _randomize(LDMUNetModel(**params))
    ckpt = LDMUNetModel(**{**params, "use_checkpoint": True})
    ckpt.load_state_dict(plain.state_dict())
    x, t = _inputs()
    c = torch.randn(2, 5, 12)
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    expected = _grads(plain, x, t, encoder_hidden_states=c)
    assert calls == []  # use_checkpoint=False: nothing is recomputed (the original always recomputes attention)
    got = _grads(ckpt, x, t, encoder_hidden_states=c)
    # 8 ResBlocks + 7 transformer blocks (attention at ds 1 and 2: 2 encoder, 1 middle, 4 decoder), non-reentrant
    assert calls == [False] * 15
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-6)


def test_enable_gradient_checkpointing_the_diffusers_way():
    model = _model()
    x, t = _inputs()
    seen = []

    def func(fn, *args):
        seen.append(fn)
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

    model.enable_gradient_checkpointing(func)
    _grads(model, x, t)
    assert len(seen) == 15  # 8 ResBlocks + 7 AttentionBlocks
    model.disable_gradient_checkpointing()
    seen.clear()
    _grads(model, x, t)
    assert seen == []


@pytest.mark.parametrize("params", [TINY, TINY_ST], ids=["attention_block", "spatial_transformer"])
def test_bf16_autocast_forward_and_backward(params):
    model = _randomize(LDMUNetModel(**params), scale=0.1)
    x, t = _inputs()
    c = torch.randn(2, 5, 12) if params.get("use_spatial_transformer") else None
    with torch.no_grad():
        ref = model(x, t, encoder_hidden_states=c).sample
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, encoder_hidden_states=c).sample
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # bf16 keeps ~3 significant digits: compare the relative error of the whole tensor
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.05


@pytest.mark.parametrize("flag,dtype", [("use_fp16", torch.float16), ("use_bf16", torch.bfloat16)])
def test_use_fp16_runs_without_autocast(flag, dtype):
    """The original only casts the input (and fails without autocast); the port enters autocast itself."""
    model = _model(**{flag: True})
    x, t = _inputs()
    with torch.no_grad():
        out = model(x, t).sample
    assert out.dtype == dtype and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- diffusers integration
def test_save_pretrained_round_trip_is_bit_exact(tmp_path):
    model = _model(num_classes=5, use_scale_shift_norm=True)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = LDMUNetModel.from_pretrained(tmp_path).eval()
    public = {k: v for k, v in loaded.config.items() if not k.startswith("_")}
    assert public == {k: v for k, v in model.config.items() if not k.startswith("_")}
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert list(sd) == list(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x, t = _inputs()
    y = torch.tensor([0, 4])
    with torch.no_grad():
        assert torch.equal(model(x, t, class_labels=y).sample, loaded(x, t, class_labels=y).sample)


def test_config_is_the_original_params_plus_sample_size():
    model = LDMUNetModel(**TINY)
    assert model.config.sample_size == 8 and model.config.in_channels == 3
    assert LDMUNetModel(**{**TINY, "image_size": None}, sample_size=8).config.image_size == 8
    ldm = model.to_ldm_config()
    assert ldm == {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": TINY}
    assert dict(LDMUNetModel.from_ldm_config(ldm).config) == dict(model.config)
    assert dict(LDMUNetModel.from_config(model.config).config) == dict(model.config)


def test_sample_size_may_differ_from_the_unused_image_size():
    """A LatentDiffusion samples at its own image_size (SD 1.x: 64) while the UNet's image_size (32) is unused by
    the original: sample_size (what diffusers pipelines read) holds the former and survives a config round trip."""
    model = LDMUNetModel(**TINY, sample_size=16)
    assert (model.config.image_size, model.config.sample_size, model.config.time_cond_proj_dim) == (8, 16, None)
    assert dict(LDMUNetModel.from_config(model.config).config) == dict(model.config)
    assert "time_cond_proj_dim" not in model.config  # read by StableDiffusionPipeline, never saved
    assert model.to_ldm_config()["params"] == TINY


def test_stock_pipeline_arguments_at_their_defaults_pass_and_others_are_refused():
    model = _model(image_size=8)
    x, t = _inputs()
    with torch.no_grad():
        expected = model(x, t).sample
        got = model(x, t, timestep_cond=None, cross_attention_kwargs={}, added_cond_kwargs=None, return_dict=False)
    assert torch.equal(got[0], expected)
    for kwargs, match in (
        (dict(cross_attention_kwargs={"scale": 0.5}), r"cross_attention_kwargs=\['scale'\]"),
        (dict(added_cond_kwargs={"image_embeds": x}), "added_cond_kwargs"),
        (dict(timestep_cond=x), "timestep_cond"),
        (dict(attention_mask=x), "attention_mask"),
    ):
        with pytest.raises(ValueError, match=match):
            model(x, t, **kwargs)


def test_from_ldm_config_accepts_omegaconf_and_wrapper_keys():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": TINY_ST,
            "sequential_crossattn": True,
        }
    )
    model = LDMUNetModel.from_ldm_config(cfg)
    assert model.config.context_dim == 12 and isinstance(model.config.channel_mult, list)


def test_stock_ddpm_pipeline_drives_it():
    model = _model(image_size=8)
    pipe = DDPMPipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=10))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (2, 8, 8, 3)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(num_heads=-1), "num_heads / num_head_channels"),
        (dict(context_dim=12), "context_dim: given"),
        (dict(use_spatial_transformer=True), "context_dim: required"),
        (dict(channel_mult=[2, 2]), "channel_mult"),
        (dict(num_classes="foo"), "num_classes"),
        (dict(num_classes="sequential"), "adm_in_channels"),
        (dict(disable_self_attentions=[True]), "disable_self_attentions"),
        (dict(num_attention_blocks=[2, 1]), "num_attention_blocks"),
        (dict(num_res_blocks=[1, 1, 1]), "num_res_blocks"),
        (dict(num_heads=3), "num_heads"),
        (dict(num_heads=-1, num_head_channels=24), "num_head_channels"),
        (dict(dims=4), "dims"),
        (dict(model_channels=None), "model_channels"),
        (dict(use_spatial_transformer=True, context_dim=8, dims=3), "dims"),
    ],
)
def test_configs_the_original_rejects(overrides, match):
    with pytest.raises(ValueError, match=match):
        LDMUNetModel(**{**TINY, **overrides})


def test_from_ldm_config_rejects_unknown_arguments_and_targets():
    target = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
    with pytest.raises(ValueError, match="unknown UNetModel arguments"):
        LDMUNetModel.from_ldm_config({"target": target, "params": {**TINY, "num_head": 2}})
    with pytest.raises(ValueError, match="target"):
        LDMUNetModel.from_ldm_config(
            {"target": "ldm.modules.diffusionmodules.openaimodel.EncoderUNetModel", "params": TINY}
        )
    with pytest.raises(ValueError, match="params"):
        LDMUNetModel.from_ldm_config({"target": target})


def test_state_dict_errors_list_the_offending_keys():
    model = LDMUNetModel(**TINY)
    sd = model.state_dict()
    wrong = dict(sd)
    wrong["input_blocks.0.0.weight"] = torch.zeros(32, 4, 3, 3)
    with pytest.raises(
        ValueError, match=r"input_blocks\.0\.0\.weight: checkpoint \(32, 4, 3, 3\) vs model \(32, 3, 3, 3\)"
    ):
        model.load_original_state_dict(wrong)
    missing = {k: v for k, v in sd.items() if k != "out.2.bias"}
    with pytest.raises(ValueError, match=r"1 missing: out\.2\.bias"):
        model.load_original_state_dict(missing)
    with pytest.raises(ValueError, match=r"1 unexpected: label_emb\.weight"):
        model.load_original_state_dict({**sd, "label_emb.weight": torch.zeros(3, 128)})
    assert model.load_original_state_dict(missing, strict=False).missing_keys == ["out.2.bias"]
    prefixed = {"model.diffusion_model." + k: v for k, v in sd.items()} | {"betas": torch.zeros(3)}
    model.load_original_state_dict(prefixed)
    assert set(model.original_state_dict()) == {"model.diffusion_model." + k for k in sd}


def test_half_precision_weights_from_pretrained(tmp_path):
    """``from_pretrained(torch_dtype=torch.bfloat16)``: GroupNorm32 still normalises in float32 and the model runs."""
    model = _model()
    model.save_pretrained(tmp_path)
    half = LDMUNetModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    assert half.dtype == torch.bfloat16
    x, t = _inputs()
    with torch.no_grad():
        ref = model(x, t).sample
        out = half(x.to(torch.bfloat16), t).sample
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.05


# ---------------------------------------------------------------------------------------------- resampling
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_weightless_resampling(dims):
    """``resample``: nearest-neighbour 2× up, 2× average down, over the last two dims of 3-D signals (frames kept)."""
    from ldm_compat.models.resnet import Downsample, ResBlock, Upsample, resample

    x = torch.randn((2, 3) + (2, 4, 6)[3 - dims :])
    spatial = [x.ndim - 1 - i for i in range(min(dims, 2))]  # the resampled dimensions
    up = x
    for d in spatial:
        up = up.repeat_interleave(2, dim=d)
    assert torch.equal(resample(x, "up", dims), up)
    assert torch.equal(Upsample(3, False, dims)(x), up)
    cells = list(x.shape[:2]) + ([x.shape[2]] if dims == 3 else [])
    for size in x.shape[x.ndim - len(spatial) :]:
        cells += [size // 2, 2]
    down = x.reshape(cells).mean(dim=[len(cells) - 1 - 2 * i for i in range(len(spatial))])
    torch.testing.assert_close(resample(x, "down", dims), down, rtol=0, atol=1e-6)
    torch.testing.assert_close(Downsample(3, False, dims)(x), down, rtol=0, atol=1e-6)
    # resblock_updown adds no weights: the same keys and shapes as a plain ResBlock
    plain = ResBlock(32, 8, 0.0, dims=dims)  # GroupNorm32: 32 channels at least
    for flag in ("up", "down"):
        block = ResBlock(32, 8, 0.0, dims=dims, **{flag: True})
        assert [(k, v.shape) for k, v in block.state_dict().items()] == [
            (k, v.shape) for k, v in plain.state_dict().items()
        ]
    with pytest.raises(ValueError, match="up and down"):
        ResBlock(32, 8, 0.0, dims=dims, up=True, down=True)
