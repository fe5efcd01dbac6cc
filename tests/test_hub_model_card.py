"""Model card rendering and the choice of files to push (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from PIL import Image
from reference_cases import load_case

from ldm_compat.hub import (
    card_context,
    files_to_push,
    render_model_card,
    sample_grid,
    template_text,
    write_card_extras,
    write_sample_grid,
)
from ldm_compat.pipelines import LDMCompatPipeline

REPO_ROOT = Path(__file__).resolve().parents[1]


def saved(name: str, folder: Path) -> Path:
    case = load_case(name)
    LDMCompatPipeline.from_ldm_config(case.config).save_pretrained(folder)
    return folder


def test_template_shipped_in_the_package_is_the_repo_template():
    assert template_text() == (REPO_ROOT / "model_card_template.md").read_text(encoding="utf-8")
    assert (REPO_ROOT / "ldm_compat" / "model_card_template.md").is_file()


def test_unconditional_card(tmp_path):
    folder = saved("ddpm_eps_linear", tmp_path)
    case = load_case("ddpm_eps_linear")
    card = render_model_card(folder, "someone/eps", license="mit")
    data, text = card.data, card.text
    assert (data.library_name, data.license, data.pipeline_tag) == (
        "diffusers",
        "mit",
        "unconditional-image-generation",
    )
    assert {"ldm_compat", "latent-diffusion", "parameterization-eps"} <= set(data.tags)
    # the schedule in the original's names and values, read back from the scheduler config
    p = case.params
    for key in ("timesteps", "beta_schedule", "linear_start", "linear_end", "log_every_t", "clip_denoised"):
        assert f"| `{key}` | `{p[key]}` |" in text, key
    assert "`eps` (the UNet predicts the noise ε)" in text
    assert "| UNet `model_channels` | `32` |" in text and "| UNet `channel_mult` | `1, 2` |" in text
    assert "none (unconditional)" in text and "3 × 16 × 16" in text
    assert "No training facts were recorded" in text
    assert 'LDMCompatPipeline.from_pretrained("someone/eps")' in text
    # a stock DDPMPipeline folder holds no code: plain diffusers needs no trust_remote_code
    assert 'DiffusionPipeline.from_pretrained(snapshot_download("someone/eps"))' in text
    assert "trust_remote_code=True)" not in text and "num_inference_steps=T).images" in text
    assert "encoder_hidden_states=" not in text and "## Samples" not in text and "## Original config" not in text
    assert "hf download someone/eps --local-dir eps\nldm-compat export eps --output model.ckpt" in text
    # the YAML header round-trips through huggingface_hub
    assert ModelCard(str(card)).data.to_dict() == data.to_dict()


def test_conditional_card_with_extras(tmp_path):
    folder = saved("ddpm_v_sqrtlinear_crossattn", tmp_path)
    case = load_case("ddpm_v_sqrtlinear_crossattn")
    images = [Image.new("RGB", (16, 16), (i * 50, 0, 0)) for i in range(5)]
    write_card_extras(
        folder,
        training={"steps": 500, "dataset": "my-org/my-dataset", "hardware": "1x A100", "ema": {"decay": 0.9999}},
        original_config=case.config,
        samples=images,
    )
    card = render_model_card(folder, "someone/v", training={"steps": 600}, model_description="My v model.")
    text = card.text
    assert card.data.pipeline_tag is None and card.data.license is None
    assert card.data.datasets == ["my-org/my-dataset"]
    assert {"conditioning-crossattn", "parameterization-v"} <= set(card.data.tags)
    assert text.count("My v model.") == 1
    assert "| conditioning | `crossattn` |" in text and "`encoder_hidden_states` of width 24" in text
    assert "| steps | 600 |" in text and "| hardware | 1x A100 |" in text and "| ema | decay: 0.9999 |" in text
    assert "encoder_hidden_states=context" in text and "(batch, tokens, 24)" in text
    assert "![samples](sample_grid.png)" in text
    assert "## Original config" in text and "use_linear_in_transformer: true" in text
    assert "`v` (the UNet predicts v" in text
    assert 'DiffusionPipeline.from_pretrained("someone/v", trust_remote_code=True)' in text  # loader files
    assert "snapshot_download" not in text
    grid = Image.open(folder / "sample_grid.png")
    assert grid.size == (48, 32)  # 5 images → 2 rows × 3 columns


def test_card_context_for_every_conditioning_kind(tmp_path):
    case = load_case("ddpm_eps_linear")
    unet = dict(case.unet_config["params"], in_channels=5, num_classes=7)
    config = {
        "model": {
            "params": {
                **case.params,
                "conditioning_key": "hybrid-adm",
                "unet_config": {"target": case.unet_config["target"], "params": unet},
            }
        }
    }
    config["model"]["params"]["unet_config"]["params"].update(use_spatial_transformer=True, context_dim=8)
    LDMCompatPipeline.from_ldm_config(config).save_pretrained(tmp_path)
    context = card_context(tmp_path, "x/y")
    assert context["conditioning"] == {
        "key": "hybrid-adm",
        "image_size": 16,
        "channels": 3,
        "context_dim": 8,
        "num_classes": 7,
        "concat_channels": 2,
    }
    text = render_model_card(tmp_path, "x/y").text
    assert "class_labels=labels" in text and "concat=concat" in text and "in 0 … 6" in text


def test_files_to_push(tmp_path):
    folder = saved("ddpm_eps_linear", tmp_path)
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "model.safetensors").write_bytes(b"x")
    (folder / "logs").mkdir()
    (folder / "logs" / "train.log").write_text("x")
    (folder / "README.md").write_text("old card")
    assert files_to_push(folder) == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unet/diffusion_pytorch_model.bin: pickle-based weights"):
        files_to_push(folder)
    (folder / "unet" / "diffusion_pytorch_model.bin").unlink()
    (folder / "ldm_extras").mkdir()
    (folder / "ldm_extras" / "hook.py").write_text("import os\n")
    with pytest.raises(ValueError, match="ldm_extras/hook.py: not an ldm_compat loader file"):
        files_to_push(folder)


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a pipeline folder"):
        files_to_push(tmp_path)
    (tmp_path / "model_index.json").write_text("{broken")
    with pytest.raises(ValueError, match="model_index.json: not valid JSON"):
        render_model_card(tmp_path, "x/y")


def test_push_cli_rejects_bad_input(tmp_path, capsys):
    from ldm_compat.cli import main

    assert main(["push", str(tmp_path), "someone/x"]) == 2
    assert "not a pipeline folder" in capsys.readouterr().err
    folder = saved("ddpm_eps_linear", tmp_path / "p")
    assert main(["push", str(folder), "someone/x", "--training", "[1, 2]"]) == 2
    assert "--training: expected a JSON object" in capsys.readouterr().err
    assert main(["push", str(folder), "a/b/c"]) == 2
    assert "repo_id" in capsys.readouterr().err


def test_sample_grid_layout():
    images = [Image.new("L", (4, 4), i) for i in range(4)]
    assert sample_grid(images).size == (8, 8)
    with pytest.raises(ValueError, match="samples"):
        sample_grid([])


def test_write_sample_grid(tmp_path):
    folder = saved("ddpm_eps_linear", tmp_path / "uncond")
    path = write_sample_grid(folder, 4, num_inference_steps=2, seed=1)
    assert Image.open(path).size == (32, 32)
    assert "![samples](sample_grid.png)" in render_model_card(folder, "x/y").text
    cond = saved("ddpm_v_sqrtlinear_crossattn", tmp_path / "cond")
    with pytest.raises(ValueError, match="only unconditional"):
        write_sample_grid(cond, 2)
