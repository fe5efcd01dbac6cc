"""``LDMUNetModel`` builds the original's exact state-dict layout for every public config with a ``unet_config``.

``PUBLIC_CONFIGS`` lists the ``unet_config.params`` of every config in CompVis/latent-diffusion@a506df5 and
Stability-AI/stablediffusion@cf1d67a (``configs/`` and ``models/ldm/``) that has one, with the key count, parameter
count and SHA-256 of the ordered ``"key:shape"`` lines of the ORIGINAL ``openaimodel.UNetModel`` built from it
(CompVis code for CompVis configs, Stability-AI code for Stability-AI configs). The two published layouts in
``tests/fixtures/ldm_reference/layout_*.json`` are compared key by key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest
import torch
from reference_cases import LAYOUTS, load_layout

from ldm_compat import LDMUNetModel


@dataclass(frozen=True)
class PublicConfig:
    configs: tuple[str, ...]  # repo:path of every original config with these unet_config.params
    params: dict
    keys: int  # len(state_dict()) of the original UNetModel
    parameters: int  # number of parameters of the original UNetModel
    sha256: str  # of "\n".join(f"{key}:{tuple(shape)}") over the original's state_dict, in order


PUBLIC_CONFIGS = [
    PublicConfig(
        configs=("CompVis/latent-diffusion:models/ldm/bsr_sr/config.yaml",),
        params={
            "image_size": 64,
            "in_channels": 6,
            "out_channels": 3,
            "model_channels": 160,
            "attention_resolutions": [16, 8],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 2, 4],
            "num_head_channels": 32,
        },
        keys=306,
        parameters=113622563,
        sha256="a4c8759ab8b511fb1f05efa5067e72b8d42e94644d18c2585aab68232b35bd3d",
    ),
    PublicConfig(
        configs=(
            "CompVis/latent-diffusion:models/ldm/celeba256/config.yaml",
            "CompVis/latent-diffusion:models/ldm/ffhq256/config.yaml",
            "CompVis/latent-diffusion:configs/latent-diffusion/celebahq-ldm-vq-4.yaml",
            "CompVis/latent-diffusion:configs/latent-diffusion/ffhq-ldm-vq-4.yaml",
            "CompVis/latent-diffusion:configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml",
            "CompVis/latent-diffusion:models/ldm/lsun_beds256/config.yaml",
        ),
        params={
            "image_size": 64,
            "in_channels": 3,
            "out_channels": 3,
            "model_channels": 224,
            "attention_resolutions": [8, 4, 2],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 3, 4],
            "num_head_channels": 32,
        },
        keys=368,
        parameters=274056163,
        sha256="54322b889680ee39abf659f7ebb18c43cb6fea5eb41c2db924596b44e471e2a3",
    ),
    PublicConfig(
        configs=(
            "CompVis/latent-diffusion:models/ldm/cin256/config.yaml",
            "CompVis/latent-diffusion:configs/latent-diffusion/cin-ldm-vq-f8.yaml",
        ),
        params={
            "image_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": 256,
            "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 4],
            "num_head_channels": 32,
            "use_spatial_transformer": True,
            "transformer_depth": 1,
            "context_dim": 512,
        },
        keys=626,
        parameters=394984196,
        sha256="335c3c46e77dacb01def844751ae46235c94e3f010f09926bff5b2a9b864a575",
    ),
    PublicConfig(
        configs=("CompVis/latent-diffusion:models/ldm/inpainting_big/config.yaml",),
        params={
            "image_size": 64,
            "in_channels": 7,
            "out_channels": 3,
            "model_channels": 256,
            "attention_resolutions": [8, 4, 2],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 3, 4],
            "num_heads": 8,
            "resblock_updown": True,
        },
        keys=416,
        parameters=387245827,
        sha256="901286c8b6b6da3467aeb370c58135a1cfce02522541956ac0d0350c6c7a3e41",
    ),
    PublicConfig(
        configs=("CompVis/latent-diffusion:configs/latent-diffusion/cin256-v2.yaml",),
        params={
            "image_size": 64,
            "in_channels": 3,
            "out_channels": 3,
            "model_channels": 192,
            "attention_resolutions": [8, 4, 2],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 3, 5],
            "num_heads": 1,
            "use_spatial_transformer": True,
            "transformer_depth": 1,
            "context_dim": 512,
        },
        keys=688,
        parameters=400920579,
        sha256="c19488258949dd3a5674cf929a9a28af9c983910cc6299af6a0208849f599370",
    ),
    PublicConfig(
        configs=(
            "CompVis/latent-diffusion:configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml",
            "CompVis/latent-diffusion:models/ldm/lsun_churches256/config.yaml",
        ),
        params={
            "image_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": 192,
            "attention_resolutions": [1, 2, 4, 8],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 2, 4, 4],
            "num_heads": 8,
            "use_scale_shift_norm": True,
            "resblock_updown": True,
        },
        keys=520,
        parameters=294966916,
        sha256="38e62dda353bf0ad6612e5302aab711c95e7de281822f1af53bac8a8e527ff0e",
    ),
    PublicConfig(
        configs=("CompVis/latent-diffusion:configs/latent-diffusion/txt2img-1p4B-eval.yaml",),
        params={
            "image_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": 320,
            "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 4, 4],
            "num_heads": 8,
            "use_spatial_transformer": True,
            "transformer_depth": 1,
            "context_dim": 1280,
            "use_checkpoint": True,
            "legacy": False,
        },
        keys=686,
        parameters=872300484,
        sha256="bf0eb85c4ee8272cf702aa53f493be7845c14b19e62e14af7e8aedd451134e4d",
    ),
    PublicConfig(
        configs=("CompVis/latent-diffusion:models/ldm/layout2img-openimages256/config.yaml",),
        params={
            "image_size": 64,
            "in_channels": 3,
            "out_channels": 3,
            "model_channels": 128,
            "attention_resolutions": [8, 4, 2],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 3, 4],
            "num_head_channels": 32,
            "use_spatial_transformer": True,
            "transformer_depth": 3,
            "context_dim": 512,
        },
        keys=1328,
        parameters=246277379,
        sha256="9e0b8333c2cedeed7dae52af740dec953c4d11ae9378b4481e0b39918e28e0aa",
    ),
    PublicConfig(
        configs=("CompVis/latent-diffusion:configs/retrieval-augmented-diffusion/768x768.yaml",),
        params={
            "image_size": 48,
            "in_channels": 16,
            "out_channels": 16,
            "model_channels": 448,
            "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 3, 4],
            "use_scale_shift_norm": False,
            "resblock_updown": False,
            "num_head_channels": 32,
            "use_spatial_transformer": True,
            "transformer_depth": 1,
            "context_dim": 768,
            "use_checkpoint": True,
        },
        keys=688,
        parameters=1335480400,
        sha256="b55107235060d573c1905541ce1cdcb1f94904a87450efee7532821ca1e2258a",
    ),
    PublicConfig(
        configs=("CompVis/latent-diffusion:models/ldm/semantic_synthesis256/config.yaml",),
        params={
            "image_size": 64,
            "in_channels": 6,
            "out_channels": 3,
            "model_channels": 128,
            "attention_resolutions": [32, 16, 8],
            "num_res_blocks": 2,
            "channel_mult": [1, 4, 8],
            "num_heads": 8,
        },
        keys=216,
        parameters=215229315,
        sha256="f02877882de6aea4cc0f532f31fb6bd5bdb066b55ab957d6f985cad6995cdbd9",
    ),
    PublicConfig(
        configs=("CompVis/latent-diffusion:models/ldm/semantic_synthesis512/config.yaml",),
        params={
            "image_size": 128,
            "in_channels": 6,
            "out_channels": 3,
            "model_channels": 128,
            "attention_resolutions": [32, 16, 8],
            "num_res_blocks": 2,
            "channel_mult": [1, 4, 8],
            "num_heads": 8,
        },
        keys=216,
        parameters=215229315,
        sha256="f02877882de6aea4cc0f532f31fb6bd5bdb066b55ab957d6f985cad6995cdbd9",
    ),
    PublicConfig(
        configs=("CompVis/latent-diffusion:models/ldm/text2img256/config.yaml",),
        params={
            "image_size": 64,
            "in_channels": 3,
            "out_channels": 3,
            "model_channels": 192,
            "attention_resolutions": [8, 4, 2],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 3, 5],
            "num_head_channels": 32,
            "use_spatial_transformer": True,
            "transformer_depth": 1,
            "context_dim": 640,
        },
        keys=688,
        parameters=403623939,
        sha256="3e04cdbfa2e2bce5fd19eaa9c212801408e68d3539cbb968a7a8d7b011d884db",
    ),
    PublicConfig(
        configs=(
            "Stability-AI/stablediffusion:configs/stable-diffusion/intel/v2-inference-bf16.yaml",
            "Stability-AI/stablediffusion:configs/stable-diffusion/intel/v2-inference-v-bf16.yaml",
        ),
        params={
            "use_checkpoint": False,
            "use_fp16": False,
            "use_bf16": True,
            "image_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": 320,
            "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 4, 4],
            "num_head_channels": 64,
            "use_spatial_transformer": True,
            "use_linear_in_transformer": True,
            "transformer_depth": 1,
            "context_dim": 1024,
            "legacy": False,
        },
        keys=686,
        parameters=865910724,
        sha256="e2c93ab056916a5d4d3b941704642c0bb543a271c97f374d53ea071d11497e51",
    ),
    PublicConfig(
        configs=(
            "Stability-AI/stablediffusion:configs/stable-diffusion/intel/v2-inference-fp32.yaml",
            "Stability-AI/stablediffusion:configs/stable-diffusion/intel/v2-inference-v-fp32.yaml",
        ),
        params={
            "use_checkpoint": False,
            "use_fp16": False,
            "image_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": 320,
            "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 4, 4],
            "num_head_channels": 64,
            "use_spatial_transformer": True,
            "use_linear_in_transformer": True,
            "transformer_depth": 1,
            "context_dim": 1024,
            "legacy": False,
        },
        keys=686,
        parameters=865910724,
        sha256="e2c93ab056916a5d4d3b941704642c0bb543a271c97f374d53ea071d11497e51",
    ),
    PublicConfig(
        configs=("Stability-AI/stablediffusion:configs/stable-diffusion/v2-1-stable-unclip-h-inference.yaml",),
        params={
            "num_classes": "sequential",
            "adm_in_channels": 2048,
            "use_checkpoint": True,
            "image_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": 320,
            "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 4, 4],
            "num_head_channels": 64,
            "use_spatial_transformer": True,
            "use_linear_in_transformer": True,
            "transformer_depth": 1,
            "context_dim": 1024,
            "legacy": False,
        },
        keys=690,
        parameters=870173124,
        sha256="5ce3571120519f5965040aa16bafa7d150a78bffa4b8e233a7f0fad52102556a",
    ),
    PublicConfig(
        configs=("Stability-AI/stablediffusion:configs/stable-diffusion/v2-1-stable-unclip-l-inference.yaml",),
        params={
            "num_classes": "sequential",
            "adm_in_channels": 1536,
            "use_checkpoint": True,
            "image_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": 320,
            "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 4, 4],
            "num_head_channels": 64,
            "use_spatial_transformer": True,
            "use_linear_in_transformer": True,
            "transformer_depth": 1,
            "context_dim": 1024,
            "legacy": False,
        },
        keys=690,
        parameters=869517764,
        sha256="75ae06fcbd2bc43e0cf18220ab688e09659d1ad88c3575d4e5bbfabcedf15f39",
    ),
    PublicConfig(
        configs=(
            "Stability-AI/stablediffusion:configs/stable-diffusion/v2-inference-v.yaml",
            "Stability-AI/stablediffusion:configs/stable-diffusion/v2-inference.yaml",
        ),
        params={
            "use_checkpoint": True,
            "use_fp16": True,
            "image_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": 320,
            "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 4, 4],
            "num_head_channels": 64,
            "use_spatial_transformer": True,
            "use_linear_in_transformer": True,
            "transformer_depth": 1,
            "context_dim": 1024,
            "legacy": False,
        },
        keys=686,
        parameters=865910724,
        sha256="e2c93ab056916a5d4d3b941704642c0bb543a271c97f374d53ea071d11497e51",
    ),
    PublicConfig(
        configs=("Stability-AI/stablediffusion:configs/stable-diffusion/v2-inpainting-inference.yaml",),
        params={
            "use_checkpoint": True,
            "image_size": 32,
            "in_channels": 9,
            "out_channels": 4,
            "model_channels": 320,
            "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 4, 4],
            "num_head_channels": 64,
            "use_spatial_transformer": True,
            "use_linear_in_transformer": True,
            "transformer_depth": 1,
            "context_dim": 1024,
            "legacy": False,
        },
        keys=686,
        parameters=865925124,
        sha256="67e3d4a813e54f9dd965a18a20facfa68ee64eac258c9f873f7b7d261c60ece9",
    ),
    PublicConfig(
        configs=("Stability-AI/stablediffusion:configs/stable-diffusion/v2-midas-inference.yaml",),
        params={
            "use_checkpoint": True,
            "image_size": 32,
            "in_channels": 5,
            "out_channels": 4,
            "model_channels": 320,
            "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 4, 4],
            "num_head_channels": 64,
            "use_spatial_transformer": True,
            "use_linear_in_transformer": True,
            "transformer_depth": 1,
            "context_dim": 1024,
            "legacy": False,
        },
        keys=686,
        parameters=865913604,
        sha256="b8cf3a10c882e7ab3f8928b0376ab7f91c6953cd31771b31e043c497a24543e8",
    ),
    PublicConfig(
        configs=("Stability-AI/stablediffusion:configs/stable-diffusion/x4-upscaling.yaml",),
        params={
            "use_checkpoint": True,
            "num_classes": 1000,
            "image_size": 128,
            "in_channels": 7,
            "out_channels": 4,
            "model_channels": 256,
            "attention_resolutions": [2, 4, 8],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 2, 4],
            "disable_self_attentions": [True, True, True, False],
            "disable_middle_self_attn": False,
            "num_heads": 8,
            "use_spatial_transformer": True,
            "transformer_depth": 1,
            "context_dim": 1024,
            "legacy": False,
            "use_linear_in_transformer": True,
        },
        keys=687,
        parameters=473398020,
        sha256="568b31f97427206b91cc20261c84bdcab0a4bade169a74d3defb56d163a70daf",
    ),
]


def _layout(model) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _meta_model(params: dict) -> LDMUNetModel:
    with torch.device("meta"):
        return LDMUNetModel.from_ldm_config(
            {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": params}
        )


@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_fixture_layouts_match_exactly(layout_name):
    layout = load_layout(layout_name)
    model = _meta_model(layout["unet_config_params"])
    expected = [(k, tuple(shape)) for k, shape in layout["state_dict"].items()]
    assert _layout(model) == expected
    assert sum(p.numel() for p in model.parameters()) == layout["num_parameters"]


def _config_id(public: PublicConfig) -> str:
    path = public.configs[0].split(":", 1)[1].removesuffix(".yaml").removesuffix("/config")
    return path.rsplit("/", 1)[-1]


@pytest.mark.parametrize("public", PUBLIC_CONFIGS, ids=[_config_id(c) for c in PUBLIC_CONFIGS])
def test_public_config_layouts(public):
    model = _meta_model(public.params)
    layout = _layout(model)
    assert len(layout) == public.keys
    assert sum(p.numel() for p in model.parameters()) == public.parameters
    text = "\n".join(f"{k}:{shape}" for k, shape in layout)
    assert hashlib.sha256(text.encode()).hexdigest() == public.sha256


def test_layout_hash_convention_matches_fixture():
    """The hash convention above, checked on a fixture layout that also appears in PUBLIC_CONFIGS."""
    layout = load_layout("celebahq-ldm-vq-4")
    text = "\n".join(f"{k}:{tuple(s)}" for k, s in layout["state_dict"].items())
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert any(c.sha256 == digest and c.params == layout["unet_config_params"] for c in PUBLIC_CONFIGS)
