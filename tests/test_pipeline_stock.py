"""The stock diffusers pipeline a folder names (``ldm_compat.pipelines.stock``) samples exactly what
``LDMCompatPipeline`` samples: same generator, same UNet and scheduler calls in the same order, same output
conversion — compared bit for bit in one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from reference_cases import case_pipeline

from ldm_compat import LDMDDIMScheduler
from ldm_compat.pipelines.stock import stock_pipeline_for

UNCONDITIONAL = ["ddpm_eps_linear", "ddpm_x0_cosine_l1"]


def both(pipe):
    stock = DDPMPipeline(unet=pipe.unet, scheduler=pipe.scheduler)
    stock.set_progress_bar_config(disable=True)
    return pipe, stock


def test_full_chain_equals_ldm_compat_pipeline():
    ours, stock = both(case_pipeline("ddpm_eps_linear"))
    assert ours.stock_pipeline == "DDPMPipeline"
    T = ours.scheduler.config.num_train_timesteps
    # LDMCompatPipeline's default is the original p_sample_loop (all T steps); DDPMPipeline needs the count
    a = ours(batch_size=2, generator=torch.Generator().manual_seed(1), output_type="pt").images
    b = stock(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=T, output_type="pt").images
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", UNCONDITIONAL)
def test_strided_chain_equals_ldm_compat_pipeline(name):
    ours, stock = both(case_pipeline(name))  # x0: clip_denoised in the scheduler step, as in p_sample
    a = ours(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=12, output_type="pt")
    b = stock(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=12, output_type="pt")
    assert torch.equal(a.images, b.images)


@pytest.mark.parametrize("output_type", ["np", "pil"])
def test_output_types_equal(output_type):
    ours, stock = both(case_pipeline("ddpm_eps_linear"))
    kwargs = dict(batch_size=2, num_inference_steps=7, output_type=output_type)
    a = ours(generator=torch.Generator().manual_seed(2), **kwargs).images
    b = stock(generator=torch.Generator().manual_seed(2), **kwargs).images
    if output_type == "pil":
        a, b = np.stack([np.asarray(x) for x in a]), np.stack([np.asarray(x) for x in b])
    assert a.dtype == b.dtype and np.array_equal(a, b)


def test_swapped_scheduler_and_per_sample_generators_equal():
    pipe = case_pipeline("ddpm_eps_linear")
    pipe.scheduler = LDMDDIMScheduler.from_config(pipe.scheduler.config)
    ours, stock = both(pipe)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
    a = ours(batch_size=2, generator=gens(), num_inference_steps=6, output_type="pt").images
    b = stock(batch_size=2, generator=gens(), num_inference_steps=6, output_type="pt").images
    assert torch.equal(a, b)


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler])
def test_diffusers_schedulers_named_stock_sample_identically(scheduler_class):
    pipe = case_pipeline("ddpm_eps_linear")
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    assert pipe.stock_pipeline == "DDPMPipeline"
    ours, stock = both(pipe)
    a = ours(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=8, output_type="pt")
    b = stock(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=8, output_type="pt")
    assert torch.equal(a.images, b.images)


def test_schedulers_ddpm_pipeline_runs_differently_keep_our_class():
    # Euler scales x_T (init_noise_sigma) and the UNet input, which DDPMPipeline does not do
    pipe = case_pipeline("ddpm_eps_linear")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.init_noise_sigma != 1 and pipe.stock_pipeline is None
    ours, stock = both(pipe)
    a = ours(batch_size=1, generator=torch.Generator().manual_seed(5), num_inference_steps=4, output_type="pt")
    b = stock(batch_size=1, generator=torch.Generator().manual_seed(5), num_inference_steps=4, output_type="pt")
    assert not torch.equal(a.images, b.images)


def test_what_ddpm_pipeline_reads_from_the_unet():
    unet = case_pipeline("ddpm_eps_linear").unet
    # DDPMPipeline: shape from config.sample_size and config.in_channels, dtype, and unet(x, t).sample with a 0-d t
    assert (unet.config.sample_size, unet.config.in_channels, unet.dtype) == (16, 3, torch.float32)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        scalar = unet(x, torch.tensor(17)).sample
        batch = unet(x, torch.tensor([17, 17])).sample
    assert torch.equal(scalar, batch)


def test_stock_pipeline_for():
    unet = {"sample_size": 16, "in_channels": 3, "out_channels": 3}
    assert stock_pipeline_for(None, unet) == "DDPMPipeline"
    assert stock_pipeline_for(None, unet, image_size=16, channels=3) == "DDPMPipeline"
    assert stock_pipeline_for(None, {**unet, "sample_size": [16, 16]}, image_size=16) == "DDPMPipeline"
    assert stock_pipeline_for(None, unet, image_size=24) is None  # DDPMPipeline samples at the UNet's size
    assert stock_pipeline_for(None, unet, channels=4) is None
    for key in ("concat", "crossattn", "hybrid", "adm", "crossattn-adm", "hybrid-adm"):
        assert stock_pipeline_for(key, unet) is None
    assert stock_pipeline_for(None, unet, vqvae=object()) is None  # no stock class for more components yet
    assert stock_pipeline_for(None, unet, scheduler=EulerDiscreteScheduler) is None
    assert stock_pipeline_for(None, unet, scheduler=LDMDDIMScheduler) == "DDPMPipeline"
