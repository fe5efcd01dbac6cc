"""LDMCompatPipeline conditioning: the original DiffusionWrapper routing for every conditioning_key, and clear
ValueErrors for wrong conditioning — raised before any UNet call."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from ldm_compat import LDMDDIMScheduler, LDMDDPMScheduler, LDMUNetModel
from ldm_compat.pipelines import LDMCompatPipeline

CHANNELS, SIZE, CONCAT, CONTEXT_DIM, NUM_CLASSES, T = 3, 8, 2, 12, 5, 20

KEYS = [None, "concat", "crossattn", "hybrid", "adm", "crossattn-adm", "hybrid-adm"]
USES_CONCAT = {"concat", "hybrid", "hybrid-adm"}
USES_CONTEXT = {"crossattn", "hybrid", "crossattn-adm", "hybrid-adm"}
USES_LABELS = {"adm", "crossattn-adm", "hybrid-adm"}


def tiny_unet(key) -> LDMUNetModel:
    """A tiny original UNet for ``key``; every weight random (the original zero-initialises output layers, which
    would make the output independent of the conditioning)."""
    torch.manual_seed(0)
    unet = LDMUNetModel(
        image_size=SIZE,
        in_channels=CHANNELS + (CONCAT if key in USES_CONCAT else 0),
        out_channels=CHANNELS,
        model_channels=64,  # 2 channels per GroupNorm32 group: with 1, per-channel embeddings normalise away
        num_res_blocks=1,
        attention_resolutions=[1],
        channel_mult=[1],
        num_head_channels=16,
        use_spatial_transformer=key in USES_CONTEXT,
        context_dim=CONTEXT_DIM if key in USES_CONTEXT else None,
        num_classes=NUM_CLASSES if key in USES_LABELS else None,
    )
    with torch.no_grad():
        for param in unet.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    return unet.eval()


def make_pipeline(key) -> LDMCompatPipeline:
    scheduler = LDMDDPMScheduler.from_ldm_config({"timesteps": T, "parameterization": "eps"})
    pipe = LDMCompatPipeline(tiny_unet(key), scheduler, conditioning_key=key, image_size=SIZE, channels=CHANNELS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def conditioning(key, batch=2):
    g = torch.Generator().manual_seed(1)
    return {
        "encoder_hidden_states": torch.randn(batch, 4, CONTEXT_DIM, generator=g) if key in USES_CONTEXT else None,
        "class_labels": torch.tensor([1, 4])[:batch] if key in USES_LABELS else None,
        "concat": torch.randn(batch, CONCAT, SIZE, SIZE, generator=g) if key in USES_CONCAT else None,
    }


class CountingUNet(torch.nn.Module):
    """Wraps ``pipe.unet.forward`` to count calls."""

    def __init__(self, pipe):
        super().__init__()
        self.calls = 0
        self.inner = pipe.unet.forward

        def forward(*args, **kwargs):
            self.calls += 1
            return self.inner(*args, **kwargs)

        pipe.unet.forward = forward


@pytest.mark.parametrize("key", KEYS)
def test_routing_is_the_diffusion_wrapper(key):
    """One DDIM step through the pipeline = the original wrapper's UNet call + the DDIM update, done by hand."""
    pipe = make_pipeline(key)
    pipe.scheduler = LDMDDIMScheduler.from_config(pipe.scheduler.config)
    cond = conditioning(key)
    x_T = torch.randn(2, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    ours = pipe(latents=x_T, num_inference_steps=1, output_type="latent", **cond).images

    # the original DiffusionWrapper: concat → cat([x] + c_concat, 1); crossattn → context; adm → y
    x_in = torch.cat([x_T, cond["concat"]], 1) if key in USES_CONCAT else x_T
    t = int(pipe.scheduler.timesteps[0])
    with torch.no_grad():
        eps = pipe.unet(
            x_in,
            torch.full((2,), t),
            encoder_hidden_states=cond["encoder_hidden_states"],
            class_labels=cond["class_labels"],
        ).sample
    expected = pipe.scheduler.step(eps, t, x_T).prev_sample
    assert (ours - expected).abs().max().item() <= 1e-6


def test_routing_depends_on_each_input():
    # the check can fail: changing any conditioning input changes the samples
    pipe = make_pipeline("hybrid-adm")
    pipe.scheduler = LDMDDIMScheduler.from_config(pipe.scheduler.config)
    x_T = torch.randn(2, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    base = conditioning("hybrid-adm")
    ref = pipe(latents=x_T, num_inference_steps=2, output_type="latent", **base).images
    for name in ("encoder_hidden_states", "class_labels", "concat"):
        changed = dict(base)
        changed[name] = torch.tensor([2, 3]) if name == "class_labels" else base[name] + 1.0
        out = pipe(latents=x_T, num_inference_steps=2, output_type="latent", **changed).images
        assert (out - ref).abs().max().item() > 1e-4, name


def test_broadcast_and_batch_from_conditioning():
    pipe = make_pipeline("crossattn-adm")
    cond = conditioning("crossattn-adm", batch=1)
    out = pipe(batch_size=3, num_inference_steps=2, output_type="latent", **cond).images
    assert out.shape == (3, CHANNELS, SIZE, SIZE)
    # batch_size left at 1: the conditioning's batch decides; labels may be a list
    out = pipe(
        num_inference_steps=2,
        output_type="latent",
        encoder_hidden_states=torch.randn(2, 4, CONTEXT_DIM),
        class_labels=[0, 4],
    ).images
    assert out.shape == (2, CHANNELS, SIZE, SIZE)


BAD_CALLS = [
    ("crossattn", {}, "encoder_hidden_states: required"),
    ("hybrid", {"encoder_hidden_states": torch.randn(2, 4, CONTEXT_DIM)}, "concat: required"),
    ("adm", {}, "class_labels: required"),
    ("adm", {"class_labels": torch.tensor([0, NUM_CLASSES])}, r"class_labels: values must lie in \[0, 4\]"),
    ("adm", {"class_labels": torch.tensor([-1, 2])}, "class_labels: values must lie"),
    ("adm", {"class_labels": torch.tensor([0.0, 1.0])}, "class_labels: expected a 1-D integer tensor"),
    (None, {"encoder_hidden_states": torch.randn(2, 4, CONTEXT_DIM)}, "takes no encoder_hidden_states"),
    (
        "crossattn",
        {"class_labels": torch.tensor([1, 2]), "encoder_hidden_states": torch.randn(2, 4, CONTEXT_DIM)},
        "takes no class_labels",
    ),
    ("crossattn", {"encoder_hidden_states": torch.randn(2, 4, CONTEXT_DIM + 1)}, "context_dim"),
    ("crossattn", {"encoder_hidden_states": torch.randn(2, CONTEXT_DIM)}, r"\(batch, tokens, dim\)"),
    ("concat", {"concat": torch.randn(2, CONCAT + 1, SIZE, SIZE)}, "concat: 3 channels"),
    ("concat", {"concat": torch.randn(2, CONCAT, SIZE, SIZE + 1)}, "concat: spatial size"),
    ("crossattn", {"encoder_hidden_states": torch.randn(3, 4, CONTEXT_DIM), "batch_size": 2}, "batch size"),
    (None, {"latents": torch.randn(2, CHANNELS + 1, SIZE, SIZE)}, "latents: expected shape"),
    (None, {"num_inference_steps": 0}, "num_inference_steps"),
    (None, {"num_inference_steps": T + 1}, "num_inference_steps"),
    (None, {"variance_noise": [torch.randn(1, CHANNELS, SIZE, SIZE)]}, "variance_noise: expected one tensor per step"),
    (None, {"log_every_t": 0}, "log_every_t"),
    (None, {"batch_size": 0}, "batch_size"),
]


@pytest.mark.parametrize(("key", "kwargs", "message"), BAD_CALLS)
def test_bad_conditioning_fails_before_any_unet_call(key, kwargs, message):
    pipe = make_pipeline(key)
    counter = CountingUNet(pipe)
    with pytest.raises(ValueError, match=message):
        pipe(output_type="latent", **kwargs)
    assert counter.calls == 0


def test_class_conditional_unet_needs_an_adm_key():
    pipe = make_pipeline("adm")
    pipe.register_to_config(conditioning_key=None)
    counter = CountingUNet(pipe)
    with pytest.raises(ValueError, match="class-conditional"):
        pipe(output_type="latent")
    assert counter.calls == 0


def test_variance_noise_needs_a_scheduler_that_takes_it():
    pipe = make_pipeline(None)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    counter = CountingUNet(pipe)
    with pytest.raises(ValueError, match="variance_noise"):
        pipe(num_inference_steps=2, variance_noise=[torch.zeros(1, CHANNELS, SIZE, SIZE)] * 2)
    assert counter.calls == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"conditioning_key": "cross-attn"}, "conditioning_key: expected one of"),
        ({"image_size": 0}, "image_size"),
        ({"channels": "3"}, "channels"),
    ],
)
def test_bad_pipeline_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LDMCompatPipeline(tiny_unet(None), LDMDDPMScheduler(num_train_timesteps=T), **kwargs)


def test_from_ldm_config_needs_a_unet_config():
    with pytest.raises(ValueError, match="unet_config"):
        LDMCompatPipeline.from_ldm_config({"model": {"params": {"timesteps": 10}}})
