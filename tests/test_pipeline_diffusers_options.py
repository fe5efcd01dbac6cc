"""diffusers' ``from_pretrained`` / ``save_pretrained`` options on ldm_compat folders, as a diffusers user calls them.

``LDMCompatPipeline`` delegates to ``DiffusionPipeline.from_pretrained`` / ``save_pretrained``, so every option
must behave as it does for a stock pipeline: each test makes the same call on ``LDMCompatPipeline`` and on plain
``DiffusionPipeline`` (the stock ``DDPMPipeline`` that an unconditional folder names) and checks the result — or
the error — is the same, and that the weights are the saved ones.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMPipeline, DiffusionPipeline
from diffusers.pipelines.pipeline_utils import SUPPORTED_DEVICE_MAP
from reference_cases import case_pipeline

from ldm_compat.hub import push_folder
from ldm_compat.pipelines import LDMCompatPipeline

LOADERS = {"LDMCompatPipeline": LDMCompatPipeline, "DiffusionPipeline": DiffusionPipeline}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The unconditional fixture pipeline and the folder it was saved to (a stock DDPMPipeline folder)."""
    pipe = case_pipeline("ddpm_eps_linear")
    folder = tmp_path_factory.mktemp("uncond")
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def saved_cond(tmp_path_factory):
    """A conditional pipeline (saved as LDMCompatPipeline, with loader files)."""
    pipe = case_pipeline("ddpm_v_sqrtlinear_crossattn")
    folder = tmp_path_factory.mktemp("cond")
    pipe.save_pretrained(folder)
    return pipe, folder


def same_weights(a, b, dtype=None) -> bool:
    """``a`` holds ``b``'s weights (cast to ``dtype``), wherever ``a`` was placed."""
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(
        torch.equal(sa[k].cpu(), sb[k] if dtype is None else sb[k].to(dtype)) and sa[k].dtype == (dtype or sb[k].dtype)
        for k in sa
    )


def raised(call) -> tuple[type, str]:
    with pytest.raises(Exception) as info:  # noqa: B017 - the type is compared below
        call()
    return info.type, str(info.value)


# ---------------------------------------------------------------------------------------------------- device_map
@pytest.mark.parametrize("device_map", sorted(set(SUPPORTED_DEVICE_MAP)))
def test_device_map_strategies_as_in_diffusers(saved, saved_cond, device_map):
    pipe, folder = saved
    ours = LDMCompatPipeline.from_pretrained(folder, device_map=device_map)
    stock = DiffusionPipeline.from_pretrained(folder, device_map=device_map)
    assert type(stock) is DDPMPipeline and ours.hf_device_map == stock.hf_device_map
    assert ours.unet.device == stock.unet.device
    assert same_weights(ours.unet, pipe.unet)
    cond, cond_folder = saved_cond
    loaded = LDMCompatPipeline.from_pretrained(cond_folder, device_map=device_map)
    assert loaded.hf_device_map == ours.hf_device_map and same_weights(loaded.unet, cond.unet)


def test_device_map_cpu_samples_the_saved_model(saved):
    pipe, folder = saved
    loaded = LDMCompatPipeline.from_pretrained(folder, device_map="cpu")
    assert loaded.hf_device_map == "cpu"
    loaded.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(batch_size=2, num_inference_steps=5, output_type="latent")
    assert torch.equal(
        loaded(generator=gen, **kwargs).images, pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"device_map": {"unet": "cpu"}},  # diffusers pipelines take strategies only (models take dicts)
        {"device_map": "auto"},
        {"device_map": "cpu", "low_cpu_mem_usage": False},
    ],
    ids=["dict", "auto", "no_low_cpu_mem_usage"],
)
def test_unsupported_device_maps_refused_as_in_diffusers(saved, kwargs):
    _, folder = saved
    errors = {
        name: raised(lambda loader=loader: loader.from_pretrained(folder, **kwargs)) for name, loader in LOADERS.items()
    }
    assert errors["LDMCompatPipeline"] == errors["DiffusionPipeline"]
    kind, message = errors["LDMCompatPipeline"]
    assert issubclass(kind, (ValueError, NotImplementedError)) and "\n" not in message
    assert "device_map" in message or "Supported strategies are" in message


# ---------------------------------------------------------------------------------------------------- dtype
@pytest.mark.filterwarnings("ignore:`torch_dtype` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", ["dtype", "torch_dtype"])
@pytest.mark.parametrize(
    "value, expected",
    [
        ({"unet": torch.bfloat16, "default": torch.float16}, torch.bfloat16),
        ({"default": torch.float16}, torch.float16),
        ({"scheduler": torch.float16}, torch.float32),  # diffusers' default for components not named
        (torch.bfloat16, torch.bfloat16),
    ],
    ids=["unet_and_default", "default", "other_component", "one_dtype"],
)
def test_dtype_per_component(saved, saved_cond, name, value, expected):
    (pipe, folder), (cond, cond_folder) = saved, saved_cond
    for loaded, original in (
        (LDMCompatPipeline.from_pretrained(folder, **{name: value}), pipe),
        (DiffusionPipeline.from_pretrained(folder, **{name: value}), pipe),
        (LDMCompatPipeline.from_pretrained(cond_folder, **{name: value}), cond),
    ):
        assert loaded.unet.dtype == expected, type(loaded).__name__
        assert same_weights(loaded.unet, original.unet, expected)


# ---------------------------------------------------------------------------------------------------- saving
def files_of(folder) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_save_without_safetensors_as_in_diffusers(saved, tmp_path):
    pipe, _ = saved
    pipe.save_pretrained(tmp_path / "ours", safe_serialization=False)
    DDPMPipeline(unet=pipe.unet, scheduler=pipe.scheduler).save_pretrained(tmp_path / "stock", safe_serialization=False)
    assert files_of(tmp_path / "ours") == files_of(tmp_path / "stock")
    assert "unet/diffusion_pytorch_model.bin" in files_of(tmp_path / "ours")
    for loader in LOADERS.values():
        assert same_weights(loader.from_pretrained(tmp_path / "ours").unet, pipe.unet)
    # asking for safetensors only fails the same way for both
    errors = {
        n: raised(lambda lo=lo: lo.from_pretrained(tmp_path / "ours", use_safetensors=True))
        for n, lo in LOADERS.items()
    }
    assert errors["LDMCompatPipeline"] == errors["DiffusionPipeline"]
    # pickles are never uploaded
    with pytest.raises(ValueError, match="unet/diffusion_pytorch_model.bin: pickle-based weights are not pushed"):
        push_folder(tmp_path / "ours", "someone/model")
    with pytest.raises(ValueError, match="^safe_serialization=False: ldm_compat pushes safetensors weights only$"):
        pipe.push_to_hub("someone/model", safe_serialization=False)


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_variants_as_in_diffusers(saved, tmp_path, safe_serialization):
    pipe, _ = saved
    pipe.save_pretrained(tmp_path, variant="fp16", safe_serialization=safe_serialization)
    suffix = "safetensors" if safe_serialization else "bin"
    assert f"unet/diffusion_pytorch_model.fp16.{suffix}" in files_of(tmp_path)
    for loader in LOADERS.values():
        assert same_weights(loader.from_pretrained(tmp_path, variant="fp16").unet, pipe.unet)
    errors = {n: raised(lambda lo=lo: lo.from_pretrained(tmp_path, variant="bf16")) for n, lo in LOADERS.items()}
    assert errors["LDMCompatPipeline"] == errors["DiffusionPipeline"]
    assert errors["LDMCompatPipeline"][0] is ValueError and "variant=bf16" in errors["LDMCompatPipeline"][1]
