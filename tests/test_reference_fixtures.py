"""The golden fixtures load and match the shapes their .json files declare."""

import pytest
import torch
from reference_cases import CASES, LAYOUTS, load_case, load_layout, load_litema_trajectory

SCHEDULE_BUFFERS = [
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
]  # fmt: skip


def test_every_case_is_complete():
    assert len(CASES) >= 3, CASES
    assert len(LAYOUTS) >= 2, LAYOUTS


@pytest.mark.parametrize("name", CASES)
def test_case_tensors_match_declared_shapes(name):
    case = load_case(name)
    declared = case.meta["tensors"]
    assert set(declared) == set(case.io), f"{name}: io tensors differ from the .json list"
    for key, shape in declared.items():
        assert list(case.io[key].shape) == shape, f"{name}: {key} has shape {list(case.io[key].shape)}, json {shape}"


@pytest.mark.parametrize("name", CASES)
def test_case_checkpoint_is_original_layout(name):
    case = load_case(name)
    assert set(case.checkpoint) >= {"state_dict", "global_step", "epoch"}
    sd = case.state_dict
    timesteps = sd["betas"].shape[0]
    for key in SCHEDULE_BUFFERS:
        assert sd[key].dtype == torch.float32 and sd[key].shape == (timesteps,), key
    assert case.unet_state_dict(), "no model.diffusion_model.* keys"
    assert case.config["model"]["target"] == "ldm.models.diffusion.ddpm.DDPM"
    assert case.params["timesteps"] == timesteps
    if case.has_ema:
        ema = case.ema_buffers()
        assert ema["decay"].dtype == torch.float32 and ema["num_updates"].dtype == torch.int32
        assert int(ema["num_updates"]) == case.meta["ema_updates"]
        # LitEma stores one shadow per trainable UNet parameter, named without dots
        unet_names = {("diffusion_model." + k).replace(".", "") for k in case.unet_state_dict()}
        assert set(ema) - {"decay", "num_updates"} <= unet_names


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_files(name):
    layout = load_layout(name)
    assert layout["unet_config_params"]["model_channels"] > 0
    total = 0
    for key, shape in layout["state_dict"].items():
        assert isinstance(key, str) and all(isinstance(d, int) for d in shape)
        n = 1
        for d in shape:
            n *= d
        total += n
    assert total == layout["num_parameters"]


def test_litema_trajectory():
    meta, tensors = load_litema_trajectory()
    assert meta["decay"] == pytest.approx(0.999)
    steps = {k.split(".")[0] for k in tensors if k.startswith("step")}
    assert len(steps) == 12
    assert any(k.startswith("init.model.") for k in tensors)
