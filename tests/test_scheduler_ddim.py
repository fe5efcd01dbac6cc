"""LDMDDIMScheduler against the original DDIMSampler (``fixtures/ldm_schedules`` traces, ``fixtures/ldm_reference``)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from reference_cases import CASES, load_case
from schedule_traces import META, max_abs, synthetic_model, trace_atol, trace_tensors

from ldm_compat import LDMDDIMScheduler, LDMDDPMScheduler
from ldm_compat.schedulers import stock_ddim_overrides


def ddim_scheduler(trace, **overrides):
    ddpm = LDMDDPMScheduler.from_ldm_config({**trace, "parameterization": trace["parameterization"]})
    return LDMDDIMScheduler.from_config(ddpm.config, ddim_discretize=trace["discretize"], **overrides)


def run(scheduler, x, eta, noise=None, log_every_t=4, model=synthetic_model):
    keep = set(scheduler.intermediate_steps(log_every_t))
    x_inter, pred_x0 = [x], [x]
    for i, t in enumerate(scheduler.timesteps):
        z = None if noise is None else noise[i]
        out = scheduler.step(model(x, torch.full((x.shape[0],), int(t))), t, x, eta=eta, variance_noise=z)
        x = out.prev_sample
        if i in keep:
            x_inter.append(x)
            pred_x0.append(out.pred_original_sample)
    return x, torch.stack(x_inter), torch.stack(pred_x0)


def replay_ddim(name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The trace's DDIMSampler run with its recorded noise, computed in ``dtype``: sample, x_inter, pred_x0."""
    trace, tensors = META["ddim_traces"][name], trace_tensors()
    # the x0 trace shows the original's bug (x0 output used as eps), so reproduce it here
    scheduler = ddim_scheduler(trace, ldm_bug_compat=trace["parameterization"] == "x0")
    scheduler.set_timesteps(None if trace["ddim_use_original_steps"] else trace["steps"])
    assert scheduler.timesteps.flip(0).tolist() == tensors[f"ddim.{name}.timesteps"].tolist()
    return run(scheduler, tensors[f"ddim.{name}.x_T"].to(dtype), trace["eta"], tensors[f"ddim.{name}.noise"].to(dtype))


@pytest.mark.parametrize("name", sorted(META["ddim_traces"]))
def test_matches_original_ddim_sampler(name):
    # traces stored on another machine: float32 tolerance, see schedule_traces.TRACE_ATOL; in float64 the chain is
    # free of float32 rounding and the traces lie within the same tolerance of it
    keys = ("sample", "x_inter", "pred_x0")
    expected = [trace_tensors()[f"ddim.{name}.{key}"] for key in keys]
    atol = trace_atol(len(trace_tensors()[f"ddim.{name}.timesteps"]), *expected)
    for dtype in (torch.float32, torch.float64):
        for key, got, want in zip(keys, replay_ddim(name, dtype), expected):
            assert max_abs(got, want) <= atol, (dtype, key)


def test_draws_noise_like_the_original_without_variance_noise():
    name = "eps_uniform_eta1_uneven"
    trace, tensors = META["ddim_traces"][name], trace_tensors()
    scheduler = ddim_scheduler(trace)
    scheduler.set_timesteps(trace["steps"])
    noise = tensors[f"ddim.{name}.noise"]
    # the original draws one randn per step (also when eta == 0); so does step() without variance_noise
    torch.manual_seed(7)
    drawn = torch.stack([torch.randn(noise.shape[1:]) for _ in range(noise.shape[0])])
    torch.manual_seed(7)
    sample, _, _ = run(scheduler, tensors[f"ddim.{name}.x_T"], trace["eta"])
    scheduler.set_timesteps(trace["steps"])
    expected, _, _ = run(scheduler, tensors[f"ddim.{name}.x_T"], trace["eta"], drawn)
    assert torch.equal(sample, expected)


@pytest.mark.parametrize("name", CASES)
def test_reference_ddim_timesteps(name):
    case = load_case(name)
    scheduler = LDMDDIMScheduler.from_config(LDMDDPMScheduler.from_ldm_config(case.params).config)
    scheduler.set_timesteps(case.meta["ddim"]["steps"])
    assert scheduler.timesteps.flip(0).tolist() == case.io["ddim_timesteps"].tolist()
    assert scheduler.config.prediction_type == LDMDDPMScheduler.from_ldm_config(case.params).config.prediction_type


@pytest.mark.parametrize("name", CASES)
def test_reference_ddim_samples_with_the_unet(name):
    """The fixture's whole original DDIM run, replayed with the ported UNet and this scheduler."""
    from ldm_compat.models.conditioning import apply_model
    from ldm_compat.models.unet_ldm import LDMUNetModel

    case = load_case(name)
    unet = LDMUNetModel.from_ldm_config(case.unet_config).eval()
    unet.load_state_dict(case.unet_state_dict())
    # DDIMSampler.sample ran on the training weights (not under ema_scope)
    key = case.params.get("conditioning_key")
    cond = case.io.get("context", case.io.get("concat", case.io.get("y")))
    ddpm = LDMDDPMScheduler.from_ldm_config(case.params)
    # the fixture's x0 DDIM samples show the original's bug (x0 output used as eps)
    scheduler = LDMDDIMScheduler.from_config(ddpm.config, ldm_bug_compat=True)
    scheduler.set_timesteps(case.meta["ddim"]["steps"])

    def model(x, t):
        with torch.no_grad():
            return apply_model(unet, x, t, cond, key)

    sample, _, _ = run(scheduler, case.io["ddim_x_T"], case.meta["ddim"]["eta"], case.io.get("ddim_noise"), model=model)
    assert (sample - case.io["ddim_samples"]).abs().max().item() <= 1e-5


def test_x0_models_are_sampled_correctly_by_default():
    ddpm = LDMDDPMScheduler(num_train_timesteps=50, ldm_beta_schedule="cosine", prediction_type="sample")
    correct = LDMDDIMScheduler.from_config(ddpm.config)
    eps_twin = LDMDDIMScheduler.from_config(ddpm.config, prediction_type="epsilon")
    for s in (correct, eps_twin):
        s.set_timesteps(5)
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = int(correct.timesteps[0])
    x_t = correct.add_noise(x0, eps, torch.full((2,), t))
    z = torch.randn_like(x_t)
    a = correct.step(x0, t, x_t, eta=0.5, variance_noise=z)
    b = eps_twin.step(eps, t, x_t, eta=0.5, variance_noise=z)
    torch.testing.assert_close(a.pred_original_sample, x0, rtol=0, atol=0)
    torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=0, atol=2e-6)
    bug = LDMDDIMScheduler.from_config(ddpm.config, ldm_bug_compat=True)
    bug.set_timesteps(5)
    assert not torch.allclose(bug.step(x0, t, x_t, variance_noise=z).prev_sample, a.prev_sample, atol=1e-3)


def test_v_and_eps_outputs_describing_the_same_noise_agree():
    config = LDMDDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction").config
    v_sched = LDMDDIMScheduler.from_config(config)
    e_sched = LDMDDIMScheduler.from_config(config, prediction_type="epsilon")
    v_sched.set_timesteps(10)
    e_sched.set_timesteps(10)
    x0, eps = torch.randn(2, 3, 4, 4).double(), torch.randn(2, 3, 4, 4).double()
    t = int(v_sched.timesteps[3])
    x_t = v_sched.add_noise(x0, eps, t)
    v = v_sched.get_velocity(x0, eps, t)
    a = v_sched.step(v, t, x_t, eta=0.0).prev_sample
    b = e_sched.step(eps, t, x_t, eta=0.0).prev_sample
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_from_config_takes_the_ldm_ddpm_schedule_quietly(caplog):
    ddpm = LDMDDPMScheduler.from_ldm_config(
        {"timesteps": 60, "beta_schedule": "sqrt", "v_posterior": 0.5, "clip_denoised": True, "log_every_t": 3}
    )
    with caplog.at_level("WARNING"):
        ddim = LDMDDIMScheduler.from_config(ddpm.config)
    assert "not expected" not in caplog.text
    assert torch.equal(ddim.alphas_cumprod, ddpm.alphas_cumprod)
    assert ddim.config.ldm_bug_compat is False and ddim.config.ddim_discretize == "uniform"
    assert LDMDDPMScheduler in ddim.compatibles and LDMDDIMScheduler in ddpm.compatibles


def test_original_steps_mode_ends_at_alpha_one():
    scheduler = LDMDDIMScheduler(num_train_timesteps=10)
    scheduler.set_timesteps()
    assert scheduler.timesteps.tolist() == list(range(9, -1, -1))
    x, eps = torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2)
    for t in scheduler.timesteps:
        out = scheduler.step(eps, t, x, eta=1.0)
        x = out.prev_sample
    assert torch.equal(x, out.pred_original_sample)  # ᾱ_prev = 1 and σ = 0 at the last step


def test_step_errors():
    scheduler = LDMDDIMScheduler(num_train_timesteps=20)
    x = torch.randn(2, 1, 2, 2)
    with pytest.raises(ValueError, match="call set_timesteps first"):
        scheduler.step(x, 19, x)
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="not among the current sampling timesteps"):
        scheduler.step(x, 2, x)
    with pytest.raises(ValueError, match="one timestep for the whole batch"):
        scheduler.step(x, torch.tensor([16, 11]), x)
    with pytest.raises(ValueError, match="num_inference_steps=20"):
        scheduler.set_timesteps(20)
    with pytest.raises(ValueError, match="ddim_discretize='log'"):
        LDMDDIMScheduler(ddim_discretize="log")


def test_temperature_and_noise_dropout():
    scheduler = LDMDDIMScheduler(num_train_timesteps=20)
    scheduler.set_timesteps(4)
    x, out, z = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    t = int(scheduler.timesteps[0])
    base = scheduler.step(out, t, x, eta=1.0, variance_noise=torch.zeros_like(z)).prev_sample
    one = scheduler.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
    two = scheduler.step(out, t, x, eta=1.0, variance_noise=z, temperature=2.0).prev_sample
    torch.testing.assert_close(two - base, 2 * (one - base), rtol=0, atol=1e-6)
    dropped = scheduler.step(out, t, x, eta=1.0, variance_noise=z, noise_dropout=0.999).prev_sample
    assert (dropped == base).float().mean() > 0.9


def test_stock_ddim_overrides_give_the_original_grid_when_steps_divide_T():
    config = LDMDDPMScheduler(num_train_timesteps=100).config
    stock = DDIMScheduler.from_config(config, **stock_ddim_overrides())
    ours = LDMDDIMScheduler.from_config(config)
    stock.set_timesteps(10)
    ours.set_timesteps(10)
    assert stock.timesteps.tolist() == ours.timesteps.tolist()
    x, eps = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    for t in ours.timesteps:
        a = ours.step(eps, t, x).prev_sample
        b = stock.step(eps, t, x).prev_sample
        x = a
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-5)
