"""Reading and writing original checkpoints safely: no pickled code is ever executed, no half-written file is left."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

KEY_ORDER_METADATA = "ldm_compat.key_order"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what was expected."""


def load_checkpoint(path: str | os.PathLike, *, mmap: bool = True) -> dict[str, Any]:
    """Load an original ``.ckpt`` (``torch.load(weights_only=True)``) or ``.safetensors`` file.

    Returns the top-level mapping: ``{'state_dict': ..., 'global_step': ..., ...}`` for Lightning checkpoints, the
    bare state dict otherwise (safetensors files are always bare). Tensors are memory-mapped where possible so a
    large file costs little RAM until its tensors are used.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            tensors = load_file(path)
            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
        # safetensors sorts keys; restore the original module order when we wrote the file
        order = json.loads(metadata.get(KEY_ORDER_METADATA, "[]"))
        if sorted(order) == sorted(tensors):
            tensors = {k: tensors[k] for k in order}
        return tensors
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many types for bad files; each becomes one clear line
        message = str(err)
        if isinstance(err, pickle.UnpicklingError) and ("GLOBAL" in message or "Unsupported global" in message):
            raise CheckpointError(
                f"{path}: refused — the pickle needs code to load ({_unsafe_global(err)}); only tensors, numbers "
                "and containers are loaded (torch.load weights_only=True). Re-save it as plain tensors or safetensors"
            ) from None
        if mmap and "mmap can only be used" in message:
            return load_checkpoint(path, mmap=False)  # legacy (non-zip) torch.save files cannot be mapped
        reason = f"{type(err).__name__}: {message.split('. ')[0].splitlines()[0]}" if message else type(err).__name__
        raise CheckpointError(f"{path}: truncated or not a PyTorch checkpoint ({reason})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict or {{'state_dict': ...}}, got {type(obj).__name__}")
    return dict(obj)


def _unsafe_global(err: Exception) -> str:
    for line in str(err).splitlines():
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.strip().rstrip(".")
    return "unsupported global"


def state_dict_of(checkpoint: Mapping[str, Any], path: str | os.PathLike = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: ``checkpoint['state_dict']`` when present, else the mapping itself."""
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(state_dict).__name__}, expected a mapping")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: expected tensors in the state dict, not for keys {bad[:5]}")
    if not state_dict:
        raise CheckpointError(f"{path}: the state dict is empty")
    return dict(state_dict)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A crash or kill at any point leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(obj: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write an original-style checkpoint atomically: ``.safetensors`` (state dict only) or ``.ckpt`` (torch.save)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = obj.get("state_dict", obj)
        metadata = {k: str(v) for k, v in obj.items() if k != "state_dict" and isinstance(v, (int, float, str))}
        metadata[KEY_ORDER_METADATA] = json.dumps(list(tensors))
        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata))
    else:
        atomic_write(path, lambda tmp: torch.save(dict(obj), tmp))
