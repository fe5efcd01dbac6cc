"""LDMPLMSScheduler against the original PLMSSampler (``fixtures/ldm_plms`` traces of the original code)."""

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from schedule_traces import max_abs, trace_atol

from ldm_compat import LDMDDIMScheduler, LDMDDPMScheduler, LDMPLMSScheduler
from ldm_compat.pipelines.guidance import combine_guidance, guidance_batch, guided_model_output

TRACES = Path(__file__).parent / "fixtures" / "ldm_plms"
META = json.loads((TRACES / "plms.json").read_text())
SCHEDULE_KEYS = ("beta_schedule", "timesteps", "linear_start", "linear_end", "cosine_s")


@cache
def trace_tensors():
    return load_file(TRACES / "plms.safetensors")


def synthetic_model(x, t):
    """The stand-in denoiser of the traces (fixtures/ldm_plms/generate.py); computes in the dtype of ``x``."""
    return torch.tanh(x * 0.9) * 0.8 + (t.to(x.dtype) / 100.0).reshape(-1, 1, 1, 1) * 0.05


def guided_model(x, t, c):
    return synthetic_model(x, t) + 0.3 * torch.sin(c * 1.7)


def snap(x):
    return torch.round(x * 4) / 4, None, None


def plms_scheduler(trace, **overrides):
    params = {k: trace[k] for k in SCHEDULE_KEYS if k in trace}
    ddpm = LDMDDPMScheduler.from_ldm_config({**params, "parameterization": trace["parameterization"]})
    return LDMPLMSScheduler.from_config(ddpm.config, ddim_discretize=trace["discretize"], **overrides)


def replay(name, scheduler, *, use_noise=True, dtype=torch.float32):
    """The original plms_sampling loop as a diffusers loop, computed in ``dtype``; returns (sample, x_inter,
    pred_x0)."""
    trace = META["cases"][name]
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in trace_tensors().items()}
    options = trace["options"]
    x = tensors[f"{name}.x_T"]
    step_kwargs = {k: options[k] for k in ("temperature", "noise_dropout", "dynamic_threshold") if k in options}
    if options.get("quantize"):
        step_kwargs["quantize_denoised"] = snap
    keep = set(scheduler.intermediate_steps(trace["log_every_t"]))
    x_inter, pred_x0, blends = [x], [x], 0
    for k, t in enumerate(scheduler.timesteps):
        t_batch = torch.full((x.shape[0],), int(t))
        if options.get("mask") and scheduler.starts_original_step:
            # plms_sampling's mask/x0 blending, before each original step (not before the first step's 2nd call)
            x_orig = scheduler.add_noise(tensors[f"{name}.x0"], tensors[f"{name}.q_noise"][blends], t_batch)
            mask = tensors[f"{name}.mask"]
            x = x_orig * mask + (1.0 - mask) * x
            blends += 1
        if options.get("guidance"):
            cond, uncond = tensors[f"{name}.cond"], tensors[f"{name}.uncond"]
            out = guided_model_output(guided_model, x, t_batch, cond, uncond, META["guidance_scale"])
        else:
            out = synthetic_model(x, t_batch)
        noise = tensors[f"{name}.noise"][k] if use_noise else None
        result = scheduler.step(out, t, x, variance_noise=noise, **step_kwargs)
        x = result.prev_sample
        if k in keep:
            x_inter.append(x)
            pred_x0.append(result.pred_original_sample)
    return x, torch.stack(x_inter), torch.stack(pred_x0)


@pytest.mark.parametrize("name", sorted(META["cases"]))
def test_matches_original_plms_sampler(name):
    trace, tensors = META["cases"][name], trace_tensors()
    # the original PLMSSampler uses x0 and v outputs as eps: the traces of such models show that bug
    scheduler = plms_scheduler(trace, ldm_bug_compat=trace["parameterization"] != "eps")
    scheduler.set_timesteps(trace["steps"])
    grid = tensors[f"{name}.timesteps"].flip(0).tolist()
    # every UNet evaluation: the grid with its second point twice (the first step's two evaluations)
    assert scheduler.timesteps.tolist() == [grid[0], grid[min(1, len(grid) - 1)], *grid[1:]]
    assert len(tensors[f"{name}.noise"]) == len(scheduler.timesteps)  # the original draws once per evaluation
    # traces stored on another machine: a float32 tolerance scaled to the chain's values (schedule_traces.trace_atol);
    # in float64 the chain is free of float32 rounding and the traces lie within the same tolerance of it. The
    # quantize_x0 chain's x̂0 stays ≥ 5.9e-4 from a rounding boundary of its 0.25 grid, so no snap can flip.
    keys = ("sample", "x_inter", "pred_x0")
    expected = [tensors[f"{name}.{key}"] for key in keys]
    atol = trace_atol(len(tensors[f"{name}.noise"]), *expected)  # one noise draw per model evaluation
    for dtype in (torch.float32, torch.float64):
        scheduler.set_timesteps(trace["steps"])  # a fresh chain (the multistep history restarts)
        for key, got, want in zip(keys, replay(name, scheduler, dtype=dtype), expected):
            assert got.shape == want.shape and max_abs(got, want) <= atol, (dtype, key)


@pytest.mark.parametrize("name", [n for n, c in sorted(META["cases"].items()) if not c["options"].get("mask")])
def test_consumes_the_global_rng_like_the_original(name):
    """Without variance_noise, step() draws what the original's noise_like (and noise_dropout) drew."""
    trace, tensors = META["cases"][name], trace_tensors()
    scheduler = plms_scheduler(trace, ldm_bug_compat=trace["parameterization"] != "eps")
    scheduler.set_timesteps(trace["steps"])
    torch.manual_seed(trace["rng_seed"])
    sample, _, _ = replay(name, scheduler, use_noise=False)
    assert torch.equal(torch.randn(4), tensors[f"{name}.rng_after"])
    # σ = 0: the noise adds nothing
    assert max_abs(sample, tensors[f"{name}.sample"]) <= trace_atol(
        len(tensors[f"{name}.noise"]), tensors[f"{name}.sample"]
    )


def test_the_traces_cover_every_multistep_order():
    steps = {c["steps"] for c in META["cases"].values()}
    assert {1, 2, 3} <= steps and max(steps) >= 5  # Heun start only, + AB2, + AB3, and AB4 chains
    assert any(c["discretize"] == "quad" for c in META["cases"].values())


def chain(scheduler, model, x):
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, torch.full((x.shape[0],), int(t))), t, x).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_v_and_x0_models_are_sampled_correctly_by_default(prediction_type):
    """A v (x0) model describing the same noise as an eps model gives the eps model's chain; the original (and
    ``ldm_bug_compat``) does not."""
    config = LDMDDPMScheduler(num_train_timesteps=200, prediction_type=prediction_type).config
    ours = LDMPLMSScheduler.from_config(config)
    eps_twin = LDMPLMSScheduler.from_config(config, prediction_type="epsilon")
    bug = LDMPLMSScheduler.from_config(config, ldm_bug_compat=True)
    buffers = {k: v.double() for k, v in ours.ldm_buffers().items()}  # the coefficients the conversion uses

    def eps_model(x, t):
        return synthetic_model(x, t)

    def other_model(x, t):
        e = eps_model(x, t)
        sqrt_a = buffers["sqrt_alphas_cumprod"][t].reshape(-1, 1, 1, 1)
        sqrt_1ma = buffers["sqrt_one_minus_alphas_cumprod"][t].reshape(-1, 1, 1, 1)
        x0 = (x - sqrt_1ma * e) / sqrt_a
        return sqrt_a * e - sqrt_1ma * x0 if prediction_type == "v_prediction" else x0

    x_T = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    results = []
    for scheduler, model in ((ours, other_model), (eps_twin, eps_model), (bug, other_model)):
        scheduler.set_timesteps(8)
        results.append(chain(scheduler, model, x_T))
    # float64 chains; v → ε uses float32-rounded √ᾱ and √(1-ᾱ), whose squares sum to 1 only within ~1e-7
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)
    assert (results[2] - results[1]).abs().max() > 1e-2


def test_a_second_chain_restarts_with_set_timesteps():
    scheduler = LDMPLMSScheduler(num_train_timesteps=100)
    x = torch.randn(1, 2, 4, 4)
    scheduler.set_timesteps(5)
    first = chain(scheduler, synthetic_model, x)
    with pytest.raises(ValueError, match="all 6 timesteps are done"):
        scheduler.step(x, scheduler.timesteps[-1], x)
    scheduler.set_timesteps(5)
    assert torch.equal(chain(scheduler, synthetic_model, x), first)


def test_step_errors():
    scheduler = LDMPLMSScheduler(num_train_timesteps=100)
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="call set_timesteps first"):
        scheduler.step(x, 91, x)
    with pytest.raises(ValueError, match="runs only on a DDIM grid"):
        scheduler.set_timesteps(None)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="eta=0.5: PLMS needs eta=0"):
        scheduler.step(x, 91, x, eta=0.5)
    with pytest.raises(ValueError, match="call 0 expects t=91"):
        scheduler.step(x, 81, x)
    with pytest.raises(ValueError, match="quantize_denoised: pass the first stage's quantizer"):
        scheduler.step(x, 91, x, quantize_denoised=True)
    with pytest.raises(ValueError, match="model_output: expected the sample's shape"):
        scheduler.step(x[:1], 91, x)
    scheduler.step(x, 91, x)
    assert not scheduler.starts_original_step  # the first step's second evaluation comes next
    with pytest.raises(ValueError, match="call 1 expects t=81"):
        scheduler.step(x, 91, x)


def test_config_is_the_ddim_schedulers_and_travels(tmp_path, caplog):
    ddpm = LDMDDPMScheduler.from_ldm_config({"timesteps": 60, "beta_schedule": "cosine", "parameterization": "v"})
    with caplog.at_level("WARNING"):
        plms = LDMPLMSScheduler.from_config(ddpm.config)
        ddim = LDMDDIMScheduler.from_config(plms.config)
    assert "not expected" not in caplog.text
    assert torch.equal(plms.alphas_cumprod, ddpm.alphas_cumprod) and plms.config.prediction_type == "v_prediction"
    assert {k: v for k, v in plms.config.items() if k != "_class_name"} == {
        k: v for k, v in ddim.config.items() if k != "_class_name"
    }
    plms.save_pretrained(tmp_path)
    loaded = LDMPLMSScheduler.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_class_name"] == "LDMPLMSScheduler"
    assert dict(loaded.config) == dict(plms.config)
    assert LDMDDPMScheduler in plms.compatibles and LDMDDIMScheduler in plms.compatibles


def test_timesteps_and_step_in_a_stock_style_loop():
    """diffusers pipelines pass eta and generator when step() takes them, and count len(timesteps) evaluations."""
    import inspect

    scheduler = LDMPLMSScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(10)
    assert scheduler.num_inference_steps == 10 and len(scheduler.timesteps) == 11
    assert scheduler.timesteps[:3].tolist() == [901, 801, 801]
    assert {"eta", "generator"} <= set(inspect.signature(scheduler.step).parameters)
    assert scheduler.intermediate_steps(4) == [1, 2, 6, 10]  # original steps 0, 1, 5, 9 end at these calls


def test_half_precision_samples_are_computed_in_float32():
    scheduler = LDMPLMSScheduler(num_train_timesteps=100)
    x = torch.randn(1, 2, 4, 4)
    scheduler.set_timesteps(4)
    full = chain(scheduler, synthetic_model, x)
    scheduler.set_timesteps(4)
    half = chain(scheduler, lambda s, t: synthetic_model(s.float(), t).half(), x.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), full, rtol=0, atol=1e-2)


# ---------------------------------------------------------------------------------------------------- guidance
def test_guidance_runs_one_call_on_uc_then_c():
    calls = []

    def model(x, t, c):
        calls.append((x.clone(), t.clone(), c))
        return x * 0 + c  # the output shows which conditioning each half saw

    x, t = torch.randn(2, 1, 2, 2), torch.tensor([5, 5])
    cond, uncond = torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), -1.0)
    out = guided_model_output(model, x, t, cond, uncond, 3.0)
    assert len(calls) == 1
    assert torch.equal(calls[0][0], torch.cat([x, x])) and calls[0][1].tolist() == [5, 5, 5, 5]
    assert torch.equal(calls[0][2], torch.cat([uncond, cond]))  # the original's order: [uc, c]
    assert torch.equal(out, torch.full_like(x, -1.0 + 3.0 * (2.0 - -1.0)))
    calls.clear()
    assert torch.equal(guided_model_output(model, x, t, cond, uncond, 1.0), cond)  # scale 1: c alone, as the original
    assert len(calls) == 1 and calls[0][0].shape[0] == 2


def test_guidance_combination_order():
    u, c = torch.randn(1000), torch.randn(1000)
    assert torch.equal(combine_guidance(u, c, 7.5), u + 7.5 * (c - u))
    # another algebraically equal form rounds differently somewhere: the order is not a matter of taste
    assert not torch.equal(combine_guidance(u, c, 7.5), (1 - 7.5) * u + 7.5 * c)


def test_guidance_batch_structures_and_errors():
    x, t = torch.zeros(2, 1), torch.tensor([1, 1])
    a, b = torch.ones(2, 3), torch.zeros(2, 3)
    _, _, c_in = guidance_batch(x, t, {"c_crossattn": [a], "c_concat": [a]}, {"c_crossattn": [b], "c_concat": [b]})
    assert torch.equal(c_in["c_crossattn"][0], torch.cat([b, a]))
    assert torch.equal(c_in["c_concat"][0], torch.cat([b, a]))
    with pytest.raises(ValueError, match="needs an unconditional conditioning"):
        guided_model_output(lambda *args: args[0], x, t, a, None, 3.0)
    with pytest.raises(ValueError, match=r"uncond\[0\]: shape \(1, 3\) differs"):
        guidance_batch(x, t, [a], [b[:1]])
    with pytest.raises(ValueError, match="expected a dict with the keys"):
        guidance_batch(x, t, {"c_crossattn": [a]}, {"c_concat": [b]})
    with pytest.raises(ValueError, match="expected a list of 1 entries"):
        guidance_batch(x, t, [a], b)
