"""DDPMObjective against the original p_losses outputs, and the formulas the original intended."""

import pytest
import torch
from reference_cases import CASES, load_case

from ldm_compat import DDPMObjective, LDMUNetModel
from ldm_compat.models.conditioning import apply_model
from ldm_compat.schedulers.schedule import make_beta_schedule

LOSS_CASES = [n for n in CASES if "loss" in load_case(n).io]
TOL = dict(rtol=1e-6, atol=1e-6)


def unet_for(case, ema=False):
    unet = LDMUNetModel(**case.unet_config["params"])
    unet.load_state_dict(case.unet_state_dict())
    return unet.eval()


@pytest.mark.parametrize("name", LOSS_CASES)
def test_p_losses_matches_original(name):
    case = load_case(name)
    io = case.io
    objective = DDPMObjective.from_ldm_config(case.params, ldm_bug_compat=True).eval()
    loss, logs = objective.p_losses(unet_for(case), io["x_start"], io["t"], io["noise"])
    torch.testing.assert_close(loss.detach().reshape(1), io["loss"].reshape(1), **TOL)
    for key in ("loss_simple", "loss_vlb", "loss"):
        torch.testing.assert_close(logs[f"val/{key}"].detach().reshape(1), io[f"loss_dict.{key}"].reshape(1), **TOL)


@pytest.mark.parametrize("name", CASES)
def test_q_sample_and_v_target_bit_equal(name):
    case = load_case(name)
    io = case.io
    objective = DDPMObjective.from_ldm_config(case.params)
    assert torch.equal(objective.q_sample(io["x_start"], io["t"], io["noise"]), io["x_noisy"])
    if "v_target" in io:
        torch.testing.assert_close(objective.get_v(io["x_start"], io["noise"], io["t"]), io["v_target"], **TOL)


def test_conditional_case_routes_context():
    case = load_case("ddpm_v_sqrtlinear_crossattn")
    io = case.io
    objective = DDPMObjective.from_ldm_config(case.params).eval()
    unet = unet_for(case)
    # the loss of the fixture's own UNet output against the v target, computed independently
    expected = ((io["unet_out"] - io["v_target"]) ** 2).mean(dim=[1, 2, 3])
    logvar = objective.logvar[io["t"]]
    expected_gamma = (expected / torch.exp(logvar) + logvar).mean()
    loss, logs = objective.p_losses(unet, io["x_start"], io["t"], io["noise"], cond=io["context"])
    torch.testing.assert_close(logs["val/loss_simple"].detach(), expected.mean(), **TOL)
    torch.testing.assert_close(logs["val/loss_gamma"].detach(), expected_gamma, **TOL)
    assert "val/logvar" in logs
    with pytest.raises(ValueError, match="c_crossattn|cond"):
        objective.p_losses(unet, io["x_start"], io["t"], io["noise"], cond=None)


def test_x0_lvlb_default_is_the_intended_formula():
    case = load_case("ddpm_x0_cosine_l1")
    fixed = DDPMObjective.from_ldm_config(case.params)
    buggy = DDPMObjective.from_ldm_config(case.params, ldm_bug_compat=True)
    ac = fixed.scheduler.ldm_buffers()["alphas_cumprod"]
    intended = 0.5 * torch.sqrt(ac) / (2.0 * (1 - ac))
    intended[0] = intended[1]
    bug = 0.5 * torch.sqrt(ac) / (2.0 - ac)
    bug[0] = bug[1]
    assert torch.equal(fixed.lvlb_weights, intended)
    assert torch.equal(buggy.lvlb_weights, bug)
    assert not torch.allclose(fixed.lvlb_weights, buggy.lvlb_weights)
    # the default differs from the fixture (made by the buggy original) exactly through loss_vlb
    io = case.io
    unet = unet_for(case)
    _, logs = fixed.eval().p_losses(unet, io["x_start"], io["t"], io["noise"])
    per_sample = (io["unet_out"] - io["x_start"]).abs().mean(dim=[1, 2, 3])
    torch.testing.assert_close(logs["val/loss_vlb"].detach(), (intended[io["t"]] * per_sample).mean(), **TOL)


def test_eps_lvlb_weights_formula():
    objective = DDPMObjective(timesteps=50, beta_schedule="linear")
    b = objective.scheduler.ldm_buffers()
    alphas = torch.from_numpy(1.0 - make_beta_schedule("linear", 50, 1e-4, 2e-2)).float()  # to_torch(alphas)
    expected = b["betas"] ** 2 / (2 * b["posterior_variance"] * alphas * (1 - b["alphas_cumprod"]))
    expected[0] = expected[1]
    assert torch.equal(objective.lvlb_weights, expected)
    assert torch.isfinite(objective.lvlb_weights).all()


def test_train_prefix_logvar_parameter_and_gradients():
    objective = DDPMObjective(timesteps=20, learn_logvar=True, logvar_init=0.5)
    assert isinstance(objective.logvar, torch.nn.Parameter) and "logvar" in objective.state_dict()
    unet = LDMUNetModel(image_size=8, in_channels=1, out_channels=1, model_channels=32, num_res_blocks=1,
                        attention_resolutions=[], channel_mult=[1], num_heads=1)  # fmt: skip
    x = torch.randn(2, 1, 8, 8)
    loss, logs = objective.train()(unet, x)
    assert set(logs) == {"train/loss_simple", "train/loss_gamma", "train/logvar", "train/loss_vlb", "train/loss"}
    loss.backward()
    assert objective.logvar.grad is not None and objective.logvar.grad.abs().sum() > 0


def test_fixed_logvar_is_a_non_persistent_buffer():
    objective = DDPMObjective(timesteps=20)
    assert "logvar" in dict(objective.named_buffers()) and "logvar" not in objective.state_dict()
    assert objective.to(torch.float64).logvar.dtype == torch.float64  # moves with .to like every buffer


def test_pixel_ddpm_logvar_weighting_off():
    # learn_logvar with the DDPM (pixel-space) loss: logvar is trained only if the loss uses it
    objective = DDPMObjective(timesteps=20, learn_logvar=True, logvar_init=1.0, logvar_weighting=False)
    unet = LDMUNetModel(image_size=8, in_channels=1, out_channels=1, model_channels=32, num_res_blocks=1,
                        attention_resolutions=[], channel_mult=[1], num_heads=1).eval()  # fmt: skip
    x, t, noise = torch.randn(2, 1, 8, 8), torch.tensor([3, 7]), torch.randn(2, 1, 8, 8)
    loss, logs = objective.eval().p_losses(unet, x, t, noise)
    out = apply_model(unet, objective.q_sample(x, t, noise), t)
    torch.testing.assert_close(loss.detach(), ((out - noise) ** 2).mean(), **TOL)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss_type": "huber"}, "loss_type"),
        ({"parameterization": "mu"}, "parameterization"),
        ({"conditioning_key": "film"}, "conditioning_key"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DDPMObjective(timesteps=10, **kwargs)


def test_save_load_round_trip(tmp_path):
    objective = DDPMObjective(timesteps=30, learn_logvar=True, logvar_init=-0.25, parameterization="v")
    objective.save_pretrained(tmp_path)
    back = DDPMObjective.from_pretrained(tmp_path)
    assert back.config.parameterization == "v" and torch.equal(back.logvar, objective.logvar)
    assert torch.equal(back.lvlb_weights, objective.lvlb_weights)
