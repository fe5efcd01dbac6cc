"""Loader for the golden outputs of the original latent-diffusion code in ``tests/fixtures/ldm_reference``.

Each case ``NAME`` has ``NAME.yaml`` (original config), ``NAME.ckpt`` (original checkpoint, read with
``torch.load(weights_only=True)``), ``NAME.io.safetensors`` (inputs and the original's outputs) and ``NAME.json``
(tensor shapes and settings). See the README in that folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "ldm_reference"
CASES = sorted(p.name[: -len(".ckpt")] for p in FIXTURES.glob("*.ckpt"))
LAYOUTS = sorted(p.name[len("layout_") : -len(".json")] for p in FIXTURES.glob("layout_*.json"))

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."


@dataclass(frozen=True)
class ReferenceCase:
    name: str
    config: dict  # the whole YAML as plain Python
    checkpoint: dict  # {'state_dict', 'global_step', 'epoch'}
    io: dict[str, torch.Tensor]
    meta: dict  # the .json

    @property
    def params(self) -> dict:
        return self.config["model"]["params"]

    @property
    def unet_config(self) -> dict:
        return self.params["unet_config"]

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.checkpoint["state_dict"]

    def unet_state_dict(self) -> dict[str, torch.Tensor]:
        """The ``model.diffusion_model.*`` tensors with that prefix removed."""
        n = len(UNET_PREFIX)
        return {k[n:]: v for k, v in self.state_dict.items() if k.startswith(UNET_PREFIX)}

    def ema_buffers(self) -> dict[str, torch.Tensor]:
        """The ``model_ema.*`` tensors with that prefix removed (LitEma names: dots dropped)."""
        n = len(EMA_PREFIX)
        return {k[n:]: v for k, v in self.state_dict.items() if k.startswith(EMA_PREFIX)}

    @property
    def has_ema(self) -> bool:
        return any(k.startswith(EMA_PREFIX) for k in self.state_dict)


@cache
def load_case(name: str) -> ReferenceCase:
    if name not in CASES:
        raise KeyError(f"no reference case {name!r}; have {CASES}")
    return _read_case(FIXTURES, name)


def _read_case(folder: Path, name: str) -> ReferenceCase:
    config = OmegaConf.to_container(OmegaConf.load(folder / f"{name}.yaml"), resolve=True)
    checkpoint = torch.load(folder / f"{name}.ckpt", map_location="cpu", weights_only=True)
    io = load_file(folder / f"{name}.io.safetensors")
    meta = json.loads((folder / f"{name}.json").read_text())
    return ReferenceCase(name, config, checkpoint, io, meta)


@cache
def load_layout(name: str) -> dict:
    """A ``layout_*.json``: ``unet_config_params`` and ``state_dict`` (key → shape) of the original UNetModel."""
    return json.loads((FIXTURES / f"layout_{name}.json").read_text())


@cache
def load_litema_trajectory() -> tuple[dict, dict[str, torch.Tensor]]:
    meta = json.loads((FIXTURES / "litema_trajectory.json").read_text())
    return meta, load_file(FIXTURES / "litema_trajectory.safetensors")


def case_pipeline(name: str):
    """An ``LDMCompatPipeline`` for a case, with its training weights (the fixtures' DDIM chains used them)."""
    from ldm_compat import LDMCompatPipeline

    case = load_case(name)
    pipe = LDMCompatPipeline.from_ldm_config(case.config)
    pipe.unet.load_original_state_dict(case.unet_state_dict())
    pipe.unet.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------- latent models
LATENT_FIXTURES = Path(__file__).parent / "fixtures" / "ldm_reference_latent"
LATENT_CASES = sorted(p.name[: -len(".ckpt")] for p in LATENT_FIXTURES.glob("*.ckpt"))
FIRST_STAGE_PREFIX = "first_stage_model."


@cache
def load_latent_case(name: str) -> ReferenceCase:
    """A case of ``fixtures/ldm_reference_latent`` (same files and fields as the pixel cases)."""
    if name not in LATENT_CASES:
        raise KeyError(f"no latent reference case {name!r}; have {LATENT_CASES}")
    return _read_case(LATENT_FIXTURES, name)


def first_stage_state_dict(case: ReferenceCase) -> dict[str, torch.Tensor]:
    """The ``first_stage_model.*`` tensors with that prefix removed, in checkpoint order."""
    n = len(FIRST_STAGE_PREFIX)
    return {k[n:]: v for k, v in case.state_dict.items() if k.startswith(FIRST_STAGE_PREFIX)}


def case_unet(case: ReferenceCase, weights: str = "training"):
    """The case's ``LDMUNetModel`` (eval mode) from its ``unet_config``, with the training weights
    (``model.diffusion_model.*``) or the EMA weights (``model_ema.*``, LitEma names mapped by the converter's rules)."""
    from ldm_compat import LDMUNetModel
    from ldm_compat.convert.layout import OriginalStateDict, ema_shadow_map

    parts = OriginalStateDict.split(case.state_dict)
    if weights == "ema":
        state_dict = {name: parts.ema[shadow] for name, shadow in ema_shadow_map(parts.unet).items()}
    elif weights == "training":
        state_dict = parts.unet
    else:
        raise ValueError(f"weights={weights!r}: expected 'training' or 'ema'")
    unet = LDMUNetModel.from_ldm_config(case.unet_config)
    unet.load_original_state_dict(state_dict)
    return unet.eval()
