"""LatentDiffusion through the Accelerate trainer: the original's checkpoints in and out, exact resume, accumulation,
mixed precision, ``ckpt_path``, the latent cache, bad options (tiny models, CPU).

The fixture runs start from the original code's checkpoints (``fixtures/ldm_reference_latent``): the trainer's own
first step reproduces the original ``shared_step`` (same draws, loss within 1e-6), and a few steps later its
``--export-original`` checkpoint has exactly the original's keys, in the original's order.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers.tiny_latent import digits_latent, write_latent_config
from reference_cases import LATENT_FIXTURES, load_latent_case

from ldm_compat.config import ConfigError, load_ldm_config
from ldm_compat.training.loop import Trainer, TrainOptions

TOL = 1e-6


def run(config_path, out, *overrides, fit=True, **options) -> Trainer:
    config = load_ldm_config(config_path, list(overrides))
    trainer = Trainer(config, TrainOptions(output_dir=str(out), report_to="none", **options), source=str(config_path))
    if fit:
        trainer.fit()
    return trainer


@pytest.fixture
def latent_config(tmp_path):
    return write_latent_config(tmp_path / "digits_latent.yaml")


def test_digits_latent_trains_and_exports_an_original_checkpoint(latent_config, tmp_path):
    trainer = run(latent_config, tmp_path / "out", "model.params.learn_logvar=true", checkpointing_steps=None,
                  export_original=True, fit=False)  # fmt: skip
    first_stage_before = {k: v.clone() for k, v in trainer.latent.first_stage.model.state_dict().items()}
    embedding_before = trainer.module.cond_stage_model["class_embedder"].embedding.weight.detach().clone()
    trainer.fit()
    outputs = trainer.save_outputs()
    # the first stage is frozen (and in eval mode); the trainable cond stage was trained
    assert not trainer.latent.first_stage.model.training
    after = trainer.latent.first_stage.model.state_dict()
    assert all(torch.equal(first_stage_before[k], after[k]) for k in after)
    assert not torch.equal(embedding_before, trainer.module.cond_stage_model["class_embedder"].embedding.weight)
    # scale_by_std: set on the first batch, held as a float32 buffer, exported
    scale = trainer.latent.scale_factor
    assert scale != 1.0
    ckpt = torch.load(outputs["original_ckpt"], weights_only=True)
    state = ckpt["state_dict"]
    assert ckpt["global_step"] == 4 and state["scale_factor"].dtype == torch.float32
    assert state["scale_factor"].item() == scale
    groups = []
    for key in state:
        group = key if "." not in key else key.split(".")[0]
        if not groups or groups[-1] != group:
            groups.append(group)
    assert groups[0] == "logvar" and groups[13:] == ["scale_factor", "model", "model_ema", "first_stage_model",
                                                     "cond_stage_model"]  # fmt: skip
    assert not torch.equal(state["logvar"], torch.zeros_like(state["logvar"]))  # learned: LatentDiffusion weights by it
    assert torch.equal(state["cond_stage_model.embedding.weight"],
                       trainer.module.cond_stage_model["class_embedder"].embedding.weight.detach())  # fmt: skip
    assert int(state["model_ema.num_updates"]) == 4
    folder = Path(outputs["pipeline"])
    assert (folder / "vae" / "config.json").is_file() and (folder / "class_embedder").is_dir()


@pytest.mark.parametrize("name", ["cin_vq_class", "sd1_kl_clip_eps", "sd2_kl_openclip_v"])
def test_fixture_checkpoint_first_step_and_export(name, tmp_path):
    """From the original's checkpoint: the trainer's step reproduces ``shared_step``; after two optimizer steps the
    exported checkpoint has the original's key list (order included), the frozen stages bit for bit."""
    case = load_latent_case(name)
    config_path = fixture_training_config(case, tmp_path)
    trainer = run(config_path, tmp_path / "out", checkpointing_steps=None, export_original=True, fit=False)
    assert trainer.latent.restarted_from_ckpt  # a ckpt_path: scale_by_std would not be recomputed
    io, key = case.io, case.params["first_stage_key"]
    batch = {key: io[f"batch.{key}"]}
    if "batch.class_label" in io:
        batch["class_label"] = io["batch.class_label"]
    if "batch.txt" in case.meta["scalars"]:
        batch["txt"] = list(case.meta["scalars"]["batch.txt"])
    torch.manual_seed(case.meta["scalars"]["shared_step_seed"])
    z = trainer.get_input(batch)
    c = trainer.get_cond(batch)
    t, noise = trainer._draw_t_and_noise(z)
    with torch.no_grad():
        loss, logs = trainer.module(z, t, noise, c)
    assert noise is None and torch.equal(t, io["shared_step.t"])
    assert (loss - io["shared_step.loss"]).abs().item() <= TOL
    for k, v in logs.items():
        assert (v - io[f"shared_step.loss_dict.{k}"]).abs().item() <= TOL, k

    trainer.fit()
    outputs = trainer.save_outputs()
    exported = torch.load(outputs["original_ckpt"], weights_only=True)["state_dict"]
    assert list(exported) == list(case.state_dict)
    frozen = ("first_stage_model.",) + (() if case.params.get("cond_stage_trainable") else ("cond_stage_model.",))
    for k, v in case.state_dict.items():
        if k.startswith(frozen) or k in ("betas", "posterior_mean_coef2"):
            assert torch.equal(exported[k], v), k
        assert exported[k].dtype == v.dtype and exported[k].shape == v.shape, k
    assert not torch.equal(
        exported["model.diffusion_model.out.2.weight"], case.state_dict["model.diffusion_model.out.2.weight"]
    )


def fixture_training_config(case, tmp_path: Path) -> Path:
    """The case's YAML as a training config: its checkpoint as ``ckpt_path``, a tiny on-disk image set with labels
    and captions, and the asset folders (tokenizer, open_clip config) beside it."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    data = datasets.Dataset.from_dict(
        {"image": images, "label": [i % 10 for i in range(8)], "text": [f"a photo of {i}" for i in range(8)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"),
                                    "text": datasets.Value("string")}),
    )  # fmt: skip
    data.save_to_disk(str(tmp_path / "images"))
    for asset in ("tiny_clip", "open_clip_configs"):
        os.symlink(LATENT_FIXTURES / asset, tmp_path / asset)
    config = yaml.safe_load((LATENT_FIXTURES / f"{case.name}.yaml").read_text())
    config["model"]["params"]["ckpt_path"] = str(LATENT_FIXTURES / f"{case.name}.ckpt")
    dataset = {"target": "ldm_compat.training.data.ImageDataset",
               "params": {"source": "disk", "path": str(tmp_path / "images"),
                          "image_key": case.params["first_stage_key"]}}  # fmt: skip
    config["data"] = {"target": "main.DataModuleFromConfig", "params": {"batch_size": 2, "train": dataset}}
    config["lightning"] = {
        "trainer": {"max_steps": 2},
        "callbacks": {"image_logger": {"params": {"batch_frequency": 0}}},
    }
    path = tmp_path / f"{case.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def state_of(trainer) -> dict[str, torch.Tensor]:
    module = trainer.accelerator.unwrap_model(trainer.module)
    out = {f"module.{k}": v for k, v in module.state_dict().items()}
    out.update({f"ema.{i}": t for i, t in enumerate(trainer.ema.shadow_params)})
    for i, s in trainer.optimizer.state_dict()["state"].items():
        out.update({f"opt.{i}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
    out["scale_factor"] = torch.tensor(trainer.latent.scale_factor)
    return out


def test_resumed_latent_run_is_bit_identical(latent_config, tmp_path):
    full = run(latent_config, tmp_path / "full", checkpointing_steps=2)
    rng_full = torch.get_rng_state()
    run(latent_config, tmp_path / "cut", "lightning.trainer.max_steps=3", checkpointing_steps=3)
    resumed = run(latent_config, tmp_path / "cut", checkpointing_steps=2, resume_from_checkpoint="latest")
    assert resumed.state.global_step == full.state.global_step == 4
    assert resumed.latent.std_rescaled  # restored with the checkpoint, with the value computed at step 0
    a, b = state_of(full), state_of(resumed)
    assert set(a) == set(b) and any(k.startswith("module.cond_stage_model.") for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert torch.equal(rng_full, torch.get_rng_state())


def test_accumulation_and_bf16_autocast(latent_config, tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # mixed precision is fixed per process state: start a fresh one
    try:
        trainer = run(latent_config, tmp_path / "acc", "lightning.trainer.accumulate_grad_batches=2",
                      "lightning.trainer.max_steps=2", checkpointing_steps=None, mixed_precision="bf16")  # fmt: skip
        assert trainer.accelerator.mixed_precision == "bf16"
        assert trainer.state.global_step == 2 and trainer.state.batch_in_epoch == 4
        assert trainer.ema.num_updates == 2
        batch = next(iter(trainer.train_loader))
        assert trainer.get_input(batch).dtype == torch.float32  # the first stage encodes in float32, outside autocast
        assert all(p.dtype == torch.float32 for p in trainer.unet.parameters())
        with trainer.accelerator.autocast():
            loss, _ = trainer.module(
                trainer.get_input(batch), torch.tensor([1, 2, 3, 4]), None, trainer.get_cond(batch)
            )
        assert torch.isfinite(loss)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_ckpt_path_from_a_trained_folder_and_its_export(latent_config, tmp_path):
    first = run(latent_config, tmp_path / "a", checkpointing_steps=None, export_original=True)
    first.save_outputs()
    for source in (tmp_path / "a" / "pipeline", tmp_path / "a" / "original" / "model.ckpt"):
        warm = run(latent_config, tmp_path / f"b-{source.name}", f"model.params.ckpt_path={source}", fit=False,
                   checkpointing_steps=None)  # fmt: skip
        assert warm.latent.restarted_from_ckpt and warm.latent.scale_factor == first.latent.scale_factor
        assert not warm.latent.needs_std_rescaling(0, 0, 0)
        a, b = first.latent.first_stage.model.state_dict(), warm.latent.first_stage.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        ua, ub = first.unet.state_dict(), warm.unet.state_dict()
        assert all(torch.equal(ua[k], ub[k]) for k in ua)
        assert torch.equal(first.module.cond_stage_model["class_embedder"].embedding.weight,
                           warm.module.cond_stage_model["class_embedder"].embedding.weight)  # fmt: skip
        assert all(torch.equal(x, y) for x, y in zip(first.ema.shadow_params, warm.ema.shadow_params))


def test_image_log_and_validation_leave_the_run_unchanged(latent_config, tmp_path):
    """Images decoded by the first stage; validation with and without the EMA; neither changes the training run
    (their posterior noise, t and noise come from their own generators)."""
    plain = run(latent_config, tmp_path / "plain", "lightning.trainer.max_steps=2", checkpointing_steps=None)
    overrides = ["lightning.trainer.max_steps=2", "lightning.callbacks.image_logger.params.batch_frequency=1",
                 "lightning.trainer.val_check_interval=1"]  # fmt: skip
    logged = run(latent_config, tmp_path / "img", *overrides, checkpointing_steps=None, sample_steps=2,
                 validation_batches=1)  # fmt: skip
    names = {p.name.split("_gs")[0] for p in (tmp_path / "img" / "images" / "train").glob("*.png")}
    assert names == {"denoise_row", "diffusion_row", "inputs", "reconstruction", "samples"}
    metrics = logged.validate()
    assert {"val/loss_simple", "val/loss_simple_ema", "val/loss"} <= set(metrics)
    a, b = plain.unet.state_dict(), logged.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_latent_cache_equals_on_the_fly_encoding_and_is_reused(tmp_path):
    """Cached moments give the same latents within float32 rounding (the encoder sees other batch sizes), the same
    random stream (the posterior is sampled per step), and the cache is built once."""
    config = write_latent_config(tmp_path / "c.yaml", **{"data.params.train.params.flip_p": 0.5})
    cache = tmp_path / "cache"
    seen: dict[str, list] = {}

    def traced(out, **options):
        trainer = run(config, tmp_path / out, fit=False, checkpointing_steps=None, **options)
        get_input, zs = trainer.get_input, seen.setdefault(out, [])
        trainer.get_input = lambda batch: zs.append(get_input(batch)) or zs[-1]
        trainer.fit()
        return trainer, torch.get_rng_state()

    plain, rng_plain = traced("plain")
    cached, rng_cached = traced("cached", latent_cache=str(cache))
    assert len(seen["plain"]) == len(seen["cached"]) == 4
    assert max((a - b).abs().max().item() for a, b in zip(seen["plain"], seen["cached"])) <= 1e-5
    assert torch.equal(rng_plain, rng_cached)
    folders = list(cache.iterdir())
    assert len(folders) == 1 and (folders[0] / "latent_cache.json").is_file()
    stamp = (folders[0] / "latent_cache.json").stat().st_mtime_ns
    again, _ = traced("again", latent_cache=str(cache))
    assert (folders[0] / "latent_cache.json").stat().st_mtime_ns == stamp and list(cache.iterdir()) == folders
    assert all(torch.equal(a, b) for a, b in zip(seen["cached"], seen["again"]))
    # other first-stage weights: another fingerprint, another cache
    with torch.no_grad():
        next(again.latent.first_stage.model.parameters()).add_(1.0)
    from ldm_compat.training.latent_cache import fingerprint

    assert fingerprint(again.train_loader.dataset.base, again.latent) != folders[0].name


@pytest.mark.parametrize(
    "change,match",
    [
        ({"model.params.cond_stage_config": "__is_unconditional__"}, "cond_stage_trainable"),
        ({"model.params.scale_factor": 0.5}, "scale_by_std"),
        ({"model.params.force_null_conditioning": True}, "force_null_conditioning"),
        ({"model.params.cond_stage_forward": "decode"}, "cond_stage_forward"),
        ({"model.target": "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"}, "LatentInpaintDiffusion"),
        ({"model.params.scale_by_std": "yes"}, "scale_by_std"),
    ],
)
def test_bad_latent_options_are_one_line_errors(tmp_path, change, match):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(digits_latent(**change)))
    with pytest.raises(ConfigError, match=match):
        run(path, tmp_path / "out", fit=False)
    assert not (tmp_path / "out").exists()
