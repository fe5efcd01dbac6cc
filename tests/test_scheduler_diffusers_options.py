"""diffusers' scheduler options on the ldm_compat schedulers, tested from the diffusers user's side: a stock
``DDPMScheduler``/``DDIMScheduler`` config goes through ``from_config``, and ``step``/``add_noise`` are compared with
the stock class built from the same config.

Two references per case:

- diffusers' own ``step`` code run in float64 on our schedule (its ``alphas_cumprod`` replaced by ours in float64):
  the same semantics without float32 rounding, so ours must agree to float32 rounding (``TIGHT``);
- the plain float32 stock scheduler with the same generator: this also checks that the noise is drawn alike. Its own
  float32 arithmetic is the larger error (bounds below).
"""

import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from ldm_compat import LDMDDIMScheduler, LDMDDPMScheduler
from ldm_compat.schedulers import make_beta_schedule, rescale_zero_terminal_snr

# float32 rounding of a ~10-operation step on values |x| ≲ 5 (ulp(4) = 4.8e-7)
TIGHT = 2e-6
EPS32 = float(np.finfo(np.float32).eps)
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def quiet(factory, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these configs may warn
        return factory(*args, **kwargs)


def float64_stock(stock, alphas_cumprod: torch.Tensor, final=None):
    """The stock scheduler's own step code, run in float64 on the given schedule."""
    stock.alphas_cumprod = alphas_cumprod.double()
    stock.one = torch.tensor(1.0, dtype=torch.float64)
    if final is not None:
        stock.final_alpha_cumprod = torch.tensor(final, dtype=torch.float64)
    return stock


def inputs(prediction_type: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 6, 6, generator=g)
    out = torch.randn(2, 3, 6, 6, generator=g)
    # x0 outputs beyond [-1, 1] so that clipping and thresholding act
    return x, out * 2.5 if prediction_type == "sample" else out


# ---------------------------------------------------------------------------- DDPM: variance_type, thresholding, SNR
DDPM_CASES = [
    *[dict(variance_type=v, prediction_type=p, clip_sample=p == "sample")
      for v in ("fixed_small", "fixed_small_log", "fixed_large") for p in ("epsilon", "sample", "v_prediction")],
    dict(variance_type="fixed_large", prediction_type="sample", thresholding=True, dynamic_thresholding_ratio=0.9,
         sample_max_value=2.0),
    dict(variance_type="fixed_small", prediction_type="v_prediction", rescale_betas_zero_snr=True, **SD_BETAS),
    dict(variance_type="fixed_large", prediction_type="sample", rescale_betas_zero_snr=True, clip_sample=False),
]  # fmt: skip
DDPM_STRIDED = [
    (None, "leading"),
    (10, "leading"),
    (10, "linspace"),
    (10, "trailing"),  # last step from t = 4 to "t = -1": fixed_large adds noise √(1-ᾱ_4)·z there, as diffusers
]


@pytest.mark.parametrize("steps, spacing", DDPM_STRIDED)
@pytest.mark.parametrize("options", DDPM_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_ddpm_from_stock_config_steps_like_stock(options, steps, spacing):
    stock_config = DDPMScheduler(num_train_timesteps=50, timestep_spacing=spacing, **options).config
    ours = quiet(LDMDDPMScheduler.from_config, stock_config)
    for key, value in options.items():  # the config says what the scheduler does
        assert ours.config[key] == value, key
    stock = DDPMScheduler.from_config(stock_config)
    exact = float64_stock(DDPMScheduler.from_config(stock_config), torch.from_numpy(ours._alphas_cumprod64))
    for scheduler in (ours, stock, exact):
        scheduler.set_timesteps(steps or 50)
    assert ours.timesteps.tolist() == stock.timesteps.tolist()
    x, out = inputs(options["prediction_type"])
    timesteps = ours.timesteps.tolist()
    for i, t in enumerate(timesteps):
        # the float64 reference draws float64 noise: give ours the same numbers
        z = randn_tensor(x.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        a = ours.step(out, t, x, variance_noise=z.float())
        b = exact.step(out.double(), torch.tensor(t), x.double(), generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(a.pred_original_sample.double(), b.pred_original_sample, rtol=0, atol=TIGHT)
        torch.testing.assert_close(a.prev_sample.double(), b.prev_sample, rtol=0, atol=TIGHT)

        c = ours.step(out, t, x, generator=torch.Generator().manual_seed(t))
        d = stock.step(out, torch.tensor(t), x, generator=torch.Generator().manual_seed(t))
        # the stock re-derives β = 1 - ᾱ_t/ᾱ_prev in float32 from its float32 cumprod: an absolute error of a few ε
        # (the cumprod's last factor, the division, the subtraction) that every coefficient (∝ β, or √β for the
        # noise) carries relative to β; a different variance or noise draw moves the sample by ~√β·|Δz|, above
        # this bound wherever β > 4e-4
        s = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        a_t, a_s = ours._alphas_cumprod64[t], (ours._alphas_cumprod64[s] if s >= 0 else 1.0)
        beta = 1.0 - a_t / a_s
        magnitude = max(c.pred_original_sample.abs().max().item(), x.abs().max().item(), 4.0)
        bound = TIGHT + 16 * EPS32 * magnitude / beta
        assert (c.prev_sample - d.prev_sample).abs().max().item() <= bound, (t, bound)


def test_ddpm_variance_type_is_kept_and_used():
    """The issue: from_config(stock fixed_large) sampled with the small variance and rewrote the config."""
    config = DDPMScheduler(num_train_timesteps=50, variance_type="fixed_large").config
    large = LDMDDPMScheduler.from_config(config)
    small = LDMDDPMScheduler.from_config(config, variance_type="fixed_small")
    assert large.config.variance_type == "fixed_large" and large.config.v_posterior == 1.0
    assert small.config.variance_type == "fixed_small" and small.config.v_posterior == 0.0
    x, out = inputs("epsilon")
    z = torch.randn(x.shape)
    mean = large.step(out, 30, x, variance_noise=torch.zeros_like(x)).prev_sample
    ratio = (large.step(out, 30, x, variance_noise=z).prev_sample - mean) / (
        small.step(out, 30, x, variance_noise=z).prev_sample - mean
    )
    a = np.cumprod(1 - make_beta_schedule("sqrt_linear", 50))  # diffusers "linear" is LDM "sqrt_linear"
    beta, beta_tilde = 1 - a[30] / a[29], (1 - a[29]) / (1 - a[30]) * (1 - a[30] / a[29])
    torch.testing.assert_close(ratio, torch.full_like(ratio, math.sqrt(beta / beta_tilde)), rtol=1e-4, atol=0)


def test_ddpm_no_noise_at_t0_for_every_variance_type():
    """diffusers adds noise only for t > 0 (for fixed_large too); the original's nonzero_mask does the same."""
    x, out = inputs("epsilon")
    for variance_type in ("fixed_small", "fixed_small_log", "fixed_large"):
        scheduler = LDMDDPMScheduler(num_train_timesteps=20, variance_type=variance_type)
        noisy = scheduler.step(out, 0, x, generator=torch.Generator().manual_seed(1)).prev_sample
        assert torch.equal(noisy, scheduler.step(out, 0, x, variance_noise=torch.zeros_like(x)).prev_sample)


def test_fixed_large_is_the_original_v_posterior_one():
    fixed_large = LDMDDPMScheduler(num_train_timesteps=30, variance_type="fixed_large")
    original = LDMDDPMScheduler.from_ldm_config({"timesteps": 30, "v_posterior": 1.0})
    assert fixed_large.schedule_mismatches(original.ldm_buffers()) == []
    assert fixed_large.to_ldm_config()["v_posterior"] == 1.0
    assert original.config.variance_type == "fixed_large"
    assert LDMDDPMScheduler.from_ldm_config({"v_posterior": 0.3}).config.variance_type is None  # no diffusers name
    x, out = inputs("epsilon")
    z = torch.randn(x.shape)
    assert torch.equal(fixed_large.step(out, 17, x, variance_noise=z).prev_sample,
                       original.step(out, 17, x, variance_noise=z).prev_sample)  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"variance_type": "learned"}, "variance_type='learned' is not supported"),
        ({"variance_type": "learned_range"}, "variance_type='learned_range' is not supported"),
        ({"variance_type": "fixed_large_log"}, "variance_type='fixed_large_log' is not supported"),
        ({"variance_type": "fixed_small", "v_posterior": 0.5}, "contradicts v_posterior=0.5"),
        ({"variance_type": "fixed_large", "v_posterior": 0.5}, "contradicts v_posterior=0.5"),
        ({"dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio=1.5"),
        ({"sample_max_value": 0.5}, "sample_max_value=0.5"),
        ({"num_train_timesteps": 1, "rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ],
)
def test_ddpm_refused_options_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        LDMDDPMScheduler.from_config(DDPMScheduler().config, **kwargs)
    assert "\n" not in str(info.value)


def test_thresholding_acts_and_replaces_clipping():
    config = DDPMScheduler(num_train_timesteps=50, prediction_type="sample", thresholding=True,
                           dynamic_thresholding_ratio=0.9, sample_max_value=2.0).config  # fmt: skip
    thresholded = LDMDDPMScheduler.from_config(config)
    assert thresholded.config.thresholding is True
    x, out = inputs("sample")
    x0 = thresholded.step(out, 20, x, variance_noise=torch.zeros_like(x)).pred_original_sample
    # independent: per sample, s = the 0.9 quantile of |x0| clamped to [1, 2]; x0 clamped to ±s, divided by s
    flat = out.reshape(2, -1).double()
    s = np.clip(np.quantile(flat.abs().numpy(), 0.9, axis=1), 1, 2)[:, None]
    expected = torch.from_numpy(np.clip(flat.numpy(), -s, s) / s).reshape(out.shape)
    assert (s > 1).all()  # the threshold acts (else this is plain clipping)
    torch.testing.assert_close(x0.double(), expected, rtol=0, atol=1e-6)
    clipped = LDMDDPMScheduler.from_config(config, thresholding=False)
    assert not torch.equal(x0, clipped.step(out, 20, x, variance_noise=torch.zeros_like(x)).pred_original_sample)


def test_zero_snr_schedule_and_add_noise():
    config = DDPMScheduler(num_train_timesteps=50, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                           **SD_BETAS).config  # fmt: skip
    ours, stock = LDMDDPMScheduler.from_config(config), DDPMScheduler.from_config(config)
    assert ours.config.rescale_betas_zero_snr is True
    assert ours.alphas_cumprod[-1].item() == 0.0 and ours.betas[-1].item() == 1.0
    # diffusers rescales in float32: its ᾱ is within a few float32 ulps of 1 of the float64 rescale
    assert (ours.alphas_cumprod - stock.alphas_cumprod).abs().max().item() <= 16 * EPS32
    base = make_beta_schedule("linear", 50, 0.00085, 0.012)  # LDM "linear" = diffusers "scaled_linear"
    assert torch.equal(ours.betas, torch.tensor(rescale_zero_terminal_snr(base), dtype=torch.float32))
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 25, 49])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), stock.add_noise(x0, noise, t), rtol=0, atol=TIGHT)
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), stock.get_velocity(x0, noise, t), rtol=0, atol=TIGHT)
    assert torch.equal(ours.add_noise(x0, noise, 49), noise)  # pure noise at the last step


def test_stock_defaults_keep_their_meaning():
    """A stock config that left beta_schedule at its default means diffusers "linear", not our "scaled_linear"."""
    stock = DDPMScheduler(variance_type="fixed_large")
    ours = LDMDDPMScheduler.from_config(stock.config)
    assert ours.config.beta_schedule == "linear" and ours.config.clip_sample is True
    assert (ours.alphas_cumprod - stock.alphas_cumprod).abs().max().item() <= 5e-7
    ddim = LDMDDIMScheduler.from_config(DDIMScheduler(clip_sample=False).config)
    assert ddim.config.beta_schedule == "linear" and ddim.config.set_alpha_to_one is True
    assert ddim.config.steps_offset == 0


# ---------------------------------------------------------------------------- DDIM
DDIM_CASES = [
    (10, 0.5, dict()),
    (10, 0.5, dict(set_alpha_to_one=False, steps_offset=1)),  # the original DDIMSampler's settings
    (10, 0.0, dict(timestep_spacing="trailing")),
    (7, 0.5, dict(timestep_spacing="trailing", prediction_type="v_prediction", rescale_betas_zero_snr=True)),
    (7, 1.0, dict(timestep_spacing="linspace", prediction_type="sample", thresholding=True,
                  dynamic_thresholding_ratio=0.9, sample_max_value=2.0)),
    (10, 1.0, dict(prediction_type="v_prediction", steps_offset=2, set_alpha_to_one=False)),
]  # fmt: skip


@pytest.mark.parametrize("steps, eta, options", DDIM_CASES, ids=lambda o: str(o))
def test_ddim_from_stock_config_steps_like_stock(steps, eta, options):
    stock_config = DDIMScheduler(num_train_timesteps=50, clip_sample=False, **SD_BETAS, **options).config
    ours = quiet(LDMDDIMScheduler.from_config, stock_config)
    stock = DDIMScheduler.from_config(stock_config)
    final = 1.0 if stock_config["set_alpha_to_one"] else float(ours.alphas_cumprod[0])
    exact = float64_stock(DDIMScheduler.from_config(stock_config), ours.alphas_cumprod, final)
    for scheduler in (ours, stock, exact):
        scheduler.set_timesteps(steps)
    assert ours.timesteps.tolist() == stock.timesteps.tolist()
    x, out = inputs(options.get("prediction_type", "epsilon"))
    for t in ours.timesteps.tolist():
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        a = ours.step(out, t, x, eta=eta, variance_noise=z)
        b = exact.step(out.double(), t, x.double(), eta=eta, variance_noise=z.double())
        torch.testing.assert_close(a.pred_original_sample.double(), b.pred_original_sample, rtol=0, atol=TIGHT)
        torch.testing.assert_close(a.prev_sample.double(), b.prev_sample, rtol=0, atol=TIGHT)
        if eta > 0:  # the stock draws noise only then
            c = ours.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(t))
            d = stock.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(t))
            # the stock's float32 cumprod and steps drift ≲ 1e-5 on this 50-step schedule; a different draw would
            # move the sample by σ·|Δz| ≳ 1e-2
            torch.testing.assert_close(c.prev_sample, d.prev_sample, rtol=0, atol=1e-4)


def test_ddim_defaults_are_the_original_sampler():
    """Without the new keys (an LDMDDPMScheduler config) the grid and last step are the original's."""
    ddim = LDMDDIMScheduler.from_config(LDMDDPMScheduler(num_train_timesteps=100).config)
    assert ddim.config.steps_offset == 1 and ddim.config.set_alpha_to_one is False
    assert ddim.config.timestep_spacing == "leading"
    ddim.set_timesteps(10)
    assert ddim.timesteps.tolist() == list(range(91, 0, -10))
    assert ddim._step_params["a_prev"][-1].item() == ddim.alphas_cumprod[0].item()
    with pytest.raises(ValueError, match="'quad' grid is the original's own"):
        LDMDDIMScheduler(ddim_discretize="quad", timestep_spacing="trailing")


# ---------------------------------------------------------------------------- item 2: config round trips
ROUND_TRIPS = [
    lambda: LDMDDPMScheduler(),
    lambda: LDMDDPMScheduler.from_ldm_config({"timesteps": 40, "beta_schedule": "sqrt", "v_posterior": 0.3}),
    lambda: LDMDDPMScheduler.from_config(DDPMScheduler(variance_type="fixed_large", thresholding=True).config),
    lambda: LDMDDPMScheduler(num_train_timesteps=30, rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    lambda: LDMDDIMScheduler.from_config(LDMDDPMScheduler.from_ldm_config({"timesteps": 60, "v_posterior": 1}).config),
    lambda: LDMDDPMScheduler.from_config(LDMDDIMScheduler(num_train_timesteps=40, steps_offset=2).config),
    lambda: LDMDDIMScheduler.from_config(DDIMScheduler(clip_sample=False, timestep_spacing="trailing").config),
]


@pytest.mark.parametrize("make", ROUND_TRIPS)
def test_config_round_trips_bit_exactly(make):
    scheduler = make()
    cls = type(scheduler)
    for again in (cls(**scheduler.config), cls.from_config(scheduler.config)):
        assert dict(again.config) == dict(scheduler.config)
        buffers = again.ldm_buffers()
        assert all(torch.equal(v, buffers[k]) for k, v in scheduler.ldm_buffers().items())
        x, out = inputs("epsilon")
        z = torch.randn(x.shape)
        for s in (scheduler, again):
            s.set_timesteps(10)
        t = int(scheduler.timesteps[3])
        assert torch.equal(scheduler.step(out, t, x, variance_noise=z).prev_sample,
                           again.step(out, t, x, variance_noise=z).prev_sample)  # fmt: skip


def test_unknown_keyword_is_still_a_type_error():
    with pytest.raises(TypeError, match="no_such_option"):
        LDMDDPMScheduler(no_such_option=1)


# ---------------------------------------------------------------------------- item 3: one warning for what is ignored
def test_ddim_from_stock_config_warns_once_naming_ignored_options():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ddim = LDMDDIMScheduler.from_config(DDIMScheduler().config)  # clip_sample=True by default
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages
    assert "clip_sample=True" in messages[0]
    # implemented, so not ignored: they are in the config and act
    assert "set_alpha_to_one" not in messages[0] and "steps_offset" not in messages[0]
    assert ddim.config.set_alpha_to_one is True and ddim.config.steps_offset == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LDMDDIMScheduler(clip_sample=True, set_alpha_to_one=True)  # direct construction warns the same way
    assert len(caught) == 1 and "clip_sample=True" in str(caught[0].message)


@pytest.mark.parametrize(
    "make",
    [
        lambda: LDMDDIMScheduler.from_config(DDIMScheduler(clip_sample=False, steps_offset=1).config),
        lambda: LDMDDIMScheduler.from_config(DDIMScheduler(thresholding=True).config),  # thresholding replaces clip
        lambda: LDMDDIMScheduler.from_config(LDMDDPMScheduler(clip_sample=True).config),  # clip_denoised: not DDIM's
        lambda: LDMDDIMScheduler.from_ldm_config({"clip_denoised": True}),
        lambda: LDMDDPMScheduler.from_config(LDMDDIMScheduler().config),  # steps_offset=1 belongs to the DDIM
        lambda: LDMDDPMScheduler.from_config(DDPMScheduler().config),
    ],
)
def test_values_equal_to_what_the_scheduler_does_do_not_warn(make):
    quiet(make)


def test_ddpm_steps_offset_is_named_when_ignored():
    with pytest.warns(UserWarning, match="steps_offset=1") as caught:
        LDMDDPMScheduler.from_config(DDPMScheduler(steps_offset=1).config)
    assert len(caught) == 1


# ---------------------------------------------------------------------------- zero SNR → original checkpoint
# CompVis DDPM.__init__'s arguments (ldm/models/diffusion/ddpm.py); stablediffusion's adds more and allows "v"
ORIGINAL_DDPM_ARGS = {
    "unet_config", "timesteps", "beta_schedule", "loss_type", "ckpt_path", "ignore_keys", "load_only_unet", "monitor",
    "use_ema", "first_stage_key", "image_size", "channels", "log_every_t", "clip_denoised", "linear_start",
    "linear_end", "cosine_s", "given_betas", "original_elbo_weight", "v_posterior", "l_simple_weight",
    "conditioning_key", "parameterization", "scheduler_config", "use_positional_encodings", "learn_logvar",
    "logvar_init",
}  # fmt: skip
TINY_UNET = {"image_size": 8, "in_channels": 1, "out_channels": 1, "model_channels": 32, "num_res_blocks": 1,
             "attention_resolutions": [], "channel_mult": [1], "num_heads": 1}  # fmt: skip


@pytest.mark.parametrize("parameterization", ["x0", "v"])
def test_zero_snr_model_exports_to_an_original_checkpoint_with_its_betas(tmp_path, parameterization):
    from helpers.original_unet_layout import original_unet_layout
    from omegaconf import OmegaConf

    from ldm_compat import LDMCompatPipeline, LDMUNetModel
    from ldm_compat.convert.export import diffusers_to_original
    from ldm_compat.convert.to_diffusers import original_to_diffusers
    from ldm_compat.schedulers import LDM_BUFFER_NAMES, ldm_schedule_buffers

    params = {"timesteps": 20, "linear_start": 0.00085, "linear_end": 0.012, "parameterization": parameterization}
    trained = LDMDDPMScheduler.from_ldm_config(params, rescale_betas_zero_snr=True)
    LDMCompatPipeline(unet=LDMUNetModel(**TINY_UNET), scheduler=trained).save_pretrained(tmp_path / "model")
    ckpt = diffusers_to_original(tmp_path / "model", tmp_path / "model.ckpt", config_output=tmp_path / "model.yaml")
    checkpoint = torch.load(ckpt, weights_only=True)
    state_dict = checkpoint.get("state_dict", checkpoint)

    # the original: instantiate_from_config(OmegaConf.load(yaml).model) → DDPM(**params) → register_schedule
    yaml_params = OmegaConf.to_container(OmegaConf.load(tmp_path / "model.yaml").model.params)
    assert set(yaml_params) <= ORIGINAL_DDPM_ARGS
    # `1. - given_betas` raises TypeError for a YAML list in the original: the schedule is written as its formula
    assert "given_betas" not in yaml_params and yaml_params["use_ema"] is False
    yaml_betas = make_beta_schedule(yaml_params["beta_schedule"], yaml_params["timesteps"], yaml_params["linear_start"],
                                    yaml_params["linear_end"], yaml_params["cosine_s"])  # fmt: skip
    built = ldm_schedule_buffers(yaml_betas, yaml_params["v_posterior"])
    built.update({"model.diffusion_model." + k: torch.empty(s) for k, s in original_unet_layout(TINY_UNET).items()})
    # load_state_dict(strict=True): the same keys with the same shapes (no EMA, no logvar)
    assert set(state_dict) == set(built)
    assert all(state_dict[k].shape == built[k].shape for k in built)
    # the loaded buffers are the trained (rescaled) schedule, which the YAML alone would not give
    loaded = {name: state_dict[name] for name in LDM_BUFFER_NAMES}
    assert torch.equal(loaded["betas"], trained.betas) and not torch.equal(built["betas"], trained.betas)
    # ... and they are what the original's register_schedule computes for the rescaled betas: ᾱ[-1] = 0 gives inf
    # in sqrt_recip(m1)_alphas_cumprod (numpy divides by zero without raising)
    original_of_rescaled = ldm_schedule_buffers(rescale_zero_terminal_snr(yaml_betas), yaml_params["v_posterior"])
    assert all(torch.equal(loaded[name], original_of_rescaled[name]) for name in LDM_BUFFER_NAMES)
    assert loaded["alphas_cumprod"][-1] == 0 and torch.isinf(loaded["sqrt_recip_alphas_cumprod"][-1])
    assert "zero terminal SNR" in (tmp_path / "model.yaml").read_text()

    # and back: conversion recognises the rescaled schedule from the YAML and the buffers
    back = original_to_diffusers(ckpt, tmp_path / "model.yaml", tmp_path / "back")
    again = LDMDDPMScheduler.from_pretrained(back, subfolder="scheduler")
    assert again.config.rescale_betas_zero_snr is True and again.schedule_mismatches(loaded) == []
    again_ckpt = torch.load(diffusers_to_original(back, tmp_path / "again.ckpt"), weights_only=True)
    again_sd = again_ckpt.get("state_dict", again_ckpt)
    assert list(again_sd) == list(state_dict) and all(torch.equal(again_sd[k], state_dict[k]) for k in state_dict)
