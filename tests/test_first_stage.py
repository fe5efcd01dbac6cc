"""First stage: original ``first_stage_config`` + ``first_stage_model.*`` → stock diffusers AutoencoderKL / VQModel.

Numerics against the original code's outputs (``tests/fixtures/ldm_reference_latent``), a bit-exact key/dtype/order
round trip, kept tensors in the original module order (checked against torch's own ``state_dict`` order of a module
tree registered like the original's), and refusals that name the option.
"""

import copy

import pytest
import torch
from diffusers import AutoencoderKL, VQModel
from reference_cases import LATENT_CASES, first_stage_state_dict, load_latent_case
from torch import nn

from ldm_compat.models.first_stage import (
    FirstStage,
    UnsupportedFirstStage,
    load_first_stage,
    parse_first_stage_config,
    resolve_scale_factor,
    to_original_state_dict,
)

TOL = dict(rtol=1e-5, atol=1e-5)
# a nearest-code choice closer to a tie than this (relative distance margin) may flip under float32 rounding
TIE_MARGIN = 1e-6


def first_stage_of(name: str) -> tuple[FirstStage, dict]:
    case = load_latent_case(name)
    params = case.params
    return load_first_stage(
        params["first_stage_config"], first_stage_state_dict(case),
        scale_factor=resolve_scale_factor(params, case.state_dict), scale_by_std=params.get("scale_by_std", False),
    )  # fmt: skip


def expected(case, name):
    return case.io[f"first_stage.{name}"]


@pytest.mark.parametrize("name", LATENT_CASES)
def test_stock_class_and_config(name):
    case = load_latent_case(name)
    fs, kept = first_stage_of(name)
    target = case.params["first_stage_config"]["target"]
    assert type(fs.model) is (AutoencoderKL if target.endswith("AutoencoderKL") else VQModel)
    assert fs.model.config.scaling_factor == case.meta["scalars"]["scale_factor"]
    assert kept == {}  # lossconfig Identity: the fixtures hold nothing the diffusers model does not


@pytest.mark.parametrize("name", LATENT_CASES)
def test_encode_matches_original(name):
    case = load_latent_case(name)
    fs, _ = first_stage_of(name)
    encoded = fs.encode_first_stage(expected(case, "x"))
    if fs.spec.is_vq:
        torch.testing.assert_close(encoded, expected(case, "h"), **TOL)
        torch.testing.assert_close(fs.get_first_stage_encoding(encoded), expected(case, "z"), **TOL)
        return
    for attr in ("mean", "logvar", "std"):
        torch.testing.assert_close(getattr(encoded, attr), expected(case, f"posterior_{attr}"), **TOL)
    torch.testing.assert_close(encoded.mode(), expected(case, "posterior_mode"), **TOL)
    eps = expected(case, "posterior_eps")
    torch.testing.assert_close(encoded.mean + encoded.std * eps, expected(case, "posterior_sample"), **TOL)
    seed = case.meta["scalars"]["posterior_sample_seed"]
    torch.manual_seed(seed)
    sample = encoded.sample()
    torch.testing.assert_close(sample, expected(case, "posterior_sample"), **TOL)
    # one randn of mean.shape, as the original: the same draw from a generator, and from get_first_stage_encoding
    assert torch.equal(encoded.sample(torch.Generator().manual_seed(seed)), sample)
    torch.manual_seed(seed)
    z = fs.get_first_stage_encoding(encoded)
    torch.testing.assert_close(z, expected(case, "z"), **TOL)
    assert torch.equal(z, fs.scale_factor * sample)


@pytest.mark.parametrize("name", LATENT_CASES)
def test_decode_matches_original(name):
    case = load_latent_case(name)
    fs, _ = first_stage_of(name)
    z = expected(case, "z")
    torch.testing.assert_close(fs.decode_first_stage(z), expected(case, "decoded"), **TOL)
    if "first_stage.decoded_force_not_quantize" in case.io:
        out = fs.decode_first_stage(z, force_not_quantize=True)
        torch.testing.assert_close(out, expected(case, "decoded_force_not_quantize"), **TOL)


@pytest.mark.parametrize("name", [n for n in LATENT_CASES if "first_stage.quant" in load_latent_case(n).io])
def test_quantize_matches_original(name):
    case = load_latent_case(name)
    fs, _ = first_stage_of(name)
    out = fs.quantize(expected(case, "h"))
    torch.testing.assert_close(out.quant, expected(case, "quant"), **TOL)
    torch.testing.assert_close(out.loss.reshape(1), expected(case, "quant_loss"), **TOL)
    assert torch.equal(fs.model.quantize.embedding.weight, expected(case, "codebook"))
    margin = case.meta["scalars"]["vq_min_relative_margin.first_stage.h"]
    if margin > TIE_MARGIN:
        assert torch.equal(out.indices, expected(case, "indices"))
    else:
        agree = (out.indices == expected(case, "indices")).float().mean()
        assert agree > 0.95, f"{name}: a near tie (margin {margin:.1e}) explains a flip, not {1 - agree:.0%}"


@pytest.mark.parametrize("name", LATENT_CASES)
def test_round_trip_bit_exact_through_a_folder(name, tmp_path):
    original = first_stage_state_dict(load_latent_case(name))
    fs, kept = first_stage_of(name)
    fs.model.save_pretrained(tmp_path)
    loaded = type(fs.model).from_pretrained(tmp_path)
    back = to_original_state_dict(loaded.state_dict(), loaded, kept)
    assert list(back) == list(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert torch.equal(back[key], value), key
    # the folder holds a stock model: loaded by diffusers alone, it still decodes like the original
    case = load_latent_case(name)
    decoded = FirstStage(loaded, fs.spec).decode_first_stage(expected(case, "z"))
    torch.testing.assert_close(decoded, expected(case, "decoded"), **TOL)


def test_half_precision_round_trip_keeps_dtype():
    original = {k: v.half() for k, v in first_stage_state_dict(load_latent_case("cin_vq_class")).items()}
    spec_config = load_latent_case("cin_vq_class").params["first_stage_config"]
    fs, kept = load_first_stage(spec_config, original)
    back = to_original_state_dict(fs.model.state_dict(), fs.model, kept)
    assert list(back) == list(original)
    assert all(back[k].dtype == torch.float16 and torch.equal(back[k], v) for k, v in original.items())


def _module_tree(entries: list[tuple[str, torch.Tensor, bool]]) -> nn.Module:
    """A module tree with each (dotted name, tensor, is_buffer) registered in the given order."""
    root = nn.Module()
    for name, tensor, buffer in entries:
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        if buffer:
            module.register_buffer(leaf, tensor)
        else:
            module.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))
    return root


def test_kept_tensors_go_back_in_torch_module_order():
    """Extras of a real VQModel (loss.*, quantize.used of remap, colorize, model_ema.*) are kept verbatim; without a
    recorded order they go where torch's state_dict of the original VQModel puts them, registered as its __init__
    does (encoder, decoder, loss, quantize[embedding, used], quant_conv, post_quant_conv, colorize, model_ema).
    Within one child the kept tensors keep their given order (export passes the recorded key order anyway)."""
    state = first_stage_state_dict(load_latent_case("cin_vq_class"))
    t = torch.arange(3.0)
    extras = {"loss.logvar": t, "loss.discriminator.main.0.weight": t + 1, "quantize.used": torch.arange(16),
              "colorize": t + 2, "model_ema.decay": torch.tensor(0.99),
              "model_ema.encoderconv_inweight": t + 3}  # fmt: skip
    registration = []
    for key, value in state.items():
        if key.startswith("quant_conv"):  # the original registers loss and quantize before quant_conv
            registration += [(k, extras[k], False) for k in ("loss.logvar", "loss.discriminator.main.0.weight")]
            registration += [(k, v, False) for k, v in state.items() if k.startswith("quantize.")]
            registration.append(("quantize.used", extras["quantize.used"], True))
        if not key.startswith("quantize."):
            registration.append((key, value, False))
    registration += [("colorize", extras["colorize"], True), ("model_ema.decay", extras["model_ema.decay"], True),
                     ("model_ema.encoderconv_inweight", extras["model_ema.encoderconv_inweight"], True)]  # fmt: skip
    oracle = list(_module_tree(registration).state_dict())

    shuffled = {**extras, **state}  # extras first: their place comes from the module structure, not the input
    fs, kept = load_first_stage(load_latent_case("cin_vq_class").params["first_stage_config"], shuffled)
    assert kept == extras and all(kept[k] is extras[k] for k in extras)
    back = to_original_state_dict(fs.model.state_dict(), fs.model, kept)
    assert list(back) == oracle
    custom = list(shuffled)
    assert list(to_original_state_dict(fs.model.state_dict(), fs.model, kept, key_order=custom)) == custom


def test_bad_weights_name_the_key():
    case = load_latent_case("sd1_kl_clip_eps")
    config = case.params["first_stage_config"]
    state = first_stage_state_dict(case)
    wrong = {**state, "decoder.conv_in.weight": torch.zeros(32, 5, 3, 3)}
    with pytest.raises(ValueError, match=r"decoder\.conv_in\.weight: shape \(32, 5, 3, 3\)"):
        load_first_stage(config, wrong)
    missing = {k: v for k, v in state.items() if k != "encoder.mid.attn_1.q.weight"}
    with pytest.raises(ValueError, match=r"first_stage_model\.encoder\.mid\.attn_1\.q\.weight"):
        load_first_stage(config, missing)


def _with(config: dict, **ddconfig) -> dict:
    out = copy.deepcopy(config)
    out["params"]["ddconfig"].update(ddconfig)
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(ch_mult=[2, 2, 2]), r"ddconfig\.ch_mult=\[2, 2, 2\]: ch_mult\[0\] must be 1"),
        (dict(attn_type="linear"), r"ddconfig\.attn_type='linear'"),
        (dict(use_linear_attn=True), r"ddconfig\.use_linear_attn=True"),
        (dict(resamp_with_conv=False), r"ddconfig\.resamp_with_conv=False"),
        (dict(tanh_out=True), r"ddconfig\.tanh_out=True"),
        (dict(give_pre_end=True), r"ddconfig\.give_pre_end=True"),
        (dict(double_z=False), r"ddconfig\.double_z=False: the original AutoencoderKL asserts"),
    ],
)
def test_unrepresentable_options_are_refused_by_name(change, message):
    config = load_latent_case("sd1_kl_clip_eps").params["first_stage_config"]
    with pytest.raises(UnsupportedFirstStage, match=message):
        parse_first_stage_config(_with(config, **change))


def test_other_refusals():
    kl = load_latent_case("sd1_kl_clip_eps").params["first_stage_config"]
    with pytest.raises(UnsupportedFirstStage, match=r"embed_dim=3: .*z_channels \(4\)"):
        parse_first_stage_config({**kl, "params": {**kl["params"], "embed_dim": 3}})
    with pytest.raises(UnsupportedFirstStage, match=r"IdentityFirstStage.*supported: .*AutoencoderKL"):
        parse_first_stage_config({"target": "ldm.models.autoencoder.IdentityFirstStage", "params": {}})
    vq = load_latent_case("cin_vq_class").params["first_stage_config"]
    with pytest.raises(UnsupportedFirstStage, match=r"double_z=True: a VQ first stage"):
        parse_first_stage_config(_with(vq, double_z=True))
    with pytest.raises(ValueError, match=r"params\.n_embed: required"):
        parse_first_stage_config({**vq, "params": {k: v for k, v in vq["params"].items() if k != "n_embed"}})


def test_attention_placement_per_level():
    """attn_resolutions [8] at resolution 32 with 3 levels: attention after every resnet of the 8x8 level only, in
    the encoder (its last down block) and the decoder (its first up block), as the original Encoder/Decoder."""
    vq = load_latent_case("cin_vq_class").params["first_stage_config"]
    fs, _ = first_stage_of("cin_vq_class")
    assert list(fs.model.config.down_block_types) == ["DownEncoderBlock2D"] * 2 + ["AttnDownEncoderBlock2D"]
    assert list(fs.model.config.up_block_types) == ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 2
    none = parse_first_stage_config(_with(vq, attn_type="none"))
    assert (none.encoder_attention(), none.has_attention) == ([False, False, True], False)
    # resolution 34 (not a multiple of 4): the encoder halves 34 → 17 → 8, the decoder doubles 8 → 16 → 32
    odd = parse_first_stage_config(_with(vq, resolution=34, attn_resolutions=[34, 8]))
    assert odd.encoder_attention() == [True, False, True] and odd.decoder_attention() == [False, False, True]


def test_vq_index_options_and_predict_cids():
    case = load_latent_case("cin_vq_class")
    vq = copy.deepcopy(case.params["first_stage_config"])
    vq["params"].update(sane_index_shape=True, remap="used.npy")
    used = torch.tensor([3, 1, 4, 15, 9])
    state = {**first_stage_state_dict(case), "quantize.used": used}
    fs, kept = load_first_stage(vq, state)
    plain, _ = first_stage_of("cin_vq_class")
    h = expected(case, "h")
    flat = plain.quantize(h).indices
    torch.manual_seed(0)
    remapped = fs.quantize(h).indices
    assert remapped.shape == (2, 8, 8) and "quantize.used" in kept
    known = torch.isin(flat, used)
    position = {int(code): i for i, code in enumerate(used)}
    assert [int(i) for i in remapped.flatten()[known]] == [position[int(c)] for c in flat[known]]
    assert bool(((remapped.flatten()[~known] >= 0) & (remapped.flatten()[~known] < len(used))).all())
    # predict_cids: one-hot code logits decode like their codebook vectors without re-quantizing
    logits = torch.nn.functional.one_hot(flat.reshape(2, 8, 8), 16).permute(0, 3, 1, 2).float() * 10
    codes = plain.model.quantize.embedding(flat.reshape(2, 8, 8)).permute(0, 3, 1, 2).contiguous()
    torch.testing.assert_close(plain.decode_first_stage(logits, predict_cids=True),
                               plain.decode_first_stage(codes, force_not_quantize=True), rtol=0, atol=0)  # fmt: skip


def test_scale_by_std_divides_in_float32():
    fs, _ = first_stage_of("sd1_kl_clip_eps")
    z = torch.randn(1, 4, 8, 8)
    scale = 0.18215
    buffer = FirstStage(fs.model, fs.spec, scale, scale_by_std=True)
    assert torch.equal(buffer.get_first_stage_encoding(z), torch.tensor(scale) * z)
    expected_input = (1.0 / torch.tensor(scale)) * z
    assert torch.equal(buffer.decode_first_stage(z), fs.model.decode(expected_input).sample)


def test_decode_without_and_with_gradients():
    fs, _ = first_stage_of("sd1_kl_clip_eps")
    z = load_latent_case("sd1_kl_clip_eps").io["first_stage.z"].clone().requires_grad_(True)
    assert not fs.decode_first_stage(z).requires_grad  # the original decorates it with torch.no_grad
    out = fs.differentiable_decode_first_stage(z)
    out.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert torch.equal(out.detach(), fs.decode_first_stage(z))
