"""Lossless storage of nested checkpoint entries (optimizer states, loops, callbacks) as JSON + safetensors.

An original Lightning checkpoint carries more than its ``state_dict``: ``optimizer_states`` (lists of dicts keyed
by int, tuples, tensors), ``lr_schedulers``, ``callbacks``, ``loops``. ``flatten`` turns such a value into a JSON
skeleton plus a flat ``{name: tensor}`` dict; ``unflatten`` rebuilds it with the same types (int keys, tuples).
Anything else (an arbitrary object) is refused: it could not have come from a ``weights_only`` load anyway.
"""

from __future__ import annotations

import json
from typing import Any

import torch


def flatten(value: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value
        return {"__tensor__": path}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype | torch.device | torch.Size):
        return {"__repr__": type(value).__name__, "value": str(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {"__dict__": [[k, flatten(v, tensors, f"{path}.{k}")] for k, v in value.items()]}
    raise TypeError(f"{path or 'value'}: cannot store a {type(value).__name__} losslessly")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if "__tuple__" in skeleton:
        return tuple(unflatten(v, tensors) for v in skeleton["__tuple__"])
    if "__dict__" in skeleton:
        return {k if not isinstance(k, list) else tuple(k): unflatten(v, tensors) for k, v in skeleton["__dict__"]}
    if "__repr__" in skeleton:
        kind, text = skeleton["__repr__"], skeleton["value"]
        if kind == "dtype":
            return getattr(torch, text.removeprefix("torch."))
        if kind == "device":
            return torch.device(text)
        return torch.Size(json.loads(text.removeprefix("torch.Size(").removesuffix(")")))
    raise ValueError(f"unknown skeleton entry {sorted(skeleton)}")
