"""The pipeline folder format and loading it: ``LDMCompatPipeline.from_pretrained`` for every model, and plain
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` with only diffusers imported (stock
``DDPMPipeline`` for unconditional models, ``LDMCompatPipeline`` for the others)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from reference_cases import case_pipeline, load_case

from ldm_compat import LDMDDIMScheduler, LDMDDPMScheduler, LDMUNetModel
from ldm_compat.pipelines import LDMCompatPipeline
from ldm_compat.pipelines.folder import loader_text

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def modules_cache(tmp_path_factory, monkeypatch) -> Path:
    # where diffusers would copy folder code it runs (trust_remote_code); LDMCompatPipeline must run none
    import diffusers.utils.dynamic_modules_utils as dynamic_modules

    path = tmp_path_factory.mktemp("hf_modules")
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(path))
    return path


def sample(pipe, **kwargs) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = LDMDDIMScheduler.from_config(pipe.scheduler.config)
    return pipe(
        batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs
    ).images


def run_isolated(code: str, tmp_path: Path) -> str:
    """Run ``code`` in a fresh interpreter (nothing imported yet; private HF_HOME, offline)."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_unconditional_folder_names_stock_ddpm_pipeline(tmp_path):
    pipe = case_pipeline("ddpm_eps_linear")
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["ldm_compat_LDMUNetModel", "LDMUNetModel"]
    assert index["scheduler"] == ["ldm_compat_LDMDDPMScheduler", "LDMDDPMScheduler"]
    assert not {"conditioning_key", "image_size", "channels"} & set(index)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == [
        "model_index.json",
        "scheduler/ldm_compat_LDMDDPMScheduler.py",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/ldm_compat_LDMUNetModel.py",
    ]
    assert (tmp_path / "unet/ldm_compat_LDMUNetModel.py").read_text() == loader_text(
        "ldm_compat.models.unet_ldm", "LDMUNetModel"
    )
    assert pipe.runs_as_stock_ddpm


def test_conditional_folder_names_ldm_compat_pipeline(tmp_path):
    pipe = case_pipeline("ddpm_v_sqrtlinear_crossattn")
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["ldm_compat_pipeline", "LDMCompatPipeline"]
    assert (tmp_path / "ldm_compat_pipeline.py").read_text() == loader_text(
        "ldm_compat.pipelines.pipeline_ldm_compat", "LDMCompatPipeline"
    )
    assert (index["conditioning_key"], index["image_size"], index["channels"]) == ("crossattn", 16, 4)
    loaded = LDMCompatPipeline.from_pretrained(tmp_path)
    assert type(loaded) is LDMCompatPipeline and type(loaded.unet) is LDMUNetModel
    assert loaded.unet.dtype == torch.float32
    half = LDMCompatPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16
    assert type(loaded.scheduler) is LDMDDPMScheduler
    assert loaded.config.conditioning_key == "crossattn"
    context = load_case("ddpm_v_sqrtlinear_crossattn").io["context"]
    assert torch.equal(sample(loaded, encoder_hidden_states=context), sample(pipe, encoder_hidden_states=context))
    # plain diffusers runs the loader files only when asked to
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path)


def test_sample_shape_differing_from_the_unet_keeps_our_class(tmp_path):
    case = load_case("ddpm_eps_linear")
    config = {"model": {"params": {**case.params, "image_size": 24}}}
    pipe = LDMCompatPipeline.from_ldm_config(config)
    assert not pipe.runs_as_stock_ddpm
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"][1] == "LDMCompatPipeline"
    assert LDMCompatPipeline.from_pretrained(tmp_path).sample_shape == (3, 24, 24)


def test_round_trip_and_component_swap(tmp_path, modules_cache):
    pipe = case_pipeline("ddpm_eps_linear")
    pipe.save_pretrained(tmp_path)
    loaded = LDMCompatPipeline.from_pretrained(tmp_path)
    assert type(loaded) is LDMCompatPipeline and loaded.config.conditioning_key is None
    assert list(modules_cache.iterdir()) == []  # no folder code was run
    assert not loaded.unet.training
    for a, b in zip(pipe.unet.state_dict().values(), loaded.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(sample(loaded), sample(pipe))
    # diffusers schedulers read our scheduler config; components can be replaced at load time
    stock = DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert (stock.alphas_cumprod - pipe.scheduler.alphas_cumprod).abs().max().item() <= 5e-7
    swapped = LDMCompatPipeline.from_pretrained(tmp_path, scheduler=LDMDDIMScheduler.from_config(pipe.scheduler.config))
    assert type(swapped.scheduler) is LDMDDIMScheduler


def test_safetensors_only(tmp_path):
    pipe = case_pipeline("ddpm_eps_linear")
    with pytest.raises(ValueError, match="safe_serialization"):
        pipe.save_pretrained(tmp_path, safe_serialization=False)


def test_foreign_code_in_the_folder_is_refused(tmp_path):
    pipe = case_pipeline("ddpm_eps_linear")
    pipe.save_pretrained(tmp_path)
    shim = tmp_path / "unet" / "ldm_compat_LDMUNetModel.py"
    shim.write_text(shim.read_text() + "import os\n")
    with pytest.raises(ValueError, match="unet/ldm_compat_LDMUNetModel.py: not an ldm_compat loader file"):
        LDMCompatPipeline.from_pretrained(tmp_path)
    shim.write_text(loader_text("ldm_compat.models.unet_ldm", "LDMUNetModel"))
    (tmp_path / "None.py").write_text(loader_text("os", "system"))  # diffusers would run a root None.py
    with pytest.raises(ValueError, match="None.py"):
        LDMCompatPipeline.from_pretrained(tmp_path)


def test_folders_naming_modules_directly_still_load(tmp_path):
    # folders written before loader files (model_index.json names our modules) load through LDMCompatPipeline
    pipe = case_pipeline("ddpm_eps_linear")
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["unet"] = ["ldm_compat.models.unet_ldm", "LDMUNetModel"]
    index["scheduler"] = ["ldm_compat.schedulers.scheduling_ldm_ddpm", "LDMDDPMScheduler"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    for shim in tmp_path.rglob("*.py"):
        shim.unlink()
    assert torch.equal(sample(LDMCompatPipeline.from_pretrained(tmp_path)), sample(pipe))


def test_plain_diffusers_loading_in_a_fresh_interpreter(tmp_path):
    """Only ``diffusers`` imported by the user: ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``
    gives a stock ``DDPMPipeline`` for the unconditional folder and ``LDMCompatPipeline`` for the conditional one;
    both sample exactly like the pipelines that were saved."""
    uncond, cond = case_pipeline("ddpm_eps_linear"), case_pipeline("ddpm_v_sqrtlinear_crossattn")
    uncond.save_pretrained(tmp_path / "uncond")
    cond.save_pretrained(tmp_path / "cond")
    context = load_case("ddpm_v_sqrtlinear_crossattn").io["context"]
    torch.save(context, tmp_path / "context.pt")
    out = run_isolated(
        f"""
        import sys, torch
        from diffusers import DiffusionPipeline
        assert "ldm_compat" not in sys.modules
        torch.set_num_threads({torch.get_num_threads()})  # the same reduction order as this process
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "uncond")!r}, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        print(type(pipe).__name__, type(pipe.unet).__name__, type(pipe.scheduler).__name__)
        gen = torch.Generator().manual_seed(0)
        images = pipe(batch_size=2, generator=gen, num_inference_steps=10, output_type="pt").images
        torch.save(images, {str(tmp_path / "uncond.pt")!r})

        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "cond")!r}, trust_remote_code=True)
        import ldm_compat
        print(type(pipe) is ldm_compat.LDMCompatPipeline, pipe.config.conditioning_key)
        pipe.set_progress_bar_config(disable=True)
        context = torch.load({str(tmp_path / "context.pt")!r})
        gen = torch.Generator().manual_seed(0)
        images = pipe(generator=gen, num_inference_steps=3, encoder_hidden_states=context, output_type="latent").images
        torch.save(images, {str(tmp_path / "cond.pt")!r})
        """,
        tmp_path,
    )
    assert out.split() == ["DDPMPipeline", "LDMUNetModel", "LDMDDPMScheduler", "True", "crossattn"]
    gen = torch.Generator().manual_seed(0)
    ours = uncond(batch_size=2, generator=gen, num_inference_steps=10, output_type="pt").images
    assert torch.equal(torch.load(tmp_path / "uncond.pt"), ours)
    ours = cond(
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=3,
        encoder_hidden_states=context,
        output_type="latent",
    ).images
    # another process: the same computation up to float32 kernel choices (seen: 1 ulp in the attention path)
    assert (torch.load(tmp_path / "cond.pt") - ours).abs().max().item() <= 1e-5


def test_swapped_scheduler_is_saved_and_loaded(tmp_path):
    pipe = case_pipeline("ddpm_eps_linear")
    pipe.scheduler = LDMDDIMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler" / "ldm_compat_LDMDDIMScheduler.py").is_file()
    loaded = LDMCompatPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is LDMDDIMScheduler
    assert loaded.scheduler.config.num_train_timesteps == pipe.scheduler.config.num_train_timesteps
