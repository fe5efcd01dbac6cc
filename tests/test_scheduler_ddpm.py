"""LDMDDPMScheduler against the original DDPM (``fixtures/ldm_reference``, ``fixtures/ldm_schedules``)."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from reference_cases import CASES, load_case
from schedule_traces import META, max_abs, original_buffers, synthetic_model, trace_atol, trace_tensors

from ldm_compat import LDMDDPMScheduler
from ldm_compat.schedulers import LDM_BUFFER_NAMES, make_beta_schedule


# ---------------------------------------------------------------------------- schedule and config
@pytest.mark.parametrize("name", CASES)
def test_buffers_bit_equal_for_reference_cases(name):
    case = load_case(name)
    scheduler = LDMDDPMScheduler.from_ldm_config(case.params)
    assert scheduler.schedule_mismatches(case.state_dict) == []
    assert torch.equal(scheduler.alphas_cumprod, case.state_dict["alphas_cumprod"])
    assert scheduler.config.num_train_timesteps == case.params["timesteps"]


@pytest.mark.parametrize("name", sorted(META["schedules"]))
def test_buffers_bit_equal_for_every_schedule(name):
    # float64 numpy cast to float32 on both sides: bit-equal on every machine
    scheduler = LDMDDPMScheduler.from_ldm_config(META["schedules"][name]["params"])
    expected = original_buffers(name, LDM_BUFFER_NAMES)
    buffers = scheduler.ldm_buffers()
    for key in LDM_BUFFER_NAMES:
        assert buffers[key].dtype == torch.float32 and buffers[key].device.type == "cpu"
        assert torch.equal(buffers[key], expected[key]), key


@pytest.mark.parametrize(
    "params, beta_schedule, has_trained",
    [
        ({"beta_schedule": "linear"}, "scaled_linear", False),
        ({"beta_schedule": "sqrt_linear"}, "linear", False),
        ({"beta_schedule": "cosine"}, "squaredcos_cap_v2", False),
        ({"beta_schedule": "cosine", "cosine_s": 0.0}, "squaredcos_cap_v2", True),
        ({"beta_schedule": "sqrt"}, "linear", True),
        ({"given_betas": [0.1, 0.2, 0.3]}, "scaled_linear", True),
    ],
)
def test_config_uses_diffusers_names(params, beta_schedule, has_trained):
    config = LDMDDPMScheduler.from_ldm_config(params).config
    assert config.beta_schedule == beta_schedule
    assert (config.trained_betas is not None) == has_trained


@pytest.mark.parametrize(
    "params",
    [
        {"beta_schedule": "linear", "timesteps": 50, "linear_start": 0.0015, "linear_end": 0.0195},
        {"beta_schedule": "cosine", "timesteps": 40, "cosine_s": 0.01, "v_posterior": 0.3, "parameterization": "x0"},
        {"beta_schedule": "sqrt", "timesteps": 30, "clip_denoised": False, "log_every_t": 7},
        {"beta_schedule": "squaredcos_cap_v2", "timesteps": 30, "parameterization": "v"},
        {"given_betas": list(np.linspace(0.01, 0.2, 12)), "v_posterior": 1.0},
    ],
)
def test_to_ldm_config_inverts_from_ldm_config(params):
    scheduler = LDMDDPMScheduler.from_ldm_config(params)
    exported = scheduler.to_ldm_config()
    for key, value in params.items():
        assert exported[key] == value, key
    assert ("given_betas" in exported) == ("given_betas" in params)
    again = LDMDDPMScheduler.from_ldm_config(exported)
    assert dict(again.config) == dict(scheduler.config)
    assert scheduler.schedule_mismatches(again.ldm_buffers()) == []


def test_from_ldm_config_accepts_yaml_lists_and_whole_configs():
    betas = [0.01, 0.02, 0.05, 0.1]
    yaml = OmegaConf.create({"model": {"params": {"given_betas": betas, "timesteps": 4, "parameterization": "x0"}}})
    scheduler = LDMDDPMScheduler.from_ldm_config(yaml)
    assert torch.equal(scheduler.betas, torch.tensor(betas, dtype=torch.float32))
    assert scheduler.config.prediction_type == "sample"


@pytest.mark.parametrize(
    "params, option",
    [
        ({"beta_schedule": "quadratic"}, "beta_schedule='quadratic'"),
        ({"parameterization": "mu"}, "parameterization='mu'"),
        ({"given_betas": [0.1, -0.2]}, "given_betas"),
        ({"given_betas": [0.1, 1.5]}, "given_betas"),
        ({"given_betas": [0.1, 0.2], "timesteps": 3}, "given_betas has 2 entries but timesteps=3"),
        ({"v_posterior": 1.5}, "v_posterior"),
        ({"timesteps": 0}, "timesteps=0"),
        ({"beta_schedule": "linear", "linear_start": -1.0}, "linear_start=-1.0"),
        ({"beta_schedule": "sqrt_linear", "linear_start": -1.0}, "betas must lie in"),
    ],
)
def test_bad_ldm_params_raise_one_line_value_errors(params, option):
    with pytest.raises(ValueError, match=option) as info:
        LDMDDPMScheduler.from_ldm_config(params)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
        ({"prediction_type": "mu"}, "prediction_type='mu'"),
        ({"trained_betas": [0.1, 0.2], "num_train_timesteps": 3}, "trained_betas has 2 entries"),
        ({"trained_betas": [[0.1, 0.2]], "num_train_timesteps": 2}, "trained_betas"),
        ({"beta_schedule": "squaredcos_cap_v2", "cosine_s": 0.01}, "cosine_s=0.01"),
        ({"ldm_beta_schedule": "sqrt_linear", "beta_schedule": "scaled_linear"}, "contradicts"),
        ({"ldm_beta_schedule": "sqrt", "trained_betas": [0.1] * 1000}, "trained_betas differ"),
        ({"timestep_spacing": "uniform"}, "timestep_spacing"),
    ],
)
def test_bad_config_raises(kwargs, option):
    with pytest.raises(ValueError, match=option):
        LDMDDPMScheduler(**kwargs)


def test_ldm_beta_schedule_alone_derives_the_diffusers_keys():
    scheduler = LDMDDPMScheduler(ldm_beta_schedule="sqrt", num_train_timesteps=20)
    assert scheduler.config.beta_schedule == "linear"
    assert scheduler.config.trained_betas == [float(b) for b in make_beta_schedule("sqrt", 20)]
    assert LDMDDPMScheduler(ldm_beta_schedule="sqrt_linear").config.beta_schedule == "linear"


def test_from_ldm_checkpoint_uses_params_when_buffers_match_and_betas_otherwise():
    case = load_case("ddpm_eps_linear")
    same = LDMDDPMScheduler.from_ldm_checkpoint(case.params, case.state_dict)
    assert same.config.ldm_beta_schedule == "linear" and same.config.trained_betas is None
    # a checkpoint whose schedule differs from its config (LatentDiffusion loads the checkpoint's buffers)
    other = dict(case.params, linear_end=0.03)
    fallback = LDMDDPMScheduler.from_ldm_checkpoint(other, case.state_dict)
    assert fallback.config.ldm_beta_schedule is None
    assert torch.equal(fallback.betas, case.state_dict["betas"])
    assert fallback.to_ldm_config()["given_betas"] == [float(b) for b in case.state_dict["betas"].double()]
    assert fallback.config.prediction_type == "epsilon" and fallback.config.num_train_timesteps == 100
    pruned = {k: v for k, v in case.state_dict.items() if k not in LDM_BUFFER_NAMES}
    assert LDMDDPMScheduler.from_ldm_checkpoint(other, pruned).config.beta_end == 0.03


# ---------------------------------------------------------------------------- q_sample, v helpers, p_sample
# Exact on every machine: q_sample, the v helpers and the posterior mean are float32 products and sums of the
# float32 buffers (float64 cast) in the original's order, and IEEE × + − are correctly rounded on every CPU; the
# log variance is a buffer entry. p_sample adds exp(½·log σ²)·z, and float32 exp is a vector-math kernel that
# differs between CPUs in the last bit: one step at |x| ≤ 3.2 (ulp 2.4e-7) is held to 1e-6 (measured 0.0 here).
@pytest.mark.parametrize("name", CASES)
def test_add_noise_is_q_sample(name):
    io = load_case(name).io
    scheduler = LDMDDPMScheduler.from_ldm_config(load_case(name).params)
    assert torch.equal(scheduler.add_noise(io["x_start"], io["noise"], io["t"]), io["x_noisy"])
    assert torch.equal(scheduler.q_sample(io["x_start"], io["noise"], io["t"]), io["x_noisy"])


def test_v_helpers_match_stablediffusion():
    case = load_case("ddpm_v_sqrtlinear_crossattn")
    io, scheduler = case.io, LDMDDPMScheduler.from_ldm_config(case.params)
    assert torch.equal(scheduler.get_velocity(io["x_start"], io["noise"], io["t"]), io["v_target"])
    assert torch.equal(scheduler.get_v(io["x_start"], io["noise"], io["t"]), io["v_target"])
    x0 = scheduler.predict_start_from_z_and_v(io["x_noisy"], io["t"], io["unet_out"])
    eps = scheduler.predict_eps_from_z_and_v(io["x_noisy"], io["t"], io["unet_out"])
    assert torch.equal(x0, io["pred_x0_from_v"])
    assert torch.equal(eps, io["pred_eps_from_v"])


@pytest.mark.parametrize("name", [c for c in CASES if "p_sample" in load_case(c).io])
def test_step_is_p_sample(name):
    case = load_case(name)
    io, scheduler = case.io, LDMDDPMScheduler.from_ldm_config(case.params)
    out = scheduler.step(io["unet_out"], io["t"], io["x_noisy"], variance_noise=io["step_noise"])
    assert max_abs(out.prev_sample, io["p_sample"]) <= 1e-6
    mean, _, log_variance = scheduler.p_mean_variance(io["unet_out"], io["x_noisy"], io["t"])
    assert torch.equal(mean, io["p_mean"])
    assert torch.equal(log_variance, io["p_log_variance"])
    prev, x0 = scheduler.step(
        io["unet_out"], io["t"], io["x_noisy"], variance_noise=io["step_noise"], return_dict=False
    )
    assert torch.equal(prev, out.prev_sample) and torch.equal(x0, out.pred_original_sample)


def replay_p_sample_loop(name: str, dtype: torch.dtype) -> torch.Tensor:
    """The trace's chain with its recorded noise, computed in ``dtype``: x_T and the kept intermediates."""
    trace, tensors = META["ddpm_traces"][name], trace_tensors()
    scheduler = LDMDDPMScheduler.from_ldm_config(trace)
    intermediates, noise = tensors[f"ddpm.{name}.intermediates"], tensors[f"ddpm.{name}.noise"]
    keep = set(scheduler.intermediate_timesteps())
    x = intermediates[0].to(dtype)
    got = [x]
    for i, t in enumerate(scheduler.timesteps):
        model_output = synthetic_model(x, torch.full((x.shape[0],), int(t)))
        x = scheduler.step(model_output, t, x, variance_noise=noise[i].to(dtype)).prev_sample
        if int(t) in keep:
            got.append(x)
    assert len(got) == intermediates.shape[0]
    return torch.stack(got)


@pytest.mark.parametrize("name", sorted(META["ddpm_traces"]))
def test_full_chain_matches_p_sample_loop(name):
    # traces stored on another machine: float32 tolerance, see schedule_traces.TRACE_ATOL
    trace, tensors = META["ddpm_traces"][name], trace_tensors()
    intermediates = tensors[f"ddpm.{name}.intermediates"]
    atol = trace_atol(trace["timesteps"], intermediates)
    assert max_abs(replay_p_sample_loop(name, torch.float32), intermediates) <= atol
    # in float64 the chain is free of float32 rounding: the trace lies within the same tolerance of it
    assert max_abs(replay_p_sample_loop(name, torch.float64), intermediates) <= atol
    # the same chain drawing its own noise: the original's random stream (x_T, then one draw per step, t=0 too)
    scheduler = LDMDDPMScheduler.from_ldm_config(trace)
    torch.manual_seed(trace["seed"])
    x = torch.randn(tuple(META["trace_shape"]))
    for t in scheduler.timesteps:
        x = scheduler.step(synthetic_model(x, torch.full((x.shape[0],), int(t))), t, x).prev_sample
    assert max_abs(x, tensors[f"ddpm.{name}.sample"]) <= atol


def test_no_noise_at_t0_and_clipping():
    scheduler = LDMDDPMScheduler(num_train_timesteps=10, clip_sample=True)
    x, out = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4) * 5
    a = scheduler.step(out, 0, x, variance_noise=torch.randn_like(x)).prev_sample
    b = scheduler.step(out, 0, x, variance_noise=torch.zeros_like(x)).prev_sample
    assert torch.equal(a, b)
    x0 = scheduler.step(out, 5, x).pred_original_sample
    assert x0.abs().max() <= 1.0
    unclipped = LDMDDPMScheduler(num_train_timesteps=10, clip_sample=False).step(out, 5, x).pred_original_sample
    assert unclipped.abs().max() > 1.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_all_parameterizations_share_the_posterior(prediction_type):
    """eps, x0 and v outputs describing the same x0 give the same step (v: the original could not sample it)."""
    scheduler = LDMDDPMScheduler(num_train_timesteps=50, prediction_type=prediction_type, clip_sample=False)
    x0, eps = torch.randn(3, 2, 5, 5).double(), torch.randn(3, 2, 5, 5).double()
    t = torch.tensor([3, 17, 49])
    x_t = scheduler.add_noise(x0, eps, t)
    output = {"epsilon": eps, "sample": x0, "v_prediction": scheduler.get_velocity(x0, eps, t)}[prediction_type]
    out = scheduler.step(output, t, x_t, variance_noise=torch.zeros_like(x_t))
    torch.testing.assert_close(out.pred_original_sample, x0, rtol=0, atol=1e-6)
    mean, _, _ = scheduler.q_posterior(x0, x_t, t)
    torch.testing.assert_close(out.prev_sample, mean, rtol=0, atol=1e-6)


def test_per_batch_timesteps_equal_separate_steps():
    scheduler = LDMDDPMScheduler(num_train_timesteps=30, v_posterior=0.4)
    x, out, z = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 12, 29])
    batched = scheduler.step(out, t, x, variance_noise=z).prev_sample
    for i in range(3):
        single = scheduler.step(out[i : i + 1], int(t[i]), x[i : i + 1], variance_noise=z[i : i + 1]).prev_sample
        assert torch.equal(batched[i : i + 1], single)
    with pytest.raises(ValueError, match="one timestep per batch element"):
        scheduler.step(out, torch.tensor([1, 2]), x)
    with pytest.raises(ValueError, match="values must lie in"):
        scheduler.step(out, 30, x)


# ---------------------------------------------------------------------------- timesteps
def test_default_timesteps_are_every_training_step():
    scheduler = LDMDDPMScheduler(num_train_timesteps=12)
    assert scheduler.timesteps.tolist() == list(range(11, -1, -1))
    scheduler.set_timesteps(4)
    scheduler.set_timesteps()
    assert scheduler.timesteps.tolist() == list(range(11, -1, -1)) and scheduler.num_inference_steps == 12
    assert scheduler.previous_timestep(5) == 4 and scheduler.previous_timestep(0) == -1


def test_strided_steps_use_the_posterior_of_the_jump():
    scheduler = LDMDDPMScheduler(num_train_timesteps=20, v_posterior=0.25, clip_sample=False)
    scheduler.set_timesteps(5)
    assert scheduler.timesteps.tolist() == [16, 12, 8, 4, 0]
    assert scheduler.previous_timestep(12) == 8
    a = np.cumprod(1 - make_beta_schedule("linear", 20))
    x_t, z, eps = torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3)
    step = scheduler.step(eps, 12, x_t, variance_noise=z)
    # DDPM posterior q(x_8 | x_12, x0) in float64 with beta = 1 - a_12 / a_8
    beta = 1 - a[12] / a[8]
    x0_hat = (x_t.double() - np.sqrt(1 - a[12]) * eps.double()) / np.sqrt(a[12])
    mean = beta * np.sqrt(a[8]) / (1 - a[12]) * x0_hat + (1 - a[8]) * np.sqrt(a[12] / a[8]) / (1 - a[12]) * x_t
    var = 0.75 * beta * (1 - a[8]) / (1 - a[12]) + 0.25 * beta
    torch.testing.assert_close(step.prev_sample.double(), mean + np.sqrt(var) * z.double(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not among the current sampling timesteps"):
        scheduler.step(eps, 13, x_t)


@pytest.mark.parametrize("spacing, expected", [("linspace", [19, 13, 6, 0]), ("trailing", [19, 14, 9, 4])])
def test_timestep_spacings(spacing, expected):
    scheduler = LDMDDPMScheduler(num_train_timesteps=20, timestep_spacing=spacing)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == expected


def test_custom_timesteps():
    scheduler = LDMDDPMScheduler(num_train_timesteps=20)
    scheduler.set_timesteps(timesteps=[15, 7, 1])
    assert scheduler.previous_timestep(7) == 1 and scheduler.previous_timestep(1) == -1
    for bad in ([3, 7], [25, 1], []):
        with pytest.raises(ValueError, match="timesteps"):
            scheduler.set_timesteps(timesteps=bad)
    with pytest.raises(ValueError, match="num_inference_steps=21"):
        scheduler.set_timesteps(21)
