"""The DiffusionWrapper conditioning routing (``apply_model``) and its checks (``validate_conditioning``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from reference_cases import load_case

from ldm_compat import LDMUNetModel
from ldm_compat.models import CONDITIONING_KEYS, apply_model, validate_conditioning, wrap_conditioning


class RecordingUNet:
    """Stands in for a UNet: records how it was called and returns a diffusers-style output."""

    def __init__(self, **config):
        self.calls = []
        self.config = config

    def __call__(self, x, t, **kwargs):
        self.calls.append((x, t, kwargs))
        return SimpleNamespace(sample=x[:, :1] * 2)


B = 2
X = torch.randn(B, 3, 4, 4)
T = torch.tensor([1, 5])
CONCAT = [torch.randn(B, 1, 4, 4), torch.randn(B, 2, 4, 4)]
CROSS = [torch.randn(B, 3, 8), torch.randn(B, 2, 8)]
LABELS = torch.tensor([3, 4])
ADM = torch.randn(B, 6)


def _call(key, cond, **kw):
    unet = RecordingUNet()
    out = apply_model(unet, X, T, cond, key, **kw)
    ((x, t, kwargs),) = unet.calls
    assert t is T
    torch.testing.assert_close(out, x[:, :1] * 2)
    return x, kwargs


def test_keys_are_the_originals():
    assert CONDITIONING_KEYS == (None, "concat", "crossattn", "hybrid", "adm", "crossattn-adm", "hybrid-adm")


def test_none_ignores_conditioning():
    x, kwargs = _call(None, None)
    assert x is X and kwargs == {}
    x, kwargs = _call(None, {"c_crossattn": CROSS})
    assert x is X and kwargs == {}


def test_concat_concatenates_channels():
    x, kwargs = _call("concat", {"c_concat": CONCAT})
    torch.testing.assert_close(x, torch.cat([X, *CONCAT], 1))
    assert kwargs == {}
    # a bare tensor is wrapped as c_concat for 'concat' (LatentDiffusion.apply_model)
    x, _ = _call("concat", CONCAT[0])
    torch.testing.assert_close(x, torch.cat([X, CONCAT[0]], 1))


def test_crossattn_concatenates_tokens():
    x, kwargs = _call("crossattn", {"c_crossattn": CROSS})
    assert x is X
    torch.testing.assert_close(kwargs["encoder_hidden_states"], torch.cat(CROSS, 1))
    assert set(kwargs) == {"encoder_hidden_states"}
    _, kwargs = _call("crossattn", CROSS[0])
    assert kwargs["encoder_hidden_states"] is not None and kwargs["encoder_hidden_states"].shape == CROSS[0].shape
    _, kwargs = _call("crossattn", CROSS, sequential_crossattn=True)
    assert isinstance(kwargs["encoder_hidden_states"], list) and len(kwargs["encoder_hidden_states"]) == 2


def test_hybrid():
    x, kwargs = _call("hybrid", {"c_concat": CONCAT, "c_crossattn": CROSS})
    torch.testing.assert_close(x, torch.cat([X, *CONCAT], 1))
    torch.testing.assert_close(kwargs["encoder_hidden_states"], torch.cat(CROSS, 1))
    assert set(kwargs) == {"encoder_hidden_states"}


def test_adm_labels_travel_in_c_crossattn():
    x, kwargs = _call("adm", {"c_crossattn": [LABELS]})
    assert x is X and kwargs == {"class_labels": LABELS}
    _, kwargs = _call("adm", LABELS)
    assert kwargs == {"class_labels": LABELS}


def test_crossattn_adm_and_hybrid_adm():
    x, kwargs = _call("crossattn-adm", {"c_crossattn": CROSS, "c_adm": ADM})
    assert x is X and kwargs["class_labels"] is ADM
    torch.testing.assert_close(kwargs["encoder_hidden_states"], torch.cat(CROSS, 1))
    x, kwargs = _call("hybrid-adm", {"c_concat": CONCAT, "c_crossattn": CROSS, "c_adm": ADM})
    torch.testing.assert_close(x, torch.cat([X, *CONCAT], 1))
    assert kwargs["class_labels"] is ADM


@pytest.mark.parametrize(
    "key,cond,match",
    [
        ("concat", None, "c_concat"),
        ("hybrid", {"c_crossattn": CROSS}, "c_concat"),
        ("crossattn", None, "c_crossattn"),
        ("hybrid", {"c_concat": CONCAT}, "c_crossattn"),
        ("adm", {}, "class labels"),
        ("crossattn-adm", {"c_crossattn": CROSS}, "c_adm"),
        ("hybrid-adm", {"c_concat": CONCAT, "c_crossattn": CROSS}, "c_adm"),
        ("crossattn", {"c_crossattn": []}, "c_crossattn"),
        ("crossattn", {"c_cross": CROSS}, "unknown keys"),
        ("crossatn", CROSS, "conditioning_key"),
    ],
)
def test_missing_conditioning_is_a_clear_error(key, cond, match):
    with pytest.raises(ValueError, match=match):
        validate_conditioning(key, cond)
    with pytest.raises(ValueError, match=match):
        apply_model(RecordingUNet(), X, T, cond, key)


def test_batch_size_and_unet_checks():
    c = validate_conditioning("hybrid", {"c_concat": CONCAT[0], "c_crossattn": CROSS}, batch_size=B)
    assert c["c_concat"] == [CONCAT[0]] and c["c_crossattn"] == CROSS
    with pytest.raises(ValueError, match="rows for a batch of 3"):
        validate_conditioning("crossattn", CROSS, batch_size=3)
    plain = RecordingUNet(use_spatial_transformer=False, num_classes=None)
    with pytest.raises(ValueError, match="use_spatial_transformer"):
        validate_conditioning("crossattn", CROSS, unet=plain)
    with pytest.raises(ValueError, match="num_classes"):
        validate_conditioning("adm", LABELS, unet=plain)
    with pytest.raises(ValueError, match="num_classes"):
        validate_conditioning(None, unet=RecordingUNet(num_classes=10))
    validate_conditioning("concat", CONCAT, unet=plain)


def test_wrap_conditioning_matches_latent_diffusion_apply_model():
    assert wrap_conditioning(None, "crossattn") == {}
    assert wrap_conditioning(CROSS[0], "crossattn") == {"c_crossattn": [CROSS[0]]}
    assert wrap_conditioning(CONCAT, "concat") == {"c_concat": CONCAT}
    assert wrap_conditioning(LABELS, "adm") == {"c_crossattn": [LABELS]}


def test_apply_model_on_the_crossattn_fixture():
    """The original DiffusionWrapper('crossattn') output on the fixture, through a tensor cond as LatentDiffusion."""
    case = load_case("ddpm_v_sqrtlinear_crossattn")
    assert case.params["conditioning_key"] == "crossattn"
    model = LDMUNetModel.from_ldm_config(case.unet_config).eval()
    model.load_original_state_dict(case.unet_state_dict())
    with torch.no_grad():
        out = apply_model(model, case.io["x_noisy"], case.io["t"], case.io["context"], "crossattn")
    torch.testing.assert_close(out, case.io["unet_out"], rtol=0, atol=1e-5)


def test_apply_model_with_real_unets_for_every_key():
    """Each key's routing fits a matching LDMUNetModel (shapes line up and the conditioning changes the output)."""
    base = dict(
        image_size=4, in_channels=3, out_channels=3, model_channels=32, num_res_blocks=1, attention_resolutions=[2]
    )
    base.update(channel_mult=[1, 2], num_heads=2)
    for key in CONDITIONING_KEYS:
        params = dict(base)
        cond = {}
        if key in ("concat", "hybrid", "hybrid-adm"):
            params["in_channels"] = 6
            cond["c_concat"] = CONCAT
        if key in ("crossattn", "hybrid", "crossattn-adm", "hybrid-adm"):
            params.update(use_spatial_transformer=True, context_dim=8)
            cond["c_crossattn"] = CROSS
        if key == "adm":
            params["num_classes"] = 10
            cond["c_crossattn"] = [LABELS]
        if key in ("crossattn-adm", "hybrid-adm"):
            params.update(num_classes="sequential", adm_in_channels=6)
            cond["c_adm"] = ADM
        torch.manual_seed(0)
        model = LDMUNetModel(**params).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
            validate_conditioning(key, cond or None, batch_size=B, unet=model)
            out = apply_model(model, X, T, cond or None, key)
            assert out.shape == X.shape
            if cond:
                scaled = {k: ([c * 0.5 for c in v] if isinstance(v, list) else v * 0.5) for k, v in cond.items()}
                if key == "adm":
                    scaled = {"c_crossattn": [LABELS + 1]}
                assert (apply_model(model, X, T, scaled, key) - out).abs().max() > 1e-4, key
