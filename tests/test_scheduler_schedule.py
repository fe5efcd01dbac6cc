"""The pure schedule helpers against the original code's outputs (``fixtures/ldm_reference``, ``ldm_schedules``)."""

import numpy as np
import pytest
import torch
from reference_cases import CASES, load_case
from schedule_traces import META, original_buffers, trace_tensors

from ldm_compat.schedulers import (
    LDM_BUFFER_NAMES,
    config_to_ldm_params,
    ddim_intermediate_steps,
    ldm_intermediate_timesteps,
    ldm_params_to_config,
    ldm_schedule_buffers,
    make_beta_schedule,
    make_ddim_timesteps,
    match_buffers,
)

SCHEDULE_CASES = sorted(META["schedules"])


def betas_for(params):
    if params.get("given_betas") is not None:
        return np.asarray(params["given_betas"], dtype=np.float64)
    return make_beta_schedule(
        params.get("beta_schedule", "linear"),
        params.get("timesteps", 1000),
        params.get("linear_start", 1e-4),
        params.get("linear_end", 2e-2),
        params.get("cosine_s", 8e-3),
    )


@pytest.mark.parametrize("name", CASES)
def test_buffers_bit_equal_to_reference_checkpoints(name):
    case = load_case(name)
    buffers = ldm_schedule_buffers(betas_for(case.params), case.params.get("v_posterior", 0.0))
    assert list(buffers) == list(LDM_BUFFER_NAMES)
    assert all(b.dtype == torch.float32 for b in buffers.values())
    assert match_buffers(buffers, case.state_dict) == []


@pytest.mark.parametrize("name", SCHEDULE_CASES)
def test_buffers_bit_equal_to_original_register_schedule(name):
    # float64 numpy cast to float32, as the original: bit-equal on every machine
    params = META["schedules"][name]["params"]
    expected = original_buffers(name, LDM_BUFFER_NAMES)
    buffers = ldm_schedule_buffers(betas_for(params), params["v_posterior"])
    for key in LDM_BUFFER_NAMES:
        assert torch.equal(buffers[key], expected[key]), key


def test_match_buffers_reports_a_one_ulp_difference():
    buffers = ldm_schedule_buffers(make_beta_schedule("linear", 10))
    other = dict(buffers)
    other["posterior_mean_coef2"] = torch.nextafter(buffers["posterior_mean_coef2"], torch.tensor(2.0))
    del other["betas"]
    assert match_buffers(buffers, other) == ["betas", "posterior_mean_coef2"]


def test_v_posterior_one_is_betas_and_log_floor():
    betas = make_beta_schedule("linear", 50)
    assert torch.equal(ldm_schedule_buffers(betas, 1.0)["posterior_variance"], torch.tensor(betas, dtype=torch.float32))
    log_var = ldm_schedule_buffers(betas, 0.0)["posterior_log_variance_clipped"]
    assert log_var[0].item() == pytest.approx(np.log(1e-20))  # posterior variance is 0 at t=0


@pytest.mark.parametrize(
    "schedule, kwargs",
    [("linear", {}), ("sqrt_linear", {}), ("sqrt", {}), ("cosine", {"cosine_s": 0.0}), ("squaredcos_cap_v2", {})],
)
def test_make_beta_schedule_is_float64_in_range(schedule, kwargs):
    betas = make_beta_schedule(schedule, 37, **kwargs)
    assert betas.dtype == np.float64 and betas.shape == (37,)
    assert (betas > 0).all() and (betas <= 0.999).all()


def test_make_beta_schedule_rejects_unknown_names():
    with pytest.raises(ValueError, match="beta_schedule='quadratic'"):
        make_beta_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="timesteps=0"):
        make_beta_schedule("linear", 0)


def test_intermediate_timesteps_follow_p_sample_loop():
    # the original keeps x after step i when i % log_every_t == 0 or i == T - 1 (20 steps, every 5: 6 entries)
    assert ldm_intermediate_timesteps(20, 5) == [19, 15, 10, 5, 0]
    assert ldm_intermediate_timesteps(20, 7) == [19, 14, 7, 0]
    assert ldm_intermediate_timesteps(100, 100) == [99, 0]
    with pytest.raises(ValueError, match="log_every_t=0"):
        ldm_intermediate_timesteps(10, 0)


def test_intermediate_counts_match_the_original_traces():
    tensors = trace_tensors()
    for name, trace in META["ddpm_traces"].items():
        kept = ldm_intermediate_timesteps(trace["timesteps"], trace["log_every_t"])
        assert tensors[f"ddpm.{name}.intermediates"].shape[0] == 1 + len(kept)
    for name, trace in META["ddim_traces"].items():
        steps = tensors[f"ddim.{name}.timesteps"].shape[0]
        assert tensors[f"ddim.{name}.x_inter"].shape[0] == 1 + len(ddim_intermediate_steps(steps, trace["log_every_t"]))


@pytest.mark.parametrize("name", CASES)
def test_ddim_timesteps_match_reference(name):
    case = load_case(name)
    ddim = case.meta["ddim"]
    got = make_ddim_timesteps(ddim["discretize"], ddim["steps"], case.params["timesteps"])
    assert got.tolist() == case.io["ddim_timesteps"].tolist()


def test_ddim_timesteps_match_original_traces():
    tensors = trace_tensors()
    for name, trace in META["ddim_traces"].items():
        if trace["ddim_use_original_steps"]:
            continue
        got = make_ddim_timesteps(trace["discretize"], trace["steps"], trace["timesteps"])
        assert got.tolist() == tensors[f"ddim.{name}.timesteps"].tolist(), name


def test_ddim_timesteps_uneven_grid_runs_more_steps():
    # T=100, S=8: T // S = 12, range(0, 100, 12) has 9 entries
    assert make_ddim_timesteps("uniform", 8, 100).tolist() == [1, 13, 25, 37, 49, 61, 73, 85, 97]


@pytest.mark.parametrize("steps", [100, 33, 0, 101])
def test_ddim_timesteps_out_of_range_raise(steps):
    # 100 and 33 reach t = 100 (the original's IndexError); 0 and 101 are not step counts
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_ddim_timesteps("uniform", steps, 100)


def test_ldm_params_round_trip_and_defaults():
    config = ldm_params_to_config({"unet_config": {}, "parameterization": "v", "beta_schedule": "sqrt_linear"})
    assert config["prediction_type"] == "v_prediction" and config["beta_schedule"] == "linear"
    assert config["num_train_timesteps"] == 1000 and config["ldm_beta_schedule"] == "sqrt_linear"
    params = config_to_ldm_params(config)
    assert params == {
        "timesteps": 1000,
        "beta_schedule": "sqrt_linear",
        "linear_start": 1e-4,
        "linear_end": 2e-2,
        "cosine_s": 8e-3,
        "v_posterior": 0.0,
        "parameterization": "v",
        "clip_denoised": True,
        "log_every_t": 100,
    }
