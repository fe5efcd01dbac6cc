"""``LDMCompatPipeline`` on the converted latent fixtures (``fixtures/ldm_reference_latent``), end to end: the
fixture checkpoint converted with its YAML, then sampled from its prompts / class labels with guidance 3.0 —
DDIM (eta 0; eta 1 replaying the original's noise; EMA weights) and PLMS reproduce the original's final latents and
decoded images. The SD-style folders load as a stock ``StableDiffusionPipeline`` with only diffusers imported and give
the same images; bad inputs are refused before any UNet call.

Tolerances: latents ``max(1e-4, 3e-6 · max|ref|)``, the measured cross-machine bound of ``test_latent_chains.py``;
decoded images 1e-4 (measured here: ≤ 4.3e-6 end to end, the fixture's own samples decode bit for bit).
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from helpers.plain_diffusers import run_fresh
from reference_cases import LATENT_CASES, LATENT_FIXTURES, load_latent_case
from test_latent_chains import ATOL, CHAINS, RUNS, SCALE_RTOL

from ldm_compat import LDMCompatPipeline, LDMDDIMScheduler, LDMPLMSScheduler
from ldm_compat.convert.to_diffusers import original_to_diffusers

DECODED_ATOL = 1e-4
SD_CASES = ["sd1_kl_clip_eps", "sd2_kl_openclip_v"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each case converted twice: default (unet/ = EMA weights) and --no-ema (the training weights the chains used)."""
    root = tmp_path_factory.mktemp("latent_pipe")
    out = {}
    for name in LATENT_CASES:
        ckpt, yaml = LATENT_FIXTURES / f"{name}.ckpt", LATENT_FIXTURES / f"{name}.yaml"
        out[name, "ema"] = original_to_diffusers(ckpt, yaml, root / f"{name}_ema")
        out[name, "training"] = original_to_diffusers(ckpt, yaml, root / f"{name}_training", use_ema=False)
    return out


def load(folder) -> LDMCompatPipeline:
    pipe = LDMCompatPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def conditioning(case) -> dict:
    """What the fixture conditioned on: its prompts, or its class labels (the ClassEmbedder's batch)."""
    if case.meta["prompts"]:
        return {"prompt": case.meta["prompts"]}
    return {"class_labels": case.io["batch.class_label"]}


def sample(pipe, case, scheduler, eta=0.0, noise=None, **kwargs):
    pipe.scheduler = scheduler
    steps = case.meta["ddim"]["steps"]
    return pipe(**conditioning(case), guidance_scale=case.meta["guidance_scale"], latents=case.io["sample.x_T"],
                num_inference_steps=steps, eta=eta, variance_noise=noise, **kwargs).images  # fmt: skip


def chain_scheduler(pipe, sampler):
    if sampler == "plms":  # the original PLMSSampler uses v as eps (sd2's plms.* show it): reproduce it
        return LDMPLMSScheduler.from_config(pipe.scheduler.config, ldm_bug_compat=True)
    return LDMDDIMScheduler.from_config(pipe.scheduler.config)


@pytest.mark.parametrize(("name", "chain"), RUNS)
def test_pipeline_chain_reproduces_the_original_latents_and_images(folders, name, chain):
    case = load_latent_case(name)
    sampler, weights, eta = CHAINS[chain]
    pipe = load(folders[name, weights])
    noise = list(case.io["ddim_eta1.noise"]) if eta else None
    latents = sample(pipe, case, chain_scheduler(pipe, sampler), eta, noise, output_type="latent")
    ref, ref_decoded = case.io[f"{chain}.samples"], case.io[f"{chain}.decoded"]
    error, magnitude = (latents - ref).abs().max().item(), ref.abs().max().item()
    decoded = pipe.decode_latents(latents)
    decode_error = (decoded - ref_decoded).abs().max().item()
    print(f"{name} {chain}: latents max|Δ| {error:.3g} (max|ref| {magnitude:.3g}); decoded max|Δ| {decode_error:.3g}")
    assert error <= max(ATOL, SCALE_RTOL * magnitude)
    # the fixture's own samples decode as the original did (this does not inherit the chain's error)
    assert (pipe.decode_latents(ref) - ref_decoded).abs().max().item() <= DECODED_ATOL
    first_stage = pipe.first_stage
    if first_stage.spec.is_vq:
        codes, ref_codes = first_stage.quantize(latents).indices, first_stage.quantize(ref).indices
        if not torch.equal(codes, ref_codes):
            # decode re-quantizes: a code may flip where the original's choice was a near tie (the json's margin)
            margin = case.meta["scalars"][f"vq_min_relative_margin.{chain}.samples"]
            assert margin < 10 * error / magnitude, "codes differ beyond the chain's error"
            return
    assert decode_error <= DECODED_ATOL


@pytest.mark.parametrize("name", ["sd2_kl_openclip_v", "cin_vq_class"])
def test_output_types_decode_through_the_first_stage(folders, name):
    case = load_latent_case(name)
    pipe = load(folders[name, "ema"])
    run = dict(**conditioning(case), latents=case.io["sample.x_T"], num_inference_steps=2)
    latents = pipe(**run, output_type="latent").images
    assert latents.shape == case.io["sample.x_T"].shape
    expected = (pipe.first_stage.decode_first_stage(latents) / 2 + 0.5).clamp(0, 1)  # the original's decode
    assert torch.equal(pipe(**run, output_type="pt").images, expected)
    array = pipe(**run, output_type="np").images
    assert array.shape == (2, 32, 32, 3) and torch.equal(torch.from_numpy(array), expected.permute(0, 2, 3, 1))
    assert [im.size for im in pipe(**run).images] == [(32, 32)] * 2


def test_guidance_is_one_unet_call_on_uc_then_c(folders):
    """The original's batch: [uc, c] in one call; guidance_scale 1 makes one call on c alone."""
    case = load_latent_case("sd1_kl_clip_eps")
    pipe = load(folders["sd1_kl_clip_eps", "training"])
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"]),
                                               with_kwargs=True)  # fmt: skip
    try:
        sample(pipe, case, LDMDDIMScheduler.from_config(pipe.scheduler.config), output_type="latent")
        pipe(prompt=case.meta["prompts"], latents=case.io["sample.x_T"], num_inference_steps=2, output_type="latent")
    finally:
        hook.remove()
    guided, plain = seen[0], seen[-1]
    assert guided.shape[0] == 4 and plain.shape[0] == 2
    with torch.no_grad():
        c, uc = pipe.cond_stage.encode(case.meta["prompts"]), pipe.cond_stage.encode(["", ""])
    assert torch.equal(guided, torch.cat([uc, c])) and torch.equal(plain, c)
    torch.testing.assert_close(c, case.io["cond.c"], rtol=0, atol=1e-6)
    torch.testing.assert_close(uc, case.io["cond.uc"], rtol=0, atol=1e-6)


def test_negative_prompt_and_num_images_per_prompt(folders):
    case = load_latent_case("sd2_kl_openclip_v")
    pipe = load(folders["sd2_kl_openclip_v", "ema"])
    prompts = case.meta["prompts"]
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"]),
                                               with_kwargs=True)  # fmt: skip
    try:
        out = pipe(prompt=prompts, negative_prompt="blurry", num_images_per_prompt=2, guidance_scale=2.0,
                   num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
    finally:
        hook.remove()
    assert out.images.shape == (4, 32, 32, 3)
    with torch.no_grad():
        c, neg = pipe.cond_stage.encode(prompts), pipe.cond_stage.encode(["blurry"] * 2)
    order = [0, 0, 1, 1]  # each prompt's images together, as diffusers' num_images_per_prompt
    assert torch.equal(seen[0], torch.cat([neg[order], c[order]]))


def test_class_conditional_null_class_is_the_unconditional_branch(folders):
    case = load_latent_case("cin_vq_class")
    pipe = load(folders["cin_vq_class", "training"])
    with torch.no_grad():
        torch.testing.assert_close(pipe.cond_stage.unconditional(2), case.io["cond.uc"], rtol=0, atol=0)
    assert case.meta["scalars"]["uc_class_label"] == pipe.class_embedder.null_class == 9


@pytest.mark.parametrize("name", SD_CASES)
def test_plain_diffusers_loads_a_stable_diffusion_pipeline_with_the_same_images(folders, name, tmp_path):
    """Only diffusers imported, no flag: StableDiffusionPipeline with our UNet and LDMDDIMScheduler, then a stock
    DPMSolverMultistepScheduler swapped in; both give LDMCompatPipeline's images for the same x_T.

    Not bit-exact, measured: diffusers' autoencoder arithmetic (SiLU, SDPA; ``z / s``) moves the images by ≤ 1.8e-5,
    and the CLIP text encoder (sdpa in diffusers' default load, eager here as the original) the sd1 latents by ≤ 5e-5
    after the guided chain (sd2's OpenCLIP runs sdpa in both: its latents agree bit for bit)."""
    case = load_latent_case(name)
    folder = folders[name, "ema"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    torch.save({"prompts": case.meta["prompts"], "x_T": case.io["sample.x_T"]}, tmp_path / "inputs.pt")
    code = f"""
        import warnings
        import torch
        from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler
        warnings.simplefilter("error", FutureWarning)  # e.g. diffusers' clip_sample / steps_offset deprecations
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r})
        pipe.set_progress_bar_config(disable=True)
        data = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        out = {{"classes": [type(pipe).__name__, type(pipe.unet).__name__, type(pipe.scheduler).__name__,
                            type(pipe.vae).__name__, type(pipe.text_encoder).__name__, str(pipe.safety_checker)]}}
        for sched in ("ddim", "dpm"):
            if sched == "dpm":
                pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
            for kind in ("latent", "np"):
                images = pipe(data["prompts"], latents=data["x_T"], num_inference_steps=10, guidance_scale=3.0,
                              output_type=kind).images
                out[sched + "." + kind] = torch.as_tensor(images)
        torch.save(out, {str(tmp_path / "out.pt")!r})
    """
    run_fresh(code, tmp_path)
    stock = torch.load(tmp_path / "out.pt", weights_only=True)
    assert stock["classes"] == ["StableDiffusionPipeline", "LDMUNetModel", "LDMDDIMScheduler", "AutoencoderKL",
                                "CLIPTextModel", "None"]  # fmt: skip
    pipe = load(folder)
    for sched in ("ddim", "dpm"):
        if sched == "dpm":
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        for kind in ("latent", "np"):
            run = dict(latents=case.io["sample.x_T"], num_inference_steps=10, guidance_scale=3.0, output_type=kind)
            ours = torch.as_tensor(pipe(prompt=case.meta["prompts"], **run).images)
            error = (ours - stock[f"{sched}.{kind}"]).abs().max().item()
            print(f"{name} {sched} {kind}: max|Δ| = {error:.3g}")
            bound = DECODED_ATOL if kind == "np" else max(ATOL, SCALE_RTOL * ours.abs().max().item())
            assert error <= bound and torch.isfinite(ours).all()


def test_stable_diffusion_folder_loads_back_into_ldm_compat_pipeline(folders):
    pipe = load(folders["sd1_kl_clip_eps", "ema"])
    c = pipe.config
    assert (c.conditioning_key, c.cond_stage_config["target"], c.first_stage_config["target"]) == (
        "crossattn",
        "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
        "ldm.models.autoencoder.AutoencoderKL",
    )
    assert pipe.stock_pipeline == "StableDiffusionPipeline"
    assert "safety_checker" not in pipe.config and "requires_safety_checker" not in pipe.config


BAD_INPUTS = [
    ("sd1_kl_clip_eps", dict(), "prompt: required"),
    ("sd1_kl_clip_eps", dict(prompt="a", class_labels=[1]), "class_labels: this model"),
    ("sd1_kl_clip_eps", dict(prompt="a", image=torch.zeros(1, 3, 32, 32)), "image: this model takes no image"),
    ("sd1_kl_clip_eps", dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "negative_prompt: 3 prompts"),
    ("sd1_kl_clip_eps", dict(prompt="a", num_images_per_prompt=0), "num_images_per_prompt"),
    ("cin_vq_class", dict(class_labels=[3, 10]), r"class_labels: values must lie in \[0, 9\]"),
    ("cin_vq_class", dict(class_labels=[3], prompt="a dog"), "prompt: this model takes no text prompt"),
    ("cin_vq_class", dict(), "class_labels: required"),
    ("cin_vq_class", dict(encoder_hidden_states=torch.zeros(1, 1, 32), guidance_scale=3.0),
     "guidance_scale=3.0: needs an unconditional conditioning"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "kwargs", "match"), BAD_INPUTS)
def test_bad_input_is_one_line_before_any_unet_call(folders, name, kwargs, match):
    pipe = load(folders[name, "ema"])
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match) as err:
            pipe(num_inference_steps=2, **kwargs)
    finally:
        hook.remove()
    assert "\n" not in str(err.value) and calls == []


def test_stable_diffusion_pipeline_runs_our_plms_like_ldm_compat_pipeline(folders):
    """In one process, on the same components: StableDiffusionPipeline with LDMPLMSScheduler (its doubled first
    timestep included) and LDMCompatPipeline sample the same latents bit for bit; the f4 fixtures' vae_scale_factor
    is 4 (2 ** (len(block_out_channels) - 1)), so the images are 32 x 32 as the original decodes them."""
    from diffusers import StableDiffusionPipeline

    case = load_latent_case("sd2_kl_openclip_v")
    pipe = load(folders["sd2_kl_openclip_v", "training"])
    pipe.scheduler = LDMPLMSScheduler.from_config(pipe.scheduler.config, ldm_bug_compat=True)
    parts = {k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    stock = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False)  # fmt: skip
    stock.set_progress_bar_config(disable=True)
    assert stock.vae_scale_factor == 4
    run = dict(latents=case.io["sample.x_T"], num_inference_steps=10, guidance_scale=3.0, output_type="latent")
    theirs = stock(case.meta["prompts"], **run).images
    ours = pipe(prompt=case.meta["prompts"], **run).images
    assert torch.equal(theirs, ours)
    ref = case.io["plms.samples"]
    assert (ours - ref).abs().max().item() <= max(ATOL, SCALE_RTOL * ref.abs().max().item())
    assert stock(case.meta["prompts"], **{**run, "output_type": "np"}).images.shape == (2, 32, 32, 3)
    # (a LoRA "scale" fails inside diffusers' text-encoder LoRA helper first: transformers 5 has no text_model)
    with pytest.raises(ValueError, match=r"cross_attention_kwargs=\['ip_adapter_masks'\]: not supported by LDMUNet"):
        stock(case.meta["prompts"], **run, cross_attention_kwargs={"ip_adapter_masks": None})


def test_stock_choice_follows_the_cond_stage_and_the_scheduler(folders, tmp_path):
    from diffusers import EulerDiscreteScheduler

    from ldm_compat import LDMDDPMScheduler

    pipe = load(folders["sd1_kl_clip_eps", "ema"])
    ddim = pipe.scheduler
    for scheduler, expected in (
        (LDMPLMSScheduler.from_config(ddim.config), "StableDiffusionPipeline"),
        (DPMSolverMultistepScheduler.from_config(ddim.config), "StableDiffusionPipeline"),
        (EulerDiscreteScheduler.from_config(ddim.config), "StableDiffusionPipeline"),  # scales x_T and input: as we do
        # the SD pipelines rewrite clip_sample=True to False, which LDMDDPMScheduler's clip_denoised would feel
        (LDMDDPMScheduler.from_config(ddim.config), None),
        (LDMDDPMScheduler.from_config(ddim.config, clip_sample=False), "StableDiffusionPipeline"),
    ):
        pipe.scheduler = scheduler
        assert pipe.stock_pipeline == expected, type(scheduler).__name__
    pipe.scheduler = LDMPLMSScheduler.from_config(ddim.config)
    pipe.save_pretrained(tmp_path / "plms")
    index = json.loads((tmp_path / "plms" / "model_index.json").read_text())
    assert (index["_class_name"], index["scheduler"]) == ("StableDiffusionPipeline", ["ldm_compat", "LDMPLMSScheduler"])
    # the original's "hidden" layer is not diffusers' clip_skip (which applies the final norm): not stock
    clip = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    hidden = {"target": clip, "params": {"layer": "hidden", "layer_idx": 1}}
    pipe.register_to_config(cond_stage_config=hidden)
    assert pipe.stock_pipeline is None
    assert load(folders["cin_vq_class", "ema"]).stock_pipeline is None  # class-conditional: no stock pipeline
