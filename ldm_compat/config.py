"""Reading original-style latent-diffusion YAML configs (``model.target``, ``model.params``, ``unet_config``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """An original-style config that cannot be used; the message names the file/key and what was expected."""


def load_ldm_config(path: str | os.PathLike, overrides: list[str] | None = None) -> DictConfig:
    """Load an original-style YAML with OmegaConf, apply ``key=value`` dotlist ``overrides``, check ``model.params``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    try:
        config = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and OmegaConf's own errors
        raise ConfigError(f"{path}: not a readable YAML file ({type(err).__name__}: {err})") from None
    if not isinstance(config, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(config).__name__}")
    if overrides:
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
    if not isinstance(config.get("model"), DictConfig) or not isinstance(config.model.get("params"), DictConfig):
        raise ConfigError(f"{path}: expected 'model.params' (an original latent-diffusion config)")
    return config


def to_plain(value: Any) -> Any:
    """OmegaConf containers (and nested mappings) → plain Python dicts/lists; other values unchanged."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def model_params(config: Mapping) -> dict:
    """The ``model.params`` mapping of an original config (accepts the whole config or ``model.params`` itself)."""
    config = to_plain(config)
    if "model" in config:
        return dict(config["model"].get("params") or {})
    return dict(config)
