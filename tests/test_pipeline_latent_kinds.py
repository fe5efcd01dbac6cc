"""The latent model kinds without an original-code fixture, on tiny random-weight models written from original-style
YAMLs and round-tripped through ``ldm-compat convert``: SD2 inpainting (``LatentInpaintDiffusion``, hybrid, 9 UNet
input channels) → ``StableDiffusionInpaintPipeline``, BERT text (``BERTEmbedder``, KL-f8) →
``LDMTextToImagePipeline``, super-resolution (``concat`` + ``torch.nn.Identity``, VQ) → ``LDMSuperResolutionPipeline``,
unconditional → ``LDMPipeline``. Each folder loads as that stock class with plain ``DiffusionPipeline.from_pretrained``
and samples what ``LDMCompatPipeline`` samples; the inputs reach the UNet as the original builds them.

The stock pipelines run diffusers' autoencoder arithmetic (``nn.SiLU``, SDPA; ``z / s``) where ``LDMCompatPipeline``
runs the original's, so images agree to a float32 tolerance (1e-4; measured ≤ 2e-6), not bit for bit.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from helpers.random_latent import random_checkpoint
from reference_cases import LATENT_FIXTURES

from ldm_compat import LDMCompatPipeline
from ldm_compat.convert.to_diffusers import original_to_diffusers

ATOL = 1e-4
UNET = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": {"image_size": 8, "model_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 1],
                   "attention_resolutions": [1], "num_head_channels": 8}}  # fmt: skip
DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}  # fmt: skip
KL = {"target": "ldm.models.autoencoder.AutoencoderKL",
      "params": {"embed_dim": 4, "ddconfig": DDCONFIG, "lossconfig": {"target": "torch.nn.Identity"}}}  # fmt: skip
VQ = {"target": "ldm.models.autoencoder.VQModelInterface",
      "params": {"embed_dim": 3, "n_embed": 16, "lossconfig": {"target": "torch.nn.Identity"},
                 "ddconfig": {**DDCONFIG, "double_z": False, "z_channels": 3}}}  # fmt: skip
OPEN_CLIP = {
    "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
    "params": {"arch": "ViT-oracle-tiny", "version": "", "freeze": True, "layer": "penultimate"},
}
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "on", "the", "mat", "red"]


def model(target, unet_params, first_stage, cond_stage, **params):
    unet = {**UNET, "params": {**UNET["params"], **unet_params}}
    params = {
        "linear_start": 0.00085,
        "linear_end": 0.012,
        "timesteps": 1000,
        "image_size": 8,
        "use_ema": False,
        "first_stage_config": first_stage,
        "cond_stage_config": cond_stage,
        "unet_config": unet,
        **params,
    }
    return {"model": {"target": f"ldm.models.diffusion.ddpm.{target}", "params": params}}


CROSSATTN = {"use_spatial_transformer": True, "context_dim": 32, "transformer_depth": 1}
CONFIGS = {
    # v2-inpainting-inference.yaml shrunk
    "inpainting": model("LatentInpaintDiffusion", {**CROSSATTN, "in_channels": 9, "out_channels": 4,
                                                   "use_linear_in_transformer": True, "legacy": False},
                        KL, OPEN_CLIP, conditioning_key="hybrid", channels=4, scale_factor=0.18215,
                        cond_stage_key="txt", first_stage_key="jpg", finetune_keys=None),
    # txt2img-1p4B-eval.yaml shrunk (KL-f8, BERTEmbedder with 77 tokens)
    "bert": model("LatentDiffusion", {**CROSSATTN, "in_channels": 4, "out_channels": 4},
                  {**KL, "params": {**KL["params"], "ddconfig": {**DDCONFIG, "ch_mult": [1, 1, 1, 1]}}},
                  {"target": "ldm.modules.encoders.modules.BERTEmbedder",
                   "params": {"n_embed": 32, "n_layer": 1, "vocab_size": len(BERT_VOCAB), "max_seq_len": 77}},
                  conditioning_key="crossattn", channels=4, scale_factor=0.18215, cond_stage_key="caption"),
    # bsr_sr config shrunk: the low-res image concatenated to the VQ latents
    "super_resolution": model("LatentDiffusion", {"in_channels": 6, "out_channels": 3, "num_heads": 2},
                              VQ, {"target": "torch.nn.Identity"}, conditioning_key="concat", channels=3,
                              scale_factor=1.0, cond_stage_key="LR_image"),
    # the LSUN / CelebA-HQ kind
    "unconditional": model("LatentDiffusion", {"in_channels": 4, "out_channels": 4, "num_heads": 2}, KL,
                           "__is_unconditional__", channels=4, scale_factor=0.5),
}  # fmt: skip
STOCK = {"inpainting": "StableDiffusionInpaintPipeline", "bert": "LDMTextToImagePipeline",
         "super_resolution": "LDMSuperResolutionPipeline", "unconditional": "LDMPipeline"}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    (root / "bert_tokenizer").mkdir()
    (root / "bert_tokenizer" / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    lookups = {"inpainting": dict(tokenizer_path=LATENT_FIXTURES / "tiny_clip",
                                  open_clip_config=LATENT_FIXTURES / "open_clip_configs"),
               "bert": dict(tokenizer_path=root / "bert_tokenizer")}  # fmt: skip
    out = {}
    for seed, (name, config) in enumerate(CONFIGS.items()):
        lookup = lookups.get(name, {})
        ckpt, yaml_path = random_checkpoint(config, root, name, seed=seed, **lookup)
        out[name] = original_to_diffusers(ckpt, yaml_path, root / f"{name}_folder", **lookup)
    return out


def ours(folder):
    pipe = LDMCompatPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock(folder):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_inputs(pipe):
    """Record what reaches the UNet: (sample, context) per call."""
    seen = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0], kwargs.get("encoder_hidden_states"))), with_kwargs=True
    )
    return seen, handle


def pictures(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = (torch.rand(2, 32, 32, 3, generator=g) * 255).to(torch.uint8)
    mask = torch.zeros(2, 32, 32, dtype=torch.uint8)
    mask[0, 8:24, 4:20] = 255
    mask[1, :16] = 255
    return [PIL.Image.fromarray(a.numpy()) for a in image], [PIL.Image.fromarray(m.numpy()) for m in mask]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_folder_names_the_stock_pipeline_and_loads_both_ways(folders, name):
    index = json.loads((folders[name] / "model_index.json").read_text())
    assert index["_class_name"] == STOCK[name]
    assert type(stock(folders[name])).__name__ == STOCK[name]
    pipe = ours(folders[name])
    assert pipe.stock_pipeline == STOCK[name]
    assert pipe.config.conditioning_key == CONFIGS[name]["model"]["params"]["conditioning_key"] if name != \
        "unconditional" else pipe.config.conditioning_key is None  # fmt: skip


def test_inpainting_unet_input_is_x_mask_masked_image_latents_in_the_original_order(folders):
    pipe = ours(folders["inpainting"])
    images, masks = pictures()
    prompts = ["a red cat", "a dog on the mat"]
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    seen, handle = unet_inputs(pipe)
    try:
        pipe(prompt=prompts, image=images, mask_image=masks, latents=x_T, guidance_scale=3.0, num_inference_steps=2,
             generator=torch.Generator().manual_seed(7), output_type="latent")  # fmt: skip
    finally:
        handle.remove()
    unet_input, context = seen[0]
    assert unet_input.shape == (4, 9, 8, 8) and context.shape == (4, 77, 32)
    # independently: make_batch_sd (image / 127.5 - 1, mask / 255 binarized, masked = image * (mask < 0.5)), the
    # mask resized to the latents, the masked image's posterior sampled from the generator, times scale_factor
    image = torch.stack([torch.tensor(np.asarray(i)) for i in images]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    mask = torch.stack([torch.tensor(np.asarray(m)) for m in masks])[:, None].float() / 255
    mask = (mask >= 0.5).float()
    with torch.no_grad():
        posterior = pipe.vae.encode(image * (mask < 0.5)).latent_dist
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    masked_latents = 0.18215 * (posterior.mean + posterior.std * eps)
    expected_concat = torch.cat([F.interpolate(mask, size=(8, 8)), masked_latents], dim=1)
    for half in (unet_input[:2], unet_input[2:]):  # [uc, c]: both branches carry the same concat
        assert torch.equal(half[:, :4], x_T)
        assert torch.equal(half[:, 4:5], expected_concat[:, :1])
        torch.testing.assert_close(half[:, 5:], expected_concat[:, 1:], rtol=0, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(context[2:], pipe.cond_stage.encode(prompts)) and torch.equal(
            context[:2], pipe.cond_stage.encode(["", ""])
        )


def test_inpainting_stock_pipeline_gives_the_same_images(folders):
    images, masks = pictures()
    prompts = ["a red cat", "a dog on the mat"]
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    run = dict(image=images, mask_image=masks, latents=x_T, guidance_scale=3.0, num_inference_steps=4,
               output_type="np")  # fmt: skip
    a = ours(folders["inpainting"])(prompt=prompts, generator=torch.Generator().manual_seed(7), **run).images
    b = stock(folders["inpainting"])(prompts, generator=torch.Generator().manual_seed(7), height=32, width=32,
                                     **run).images  # fmt: skip
    assert a.shape == b.shape == (2, 32, 32, 3)
    print(f"inpainting: max|Δ| {abs(a - b).max():.3g}")
    assert abs(a - b).max() <= ATOL


def test_inpainting_with_custom_concat_keys_follows_them(folders, tmp_path):
    """concat_keys is the original's order: [masked_image, mask] puts the latents first (no stock pipeline then)."""
    config = copy.deepcopy(CONFIGS["inpainting"])
    config["model"]["params"]["concat_keys"] = ["masked_image", "mask"]
    lookup = dict(tokenizer_path=LATENT_FIXTURES / "tiny_clip", open_clip_config=LATENT_FIXTURES / "open_clip_configs")
    ckpt, yaml_path = random_checkpoint(config, tmp_path, "swapped", **lookup)
    pipe = ours(original_to_diffusers(ckpt, yaml_path, tmp_path / "f", **lookup))
    assert pipe.stock_pipeline is None and pipe.config.concat_keys == ["masked_image", "mask"]
    images, masks = pictures()
    seen, handle = unet_inputs(pipe)
    try:
        pipe(prompt="a cat", image=images[:1], mask_image=masks[:1], num_inference_steps=1, output_type="latent")
    finally:
        handle.remove()
    unet_input = seen[0][0]  # [x (4), masked-image latents (4), mask (1)]
    assert unet_input.shape[1] == 9 and set(unet_input[:, 8].unique().tolist()) == {0.0, 1.0}
    assert set(unet_input[:, 4].unique().tolist()) != {0.0, 1.0}


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(prompt="a cat", image=torch.zeros(1, 3, 32, 32)), "mask_image: required by this inpainting model"),
    (dict(prompt="a cat", mask_image=torch.zeros(1, 1, 32, 32)), "image: required by this inpainting model"),
    (dict(image=torch.zeros(1, 3, 32, 32), mask_image=torch.zeros(1, 1, 32, 32)), "prompt: required"),
    (dict(prompt="a cat", image=torch.zeros(1, 3, 32, 32), mask_image=torch.zeros(1, 1, 16, 16)),
     "mask_image: size"),
])  # fmt: skip
def test_inpainting_bad_input_before_any_unet_call(folders, kwargs, match):
    pipe = ours(folders["inpainting"])
    seen, handle = unet_inputs(pipe)
    try:
        with pytest.raises(ValueError, match=match):
            pipe(num_inference_steps=1, **kwargs)
    finally:
        handle.remove()
    assert seen == []


def test_bert_text_to_image_stock_pipeline_gives_the_same_images(folders):
    prompts = ["a red cat", "a dog on the mat"]
    run = dict(guidance_scale=3.0, num_inference_steps=4, output_type="np")
    pipe = ours(folders["bert"])
    seen, handle = unet_inputs(pipe)
    try:
        a = pipe(prompt=prompts, generator=torch.Generator().manual_seed(3), **run).images
    finally:
        handle.remove()
    b = stock(folders["bert"])(prompts, generator=torch.Generator().manual_seed(3), **run).images
    assert a.shape == b.shape == (2, 64, 64, 3)  # KL-f8: 8 x 8 latents
    print(f"bert: max|Δ| {abs(a - b).max():.3g}")
    assert abs(a - b).max() <= ATOL
    with torch.no_grad():  # the original BERTEmbedder: 77 padded tokens, [uc = "", c] in one call
        uc, c = pipe.cond_stage.encode(["", ""]), pipe.cond_stage.encode(prompts)
    assert torch.equal(seen[0][1], torch.cat([uc, c])) and c.shape == (2, 77, 32)


def test_super_resolution_stock_pipeline_gives_the_same_images(folders):
    low_res = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    pipe = ours(folders["super_resolution"])
    seen, handle = unet_inputs(pipe)
    try:
        a = pipe(image=low_res, generator=torch.Generator().manual_seed(5), num_inference_steps=4, output_type="np")
    finally:
        handle.remove()
    b = stock(folders["super_resolution"])(image=low_res, generator=torch.Generator().manual_seed(5),
                                           num_inference_steps=4, output_type="np")  # fmt: skip
    assert a.images.shape == b.images.shape == (2, 32, 32, 3)
    print(f"super-resolution: max|Δ| {abs(a.images - b.images).max():.3g}")
    assert abs(a.images - b.images).max() <= ATOL
    assert seen[0][0].shape == (2, 6, 8, 8) and torch.equal(seen[0][0][:, 3:], low_res)  # c_concat = the image
    with pytest.raises(ValueError, match="guidance_scale=2.0: needs an unconditional conditioning"):
        pipe(image=low_res, guidance_scale=2.0)
    with pytest.raises(ValueError, match="image: required"):
        pipe(num_inference_steps=1)


def test_unconditional_latent_stock_pipeline_gives_the_same_images(folders):
    run = dict(batch_size=2, num_inference_steps=4, output_type="np")
    a = ours(folders["unconditional"])(generator=torch.Generator().manual_seed(6), **run).images
    b = stock(folders["unconditional"])(generator=torch.Generator().manual_seed(6), **run).images
    print(f"unconditional: max|Δ| {abs(a - b).max():.3g}")
    assert a.shape == b.shape == (2, 32, 32, 3) and abs(a - b).max() <= ATOL
    pipe = ours(folders["unconditional"])
    seen, handle = unet_inputs(pipe)
    try:
        for kwargs, match in ((dict(prompt="a cat"), "prompt: this model takes no text prompt"),
                              (dict(class_labels=[1]), "class_labels: this model"),
                              (dict(guidance_scale=3.0), "guidance_scale=3.0: needs an unconditional")):  # fmt: skip
            with pytest.raises(ValueError, match=match):
                pipe(num_inference_steps=1, **kwargs)
    finally:
        handle.remove()
    assert seen == []
