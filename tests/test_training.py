"""The Accelerate training loop: outputs, exact resume, accumulation, failures (tiny models, CPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.tiny_config import TINY

from ldm_compat.config import ConfigError, load_ldm_config
from ldm_compat.convert.checkpoint_io import load_checkpoint
from ldm_compat.convert.export import read_original_checkpoint
from ldm_compat.training.loop import Trainer, TrainOptions, train
from ldm_compat.training.settings import TrainSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def run(config_path, out, *overrides, **options):
    config = load_ldm_config(config_path, list(overrides))
    trainer = Trainer(config, TrainOptions(output_dir=str(out), report_to="none", **options))
    trainer.fit()
    return trainer


def test_resume_is_bit_identical(tiny_config, tmp_path):
    full = run(tiny_config, tmp_path / "full", checkpointing_steps=2)
    run(tiny_config, tmp_path / "cut", "lightning.trainer.max_steps=3", checkpointing_steps=3)
    resumed = run(tiny_config, tmp_path / "cut", checkpointing_steps=2, resume_from_checkpoint="latest")
    assert resumed.state.global_step == full.state.global_step == 4
    a, b = full.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(full.ema.shadow_params, resumed.ema.shadow_params))
    assert full.ema.num_updates == resumed.ema.num_updates == 4
    assert torch.equal(full.objective.logvar, resumed.objective.logvar)
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_gradient_accumulation_steps_ema_per_optimizer_step(tiny_config, tmp_path):
    trainer = run(tiny_config, tmp_path / "acc", "lightning.trainer.accumulate_grad_batches=2",
                  "lightning.trainer.max_steps=2", checkpointing_steps=None)  # fmt: skip
    assert trainer.state.global_step == 2 and trainer.state.batch_in_epoch == 4
    assert trainer.ema.num_updates == 2
    assert trainer.learning_rate == pytest.approx(2 * 1 * 4 * 1e-4)


def test_scale_lr_off(tiny_config, tmp_path):
    config = load_ldm_config(tiny_config)
    trainer = Trainer(config, TrainOptions(output_dir=str(tmp_path), report_to="none", scale_lr=False))
    assert trainer.learning_rate == pytest.approx(1e-4)


def test_non_finite_loss_stops_with_step(tiny_config, tmp_path, monkeypatch):
    config = load_ldm_config(tiny_config)
    trainer = Trainer(config, TrainOptions(output_dir=str(tmp_path), report_to="none", checkpointing_steps=None))
    monkeypatch.setattr(trainer, "get_input", lambda batch: torch.full((4, 1, 8, 8), float("nan")))
    with pytest.raises(FloatingPointError, match="step 0: loss is nan"):
        trainer.fit()


def test_read_only_output_dir(tiny_config, tmp_path):
    if os.geteuid() == 0:
        target = Path("/proc/ldm_compat_out")  # not writable even for root
    else:
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o500)
        target = tmp_path / "ro" / "out"
    with pytest.raises(PermissionError, match="--output_dir"):
        Trainer(load_ldm_config(tiny_config), TrainOptions(output_dir=str(target), report_to="none"))


def test_settings_validation(tmp_path):
    bad = yaml.safe_load(yaml.safe_dump(TINY))
    bad["model"]["params"]["timesteps"] = "many"
    with pytest.raises(ConfigError, match="model.params.timesteps"):
        TrainSettings.from_config(bad)
    typo = yaml.safe_load(yaml.safe_dump(TINY))
    typo["model"]["params"]["lienar_start"] = 0.1
    with pytest.warns(UserWarning, match="lienar_start"):
        TrainSettings.from_config(typo)
    dead = yaml.safe_load(yaml.safe_dump(TINY))
    dead["model"]["params"]["use_positional_encodings"] = True
    with pytest.warns(UserWarning, match="use_positional_encodings"):
        TrainSettings.from_config(dead)


def test_accelerate_launch_writes_both_formats(tiny_config, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
           str(ROOT / "examples" / "train.py"), "--config", str(tiny_config), "--output_dir", str(out),
           "--export-original", "--report_to", "none", "--checkpointing_steps", "2",
           "lightning.trainer.max_steps=2", "model.params.timesteps=8"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pipeline:" in result.stdout and "original_ckpt:" in result.stdout
    from ldm_compat import LDMCompatPipeline

    pipe = LDMCompatPipeline.from_pretrained(out / "pipeline")
    assert pipe.scheduler.config.num_train_timesteps == 8  # the dotlist override reached the model
    ckpt = load_checkpoint(out / "original" / "model.ckpt")
    assert ckpt["global_step"] == 2
    keys = list(ckpt["state_dict"])
    assert keys[0] == "logvar" and keys[1] == "betas" and "model_ema.num_updates" in keys
    assert int(ckpt["state_dict"]["model_ema.num_updates"]) == 2
    exported = read_original_checkpoint(out / "pipeline")
    assert list(exported["state_dict"]) == keys
    assert (out / "checkpoints" / "checkpoint-2").is_dir()


def test_train_function_returns_outputs(tiny_config, tmp_path):
    config = load_ldm_config(tiny_config, ["lightning.trainer.max_steps=1"])
    outputs = train(config, TrainOptions(output_dir=str(tmp_path / "o"), report_to="none", checkpointing_steps=None))
    assert Path(outputs["pipeline"]).is_dir()


def test_class_conditional_training_and_image_log(tmp_path):
    config = yaml.safe_load(yaml.safe_dump(TINY))
    config["model"]["params"]["conditioning_key"] = "adm"
    config["model"]["params"]["unet_config"]["params"]["num_classes"] = 10
    config["lightning"]["callbacks"]["image_logger"]["params"]["batch_frequency"] = 2
    path = tmp_path / "adm.yaml"
    path.write_text(yaml.safe_dump(config))
    trainer = run(path, tmp_path / "out", "lightning.trainer.max_steps=2", checkpointing_steps=None)
    images = sorted(p.name.split("_gs")[0] for p in (tmp_path / "out" / "images" / "train").glob("*.png"))
    assert images == ["denoise_row", "diffusion_row", "inputs", "samples"]
    # the labels reach the UNet: a different class gives a different prediction
    unet = trainer.unet.eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 3])
    with torch.no_grad():
        a = unet(x, t, class_labels=torch.tensor([1, 1])).sample
        b = unet(x, t, class_labels=torch.tensor([2, 2])).sample
    assert not torch.equal(a, b)


def test_ucg_training_replaces_labels_with_the_given_p(tmp_path, monkeypatch):
    config = yaml.safe_load(yaml.safe_dump(TINY))
    config["model"]["params"]["conditioning_key"] = "adm"
    config["model"]["params"]["unet_config"]["params"]["num_classes"] = 11
    config["model"]["params"]["ucg_training"] = {"class_label": {"p": 1.0, "val": 10}}
    path = tmp_path / "ucg.yaml"
    path.write_text(yaml.safe_dump(config))
    options = TrainOptions(output_dir=str(tmp_path / "o"), report_to="none", checkpointing_steps=None)
    trainer = Trainer(load_ldm_config(path, ["lightning.trainer.max_steps=1"]), options)
    seen = []
    original = trainer.get_cond
    monkeypatch.setattr(trainer, "get_cond", lambda batch: seen.append(batch["class_label"]) or original(batch))
    trainer.fit()
    assert len(seen) == 1 and torch.equal(torch.as_tensor(seen[0]), torch.full((4,), 10))
