"""diffusers conventions for the ldm_compat schedulers: from_config interop, save/load, shapes, dtypes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from reference_cases import CASES, load_case

from ldm_compat import LDMDDIMScheduler, LDMDDPMScheduler

SCHEDULES = json.loads((Path(__file__).parent / "fixtures" / "ldm_schedules" / "schedules.json").read_text())
ALL_PARAMS = {name: case["params"] for name, case in SCHEDULES["schedules"].items()}
ALL_PARAMS.update({name: load_case(name).params for name in CASES})
STOCK = [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler]


@pytest.mark.parametrize("name", sorted(ALL_PARAMS))
def test_stock_schedulers_get_the_same_alphas_cumprod(name):
    scheduler = LDMDDPMScheduler.from_ldm_config(ALL_PARAMS[name])
    # diffusers runs the cumprod in float32; even the exact float32 betas cannot do better than this
    fp32_floor = (torch.cumprod(1 - scheduler.betas, 0) - scheduler.alphas_cumprod).abs().max().item()
    tolerance = max(5e-7, fp32_floor)
    for cls in STOCK:
        stock = cls.from_config(scheduler.config)
        assert stock.config.num_train_timesteps == scheduler.config.num_train_timesteps
        assert stock.config.prediction_type == scheduler.config.prediction_type, cls.__name__
        error = (stock.alphas_cumprod - scheduler.alphas_cumprod).abs().max().item()
        assert error <= tolerance, (cls.__name__, error)


def test_stock_tolerance_exceeds_5e7_only_at_the_float32_floor():
    """lsun-churches' (0.0015, 0.0155): stock diffusers is 5.96e-7 off whatever the config says (its fp32 cumprod)."""
    scheduler = LDMDDPMScheduler.from_ldm_config(ALL_PARAMS["linear_1000_churches"])
    floor = (torch.cumprod(1 - scheduler.betas, 0) - scheduler.alphas_cumprod).abs().max().item()
    stock = DDPMScheduler.from_config(scheduler.config)
    assert (stock.alphas_cumprod - scheduler.alphas_cumprod).abs().max().item() == floor


def test_defaults_survive_from_config():
    """diffusers replaces keys listed in _use_default_values by the target's defaults; none may be listed."""
    scheduler = LDMDDPMScheduler()  # every key defaulted
    assert scheduler.config["_use_default_values"] == []
    ddim = DDIMScheduler.from_config(scheduler.config)
    assert ddim.config.beta_schedule == "scaled_linear"  # DDIM's own default would be "linear"
    assert torch.allclose(ddim.alphas_cumprod, scheduler.alphas_cumprod, atol=5e-7, rtol=0)
    ddpm = DDPMScheduler.from_config(scheduler.config)
    assert ddpm.config.variance_type == "fixed_small_log"
    fixed_large = DDPMScheduler.from_config(LDMDDPMScheduler(v_posterior=1.0).config)
    assert fixed_large.config.variance_type == "fixed_large"


def test_derived_keys_follow_overrides():
    base = LDMDDPMScheduler(v_posterior=1.0)
    changed = LDMDDPMScheduler.from_config(base.config, v_posterior=0.0)
    assert changed.config.variance_type == "fixed_small_log"


@pytest.mark.parametrize("name", ["ddpm_x0_cosine_l1", "sqrt_500", "given_betas_64", "cosine_300_s001"])
def test_save_and_load_round_trip(tmp_path, name):
    scheduler = LDMDDPMScheduler.from_ldm_config(ALL_PARAMS[name])
    scheduler.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "LDMDDPMScheduler" and "_use_default_values" not in saved
    loaded = LDMDDPMScheduler.from_pretrained(tmp_path)
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == {
        k: v for k, v in scheduler.config.items() if not k.startswith("_")
    }
    assert scheduler.schedule_mismatches(loaded.ldm_buffers()) == []
    assert loaded.to_ldm_config() == scheduler.to_ldm_config()
    stock = DDIMScheduler.from_pretrained(tmp_path)
    assert (stock.alphas_cumprod - scheduler.alphas_cumprod).abs().max() <= 5e-7
    ddim = LDMDDIMScheduler.from_pretrained(tmp_path)
    assert torch.equal(ddim.alphas_cumprod, scheduler.alphas_cumprod)
    ddim.save_pretrained(tmp_path / "ddim")
    assert torch.equal(LDMDDIMScheduler.from_pretrained(tmp_path / "ddim").alphas_cumprod, scheduler.alphas_cumprod)


def test_trained_betas_as_ndarray():
    betas = np.linspace(1e-3, 2e-2, 25)
    scheduler = LDMDDPMScheduler(num_train_timesteps=25, trained_betas=betas)
    assert scheduler.config.trained_betas == [float(b) for b in betas]
    assert json.loads(scheduler.to_json_string())["trained_betas"] == [float(b) for b in betas]


@pytest.mark.parametrize("shape", [(4, 7), (4, 3, 5), (4, 3, 8, 8), (4, 2, 3, 4, 4)])
def test_add_noise_and_velocity_shapes(shape):
    scheduler = LDMDDPMScheduler(num_train_timesteps=50)
    x0, eps = torch.randn(shape), torch.randn(shape)
    for t in (torch.tensor([0, 10, 20, 49]), 7, torch.tensor(7), torch.tensor([7])):
        assert scheduler.add_noise(x0, eps, t).shape == shape
        assert scheduler.get_velocity(x0, eps, t).shape == shape
    per_sample = scheduler.add_noise(x0, eps, torch.tensor([3, 3, 3, 3]))
    assert torch.equal(per_sample, scheduler.add_noise(x0, eps, 3))
    with pytest.raises(ValueError, match="one timestep per batch element"):
        scheduler.add_noise(x0, eps, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer timesteps"):
        scheduler.add_noise(x0, eps, 2.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    scheduler = LDMDDPMScheduler(num_train_timesteps=50, prediction_type="v_prediction")
    x0, eps, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([5, 40])
    reference = scheduler.add_noise(x0, eps, t)
    noisy = scheduler.add_noise(x0.to(dtype), eps.to(dtype), t)
    assert noisy.dtype == dtype
    tolerance = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-6}[dtype]
    assert (noisy.double() - reference.double()).abs().max() <= tolerance
    out = scheduler.step(eps.to(dtype), t, noisy, variance_noise=eps.to(dtype))
    assert out.prev_sample.dtype == dtype and out.pred_original_sample.dtype == dtype
    ddim = LDMDDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(10)
    step = ddim.step(eps.to(dtype), ddim.timesteps[0], noisy, eta=1.0)
    assert step.prev_sample.dtype == dtype and torch.isfinite(step.prev_sample.float()).all()


def test_step_api_conventions():
    for scheduler in (LDMDDPMScheduler(num_train_timesteps=20), LDMDDIMScheduler(num_train_timesteps=20)):
        assert scheduler.init_noise_sigma == 1.0 and scheduler.order == 1 and len(scheduler) == 20
        scheduler.set_timesteps(5, device="cpu")
        x = torch.randn(2, 3, 4, 4)
        assert torch.equal(scheduler.scale_model_input(x, scheduler.timesteps[0]), x)
        t = scheduler.timesteps[0]  # a 0-d tensor, as pipelines pass it
        if isinstance(scheduler, LDMDDIMScheduler):
            scheduler.set_timesteps(5)
        a = scheduler.step(x, t, x, generator=torch.Generator().manual_seed(0))
        if isinstance(scheduler, LDMDDIMScheduler):
            scheduler.set_timesteps(5)
        b = scheduler.step(x, t, x, generator=torch.Generator().manual_seed(0), return_dict=False)
        assert torch.equal(a.prev_sample, b[0]) and torch.equal(a.pred_original_sample, b[1])
        assert a.prev_sample.shape == x.shape


def test_ddpm_pipeline_runs_with_the_scheduler():
    """A stock DDPMPipeline loop (0-d tensor timesteps, generator) with LDMDDPMScheduler."""
    from diffusers import DDPMPipeline, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    pipe = DDPMPipeline(unet=unet, scheduler=LDMDDPMScheduler(num_train_timesteps=4))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4, output_type="np")
    images = images.images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
