"""The objective options of a training YAML: defaults per ``model.target`` as the original classes, the
``ldm_compat.objective`` section, the ``examples/train.py`` flags, and the one-line report of deviations."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from helpers.tiny_config import TINY

from ldm_compat.config import ConfigError, load_ldm_config
from ldm_compat.training.loop import Trainer, TrainOptions
from ldm_compat.training.objective import DDPMObjective, lvlb_weights_from_buffers
from ldm_compat.training.settings import TrainSettings

ROOT = Path(__file__).resolve().parents[1]
DDPM = "ldm.models.diffusion.ddpm.DDPM"
LATENT = "ldm.models.diffusion.ddpm.LatentDiffusion"


def config(target=DDPM, flags=None, **params) -> dict:
    out = copy.deepcopy(TINY)
    out.pop("ldm_compat")
    out["model"]["target"] = target
    out["model"]["params"].update(params)
    if flags is not None:
        out["ldm_compat"] = {"objective": flags}
    return out


def objective_for(cfg: dict) -> tuple[TrainSettings, DDPMObjective]:
    settings = TrainSettings.from_config(cfg)
    return settings, DDPMObjective.from_ldm_config(settings.params, **settings.objective_flags)


def loss_of(objective, out, x, t, noise):
    """``p_losses`` with a stand-in UNet that returns ``out``, so the loss formula itself is what is compared."""
    loss, _ = objective.eval().p_losses(lambda sample, timestep: out, x, t, noise)
    return loss


def test_pixel_ddpm_never_weights_by_logvar_even_when_learned():
    # the original DDPM.p_losses never reads logvar; learn_logvar only makes it a parameter (with no gradient)
    settings, objective = objective_for(config(learn_logvar=True, logvar_init=1.5))
    assert settings.objective_flags == {"ldm_bug_compat": False, "logvar_weighting": False}
    assert isinstance(objective.logvar, torch.nn.Parameter) and not objective.logvar.requires_grad
    assert "logvar" in objective.state_dict()  # still saved, as the original's parameter
    x, t, noise, out = torch.randn(2, 1, 8, 8), torch.tensor([1, 7]), torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    expected = ((out - noise) ** 2).mean()  # DDPM.p_losses: l_simple_weight 1, original_elbo_weight 0
    torch.testing.assert_close(loss_of(objective, out, x, t, noise), expected, rtol=0, atol=1e-7)
    assert settings.deviation_report(objective) == f"objective: as the original {DDPM}"


def test_latent_diffusion_always_weights_by_logvar():
    # LatentDiffusion.p_losses: loss_simple / exp(logvar_t) + logvar_t, also with a fixed logvar
    settings, objective = objective_for(config(LATENT, logvar_init=0.5))
    assert settings.objective_flags["logvar_weighting"] is True
    x, t, noise, out = torch.randn(2, 1, 8, 8), torch.tensor([1, 7]), torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    per_sample = ((out - noise) ** 2).mean(dim=[1, 2, 3])
    expected = (per_sample / torch.exp(torch.tensor(0.5)) + 0.5).mean()
    torch.testing.assert_close(loss_of(objective, out, x, t, noise), expected, rtol=0, atol=1e-6)
    assert settings.deviation_report(objective) == f"objective: as the original {LATENT}"
    # the stablediffusion subclasses share LatentDiffusion.p_losses
    upscale = "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion"
    assert TrainSettings.from_config(config(upscale)).objective_flags["logvar_weighting"] is True


def test_yaml_section_sets_both_flags_and_the_report_names_each_deviation():
    cfg = config(flags={"logvar_weighting": True}, learn_logvar=True, parameterization="x0")
    settings, objective = objective_for(cfg)
    assert objective.weights_by_logvar and objective.logvar.requires_grad
    report = settings.deviation_report(objective)
    assert report.startswith(f"objective: deviations from the original {DDPM}: ")
    assert "logvar_weighting=True" in report and "DDPM never does" in report
    assert "x0 lvlb_weights use the intended" in report and "only the logged loss_vlb" in report
    assert "\n" not in report
    # ldm_bug_compat: the original's x0 lvlb_weights, and no x0 deviation left to report
    settings, objective = objective_for(config(flags={"ldm_bug_compat": True}, parameterization="x0"))
    buffers = objective.scheduler.ldm_buffers()
    expected = lvlb_weights_from_buffers(buffers, objective.scheduler.ldm_alphas(), "x0", ldm_bug_compat=True)
    assert objective.config.ldm_bug_compat and torch.equal(objective.lvlb_weights, expected)
    assert settings.deviation_report(objective) == f"objective: as the original {DDPM}"


def test_logvar_weighting_off_for_latent_diffusion_is_reported():
    settings, objective = objective_for(config(LATENT, flags={"logvar_weighting": False}))
    report = settings.deviation_report(objective)
    assert "logvar_weighting=False" in report and "LatentDiffusion always does" in report


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"flags": {"ldm_bug_compat": "yes"}}, r"ldm_compat.objective.ldm_bug_compat='yes': expected true or false"),
        ({"flags": {"logvar_weighting": 1}}, r"ldm_compat.objective.logvar_weighting=1: expected true or false"),
        ({"flags": {"lvlb_bug": True}}, r"ldm_compat.objective: expected a mapping of ldm_bug_compat, "),
        ({"target": "mypackage.MyDDPM"}, r"model.target='mypackage.MyDDPM' is not an original DDPM class; set "),
    ],
)
def test_bad_options_are_one_line_errors(changes, match):
    with pytest.raises(ConfigError, match=match) as info:
        TrainSettings.from_config(config(**changes))
    assert "\n" not in str(info.value)


def test_an_unknown_target_trains_with_an_explicit_weighting_and_a_bad_section_is_refused():
    assert TrainSettings.from_config(config("mypackage.MyDDPM", flags={"logvar_weighting": False})).objective_flags
    bad = config()
    bad["ldm_compat"] = {"objectives": {}}
    with pytest.raises(ConfigError, match="ldm_compat: expected a mapping with the one key 'objective'"):
        TrainSettings.from_config(bad)


def _train_script():
    spec = importlib.util.spec_from_file_location("train_example", ROOT / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_py_flags_reach_the_objective_over_the_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config(flags={"logvar_weighting": True})))
    script = _train_script()
    args = script.parse_args(["--config", str(path), "--output_dir", "o", "--ldm_bug_compat",
                              "--logvar_weighting", "false"])  # fmt: skip
    loaded = load_ldm_config(args.config, args.overrides + script.objective_overrides(args))
    assert TrainSettings.from_config(loaded).objective_flags == {"ldm_bug_compat": True, "logvar_weighting": False}
    plain = script.parse_args(["--config", str(path), "--output_dir", "o"])
    assert script.objective_overrides(plain) == []
    with pytest.raises(SystemExit):
        script.parse_args(["--config", str(path), "--output_dir", "o", "--logvar_weighting", "maybe"])


def test_trainer_prints_the_report_once_and_trains_as_the_original_ddpm(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config(learn_logvar=True, logvar_init=0.25)))
    options = TrainOptions(output_dir=str(tmp_path / "o"), report_to="none", checkpointing_steps=None)
    trainer = Trainer(load_ldm_config(path, ["lightning.trainer.max_steps=2"]), options)
    assert capsys.readouterr().out.count("objective: as the original ldm.models.diffusion.ddpm.DDPM") == 1
    trainer.fit()
    # as in the original DDPM, the learned logvar gets no gradient and stays at logvar_init
    assert torch.equal(trainer.objective.logvar.detach(), torch.full((10,), 0.25))
    assert trainer.state.global_step == 2
    assert "objective:" not in capsys.readouterr().out
