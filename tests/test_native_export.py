"""LDMUNetModel → stock diffusers UNet2DModel / UNet2DConditionModel: same outputs, clean refusals, CLI ``--native``."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from reference_cases import CASES, FIXTURES, load_case

from ldm_compat.cli import main as cli
from ldm_compat.convert.native import (
    NATIVE_SUBFOLDER,
    ldm_to_native_state_dict,
    native_unet_config,
    to_native_unet,
    write_native_unet,
)
from ldm_compat.models.unet_ldm import LDMUNetModel

# float32 on the CPU: the two models differ only in the order of floating-point operations
ATOL = 1e-5

BASE = dict(
    image_size=8,
    in_channels=3,
    out_channels=3,
    model_channels=32,
    num_res_blocks=1,
    attention_resolutions=[2],
    channel_mult=[1, 2],
    num_heads=2,
)
SPATIAL = dict(BASE, use_spatial_transformer=True, context_dim=16, attention_resolutions=[1, 2])

# id → (config, expected diffusers class)
EXPRESSIBLE = {
    "scale_shift_norm": (dict(BASE, use_scale_shift_norm=True), "UNet2DModel"),
    "num_head_channels": (dict(BASE, num_heads=-1, num_head_channels=16, attention_resolutions=[1, 2]), "UNet2DModel"),
    "three_levels": (
        dict(BASE, channel_mult=[1, 2, 2], num_res_blocks=2, attention_resolutions=[2, 4], num_head_channels=16),
        "UNet2DModel",
    ),
    "new_attention_order": (
        dict(BASE, num_heads=-1, num_head_channels=16, use_new_attention_order=True, attention_resolutions=[1, 2]),
        "UNet2DModel",
    ),
    "one_head_every_width": (dict(BASE, num_heads=1, attention_resolutions=[1, 2]), "UNet2DModel"),
    "class_labels_num_heads_upsample": (dict(BASE, num_classes=5, num_heads_upsample=2), "UNet2DModel"),
    "resblock_updown": (
        dict(
            BASE,
            resblock_updown=True,
            use_scale_shift_norm=True,
            attention_resolutions=[1],
            num_heads=-1,
            num_head_channels=8,
        ),
        "UNet2DModel",
    ),
    "spatial_conv_proj_legacy": (SPATIAL, "UNet2DConditionModel"),
    "spatial_linear_depth2": (
        dict(
            SPATIAL,
            num_heads=-1,
            num_head_channels=16,
            legacy=False,
            use_linear_in_transformer=True,
            transformer_depth=2,
        ),
        "UNet2DConditionModel",
    ),
    "spatial_per_level_blocks_3_levels": (
        dict(
            SPATIAL,
            channel_mult=[1, 2, 2],
            num_res_blocks=[1, 2, 1],
            attention_resolutions=[1, 4],
            use_scale_shift_norm=True,
        ),
        "UNet2DConditionModel",
    ),
    "spatial_disable_self_attentions": (dict(SPATIAL, disable_self_attentions=[True, False]), "UNet2DConditionModel"),
    "spatial_class_labels": (dict(SPATIAL, num_classes=4), "UNet2DConditionModel"),
    "spatial_adm_sequential": (dict(SPATIAL, num_classes="sequential", adm_in_channels=6), "UNet2DConditionModel"),
}

# id → (config, pattern the ValueError must match: the option and the reason)
REFUSED = {
    "dims": (dict(BASE, dims=1), r"dims: .*2-D only"),
    "n_embed": (dict(BASE, n_embed=16), r"n_embed: .*id_predictor"),
    "conv_resample": (dict(BASE, conv_resample=False), r"conv_resample: .*always resample"),
    "channel_mult": (dict(BASE, channel_mult=[2, 2]), r"channel_mult: the first multiplier must be 1"),
    "continuous_classes": (dict(BASE, num_classes="continuous"), r"num_classes: 'continuous'"),
    "sequential_without_transformer": (
        dict(BASE, num_classes="sequential", adm_in_channels=6),
        r"num_classes: 'sequential'.*UNet2DModel cannot",
    ),
    "resblock_updown_spatial": (dict(SPATIAL, resblock_updown=True), r"resblock_updown: .*CrossAttnDownBlock2D"),
    "disable_middle_self_attn": (
        dict(SPATIAL, disable_middle_self_attn=True),
        r"disable_middle_self_attn: UNetMidBlock2DCrossAttn",
    ),
    "per_level_res_blocks_unet2d": (dict(BASE, num_res_blocks=[1, 2]), r"num_res_blocks: UNet2DModel has one"),
    "level_without_res_blocks": (dict(SPATIAL, num_res_blocks=[0, 1]), r"num_res_blocks: a level without ResBlocks"),
    "heads_differ_per_level": (
        dict(BASE, attention_resolutions=[1, 2]),
        r"num_heads/num_head_channels/num_heads_upsample: UNet2DModel has one attention_head_dim",
    ),
    "num_heads_upsample": (dict(BASE, num_heads_upsample=4), r"num_heads_upsample: .*head widths differ"),
    "partial_num_attention_blocks": (
        dict(SPATIAL, num_attention_blocks=[1, 1]),
        r"num_attention_blocks: level 0 has attention after only some ResBlocks",
    ),
    "context_dim_per_block": (
        dict(SPATIAL, transformer_depth=2, context_dim=[16, 24]),
        r"context_dim: UNet2DConditionModel has one cross_attention_dim",
    ),
    "transformer_head_width": (
        dict(SPATIAL, num_heads=-1, num_head_channels=24, legacy=False, attention_resolutions=[2]),
        r"num_head_channels/legacy: .*in_channels // heads",
    ),
    "unknown_option": (dict(BASE, not_an_option=1), r"unknown UNetModel arguments \['not_an_option'\]"),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation (seconds per forward pass on a busy
    2-core machine instead of milliseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every weight (also the zero-initialised output layers) a random value, so every path matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                p.copy_(1 + 0.1 * noise if "norm" in name or name.endswith("in_layers.0.weight") else 0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))
    return model


def random_inputs(config: dict, batch: int = 2, seed: int = 1) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(seed)
    size = config["image_size"]
    x = torch.randn(batch, config["in_channels"], size, size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    kwargs = {}
    if config.get("use_spatial_transformer"):
        kwargs["encoder_hidden_states"] = torch.randn(batch, 5, config["context_dim"], generator=gen)
    if config.get("num_classes") == "sequential":
        kwargs["class_labels"] = torch.randn(batch, config["adm_in_channels"], generator=gen)
    elif config.get("num_classes") is not None:
        kwargs["class_labels"] = torch.randint(0, config["num_classes"], (batch,), generator=gen)
    return (x, t), kwargs


def outputs(model, args, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(*args, **kwargs).sample


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def fixture_unet(name: str, ema: bool = False) -> LDMUNetModel:
    case = load_case(name)
    unet = LDMUNetModel.from_ldm_config(case.unet_config)
    unet.load_original_state_dict(case.unet_state_dict())
    return unet.eval()


def fixture_inputs(name: str) -> tuple[tuple, dict]:
    io = load_case(name).io
    return (io["x_noisy"], io["t"]), ({"encoder_hidden_states": io["context"]} if "context" in io else {})


# ------------------------------------------------------------------------------------------- fixtures of the original
@pytest.mark.parametrize("name", CASES)
def test_fixture_cases_match_original_unet_out(name):
    unet = fixture_unet(name)
    native = to_native_unet(unet)
    expected_class = (
        "UNet2DConditionModel"
        if load_case(name).unet_config["params"].get("use_spatial_transformer")
        else "UNet2DModel"
    )
    assert type(native).__name__ == expected_class
    args, kwargs = fixture_inputs(name)
    out = outputs(native, args, kwargs)
    assert max_diff(out, load_case(name).io["unet_out"]) <= ATOL
    assert max_diff(out, outputs(unet, args, kwargs)) <= ATOL


def test_fixture_configs_map_as_documented():
    name, config = native_unet_config(load_case("ddpm_eps_linear").unet_config)
    assert name == "UNet2DModel"
    assert config["attention_head_dim"] == 32  # num_heads=2 on the 64-channel level and the middle block
    assert config["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D"]
    assert (config["flip_sin_to_cos"], config["freq_shift"], config["norm_eps"]) == (True, 0, 1e-5)
    name, config = native_unet_config(load_case("ddpm_v_sqrtlinear_crossattn").unet_config)
    assert name == "UNet2DConditionModel"
    # num_head_channels=8 on widths 32 and 64: diffusers' attention_head_dim is the head *count* here
    assert config["attention_head_dim"] == [4, 8]
    assert (config["cross_attention_dim"], config["use_linear_projection"]) == (24, True)
    name, config = native_unet_config(load_case("ddpm_x0_cosine_l1").unet_config)
    assert (config["downsample_type"], config["resnet_time_scale_shift"], config["dropout"]) == (
        "resnet",
        "scale_shift",
        0.1,
    )


# ------------------------------------------------------------------------------------------- random small configs
@pytest.mark.parametrize("case_id", list(EXPRESSIBLE))
def test_native_model_computes_the_same(case_id):
    config, expected_class = EXPRESSIBLE[case_id]
    unet = randomize(LDMUNetModel(**config), seed=len(case_id))
    class_name, native_config = native_unet_config(config)
    assert class_name == expected_class
    native = to_native_unet(unet)
    assert type(native).__name__ == expected_class
    assert dict(native.config)["block_out_channels"] == native_config["block_out_channels"]
    args, kwargs = random_inputs(config)
    ours, theirs = outputs(unet, args, kwargs), outputs(native, args, kwargs)
    assert ours.abs().max() > 0.1  # a meaningful output, not the zero-initialised one
    assert max_diff(ours, theirs) <= ATOL


def test_attention_order_matters():
    """The legacy and the new qkv layouts give different q/k/v for the same weights (so the test above can fail)."""
    config = EXPRESSIBLE["new_attention_order"][0]
    unet = randomize(LDMUNetModel(**config), seed=3)
    sd = unet.state_dict()
    legacy = ldm_to_native_state_dict(sd, dict(config, use_new_attention_order=False))
    new = ldm_to_native_state_dict(sd, config)
    key = "down_blocks.1.attentions.0.to_q.weight"
    assert not torch.equal(legacy[key], new[key])
    # new order: rows [q, k, v][head][channel] → q is the first C rows
    assert torch.equal(new[key], sd["input_blocks.3.1.qkv.weight"][:64, :, 0])
    # legacy: rows [head][q, k, v][channel] → head h's q rows start at h·3·16
    assert torch.equal(legacy[key][16:32], sd["input_blocks.3.1.qkv.weight"][48:64, :, 0])


def test_weights_are_copies_in_the_same_dtype():
    unet = LDMUNetModel(**BASE)
    native = to_native_unet(unet)
    with torch.no_grad():
        native.conv_in.weight.add_(1)
    assert not torch.equal(native.conv_in.weight, unet.input_blocks[0][0].weight)
    half = to_native_unet(LDMUNetModel(**BASE).half())
    assert {p.dtype for p in half.parameters()} == {torch.float16}


# ------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("case_id", list(REFUSED))
def test_inexpressible_configs_are_refused(case_id):
    config, pattern = REFUSED[case_id]
    with pytest.raises(ValueError, match=pattern):
        native_unet_config(config)


def test_config_forms_and_bad_state_dicts():
    case = load_case("ddpm_eps_linear")
    from_params = native_unet_config(case.unet_config["params"])
    assert native_unet_config(case.unet_config) == from_params
    assert native_unet_config(fixture_unet("ddpm_eps_linear").config) == from_params
    with pytest.raises(ValueError, match="unet_config.target"):
        native_unet_config({"target": "ldm.Other", "params": case.unet_config["params"]})
    sd = case.unet_state_dict()
    # a whole original state dict is accepted (the model.diffusion_model.* entries are taken)
    assert set(ldm_to_native_state_dict(case.state_dict, case.unet_config)) == set(
        ldm_to_native_state_dict(sd, case.unet_config)
    )
    with pytest.raises(ValueError, match=r"state_dict: .*1 missing: out.2.bias"):
        ldm_to_native_state_dict({k: v for k, v in sd.items() if k != "out.2.bias"}, case.unet_config)
    with pytest.raises(ValueError, match=r"1 unexpected: extra.weight"):
        ldm_to_native_state_dict({**sd, "extra.weight": torch.zeros(1)}, case.unet_config)
    with pytest.raises(ValueError, match=r"with wrong shapes: out.2.bias \(4,\)"):
        ldm_to_native_state_dict({**sd, "out.2.bias": torch.zeros(4)}, case.unet_config)


# ------------------------------------------------------------------------------------------- folders and the CLI
@pytest.mark.parametrize("case_id", ["resblock_updown", "spatial_adm_sequential"])
def test_write_native_unet_loads_with_diffusers(tmp_path, case_id):
    config, expected_class = EXPRESSIBLE[case_id]
    unet = randomize(LDMUNetModel(**config), seed=7)
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    path = write_native_unet(tmp_path / "pipe")
    assert path == tmp_path / "pipe" / NATIVE_SUBFOLDER
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads((path / "config.json").read_text())["_class_name"] == expected_class
    cls = UNet2DModel if expected_class == "UNet2DModel" else UNet2DConditionModel
    loaded = cls.from_pretrained(path)
    args, kwargs = random_inputs(config)
    assert max_diff(outputs(loaded, args, kwargs), outputs(unet, args, kwargs)) <= ATOL

    with pytest.raises(FileExistsError, match="native output"):
        write_native_unet(tmp_path / "pipe", path)
    assert write_native_unet(tmp_path / "pipe", path, overwrite=True) == path


def test_write_native_unet_refuses_before_writing(tmp_path):
    LDMUNetModel(**dict(BASE, conv_resample=False)).save_pretrained(tmp_path / "pipe" / "unet")
    with pytest.raises(ValueError, match="conv_resample"):
        write_native_unet(tmp_path / "pipe", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]  # no temporary folder left behind
    with pytest.raises(FileNotFoundError, match="no unet/config.json"):
        write_native_unet(tmp_path / "missing")


def test_cli_convert_native_end_to_end(tmp_path):
    name = "ddpm_eps_linear"
    out = tmp_path / "converted"
    ckpt, yaml = FIXTURES / f"{name}.ckpt", FIXTURES / f"{name}.yaml"
    assert cli(["convert", str(ckpt), "--config", str(yaml), "--output", str(out), "--native"]) == 0
    native_dir = out / NATIVE_SUBFOLDER
    # a fresh interpreter in which ldm_compat cannot be imported: the folder needs diffusers only
    script = (
        "import sys; sys.modules['ldm_compat'] = None\n"
        "import torch\nfrom diffusers import UNet2DModel\nfrom safetensors.torch import load_file\n"
        f"io = load_file({str(FIXTURES / f'{name}.io.safetensors')!r})\n"
        f"unet = UNet2DModel.from_pretrained({str(native_dir)!r}).eval()\n"
        "with torch.no_grad():\n    out = unet(io['x_noisy'], io['t']).sample\n"
        "print((out - io['unet_out_ema']).abs().max().item())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    # the pipeline folder samples with the EMA weights, and so does the native UNet written from it
    assert float(result.stdout.strip().splitlines()[-1]) <= ATOL
