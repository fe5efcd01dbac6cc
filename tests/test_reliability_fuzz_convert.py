"""Fuzzing the converters' key mapping with random valid UNet configs (hypothesis).

For each config: a random-weight ``LDMUNetModel`` whose state-dict layout must equal the ORIGINAL layout rules
(``helpers/original_unet_layout.py``, itself checked here against the original code's layouts of every published
config); then both directions, bit-exact:
- diffusers folder → original checkpoint → diffusers folder → original checkpoint (the key set and order of the
  exported UNet are the original layout; weights, schedule buffers and the second export are unchanged);
- original checkpoint with EMA (LitEma names), ``logvar``, schedule buffers, ``global_step`` → diffusers folder →
  original checkpoint, identical to the input (keys, order, dtypes, values, top-level entries).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest
import torch
from helpers.checkpoint_compare import differences
from helpers.original_unet_layout import original_unet_layout
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_cases import LAYOUTS, load_layout
from safetensors.torch import load_file
from test_unet_layouts import PUBLIC_CONFIGS

from ldm_compat import LDMCompatPipeline, LDMUNetModel
from ldm_compat.convert.export import diffusers_to_original
from ldm_compat.convert.to_diffusers import original_to_diffusers
from ldm_compat.schedulers.scheduling_ldm_ddpm import LDMDDPMScheduler

UNET, EMA = "model.diffusion_model.", "model_ema."
T = 10
SCHEDULE = {"timesteps": T, "beta_schedule": "linear", "linear_start": 0.0015, "linear_end": 0.0195}
MAX_EXAMPLES = int(os.environ.get("LDM_COMPAT_FUZZ_EXAMPLES", 15))  # per test; raise it for a longer search


@pytest.mark.parametrize("config", PUBLIC_CONFIGS, ids=lambda c: c.configs[0].split(":")[-1])
def test_the_oracle_reproduces_the_original_layout_of_every_published_config(config):
    layout = original_unet_layout(config.params)
    text = "\n".join(f"{key}:{shape}" for key, shape in layout.items())
    assert len(layout) == config.keys and hashlib.sha256(text.encode()).hexdigest() == config.sha256


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_oracle_reproduces_the_fixture_layouts(name):
    layout = load_layout(name)
    expected = {key: tuple(shape) for key, shape in layout["state_dict"].items()}
    assert list(original_unet_layout(layout["unet_config_params"]).items()) == list(expected.items())


@st.composite
def unet_configs(draw) -> dict:
    """A random valid original ``unet_config.params`` (tiny: model_channels 32, ≤ 3 levels)."""
    levels = draw(st.integers(1, 3))
    spatial_transformer = draw(st.booleans())
    dims = 2 if spatial_transformer else draw(st.sampled_from([2, 2, 1, 3]))
    per_level = draw(st.booleans())
    num_res_blocks = draw(st.lists(st.integers(0, 2), min_size=levels, max_size=levels) if per_level
                          else st.integers(1, 2))  # fmt: skip
    nrb = num_res_blocks if per_level else [num_res_blocks] * levels
    params = {
        "image_size": 8,
        "in_channels": draw(st.integers(1, 4)),
        "out_channels": draw(st.integers(1, 4)),
        "model_channels": 32,
        "num_res_blocks": num_res_blocks,
        "channel_mult": [1, *draw(st.lists(st.sampled_from([1, 2, 3]), min_size=levels - 1, max_size=levels - 1))],
        "attention_resolutions": draw(st.lists(st.sampled_from([1, 2, 4]), max_size=3, unique=True)),
        "dims": dims,
        "conv_resample": draw(st.booleans()),
        "use_scale_shift_norm": draw(st.booleans()),
        "resblock_updown": draw(st.booleans()),
        "use_new_attention_order": draw(st.booleans()),
        "legacy": draw(st.booleans()),
    }
    if draw(st.booleans()):
        params.update(num_heads=draw(st.sampled_from([1, 2, 4])), num_head_channels=-1)
    else:
        params.update(num_heads=draw(st.sampled_from([-1, 2])), num_head_channels=draw(st.sampled_from([8, 16, 32])))
    params["num_heads_upsample"] = draw(st.sampled_from([-1, 1, 2]))
    classes = draw(st.sampled_from([None, "int", "continuous", "sequential"]))
    if classes == "int":
        params["num_classes"] = draw(st.integers(2, 5))
    elif classes is not None:
        params["num_classes"] = classes
        if classes == "sequential":
            params["adm_in_channels"] = draw(st.integers(1, 8))
    if draw(st.booleans()):
        params["n_embed"] = draw(st.integers(2, 9))
    if draw(st.booleans()):
        params["num_attention_blocks"] = [draw(st.integers(0, n)) for n in nrb]
    if spatial_transformer:
        depth = draw(st.integers(1, 2))
        params.update(
            use_spatial_transformer=True,
            transformer_depth=depth,
            context_dim=draw(st.integers(4, 16) | st.lists(st.integers(4, 16), min_size=depth, max_size=depth)),
            use_linear_in_transformer=draw(st.booleans()),
            disable_middle_self_attn=draw(st.booleans()),
        )
        if draw(st.booleans()):
            params["disable_self_attentions"] = draw(st.lists(st.booleans(), min_size=levels, max_size=levels))
    return params


def random_unet(params: dict, seed: int) -> LDMUNetModel:
    with torch.device("meta"):  # skip the default initialisation: every tensor is overwritten below
        unet = LDMUNetModel(**params)
    unet = unet.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in unet.state_dict().values():  # every entry, zero-initialised ones included
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return unet


def yaml_for(params: dict) -> dict:
    unet_config = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": params}
    return {"model": {"target": "ldm.models.diffusion.ddpm.DDPM", "params": {**SCHEDULE, "unet_config": unet_config}}}


def assert_no_differences(a, b, what: str) -> None:
    found = differences(a, b, what)
    assert not found, found[:8]


FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(params=unet_configs(), seed=st.integers(0, 2**31 - 1))
def test_diffusers_folder_to_original_and_back_is_bit_exact(params, seed):
    unet = random_unet(params, seed)
    layout = original_unet_layout(params)
    assert [(k, tuple(v.shape)) for k, v in unet.state_dict().items()] == list(layout.items())
    scheduler = LDMDDPMScheduler.from_ldm_config(SCHEDULE)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        LDMCompatPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp / "a")
        exported = torch.load(diffusers_to_original(tmp / "a", tmp / "a.ckpt", config_output=tmp / "a.yaml"),
                              weights_only=True)  # fmt: skip
        state_dict = exported.get("state_dict", exported)
        unet_keys = [k[len(UNET) :] for k in state_dict if k.startswith(UNET)]
        assert unet_keys == list(layout), "exported UNet keys are not the original layout"
        others = [k for k in state_dict if not k.startswith(UNET)]
        assert set(others) == set(scheduler.ldm_buffers()), others
        assert_no_differences({k: state_dict[UNET + k] for k in unet_keys}, unet.state_dict(), "export")
        back = original_to_diffusers(tmp / "a.ckpt", tmp / "a.yaml", tmp / "b")
        weights = load_file(back / "unet" / "diffusion_pytorch_model.safetensors")
        assert_no_differences(dict(sorted(weights.items())), dict(sorted(unet.state_dict().items())), "convert")
        again = torch.load(diffusers_to_original(back, tmp / "b.ckpt"), weights_only=True)
        assert_no_differences(again, exported, "second export")


@FUZZ
@given(params=unet_configs(), seed=st.integers(0, 2**31 - 1), learn_logvar=st.booleans())
def test_original_checkpoint_with_ema_round_trip_is_bit_exact(params, seed, learn_logvar):
    unet = random_unet(params, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    state_dict = {"logvar": torch.randn(T, generator=generator)} if learn_logvar else {}
    state_dict.update(LDMDDPMScheduler.from_ldm_config(SCHEDULE).ldm_buffers())
    state_dict.update({UNET + k: v for k, v in unet.state_dict().items()})
    state_dict[EMA + "decay"] = torch.tensor(0.9999)
    state_dict[EMA + "num_updates"] = torch.tensor(seed % 1000, dtype=torch.int32)
    for name, param in unet.named_parameters():  # LitEma: "diffusion_model." + name, every dot removed
        state_dict[EMA + ("diffusion_model." + name).replace(".", "")] = torch.randn(param.shape, generator=generator)
    original = {"state_dict": state_dict, "global_step": seed % 977, "epoch": seed % 13}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save(original, tmp / "in.ckpt")
        import yaml

        (tmp / "in.yaml").write_text(yaml.safe_dump(yaml_for(params)))
        folder = original_to_diffusers(tmp / "in.ckpt", tmp / "in.yaml", tmp / "folder")
        back = torch.load(diffusers_to_original(folder, tmp / "out.ckpt"), weights_only=True)
        assert_no_differences(back, torch.load(tmp / "in.ckpt", weights_only=True), "round trip")
        # the folder samples with the EMA weights
        sampling = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
        shadow = {n: state_dict[EMA + ("diffusion_model." + n).replace(".", "")] for n, _ in unet.named_parameters()}
        assert_no_differences(dict(sorted(sampling.items())), dict(sorted(shadow.items())), "EMA weights")
