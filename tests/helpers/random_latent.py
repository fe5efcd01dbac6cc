"""Tiny random-weight ``LatentDiffusion`` checkpoints in the original layout, built from an original-style YAML.

For the model kinds the latent fixtures do not cover (inpainting, super-resolution, BERT text, unconditional): the
UNet (``model.diffusion_model.*``, every parameter drawn at random so no layer is the zero-initialised identity),
the first stage (``first_stage_model.*``, diffusers' init mapped to the original keys) and the cond stage
(``cond_stage_model.*``, the adapter's from-scratch init) under the original keys, so ``ldm-compat convert`` can
round-trip them like a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ldm_compat import LDMUNetModel
from ldm_compat.models.cond_stage import build_cond_stage
from ldm_compat.models.first_stage import build_model, parse_first_stage_config, to_original_state_dict


def random_checkpoint(config: dict, folder: Path, name: str, *, seed: int = 0, **cond_lookup) -> tuple[Path, Path]:
    """Write ``NAME.yaml`` and ``NAME.ckpt`` (``{"state_dict": …}``) into ``folder``; ``cond_lookup``:
    ``search_dirs`` / ``tokenizer_path`` / ``open_clip_config`` of ``build_cond_stage``."""
    torch.manual_seed(seed)
    params = config["model"]["params"]
    unet = LDMUNetModel.from_ldm_config(params["unet_config"])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    first = params["first_stage_config"]
    model = build_model(parse_first_stage_config(first), float(params.get("scale_factor", 1.0)))
    state.update({f"first_stage_model.{k}": v for k, v in to_original_state_dict(model.state_dict(), model).items()})
    cond = params.get("cond_stage_config")
    if isinstance(cond, dict) and cond.get("target") != "torch.nn.Identity":
        stage = build_cond_stage(cond, None, **cond_lookup)
        state.update({f"cond_stage_model.{k}": v for k, v in stage.original_state_dict().items()})
    ckpt, yaml_path = folder / f"{name}.ckpt", folder / f"{name}.yaml"
    torch.save({"state_dict": state, "global_step": 1}, ckpt)
    yaml_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return ckpt, yaml_path
