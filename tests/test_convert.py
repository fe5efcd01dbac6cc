"""Original checkpoint ⇄ diffusers folder: bit-exact round trips, fixture outputs, and bad inputs."""

import os

import pytest
import torch
import yaml
from reference_cases import CASES, FIXTURES, load_case
from safetensors.torch import load_file, save_file

from ldm_compat import LDMCompatPipeline, LDMUNetModel
from ldm_compat.cli import main as cli
from ldm_compat.convert.checkpoint_io import CheckpointError
from ldm_compat.convert.export import diffusers_to_original, read_original_checkpoint
from ldm_compat.convert.to_diffusers import TRAINING_WEIGHTS_FILE, original_to_diffusers

TOL = dict(rtol=1e-5, atol=1e-5)


def ckpt(name):
    return FIXTURES / f"{name}.ckpt"


def config(name):
    return FIXTURES / f"{name}.yaml"


def unet_output(unet, case):
    io = case.io
    kwargs = {"encoder_hidden_states": io["context"]} if "context" in io else {}
    with torch.no_grad():
        return unet.eval()(io["x_noisy"], io["t"], **kwargs).sample


def assert_same_checkpoint(a: dict, b: dict):
    assert list(a) == list(b), "top-level entries differ"
    sa, sb = a["state_dict"], b["state_dict"]
    assert list(sa) == list(sb), "state-dict keys or their order differ"
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, key
        assert torch.equal(sa[key], sb[key]), key
    for key in a:
        if key != "state_dict":
            assert a[key] == b[key], key


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    return {name: original_to_diffusers(ckpt(name), config(name), root / name) for name in CASES}


@pytest.mark.parametrize("name", CASES)
def test_folder_samples_with_ema_and_keeps_training_weights(converted, name):
    case, folder = load_case(name), converted[name]
    pipe = LDMCompatPipeline.from_pretrained(folder)
    expected = case.io["unet_out_ema"] if case.has_ema else case.io["unet_out"]
    torch.testing.assert_close(unet_output(pipe.unet, case), expected, **TOL)
    assert pipe.config.conditioning_key == case.params.get("conditioning_key")
    if case.has_ema:
        training = LDMUNetModel(**case.unet_config["params"])
        training.load_state_dict(load_file(folder / TRAINING_WEIGHTS_FILE))
        torch.testing.assert_close(unet_output(training, case), case.io["unet_out"], **TOL)
    # the original YAML is kept verbatim
    assert (folder / "ldm_extras" / "config.yaml").read_text() == config(name).read_text()
    for path in folder.rglob("*"):
        assert path.suffix not in (".bin", ".ckpt", ".pt"), f"pickle file {path} in the folder"


@pytest.mark.parametrize("name", CASES)
def test_export_is_bit_exact(converted, name, tmp_path):
    out = diffusers_to_original(converted[name], tmp_path / "back.ckpt", config_output=tmp_path / "back.yaml")
    assert_same_checkpoint(torch.load(ckpt(name), weights_only=True), torch.load(out, weights_only=True))
    assert yaml.safe_load((tmp_path / "back.yaml").read_text()) == yaml.safe_load(config(name).read_text())


@pytest.mark.parametrize("name", CASES)
def test_convert_of_export_gives_the_same_folder(converted, name, tmp_path):
    exported = diffusers_to_original(converted[name], tmp_path / "x.ckpt")
    again = original_to_diffusers(exported, config(name), tmp_path / "again")
    first = {p.relative_to(converted[name]): p for p in converted[name].rglob("*.safetensors")}
    second = {p.relative_to(again): p for p in again.rglob("*.safetensors")}
    assert set(first) == set(second)
    for rel, path in first.items():
        a, b = load_file(path), load_file(second[rel])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel


def test_safetensors_input_and_output(tmp_path):
    name = "ddpm_eps_linear"
    sd = torch.load(ckpt(name), weights_only=True)["state_dict"]
    save_file(sd, tmp_path / "in.safetensors")
    folder = original_to_diffusers(tmp_path / "in.safetensors", config(name), tmp_path / "f")
    back = diffusers_to_original(folder, tmp_path / "out.safetensors")
    restored = load_file(back)
    assert restored.keys() == sd.keys() and all(torch.equal(restored[k], sd[k]) for k in sd)
    bare = read_original_checkpoint(folder)  # a bare state dict stays bare (safetensors files hold one)
    assert "state_dict" not in bare and set(bare) == set(sd)


def test_no_ema(tmp_path):
    name = "ddpm_eps_linear"
    case = load_case(name)
    folder = original_to_diffusers(ckpt(name), config(name), tmp_path / "f", use_ema=False)
    pipe = LDMCompatPipeline.from_pretrained(folder)
    torch.testing.assert_close(unet_output(pipe.unet, case), case.io["unet_out"], **TOL)
    # unet/ holds the training weights; the EMA is kept for export, bit for bit
    assert not (folder / TRAINING_WEIGHTS_FILE).exists()
    assert_same_checkpoint(torch.load(ckpt(name), weights_only=True), read_original_checkpoint(folder))


def test_latent_diffusion_extras_and_optimizer_states_survive(tmp_path):
    name = "ddpm_eps_linear"
    original = torch.load(ckpt(name), weights_only=True)
    original["state_dict"]["first_stage_model.encoder.conv_in.weight"] = torch.randn(4, 3, 3, 3)
    original["state_dict"]["cond_stage_model.embedding.weight"] = torch.randn(10, 8).half()
    original["state_dict"]["scale_factor"] = torch.tensor(0.18215)
    original["optimizer_states"] = [{"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2)}},
                                     "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}]  # fmt: skip
    original["pytorch-lightning_version"] = "1.4.2"
    torch.save(original, tmp_path / "ldm.ckpt")
    folder = original_to_diffusers(tmp_path / "ldm.ckpt", config(name), tmp_path / "f")
    out = diffusers_to_original(folder, tmp_path / "back.ckpt")
    back = torch.load(out, weights_only=True)
    assert list(back["state_dict"]) == list(original["state_dict"])
    assert all(torch.equal(back["state_dict"][k], v) for k, v in original["state_dict"].items())
    assert back["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(
        back["optimizer_states"][0]["state"][0]["exp_avg"], original["optimizer_states"][0]["state"][0]["exp_avg"]
    )
    assert back["pytorch-lightning_version"] == "1.4.2"


def test_inferred_config_without_yaml(tmp_path):
    name = "ddpm_eps_linear"
    case = load_case(name)
    with pytest.raises(ValueError, match="num_heads"):
        original_to_diffusers(ckpt(name), None, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    folder = original_to_diffusers(ckpt(name), None, tmp_path / "b", unet_options={"num_heads": 2, "image_size": 16})
    pipe = LDMCompatPipeline.from_pretrained(folder)
    torch.testing.assert_close(unet_output(pipe.unet, case), case.io["unet_out_ema"], **TOL)
    for key in ("model_channels", "channel_mult", "attention_resolutions", "num_res_blocks"):
        assert pipe.unet.config[key] == type(pipe.unet.config[key])(case.unet_config["params"][key]), key
    # the schedule is identified among the published ones, so export stays bit-exact
    assert_same_checkpoint(torch.load(ckpt(name), weights_only=True), read_original_checkpoint(folder))


def test_schedule_mismatch(tmp_path, caplog):
    name = "ddpm_eps_linear"
    cfg = yaml.safe_load(config(name).read_text())
    cfg["model"]["params"]["linear_end"] = 0.03
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="schedule"):
        original_to_diffusers(ckpt(name), tmp_path / "wrong.yaml", tmp_path / "a")
    with caplog.at_level("WARNING"):
        folder = original_to_diffusers(
            ckpt(name), tmp_path / "wrong.yaml", tmp_path / "b", schedule_mismatch="trained_betas"
        )
    assert "schedule buffers differ" in caplog.text
    assert_same_checkpoint(torch.load(ckpt(name), weights_only=True), read_original_checkpoint(folder))
    # sampling uses the checkpoint's betas
    betas = LDMCompatPipeline.from_pretrained(folder).scheduler.ldm_buffers()["betas"]
    assert torch.equal(betas, load_case(name).state_dict["betas"])


def test_wrong_yaml_lists_shape_mismatches(tmp_path):
    cfg = yaml.safe_load(config("ddpm_eps_linear").read_text())
    cfg["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"shape mismatches.*input_blocks\.0\.0\.weight"):
        original_to_diffusers(ckpt("ddpm_eps_linear"), tmp_path / "wrong.yaml", tmp_path / "out")
    assert os.listdir(tmp_path) == ["wrong.yaml"]


def test_missing_keys_are_listed(tmp_path):
    original = torch.load(ckpt("ddpm_eps_linear"), weights_only=True)
    del original["state_dict"]["model.diffusion_model.out.2.weight"]
    torch.save(original, tmp_path / "cut.ckpt")
    with pytest.raises(ValueError, match=r"missing \(model\.diffusion_model\.out\.2\.weight"):
        original_to_diffusers(tmp_path / "cut.ckpt", config("ddpm_eps_linear"), tmp_path / "out")


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda p: p.write_bytes(ckpt("ddpm_eps_linear").read_bytes()[:5000]), "truncated"),
        (lambda p: p.write_text("hello"), "not a PyTorch checkpoint"),
        (lambda p: torch.save({"state_dict": {"x": torch.zeros(1)}, "bad": _Payload()}, p), "refused"),
        (lambda p: torch.save({"state_dict": {"x": torch.zeros(1)}}, p), "no model.diffusion_model"),
    ],
)
def test_bad_checkpoints(tmp_path, make, error):
    path = tmp_path / "bad.ckpt"
    make(path)
    with pytest.raises(ValueError, match=error):
        original_to_diffusers(path, config("ddpm_eps_linear"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _Payload:
    def __reduce__(self):
        return (print, ("executed",))


def test_existing_output_is_refused_unless_overwrite(tmp_path, converted):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        original_to_diffusers(ckpt("ddpm_eps_linear"), config("ddpm_eps_linear"), out)
    assert (out / "keep.txt").read_text() == "mine"
    original_to_diffusers(ckpt("ddpm_eps_linear"), config("ddpm_eps_linear"), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model_index.json").exists()
    (tmp_path / "taken.ckpt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        diffusers_to_original(converted["ddpm_eps_linear"], tmp_path / "taken.ckpt")
    assert (tmp_path / "taken.ckpt").read_text() == "mine"


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    import ldm_compat.convert.to_diffusers as module

    def boom(path, tensors):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "_save_tensors", boom)
    with pytest.raises(OSError, match="No space"):
        original_to_diffusers(ckpt("ddpm_eps_linear"), config("ddpm_eps_linear"), tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_cli_convert_and_export(tmp_path, capsys):
    name = "ddpm_x0_cosine_l1"
    assert cli(["convert", str(ckpt(name)), "--config", str(config(name)), "--output", str(tmp_path / "f")]) == 0
    assert cli(["export", str(tmp_path / "f"), "--output", str(tmp_path / "o.ckpt")]) == 0
    assert_same_checkpoint(
        torch.load(ckpt(name), weights_only=True), torch.load(tmp_path / "o.ckpt", weights_only=True)
    )
    assert cli(["convert", str(tmp_path / "nope.ckpt"), "--output", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.ckpt" in err[0]


def test_error_types_are_value_errors():
    assert issubclass(CheckpointError, ValueError)
