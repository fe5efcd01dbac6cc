"""The pipeline folder format and loading it: ``LDMCompatPipeline.from_pretrained`` for every folder (old ones
too), plain ``DiffusionPipeline.from_pretrained(folder)`` with only diffusers imported and no flag for unconditional
models (a stock ``DDPMPipeline`` holding our components), and ``trust_remote_code=True`` for the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from helpers.plain_diffusers import run_fresh
from reference_cases import case_pipeline, load_case

from ldm_compat import LDMDDIMScheduler, LDMDDPMScheduler, LDMUNetModel
from ldm_compat.pipelines import LDMCompatPipeline
from ldm_compat.pipelines.folder import loader_text


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


def test_unconditional_folder_names_stock_ddpm_pipeline(tmp_path):
    pipe = case_pipeline("ddpm_eps_linear")
    assert pipe.stock_pipeline == "DDPMPipeline" and pipe.runs_as_stock_ddpm
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    # a diffusers pipeline class and components diffusers imports from the ldm_compat package: no code in the folder
    assert {k: v for k, v in index.items() if k != "_diffusers_version"} == {
        "_class_name": "DDPMPipeline",
        "unet": ["ldm_compat", "LDMUNetModel"],
        "scheduler": ["ldm_compat", "LDMDDPMScheduler"],
    }
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]


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


def test_foreign_code_in_the_folder_is_refused(tmp_path):
    pipe = case_pipeline("ddpm_v_sqrtlinear_crossattn")
    pipe.save_pretrained(tmp_path)
    shim = tmp_path / "unet" / "ldm_compat_LDMUNetModel.py"
    shim.write_text(shim.read_text() + "import os\n")
    with pytest.raises(ValueError, match="unet/ldm_compat_LDMUNetModel.py: not an ldm_compat loader file"):
        LDMCompatPipeline.from_pretrained(tmp_path)
    shim.write_text(loader_text("ldm_compat.models.unet_ldm", "LDMUNetModel"))
    (tmp_path / "None.py").write_text(loader_text("os", "system"))  # diffusers would run a root None.py
    with pytest.raises(ValueError, match="None.py"):
        LDMCompatPipeline.from_pretrained(tmp_path)
    # a stock folder holds no code at all; a file where diffusers would look for a component's code is refused
    stock = tmp_path / "stock"
    case_pipeline("ddpm_eps_linear").save_pretrained(stock)
    (stock / "unet" / "ldm_compat.py").write_text("import os\n")
    with pytest.raises(ValueError, match="unet/ldm_compat.py: not an ldm_compat loader file"):
        LDMCompatPipeline.from_pretrained(stock)


def test_folders_naming_modules_directly_still_load(tmp_path):
    # folders written before loader files (model_index.json names our modules) load through LDMCompatPipeline
    pipe = case_pipeline("ddpm_eps_linear")
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["unet"] = ["ldm_compat.models.unet_ldm", "LDMUNetModel"]
    index["scheduler"] = ["ldm_compat.schedulers.scheduling_ldm_ddpm", "LDMDDPMScheduler"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert torch.equal(sample(LDMCompatPipeline.from_pretrained(tmp_path)), sample(pipe))


def write_loader_file_folder(pipe, folder: Path) -> None:
    """The unconditional folder format before stock folders named the ldm_compat package: DDPMPipeline with loader
    files for the components (diffusers needed trust_remote_code=True)."""
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    for name, module in (("unet", "models.unet_ldm"), ("scheduler", "schedulers.scheduling_ldm_ddpm")):
        class_name = index[name][1]
        (folder / name / f"ldm_compat_{class_name}.py").write_text(loader_text(f"ldm_compat.{module}", class_name))
        index[name] = [f"ldm_compat_{class_name}", class_name]
    (folder / "model_index.json").write_text(json.dumps(index))


def test_loader_file_folders_still_load(tmp_path, modules_cache):
    pipe = case_pipeline("ddpm_eps_linear")
    write_loader_file_folder(pipe, tmp_path)
    loaded = LDMCompatPipeline.from_pretrained(tmp_path, dtype={"unet": torch.bfloat16})
    assert type(loaded.unet) is LDMUNetModel and loaded.unet.dtype == torch.bfloat16
    loaded = LDMCompatPipeline.from_pretrained(tmp_path)
    assert list(modules_cache.iterdir()) == []  # the loader files were not run
    assert torch.equal(sample(loaded), sample(pipe))
    # plain diffusers still runs them when asked to (and only then)
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path)
    stock = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(stock).__name__ == "DDPMPipeline" and type(stock.unet).__name__ == "LDMUNetModel"


FRESH_PLAIN_DIFFUSERS = """
import torch
from diffusers import DiffusionPipeline
torch.set_num_threads(1)
work = {work!r}

# unconditional: a stock DDPMPipeline, no flag; nothing from ldm_compat is imported by this code
pipe = DiffusionPipeline.from_pretrained(work + "/uncond")
pipe.set_progress_bar_config(disable=True)
print(type(pipe).__name__, type(pipe.unet).__name__, type(pipe.scheduler).__name__)
T = pipe.scheduler.config.num_train_timesteps
stock = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=T, output_type="pt")
short = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5, output_type="pt")
torch.save(short.images, work + "/uncond.pt")

# conditional: no stock pipeline runs it; the loader files need the flag
try:
    DiffusionPipeline.from_pretrained(work + "/cond")
except ValueError as err:
    print("trust_remote_code" in str(err))
cond = DiffusionPipeline.from_pretrained(work + "/cond", trust_remote_code=True)
cond.set_progress_bar_config(disable=True)
context = torch.load(work + "/context.pt")
gen = torch.Generator().manual_seed(0)
images = cond(generator=gen, num_inference_steps=3, encoder_hidden_states=context, output_type="latent").images
torch.save(images, work + "/cond.pt")

import ldm_compat
print(type(cond) is ldm_compat.LDMCompatPipeline, cond.config.conditioning_key)
ours = ldm_compat.LDMCompatPipeline.from_pretrained(work + "/uncond")
ours.set_progress_bar_config(disable=True)
ours = ours(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt")  # every step: p_sample_loop
print(torch.equal(stock.images, ours.images))
"""


def test_plain_diffusers_loading_in_a_fresh_interpreter(tmp_path):
    """The user imports only diffusers. ``DiffusionPipeline.from_pretrained(folder)`` (no ``trust_remote_code``)
    of an unconditional folder gives a stock ``DDPMPipeline`` holding ``LDMUNetModel`` and ``LDMDDPMScheduler``,
    whose full T-step chain (``num_inference_steps=T``) equals ``LDMCompatPipeline``'s default (``p_sample_loop``)
    for the same generator, bit for bit. A conditional folder loads as ``LDMCompatPipeline`` with
    ``trust_remote_code=True``."""
    uncond, cond = case_pipeline("ddpm_eps_linear"), case_pipeline("ddpm_v_sqrtlinear_crossattn")
    uncond.save_pretrained(tmp_path / "uncond")
    cond.save_pretrained(tmp_path / "cond")
    context = load_case("ddpm_v_sqrtlinear_crossattn").io["context"]
    torch.save(context, tmp_path / "context.pt")
    out = run_fresh(FRESH_PLAIN_DIFFUSERS.format(work=str(tmp_path)), tmp_path)
    assert out.split() == ["DDPMPipeline", "LDMUNetModel", "LDMDDPMScheduler", "True", "True", "crossattn", "True"]
    # against the pipelines that were saved: the same computations in another process. On one machine they agree
    # bit for bit; the bounds leave room for another float32 kernel choice (seen: 1 ulp in the attention path)
    ours = uncond(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5, output_type="pt")
    assert (torch.load(tmp_path / "uncond.pt") - ours.images).abs().max().item() <= 1e-6
    gen = torch.Generator().manual_seed(0)
    ours = cond(generator=gen, num_inference_steps=3, encoder_hidden_states=context, output_type="latent").images
    assert (torch.load(tmp_path / "cond.pt") - ours).abs().max().item() <= 1e-5


def test_plain_diffusers_without_the_torch_hook_says_to_import_ldm_compat(tmp_path):
    # with torch's entry-point autoload off, diffusers >= 0.42.1 does not find ldm_compat (it resolves libraries
    # other than its own from sys.modules only) and says what to do; older diffusers imports it by name
    from diffusers.pipelines import pipeline_loading_utils

    case_pipeline("ddpm_eps_linear").save_pretrained(tmp_path / "uncond")
    code = f"""
        from diffusers import DiffusionPipeline
        try:
            DiffusionPipeline.from_pretrained({str(tmp_path / "uncond")!r})
            print("loaded")
        except ValueError as err:
            print("import ldm_compat before" in str(err))
        import ldm_compat
        print(type(DiffusionPipeline.from_pretrained({str(tmp_path / "uncond")!r})).__name__)
        """
    out = run_fresh(code, tmp_path, env={"TORCH_DEVICE_BACKEND_AUTOLOAD": "0"})
    sys_modules_only = hasattr(pipeline_loading_utils, "_get_library_or_raise")
    assert out.split() == ["True" if sys_modules_only else "loaded", "DDPMPipeline"]


def test_swapped_scheduler_is_saved_and_loaded(tmp_path):
    pipe = case_pipeline("ddpm_eps_linear")
    pipe.scheduler = LDMDDIMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == ["ldm_compat", "LDMDDIMScheduler"]
    loaded = LDMCompatPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is LDMDDIMScheduler
    assert loaded.scheduler.config.num_train_timesteps == pipe.scheduler.config.num_train_timesteps
