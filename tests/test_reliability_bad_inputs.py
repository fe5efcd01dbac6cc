"""Bad inputs at every entry point: one clear line naming the problem, no partial output, no code run.

Entry points: ``examples/train.py`` (its ``main``, in this process), ``ldm-compat convert``, the ``Trainer`` API, the
schedulers and the UNet. Each case checks the message (one line, names the file/key/option), the exit code, and that
nothing was written where the output would have gone.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers.tiny_config import tiny_config, write_config
from PIL import Image
from reference_cases import FIXTURES

from ldm_compat import LDMUNetModel
from ldm_compat.cli import main as ldm_compat_cli
from ldm_compat.config import load_ldm_config
from ldm_compat.schedulers.scheduling_ldm_ddim import LDMDDIMScheduler
from ldm_compat.schedulers.scheduling_ldm_ddpm import LDMDDPMScheduler
from ldm_compat.training.checkpoints import list_checkpoints, resolve_checkpoint
from ldm_compat.training.loop import Trainer, TrainOptions

ROOT = Path(__file__).resolve().parents[1]
CKPT = FIXTURES / "ddpm_eps_linear.ckpt"  # 3-channel 16×16 model: does not fit the tiny 1-channel config


def _load_train_main():
    spec = importlib.util.spec_from_file_location("ldm_train_example", ROOT / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


TRAIN_MAIN = _load_train_main()


def train_cli(capsys, config: Path, out: Path, *args: str) -> tuple[int, str]:
    """Run ``examples/train.py`` in this process; return its exit code and its error line (if any)."""
    code = TRAIN_MAIN(["--config", str(config), "--output_dir", str(out), "--report_to", "none", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) <= 1, errors
    return code, errors[0] if errors else ""


class _Canary:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # creates the canary file when unpickled with code execution


def _evil_checkpoint(path: Path, canary: Path) -> Path:
    original = torch.load(CKPT, weights_only=True)
    torch.save({**original, "callbacks": _Canary(str(canary))}, path)
    return path


def _png(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(path)


@pytest.fixture
def image_folder(tmp_path):
    """6 good 8×8 PNGs, one truncated PNG and one text file posing as a PNG."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        _png(folder / f"good{i}.png", i)
    (folder / "truncated.png").write_bytes((folder / "good0.png").read_bytes()[:40])
    (folder / "notes.png").write_text("not an image")
    return folder


def _data_config(folder: Path, cache: Path, **params) -> dict:
    dataset = {"source": "imagefolder", "data_dir": str(folder), "mode": "L", "cache_dir": str(cache), **params}
    return {"target": "ldm_compat.training.data.ImageDataset", "params": dataset}


# ------------------------------------------------------------------------------------------- training: refused inputs
def _truncated(tmp_path):
    path = tmp_path / "cut.ckpt"
    path.write_bytes(CKPT.read_bytes()[: CKPT.stat().st_size // 3])
    return {"model.params.ckpt_path": str(path)}, r"cut\.ckpt: truncated or not a PyTorch checkpoint"


def _not_a_checkpoint(tmp_path):
    path = tmp_path / "text.ckpt"
    path.write_text("hello")
    return {"model.params.ckpt_path": str(path)}, r"text\.ckpt: truncated or not a PyTorch checkpoint"


def _wrong_type(tmp_path):
    return {"model.params.timesteps": "ten"}, r"model\.params\.timesteps='ten' \(str\): expected int"


def _unknown_unet_argument(tmp_path):
    return {"model.params.unet_config.params.model_chanels": 32}, r"unknown UNetModel arguments \['model_chanels'\]"


def _weights_do_not_fit(tmp_path):
    expected = r"3 shape mismatches.*input_blocks\.0\.0\.weight: checkpoint \(32, 3, 3, 3\), model \(32, 1, 3, 3\)"
    return {"model.params.ckpt_path": str(CKPT)}, expected


def _all_images_corrupt(tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (folder / "b.png").write_text("not an image")
    data = _data_config(folder, tmp_path / "cache")
    return {"data.params.train": data}, r"the dataset is empty \(0 usable images of 2, 2 corrupt\)"


def _no_images(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    data = _data_config(folder, tmp_path / "cache")
    return {"data.params.train": data}, r"data_dir=.*empty: the dataset is empty \(no image files\)"


def _corrupt_image_raise(tmp_path):
    folder = tmp_path / "some_corrupt"
    folder.mkdir()
    _png(folder / "good.png", 0)
    (folder / "notes.png").write_text("not an image")
    data = _data_config(folder, tmp_path / "cache", on_corrupt="raise")
    return {"data.params.train": data}, r"image at row \d: .*notes\.png: cannot be decoded"


@pytest.mark.parametrize(
    "make",
    [_truncated, _not_a_checkpoint, _wrong_type, _unknown_unet_argument, _weights_do_not_fit, _all_images_corrupt,
     _no_images, _corrupt_image_raise],
    ids=lambda f: f.__name__.strip("_"),
)  # fmt: skip
@pytest.mark.filterwarnings("ignore:.*corrupt image")  # all_images_corrupt: the skip warning comes before the error
def test_training_refuses_bad_input_in_one_line_and_writes_nothing(capsys, tmp_path, make):
    changes, expected = make(tmp_path)
    config = write_config(tmp_path / "bad.yaml", tiny_config(**changes))
    out = tmp_path / "deep" / "run"
    code, error = train_cli(capsys, config, out)
    assert code == 2 and error.startswith("train.py: error: ")
    assert re.search(expected, error), error
    assert not (tmp_path / "deep").exists(), "output written for a refused input"


def test_pickle_that_runs_code_is_never_executed(capsys, tmp_path):
    canary = tmp_path / "canary"
    evil = _evil_checkpoint(tmp_path / "evil.ckpt", canary)
    config = write_config(tmp_path / "c.yaml", tiny_config(**{"model.params.ckpt_path": str(evil)}))
    code, error = train_cli(capsys, config, tmp_path / "run")
    assert code == 2 and "evil.ckpt: refused — the pickle needs code to load" in error, error
    assert not canary.exists() and not (tmp_path / "run").exists()
    # the same through the converter
    assert ldm_compat_cli(["convert", str(evil), "--output", str(tmp_path / "folder")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused" in err[0] and not canary.exists() and not (tmp_path / "folder").exists()
    # the canary does fire when the file is unpickled without protection
    torch.load(evil, weights_only=False)
    assert canary.exists()


def test_broken_yaml(capsys, tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("model: {params: [unclosed\n")
    code, error = train_cli(capsys, config, tmp_path / "run")
    assert code == 2 and "broken.yaml: not a readable YAML file" in error and not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["read-only", "a file"])
def test_output_dir_that_cannot_be_written(capsys, tmp_path, kind):
    config = write_config(tmp_path / "c.yaml")
    if kind == "a file":
        target = tmp_path / "taken"
        target.write_text("mine")
    elif os.geteuid() == 0:
        target = Path("/proc/ldm_compat_reliability/out")  # not writable even for root
    else:
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o500)
        target = tmp_path / "ro" / "out"
    code, error = train_cli(capsys, config, target)
    assert code == 2 and f"--output_dir {target}: not writable" in error, error
    assert kind != "a file" or target.read_text() == "mine"


def test_resume_from_a_corrupt_or_missing_checkpoint(capsys, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(**{"lightning.trainer.max_steps": 2}))
    out = tmp_path / "run"
    assert train_cli(capsys, config, out, "--checkpointing_steps", "2")[0] == 0
    optimizer = out / "checkpoints" / "checkpoint-2" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])  # e.g. disk corruption after the write
    code, error = train_cli(capsys, config, out, "--resume_from_checkpoint", "latest")
    assert code == 2 and "optimizer.bin: unreadable checkpoint file" in error, error
    code, error = train_cli(capsys, config, out, "--resume_from_checkpoint", str(tmp_path / "nope"))
    assert code == 2 and "--resume_from_checkpoint" in error and "no such checkpoint folder" in error, error


# ------------------------------------------------------------------------------------------- training: warnings
def test_unknown_ddpm_keys_are_listed_in_one_warning(capsys, tmp_path):
    config = write_config(
        tmp_path / "typo.yaml",
        tiny_config(**{"model.params.lienar_start": 0.1, "model.params.use_emma": False,
                       "lightning.trainer.max_steps": 1}),
    )  # fmt: skip
    with pytest.warns(UserWarning, match="not used by DDPM") as record:
        code, error = train_cli(capsys, config, tmp_path / "run", "--checkpointing_steps", "0")
    assert code == 0, error
    messages = [str(w.message) for w in record if "not used by DDPM" in str(w.message)]
    assert len(messages) == 1 and "lienar_start, use_emma" in messages[0]
    # the converter warns the same way (and knows LatentDiffusion's own keys)
    cfg = yaml.safe_load((FIXTURES / "ddpm_eps_linear.yaml").read_text())
    cfg["model"]["params"].update(lienar_start=0.1, scale_by_std=False, cond_stage_key="caption")
    (tmp_path / "convert.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.warns(UserWarning, match=r"not used by DDPM \(ignored\): lienar_start$"):
        code = ldm_compat_cli(["convert", str(CKPT), "--config", str(tmp_path / "convert.yaml"),
                               "--output", str(tmp_path / "folder")])  # fmt: skip
    assert code == 0


def test_converter_names_the_key_of_a_wrong_type(capsys, tmp_path):
    cfg = yaml.safe_load((FIXTURES / "ddpm_eps_linear.yaml").read_text())
    cfg["model"]["params"]["timesteps"] = "many"
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(cfg))
    assert ldm_compat_cli(["convert", str(CKPT), "--config", str(tmp_path / "wrong.yaml"), "--output",
                           str(tmp_path / "folder")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.params.timesteps='many'" in err[0], err
    assert not (tmp_path / "folder").exists()


def test_corrupt_images_are_skipped_with_a_count(capsys, tmp_path, image_folder):
    data = _data_config(image_folder, tmp_path / "cache")
    config = write_config(tmp_path / "c.yaml", tiny_config(**{"data.params.train": data,
                                                              "lightning.trainer.max_steps": 1}))  # fmt: skip
    with pytest.warns(UserWarning, match=r"skipped 2 corrupt image\(s\) of 8 \(row \d+: .*"):
        code, error = train_cli(capsys, config, tmp_path / "run", "--checkpointing_steps", "0")
    assert code == 0, error
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()


# ------------------------------------------------------------------------------------------- non-finite losses
def _trainer(tmp_path, **options) -> Trainer:
    config = load_ldm_config(write_config(tmp_path / "c.yaml"))
    return Trainer(config, TrainOptions(output_dir=str(tmp_path / "run"), report_to="none", **options))


def _poison(trainer: Trainer, step: int, value: float) -> None:
    get_input = trainer.get_input
    trainer.get_input = lambda batch: get_input(batch) * (value if trainer.state.global_step == step else 1.0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, value):
    trainer = _trainer(tmp_path, checkpointing_steps=2)
    _poison(trainer, 3, value)
    with pytest.raises(FloatingPointError, match=r"^step 3: loss is (nan|inf) \(not finite\); stopped\. The last good"):
        trainer.fit()
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name for p in folder.iterdir()] == ["checkpoint-2"]  # nothing partial, nothing newer
    assert resolve_checkpoint("latest", folder) == list_checkpoints(folder)[-1]  # readable, safe, resumable
    resumed = _trainer(tmp_path, checkpointing_steps=2, resume_from_checkpoint="latest")
    resumed.fit()
    assert resumed.state.global_step == 4


def test_skip_policy_skips_the_step_and_changes_nothing(tmp_path, caplog):
    trainer = _trainer(tmp_path, checkpointing_steps=None, nan_policy="skip")
    _poison(trainer, 1, float("nan"))
    weights, after_step = {}, trainer._after_step

    def record(batch, logs):
        weights[trainer.state.global_step] = [p.detach().clone() for p in trainer.unet.parameters()]
        after_step(batch, logs)

    trainer._after_step = record
    with caplog.at_level(logging.WARNING):
        trainer.fit()
    assert "step 1: loss is nan (not finite), batch skipped" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[2])), "the skipped step changed the weights"
    assert not all(torch.equal(a, b) for a, b in zip(weights[2], weights[3]))
    assert trainer.ema.num_updates == 3 and trainer.lr_scheduler.scheduler.last_epoch == 3


def test_bad_nan_policy(tmp_path):
    with pytest.raises(ValueError, match="--nan_policy 'ignore': expected 'stop' or 'skip'"):
        _trainer(tmp_path, nan_policy="ignore")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- schedulers and UNet
DDPM = LDMDDPMScheduler.from_ldm_config({"timesteps": 10, "beta_schedule": "linear"})
X = torch.zeros(2, 1, 8, 8)


def _ddim():
    scheduler = LDMDDIMScheduler.from_config(DDPM.config)
    scheduler.set_timesteps(5)
    return scheduler


def _ddpm(steps=None):
    scheduler = LDMDDPMScheduler.from_config(DDPM.config)
    scheduler.set_timesteps(steps)
    return scheduler


UNET = LDMUNetModel(image_size=8, in_channels=1, out_channels=1, model_channels=32, num_res_blocks=1,
                    attention_resolutions=[], channel_mult=[1, 2], num_heads=1)  # fmt: skip

CALLS = {
    "add_noise t=T": (lambda: DDPM.add_noise(X, X, torch.tensor([10, 3])), r"timestep: values must lie in \[0, 9\]"),
    "add_noise t<0": (lambda: DDPM.add_noise(X, X, torch.tensor([-1, 3])), r"values must lie in \[0, 9\]"),
    "add_noise t=1.5": (lambda: DDPM.add_noise(X, X, torch.tensor([1.5, 3.0])), r"expected integer timesteps"),
    "add_noise 3 timesteps": (lambda: DDPM.add_noise(X, X, torch.tensor([1, 2, 3])), r"one timestep per batch"),
    "add_noise noise shape": (lambda: DDPM.add_noise(X, torch.zeros(2, 1, 4, 4), 3), r"expected the sample's shape"),
    "ddpm step t=T": (lambda: _ddpm().step(X, 10, X), r"values must lie in \[0, 9\]"),
    "ddpm step output shape": (lambda: _ddpm().step(torch.zeros(2, 3, 8, 8), 3, X), r"expected the sample's shape"),
    "ddpm step t not sampled": (lambda: _ddpm(5).step(X, 3, X), r"not among the current sampling timesteps"),
    "ddpm set_timesteps > T": (lambda: _ddpm(11), r"num_inference_steps=11"),
    "ddim step t<0": (lambda: _ddim().step(X, -1, X), r"values must lie in \[0, 9\]"),
    "ddim step output shape": (lambda: _ddim().step(torch.zeros(1, 1, 8, 8), 9, X), r"model_output: expected"),
    "ddim set_timesteps 0": (lambda: _ddim().set_timesteps(0), r"num_inference_steps=0"),
    "unet channels": (lambda: UNET(torch.zeros(2, 3, 8, 8), 1), r"sample: expected shape \(batch, 1, size, size\)"),
    "unet no batch axis": (lambda: UNET(torch.zeros(1, 8, 8), 1), r"sample: expected shape"),
    "unet odd size": (lambda: UNET(torch.zeros(2, 1, 7, 7), 1), r"spatial size \(7, 7\) must be divisible by 2"),
    "unet timesteps": (lambda: UNET(X, torch.tensor([1, 2, 3])), r"timestep: expected a scalar or 2 values"),
    "unet class labels": (lambda: UNET(X, 1, class_labels=torch.tensor([1, 2])), r"class_labels: must be given"),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_scheduler_and_unet_inputs(name):
    call, message = CALLS[name]
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_unet_accepts_any_real_timestep_like_the_original():
    """Not an error: the UNet's sinusoidal embedding is defined for every real t (the original and diffusers take
    continuous times); the range check belongs to the schedulers, which know T."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = UNET(X, torch.tensor([-3.0, 2500.5])).sample
    assert out.shape == X.shape and torch.isfinite(out).all()
