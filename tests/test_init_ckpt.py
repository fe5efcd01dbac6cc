"""init_from_ckpt: the original ckpt_path / ignore_keys / load_only_unet / make_it_fit, on the fixture checkpoints."""

import copy

import pytest
import torch
from reference_cases import FIXTURES, load_case

from ldm_compat import DDPMObjective, LDMUNetModel, LitEmaModel
from ldm_compat.training.init_ckpt import fit_tensor, init_from_ckpt

NAME = "ddpm_eps_linear"
CKPT = FIXTURES / f"{NAME}.ckpt"


def fresh(case, **changes):
    params = {**case.unet_config["params"], **changes}
    return LDMUNetModel(**params)


def output(unet, case, ema=None):
    io = case.io
    with torch.no_grad():
        if ema is None:
            return unet.eval()(io["x_noisy"], io["t"]).sample
        with ema.ema_scope(unet):
            return unet.eval()(io["x_noisy"], io["t"]).sample


def test_full_checkpoint_loads_unet_and_ema():
    case = load_case(NAME)
    unet = fresh(case)
    ema = LitEmaModel(unet)
    report = init_from_ckpt(CKPT, unet, ema=ema, objective=DDPMObjective.from_ldm_config(case.params))
    assert not report.missing and not report.ema_reset
    assert set(report.unexpected) == set(case.state_dict) & {k for k in case.state_dict if "." not in k} - {"logvar"}
    torch.testing.assert_close(output(unet, case), case.io["unet_out"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output(unet, case, ema), case.io["unet_out_ema"], rtol=1e-5, atol=1e-5)
    assert ema.num_updates == case.meta["ema_updates"]


def test_learned_logvar_is_loaded():
    case = load_case("ddpm_v_sqrtlinear_crossattn")
    unet = fresh(case)
    objective = DDPMObjective.from_ldm_config(case.params)
    with torch.no_grad():
        objective.logvar.fill_(123.0)
    report = init_from_ckpt(FIXTURES / f"{case.name}.ckpt", unet, objective=objective)
    assert "logvar" in report.loaded and torch.equal(objective.logvar.detach(), case.state_dict["logvar"])


def test_ignore_keys_prefix_match_and_ema_reset():
    case = load_case(NAME)
    unet = fresh(case)
    before = copy.deepcopy(unet.state_dict())
    ema = LitEmaModel(unet)
    report = init_from_ckpt(CKPT, unet, ema=ema, ignore_keys=["model_ema.", "model.diffusion_model.out."])
    assert report.ignored and all(k.startswith(("model_ema.", "model.diffusion_model.out.")) for k in report.ignored)
    assert "model.diffusion_model.out.2.weight" in report.missing
    assert torch.equal(unet.state_dict()["out.2.weight"], before["out.2.weight"])  # not loaded
    # no EMA in what was loaded: the EMA restarts from the loaded weights (the original kept its random init)
    assert report.ema_reset
    assert all(torch.equal(s, p) for s, p in zip(ema.shadow_params, unet.parameters()))


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_load_only_unet_accepts_both_spellings(tmp_path, prefix):
    case = load_case(NAME)
    sd = {prefix + k: v for k, v in case.unet_state_dict().items()}
    sd["model_ema.decay"] = torch.tensor(0.9999)
    torch.save({"state_dict": sd}, tmp_path / "only.ckpt")
    unet = fresh(case)
    report = init_from_ckpt(tmp_path / "only.ckpt", unet, load_only_unet=True)
    assert not report.missing and report.unexpected == ["model_ema.decay"]
    torch.testing.assert_close(output(unet, case), case.io["unet_out"], rtol=1e-5, atol=1e-5)


def test_shape_mismatch_lists_keys_and_make_it_fit_tiles():
    case = load_case(NAME)
    wide = fresh(case, in_channels=6)
    with pytest.raises(
        ValueError, match=r"input_blocks\.0\.0\.weight: checkpoint \(32, 3, 3, 3\), model \(32, 6, 3, 3\)"
    ):
        init_from_ckpt(CKPT, wide)
    ema = LitEmaModel(wide)
    report = init_from_ckpt(CKPT, wide, ema=ema, make_it_fit=True)
    assert report.fitted == ["model.diffusion_model.input_blocks.0.0.weight",
                             "model_ema.diffusion_modelinput_blocks00weight"]  # fmt: skip
    old = case.state_dict["model.diffusion_model.input_blocks.0.0.weight"]
    new = wide.state_dict()["input_blocks.0.0.weight"]
    assert torch.equal(new, fit_tensor(old, new.shape))
    torch.testing.assert_close(new[:, :3] * 2, old)  # each input column used twice: halved (fixed mode)
    # a doubled input with the same image twice gives the original output
    io = case.io
    with torch.no_grad():
        out = wide.eval()(torch.cat([io["x_noisy"], io["x_noisy"]], 1), io["t"]).sample
    torch.testing.assert_close(out, io["unet_out"], rtol=1e-5, atol=1e-5)


def test_make_it_fit_bug_compatible_divides_by_uses_plus_one():
    case = load_case(NAME)
    wide = fresh(case, in_channels=6)
    init_from_ckpt(CKPT, wide, make_it_fit=True, ldm_bug_compat=True)
    old = case.state_dict["model.diffusion_model.input_blocks.0.0.weight"]
    torch.testing.assert_close(wide.state_dict()["input_blocks.0.0.weight"][:, :3] * 3, old)
