"""Guided DDIM and PLMS chains of the latent fixtures (``fixtures/ldm_reference_latent``), replayed with
``LDMUNetModel`` + ``LDMDDIMScheduler`` / ``LDMPLMSScheduler`` from the fixtures' own conditioning tensors.

What the original ran (README of the fixtures): ``DDIMSampler.sample(S=10, eta)`` and ``PLMSSampler.sample(S=10)``
from ``sample.x_T`` with ``unconditional_guidance_scale`` (the json's, 3.0) and ``unconditional_conditioning=cond.uc``;
the class-conditional case passes its ``b × 1 × d`` class embedding as the cross-attention context.

Tolerance. The issue asks for the final latents within 1e-4. That holds for the SD-style cases (latents up to ~50);
the class-conditional case's latents reach ~240, where the original code itself, run on this project's machine
(AMD EPYC, torch 2.13, one thread), misses its own fixture by up to 4.7e-4: ten guided steps amplify the few-ulp
differences between CPU kernels. Measured spread of the original against its fixture, over all eleven chains:
at most 2.4e-6 of the chain's largest latent magnitude. So the bound is 1e-4, widened for large latents to 3e-6 of
their magnitude (1.25 × that spread): ``max|Δ| ≤ max(1e-4, 3e-6 · max|ref|)``. The test prints the measured figures.

FOLLOW-UP (first stage, another helper's work): the acceptance also compares ``decode_first_stage(samples)`` with
``ddim_eta0.decoded`` / ``ddim_eta1.decoded`` / ``ddim_eta0_ema.decoded`` / ``plms.decoded`` within 1e-4. Add that
here once the AutoencoderKL / VQModel first stages load from these checkpoints (decode the *fixture's* samples, so
the comparison does not inherit the chain's error).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from reference_cases import LATENT_CASES, case_unet, load_latent_case

from ldm_compat import LDMDDIMScheduler, LDMDDPMScheduler, LDMPLMSScheduler
from ldm_compat.models import apply_model
from ldm_compat.pipelines.guidance import guided_model_output

ATOL = 1e-4  # the acceptance tolerance
SCALE_RTOL = 3e-6  # for latents beyond magnitude ~33 (see the module docstring)

# (chain, sampler, weights, eta) as the fixtures ran them
CHAINS = {
    "ddim_eta0": ("ddim", "training", 0.0),
    "ddim_eta1": ("ddim", "training", 1.0),
    "ddim_eta0_ema": ("ddim", "ema", 0.0),
    "plms": ("plms", "training", 0.0),
}
RUNS = [(c, chain) for c in LATENT_CASES for chain in CHAINS if f"{chain}.samples" in load_latent_case(c).io]


def model_fn(case, unet):
    key = case.params.get("conditioning_key")

    def model(x, t, cond):
        with torch.no_grad():
            return apply_model(unet, x, t, cond, key)

    return model


def run_chain(case, scheduler, unet, noise=None, eta=0.0):
    model = model_fn(case, unet)
    io, scale = case.io, case.meta["guidance_scale"]
    x = io["sample.x_T"]
    for k, t in enumerate(scheduler.timesteps):
        t_batch = torch.full((x.shape[0],), int(t))
        out = guided_model_output(model, x, t_batch, io["cond.c"], io["cond.uc"], scale)
        kwargs = {"eta": eta, "variance_noise": noise[k]} if noise is not None else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


def schedulers(case):
    ddim = LDMDDIMScheduler.from_ldm_config(case.params)
    # the original PLMSSampler uses v as eps (sd2_kl_openclip_v's plms.* show it): reproduce it here
    plms = LDMPLMSScheduler.from_ldm_config(case.params, ldm_bug_compat=True)
    return {"ddim": ddim, "plms": plms}


@pytest.mark.parametrize(("name", "chain"), RUNS)
def test_guided_chain_matches_the_original(name, chain):
    case = load_latent_case(name)
    sampler, weights, eta = CHAINS[chain]
    steps = (case.meta["plms"] if sampler == "plms" else case.meta["ddim"])["steps"]
    scheduler = schedulers(case)[sampler]
    scheduler.set_timesteps(steps)
    grid = case.io["ddim.timesteps"].flip(0).tolist()
    expected_timesteps = grid if sampler == "ddim" else [grid[0], grid[1], *grid[1:]]
    assert scheduler.timesteps.tolist() == expected_timesteps
    noise = case.io["ddim_eta1.noise"] if eta else None
    sample = run_chain(case, scheduler, case_unet(case, weights), noise, eta)
    ref = case.io[f"{chain}.samples"]
    error, magnitude = (sample - ref).abs().max().item(), ref.abs().max().item()
    print(f"{name} {chain}: max|Δ| = {error:.3g} (max|ref| = {magnitude:.3g}, relative {error / magnitude:.2g})")
    assert error <= max(ATOL, SCALE_RTOL * magnitude)


@pytest.mark.parametrize("name", LATENT_CASES)
def test_eta1_sigmas_match_the_original(name):
    """σ_t of the eta=1 grid, read through step(): from x = 0 with a zero output and unit noise, x_prev = σ_t."""
    case = load_latent_case(name)
    scheduler = LDMDDIMScheduler.from_ldm_config(case.params)
    scheduler.set_timesteps(case.meta["ddim"]["steps"])
    zero = torch.zeros(1, 1, 1, 1)
    sigmas = [scheduler.step(zero, t, zero, eta=1.0, variance_noise=torch.ones_like(zero)).prev_sample.item()
              for t in scheduler.timesteps]  # fmt: skip
    expected = case.io["ddim_eta1.sigmas"].flip(0)  # stored in ascending grid order
    torch.testing.assert_close(torch.tensor(sigmas), expected, rtol=1e-6, atol=0)


def test_sd2_plms_default_samples_v_models_correctly_and_differs_from_the_original():
    """The fixture's PLMS chain of the v model shows the original's bug; the default converts v to eps."""
    case = load_latent_case("sd2_kl_openclip_v")
    fixed = LDMPLMSScheduler.from_ldm_config(case.params)
    assert fixed.config.prediction_type == "v_prediction" and not fixed.config.ldm_bug_compat
    fixed.set_timesteps(case.meta["plms"]["steps"])
    sample = run_chain(case, fixed, case_unet(case))
    assert torch.isfinite(sample).all()
    assert (sample - case.io["plms.samples"]).abs().max() > 1.0  # v used as eps blows the latents up (|x| ~ 32)
    # the fixed PLMS chain stays at the scale of the (correct) DDIM chain of the same model
    assert sample.abs().max() < 2 * case.io["ddim_eta0.samples"].abs().max()


@pytest.mark.parametrize("name", ["sd1_kl_clip_eps", "sd2_kl_openclip_v"])
def test_stock_dpm_solver_from_the_plms_config_runs_a_guided_chain(name):
    case = load_latent_case(name)
    ours = LDMPLMSScheduler.from_ldm_config(case.params)
    stock = DPMSolverMultistepScheduler.from_config(ours.config)
    assert stock.config.prediction_type == ours.config.prediction_type
    # diffusers runs the cumprod in float32: this is as close as float32 betas can come (tests/test_scheduler_interop)
    floor = (torch.cumprod(1 - ours.betas, 0) - ours.alphas_cumprod).abs().max().item()
    assert (stock.alphas_cumprod - ours.alphas_cumprod).abs().max().item() <= max(5e-7, floor)
    stock.set_timesteps(10)
    sample = run_chain(case, stock, case_unet(case))
    assert sample.shape == case.io["sample.x_T"].shape and torch.isfinite(sample).all()
    assert not torch.equal(sample, case.io["sample.x_T"])


def test_schedulers_share_the_checkpoint_schedule():
    """The samplers' alphas_cumprod are the checkpoint's buffers bit for bit (the original samplers read them)."""
    for name in LATENT_CASES:
        case = load_latent_case(name)
        expected = case.state_dict["alphas_cumprod"]
        for scheduler in (LDMDDPMScheduler.from_ldm_config(case.params), *schedulers(case).values()):
            assert torch.equal(scheduler.alphas_cumprod, expected), (name, type(scheduler).__name__)
