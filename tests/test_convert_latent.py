"""LatentDiffusion checkpoints ⇄ diffusers folders: every latent fixture converts, its parts reproduce the original
outputs, and export gives back the fixture checkpoint bit for bit (keys, order, dtypes, values)."""

import importlib.util
import json
import logging

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, VQModel
from reference_cases import LATENT_CASES, LATENT_FIXTURES, load_latent_case

from ldm_compat import LDMCompatPipeline, LDMUNetModel
from ldm_compat.cli import main as cli
from ldm_compat.convert.export import diffusers_to_original, read_original_checkpoint
from ldm_compat.convert.latent import load_folder_first_stage
from ldm_compat.convert.to_diffusers import MANIFEST_FILE, original_to_diffusers

TOL = dict(rtol=1e-5, atol=1e-5)
HAS_COND_STAGE = importlib.util.find_spec("ldm_compat.models.cond_stage") is not None
# what the weights do not say, for the no-YAML tests: head layout of each fixture UNet and its scale_factor
UNET_OPTIONS = {"sd1_kl_clip_eps": {"num_heads": 2}, "sd2_kl_openclip_v": {"num_head_channels": 8},
                "cin_vq_class": {"num_head_channels": 8}}  # fmt: skip


def ckpt(name):
    return LATENT_FIXTURES / f"{name}.ckpt"


def config(name):
    return LATENT_FIXTURES / f"{name}.yaml"


def assert_same_checkpoint(a: dict, b: dict):
    assert list(a) == list(b), "top-level entries differ"
    sa, sb = a["state_dict"], b["state_dict"]
    assert list(sa) == list(sb), "state-dict keys or their order differ"
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, key
        assert torch.equal(sa[key], sb[key]), key
    assert all(a[k] == b[k] for k in a if k != "state_dict")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    return {name: original_to_diffusers(ckpt(name), config(name), root / name) for name in LATENT_CASES}


def unet_output(unet, case, key="c"):
    io = case.io
    with torch.no_grad():
        return unet.eval()(io["x_noisy"], io["t"], encoder_hidden_states=io[f"cond.{key}"]).sample


@pytest.mark.parametrize("name", LATENT_CASES)
def test_export_is_bit_exact(converted, name, tmp_path):
    out = diffusers_to_original(converted[name], tmp_path / "back.ckpt", config_output=tmp_path / "back.yaml")
    assert_same_checkpoint(torch.load(ckpt(name), weights_only=True), torch.load(out, weights_only=True))
    assert yaml.safe_load((tmp_path / "back.yaml").read_text()) == yaml.safe_load(config(name).read_text())


@pytest.mark.parametrize("name", LATENT_CASES)
def test_first_stage_folder_is_stock_and_reproduces_the_original(converted, name, caplog):
    case, folder = load_latent_case(name), converted[name]
    vq = case.params["first_stage_config"]["target"].endswith("VQModelInterface")
    cls, subfolder = (VQModel, "vqvae") if vq else (AutoencoderKL, "vae")
    model = cls.from_pretrained(folder, subfolder=subfolder)  # diffusers alone loads it
    assert model.config.scaling_factor == case.meta["scalars"]["scale_factor"]
    first_stage = load_folder_first_stage(folder)
    z = case.io["first_stage.z"]
    torch.testing.assert_close(first_stage.decode_first_stage(z), case.io["first_stage.decoded"], **TOL)
    encoded = first_stage.encode_first_stage(case.io["first_stage.x"])
    if vq:
        torch.testing.assert_close(first_stage.get_first_stage_encoding(encoded), z, **TOL)
    else:
        torch.manual_seed(case.meta["scalars"]["posterior_sample_seed"])
        torch.testing.assert_close(first_stage.get_first_stage_encoding(encoded), z, **TOL)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["first_stage"]["kept"] == []  # everything of the first stage lives in the stock model
    # the pipeline loads the folder; the latent parts are not pipeline components yet, and it says so
    with caplog.at_level(logging.WARNING):
        assert set(LDMCompatPipeline.from_pretrained(folder).components) == {"unet", "scheduler"}
    assert f"{subfolder}/" in caplog.text and "not used by LDMCompatPipeline yet" in caplog.text


@pytest.mark.parametrize("name", LATENT_CASES)
def test_unet_samples_with_ema_and_no_ema_keeps_it(converted, name, tmp_path):
    case = load_latent_case(name)
    torch.testing.assert_close(unet_output(LDMUNetModel.from_pretrained(converted[name], subfolder="unet"), case),
                               case.io["apply_model_ema"], **TOL)  # fmt: skip
    folder = original_to_diffusers(ckpt(name), config(name), tmp_path / "f", use_ema=False)
    unet = LDMUNetModel.from_pretrained(folder, subfolder="unet")
    torch.testing.assert_close(unet_output(unet, case), case.io["apply_model"], **TOL)
    torch.testing.assert_close(unet_output(unet, case, "uc"), case.io["apply_model_uc"], **TOL)
    assert_same_checkpoint(torch.load(ckpt(name), weights_only=True), read_original_checkpoint(folder))


@pytest.mark.skipif(not HAS_COND_STAGE, reason="the cond-stage adapters are not in this tree")
@pytest.mark.parametrize("name", LATENT_CASES)
def test_cond_stage_components_are_written(converted, name):
    manifest = json.loads((converted[name] / MANIFEST_FILE).read_text())
    components = manifest["cond_stage"]["components"]
    assert components and all((converted[name] / sub).is_dir() for sub in components)


def test_unknown_cond_stage_keeps_it_verbatim(tmp_path, caplog):
    cfg = yaml.safe_load(config("cin_vq_class").read_text())
    cfg["model"]["params"]["cond_stage_config"]["target"] = "my.encoders.FancyEncoder"
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(cfg))
    with caplog.at_level(logging.WARNING):
        folder = original_to_diffusers(ckpt("cin_vq_class"), tmp_path / "x.yaml", tmp_path / "f")
    if HAS_COND_STAGE:
        assert "my.encoders.FancyEncoder" in caplog.text and "ClassEmbedder" in caplog.text
    assert (folder / "vqvae").is_dir() and not (folder / "class_embedder").exists()
    assert_same_checkpoint(torch.load(ckpt("cin_vq_class"), weights_only=True), read_original_checkpoint(folder))


def test_unconditional_latent_folder_names_ldm_compat_pipeline(tmp_path):
    """An unconditional LatentDiffusion must not be named a stock DDPMPipeline: that would sample latents only."""
    cfg = yaml.safe_load(config("cin_vq_class").read_text())
    cfg["model"]["params"].update(cond_stage_config="__is_unconditional__", conditioning_key=None)
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(cfg))
    folder = original_to_diffusers(ckpt("cin_vq_class"), tmp_path / "x.yaml", tmp_path / "f")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"][1] == "LDMCompatPipeline" and index["conditioning_key"] is None
    assert type(LDMCompatPipeline.from_pretrained(folder)) is LDMCompatPipeline
    assert_same_checkpoint(torch.load(ckpt("cin_vq_class"), weights_only=True), read_original_checkpoint(folder))


def test_unsupported_first_stage_keeps_it_verbatim(tmp_path, caplog):
    cfg = yaml.safe_load(config("sd1_kl_clip_eps").read_text())
    cfg["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["tanh_out"] = True
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(cfg))
    with caplog.at_level(logging.WARNING):
        folder = original_to_diffusers(
            ckpt("sd1_kl_clip_eps"), tmp_path / "x.yaml", tmp_path / "f", tokenizer_path=LATENT_FIXTURES / "tiny_clip"
        )  # the YAML moved away from it
    assert "ddconfig.tanh_out=True" in caplog.text and not (folder / "vae").exists()
    assert_same_checkpoint(torch.load(ckpt("sd1_kl_clip_eps"), weights_only=True), read_original_checkpoint(folder))


def test_first_stage_that_does_not_fit_the_yaml_names_the_key(tmp_path):
    cfg = yaml.safe_load(config("sd1_kl_clip_eps").read_text())
    cfg["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["ch"] = 64
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(cfg))
    message = r"first_stage_model\.encoder\.conv_in\.weight: shape \(32, 3, 3, 3\), the config gives \(64"
    with pytest.raises(ValueError, match=message):
        original_to_diffusers(ckpt("sd1_kl_clip_eps"), tmp_path / "x.yaml", tmp_path / "f")
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("name", LATENT_CASES)
def test_without_yaml_the_first_stage_is_inferred(name, tmp_path):
    case = load_latent_case(name)
    options = UNET_OPTIONS[name]
    with pytest.raises(ValueError, match="scale_factor is not in the weights"):
        original_to_diffusers(ckpt(name), None, tmp_path / "a", unet_options=options)
    scale = case.meta["scalars"]["scale_factor"]
    folder = original_to_diffusers(ckpt(name), None, tmp_path / "b", unet_options=options, scale_factor=scale)
    entry = json.loads((folder / MANIFEST_FILE).read_text())["first_stage"]
    sub = entry["subfolder"]
    inferred = json.loads((folder / sub / "config.json").read_text())
    reference = original_to_diffusers(ckpt(name), config(name), tmp_path / "c")
    expected = json.loads((reference / sub / "config.json").read_text())
    # everything but sample_size (the YAML's resolution, not in the weights) is what the YAML gives
    assert {k: v for k, v in inferred.items() if k != "sample_size"} == {
        k: v for k, v in expected.items() if k != "sample_size"}  # fmt: skip
    torch.testing.assert_close(load_folder_first_stage(folder).decode_first_stage(case.io["first_stage.z"]),
                               case.io["first_stage.decoded"], **TOL)  # fmt: skip
    assert_same_checkpoint(torch.load(ckpt(name), weights_only=True), read_original_checkpoint(folder))


def test_cli_convert_with_latent_flags(tmp_path):
    name = "cin_vq_class"
    open_clip_config = LATENT_FIXTURES / "open_clip_configs" / "ViT-oracle-tiny.json"
    args = ["convert", str(ckpt(name)), "--config", str(config(name)), "--output", str(tmp_path / "f"), "--no-ema",
            "--tokenizer", str(LATENT_FIXTURES / "tiny_clip"), "--open-clip-config", str(open_clip_config)]  # fmt: skip
    assert cli(args) == 0
    assert cli(["export", str(tmp_path / "f"), "--output", str(tmp_path / "o.ckpt")]) == 0
    back = torch.load(tmp_path / "o.ckpt", weights_only=True)
    assert_same_checkpoint(torch.load(ckpt(name), weights_only=True), back)
