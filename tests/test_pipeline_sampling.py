"""LDMCompatPipeline sampling against the original code.

- DDIM: the fixtures' ``ddim_x_T`` → ``ddim_samples`` chains of the original ``DDIMSampler`` (eps, v with
  cross-attention, and the x0 case in the bug-compatible mode), ≤1e-4.
- Ancestral: the original ``p_sample_loop`` semantics (T steps from t = T-1 to 0, ``clip_denoised``, intermediates
  where ``i % log_every_t == 0 or i == T-1`` plus the initial noise), re-implemented here from the original formulas
  on the checkpoint's own schedule buffers.
- Swapping in diffusers schedulers.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    ConfigMixin,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    ModelMixin,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from reference_cases import CASES, case_pipeline, load_case
from torch import nn

from ldm_compat import LDMDDIMScheduler, LDMDDPMScheduler
from ldm_compat.pipelines import LDMCompatPipeline, LDMCompatPipelineOutput
from ldm_compat.schedulers import stock_ddim_overrides

DDIM_TOL = 1e-4
CHAIN_TOL = 1e-5


def ddim_call(pipe: LDMCompatPipeline, case, **kwargs):
    io, ddim = case.io, case.meta["ddim"]
    return pipe(
        num_inference_steps=ddim["steps"],
        latents=io["ddim_x_T"],
        eta=ddim["eta"],
        encoder_hidden_states=io.get("context"),
        variance_noise=list(io["ddim_noise"]) if "ddim_noise" in io else None,
        output_type="latent",
        **kwargs,
    ).images


@pytest.mark.parametrize("name", CASES)
def test_ddim_matches_original_sampler(name):
    case = load_case(name)
    pipe = case_pipeline(name)
    # x0 models: the original DDIMSampler treats the output as eps; only the bug-compatible mode reproduces it
    bug_compat = case.params["parameterization"] == "x0"
    pipe.scheduler = LDMDDIMScheduler.from_config(pipe.scheduler.config, ldm_bug_compat=bug_compat)
    samples = ddim_call(pipe, case)
    assert pipe.scheduler.timesteps.flip(0).tolist() == case.io["ddim_timesteps"].tolist()
    err = (samples - case.io["ddim_samples"]).abs().max().item()
    assert err <= DDIM_TOL, f"{name}: max |Δ| {err:.3g}"


def test_ddim_x0_default_mode_is_not_the_original_bug():
    case = load_case("ddpm_x0_cosine_l1")
    pipe = case_pipeline(case.name)
    pipe.scheduler = LDMDDIMScheduler.from_config(pipe.scheduler.config)
    samples = ddim_call(pipe, case)
    assert (samples - case.io["ddim_samples"]).abs().max().item() > 1e-2  # the correct x0 sampler differs


def test_ddim_wrong_weights_do_not_match():
    # the check can fail: EMA weights (a different model) do not reproduce the chain
    case = load_case("ddpm_eps_linear")
    pipe = case_pipeline(case.name)
    ema = case.ema_buffers()
    pipe.unet.load_state_dict(
        {n: ema[("diffusion_model." + n).replace(".", "")] for n, _ in pipe.unet.named_parameters()}
    )
    pipe.scheduler = LDMDDIMScheduler.from_config(pipe.scheduler.config)
    assert (ddim_call(pipe, case) - case.io["ddim_samples"]).abs().max().item() > 1e-2


def test_stock_ddim_with_original_grid_is_close():
    # diffusers' own DDIMScheduler with the original grid: float32 cumprod drift only
    case = load_case("ddpm_eps_linear")
    pipe = case_pipeline(case.name)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **stock_ddim_overrides())
    err = (ddim_call(pipe, case) - case.io["ddim_samples"]).abs().max().item()
    assert err <= DDIM_TOL, err


# ---------------------------------------------------------------------------------------------- ancestral
class TinyDenoiser(ModelMixin, ConfigMixin):
    """A cheap stand-in UNet for full T-step chains: the loop is under test, and the reference calls the same model.

    Its output depends on the sample, the timestep and the context, so any routing or ordering slip shows.
    """

    @register_to_config
    def __init__(self, sample_size: int = 16, in_channels: int = 3, out_channels: int = 3, context_dim=None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.context = nn.Linear(context_dim, out_channels) if context_dim else None

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        t = torch.as_tensor(timestep, device=sample.device).float().reshape(-1, 1, 1, 1)
        h = 3.0 * self.conv(sample) * torch.cos(t / 37.0) + 0.5 * sample
        if self.context is not None:
            h = h + self.context(encoder_hidden_states.mean(1))[:, :, None, None]
        return UNet2DOutput(sample=h)


def tiny_pipeline(case) -> LDMCompatPipeline:
    p = case.params
    torch.manual_seed(0)
    unet = TinyDenoiser(16, p["channels"], p["channels"], case.unet_config["params"].get("context_dim"))
    pipe = LDMCompatPipeline(
        unet,
        LDMDDPMScheduler.from_ldm_config(p),
        conditioning_key=p.get("conditioning_key"),
        image_size=p["image_size"],
        channels=p["channels"],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def original_p_sample_loop(case, unet, x_T, noises, context=None, log_every_t=None):
    """The original ``p_sample_loop`` from its formulas and the checkpoint's float32 schedule buffers."""
    sd, p = case.state_dict, case.params
    T = sd["betas"].shape[0]
    log_every_t = log_every_t or p.get("log_every_t", 100)
    clip = p.get("clip_denoised", True)
    param = p.get("parameterization", "eps")

    def at(name, t):
        return sd[name][t].reshape(1, 1, 1, 1)

    img, intermediates = x_T, [x_T]
    for i in reversed(range(T)):
        t = torch.full((x_T.shape[0],), i, dtype=torch.long)
        out = unet(img, t, encoder_hidden_states=context).sample
        if param == "eps":
            x_recon = at("sqrt_recip_alphas_cumprod", i) * img - at("sqrt_recipm1_alphas_cumprod", i) * out
        elif param == "v":  # stablediffusion's predict_start_from_z_and_v (the original p_sample has no v branch)
            x_recon = at("sqrt_alphas_cumprod", i) * img - at("sqrt_one_minus_alphas_cumprod", i) * out
        else:
            x_recon = out
        if clip:
            x_recon = x_recon.clamp(-1.0, 1.0)
        mean = at("posterior_mean_coef1", i) * x_recon + at("posterior_mean_coef2", i) * img
        nonzero = 0.0 if i == 0 else 1.0
        img = mean + nonzero * (0.5 * at("posterior_log_variance_clipped", i)).exp() * noises[T - 1 - i]
        if i % log_every_t == 0 or i == T - 1:
            intermediates.append(img)
    return img, intermediates


@pytest.mark.parametrize("name", CASES)
def test_ancestral_sampling_is_p_sample_loop(name):
    case = load_case(name)
    pipe = tiny_pipeline(case)
    T = pipe.scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(123)
    x_T = torch.randn(2, *pipe.sample_shape, generator=gen)
    noises = [torch.randn(x_T.shape, generator=gen) for _ in range(T)]
    context = case.io.get("context")
    ref, ref_inter = original_p_sample_loop(case, pipe.unet, x_T, noises, context)

    out = pipe(
        latents=x_T,
        variance_noise=noises,
        encoder_hidden_states=context,
        output_type="latent",
        return_intermediates=True,
    )
    assert isinstance(out, LDMCompatPipelineOutput)
    assert len(pipe.scheduler.timesteps) == T  # default: every training step, T-1 … 0
    assert (out.images - ref).abs().max().item() <= CHAIN_TOL
    assert len(out.intermediates) == len(ref_inter)
    for ours, theirs in zip(out.intermediates, ref_inter, strict=True):
        assert (ours - theirs).abs().max().item() <= CHAIN_TOL
    expected_t = [None] + pipe.scheduler.intermediate_timesteps()
    assert out.intermediate_timesteps == expected_t


def test_ancestral_generator_draws_like_the_original():
    # with a generator, x_T and every step's noise are drawn in the original's order (one randn per step)
    case = load_case("ddpm_eps_linear")
    pipe = tiny_pipeline(case)
    T = pipe.scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(7)
    x_T = torch.randn(2, *pipe.sample_shape, generator=gen)
    noises = [torch.randn(x_T.shape, generator=gen) for _ in range(T)]
    ref, _ = original_p_sample_loop(case, pipe.unet, x_T, noises)
    ours = pipe(batch_size=2, generator=torch.Generator().manual_seed(7), output_type="latent").images
    assert (ours - ref).abs().max().item() <= CHAIN_TOL


def test_intermediates_follow_log_every_t_override():
    pipe = tiny_pipeline(load_case("ddpm_eps_linear"))
    out = pipe(num_inference_steps=None, return_intermediates=True, log_every_t=40, output_type="pt")
    assert out.intermediate_timesteps == [None, 99, 80, 40, 0]
    assert len(out.intermediates) == 5 and len(out.pred_original_intermediates) == 5
    assert all(0 <= x.min() and x.max() <= 1 for x in out.intermediates)
    images, intermediates = pipe(return_intermediates=True, return_dict=False, output_type="np")
    assert images.shape == (1, 16, 16, 3) and len(intermediates) == 12  # log_every_t=10 from the config


def test_output_types():
    pipe = tiny_pipeline(load_case("ddpm_eps_linear"))
    pipe.scheduler = LDMDDIMScheduler.from_config(pipe.scheduler.config)
    kw = dict(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    latent = pipe(output_type="latent", **kw).images
    kw["generator"] = torch.Generator().manual_seed(0)
    pt = pipe(output_type="pt", **kw).images
    assert torch.equal(pt, (latent / 2 + 0.5).clamp(0, 1))
    kw["generator"] = torch.Generator().manual_seed(0)
    pil = pipe(**kw).images
    assert len(pil) == 2 and pil[0].size == (16, 16) and pil[0].mode == "RGB"
    with pytest.raises(ValueError, match="output_type"):
        pipe(output_type="tensor")


# ---------------------------------------------------------------------------------------------- swapped schedulers
@pytest.mark.parametrize(
    "scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler]
)
@pytest.mark.parametrize("name", ["ddpm_eps_linear", "ddpm_v_sqrtlinear_crossattn"])
def test_diffusers_schedulers_swap_in(name, scheduler_cls):
    case = load_case(name)
    pipe = case_pipeline(name)
    alphas = pipe.scheduler.alphas_cumprod.clone()
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    assert (
        pipe.scheduler.config.prediction_type
        == {"eps": "epsilon", "v": "v_prediction"}[case.params["parameterization"]]
    )
    assert (pipe.scheduler.alphas_cumprod - alphas).abs().max().item() <= 5e-7
    out = pipe(
        batch_size=2,
        num_inference_steps=5,
        generator=torch.Generator().manual_seed(0),
        encoder_hidden_states=case.io.get("context"),
        output_type="latent",
    ).images
    assert out.shape == (2, *pipe.sample_shape) and torch.isfinite(out).all()


def test_eta_needs_a_ddim_scheduler():
    pipe = case_pipeline("ddpm_eps_linear")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="eta"):
        pipe(num_inference_steps=3, eta=0.5)


def test_stock_ddpm_pipeline_samples_identically():
    # a folder saved for an unconditional model names DDPMPipeline: both pipelines give the same samples
    pipe = tiny_pipeline(load_case("ddpm_eps_linear"))
    ours = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), output_type="pt").images
    stock = DDPMPipeline(unet=pipe.unet, scheduler=pipe.scheduler)
    stock.set_progress_bar_config(disable=True)
    theirs = stock(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=100, output_type="pt")
    assert torch.equal(ours, theirs.images)


def test_stock_ddpm_scheduler_close_to_ancestral():
    # diffusers' DDPMScheduler built from our config: the same chain up to float32 schedule drift
    pipe = tiny_pipeline(load_case("ddpm_eps_linear"))
    kw = dict(batch_size=2, output_type="latent")
    ours = pipe(generator=torch.Generator().manual_seed(5), **kw).images
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    theirs = pipe(generator=torch.Generator().manual_seed(5), num_inference_steps=100, **kw).images
    assert (ours - theirs).abs().max().item() <= 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ddim_fixture_on_cuda(monkeypatch):
    # float32 means float32: cuDNN convolutions would otherwise use TF32 (10-bit mantissa)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    case = load_case("ddpm_v_sqrtlinear_crossattn")
    pipe = case_pipeline(case.name).to("cuda")
    pipe.scheduler = LDMDDIMScheduler.from_config(pipe.scheduler.config)
    samples = ddim_call(pipe, case).cpu()
    assert (samples - case.io["ddim_samples"]).abs().max().item() <= DDIM_TOL
