"""A shard-local ``LitEmaModel`` for FSDP2: each process averages only its own shard of every parameter.

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns each parameter into a ``DTensor`` sharded on dim 0. The EMA is
elementwise, so its shadows are sharded exactly like their parameters and updated with ``torch._foreach_*`` calls on
the local tensors: no communication in the hot path, float32 shadows, and bit for bit the update an unsharded EMA does
on the same elements.

- ``shard_like(ema, model)`` cuts the (full, identical on every process) shadows into DTensors with each parameter's
  mesh and placements. The global shape and stride are passed explicitly: ``DTensor.from_local`` would otherwise guess
  ``local × world_size``, wrong for FSDP2's uneven dim-0 shards (5 rows over 2 processes are 3 + 2), the error that
  deadlocked saves elsewhere.
- ``local_tensors`` maps DTensors to their local shards (what ``LitEmaModel`` updates and copies).
- ``gather_shadows`` returns full CPU tensors (on every process; a collective): once, when the pipeline folder is
  written.
- Checkpoints: every process writes its shards to ``ema_shard_<rank>.safetensors`` (with each shard's dim-0 offset and
  the global shape); ``load_shards`` assembles each tensor from all files and cuts the current layout's shard, so a
  checkpoint also loads on another number of processes. ``ShardedEmaState`` is what Accelerate checkpoints instead of
  the EMA itself (its scalars: decay, counter, options; never a shard that only the main process would write).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

SHARD_PREFIX = "ema_shard_"
_FORMAT = "ldm_compat.ema_shard.v1"


def _dtensor_type():
    """``DTensor`` if ``torch.distributed.tensor`` is loaded (no DTensor can exist otherwise), else ``None``."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(tensor) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The local shard of each DTensor (the same storage: in-place ops on it change the DTensor); others unchanged."""
    dtensor = _dtensor_type()
    if dtensor is None or not any(isinstance(t, dtensor) for t in tensors):
        return tensors
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def local_pairs(shadows: list[torch.Tensor], params: list[torch.Tensor]):
    """Local shards of shadows and parameters for an update or a copy; both must be sharded alike (or neither)."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return shadows, params
    for i, (s, p) in enumerate(zip(shadows, params)):
        if isinstance(s, dtensor) != isinstance(p, dtensor):
            raise ValueError(
                f"LitEmaModel: shadow {i} is {'sharded' if isinstance(s, dtensor) else 'full'} but its parameter is "
                f"{'sharded' if isinstance(p, dtensor) else 'full'} (FSDP2 leaves parameters gathered after a forward "
                "without backward when reshard_after_forward is false: set fsdp_reshard_after_forward: true)"
            )
    return local_tensors(shadows), local_tensors(params)


def dim0_slice(dtensor) -> tuple[int, int]:
    """``(start, length)`` of this process's shard along dim 0, as DTensor/FSDP2 cut it (``torch.chunk`` sizes:
    ``ceil(n / k)`` rows per shard, the last ones shorter or empty), for placements made of ``Replicate`` and
    ``Shard(0)`` (FSDP2, HSDP). Anything else is refused."""
    mesh, placements = dtensor.device_mesh, dtensor.placements
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError("LitEmaModel: this process is not part of the parameter's device mesh")
    start, length = 0, dtensor.shape[0] if dtensor.ndim else 1
    for mesh_dim, placement in enumerate(placements):
        if placement.is_replicate():
            continue
        if type(placement).__name__ == "Shard" and placement.is_shard(0) and dtensor.ndim:
            k, j = mesh.size(mesh_dim), coordinate[mesh_dim]
            rows = -(-length // k)
            lo, hi = min(j * rows, length), min((j + 1) * rows, length)
            start, length = start + lo, hi - lo
            continue
        raise ValueError(f"LitEmaModel: sharding {placement} is not supported (FSDP2's Shard(0) and Replicate are)")
    return start, length


@torch.no_grad()
def shard_like(ema, model: torch.nn.Module) -> None:
    """Replace ``ema``'s full shadows by float32 DTensors sharded like ``model``'s (FSDP2) parameters.

    Every process holds the same full shadows before (the EMA is built from the same weights everywhere), so each
    takes its own shard without communication.
    """
    from torch.distributed.tensor import DTensor

    params = ema._resolve(model)
    shards = []
    for i, (shadow, param) in enumerate(zip(ema.shadow_params, params)):
        if not isinstance(param, DTensor):
            shards.append(shadow)
            continue
        if is_dtensor(shadow):
            raise ValueError("LitEmaModel: the EMA is already sharded")
        if tuple(shadow.shape) != tuple(param.shape):
            raise ValueError(f"LitEmaModel: shadow {i} has shape {tuple(shadow.shape)}, parameter {tuple(param.shape)}")
        start, length = dim0_slice(param)
        local = shadow.narrow(0, start, length) if shadow.ndim else shadow
        local = local.to(param.to_local().device).clone()  # own storage: the full shadow is freed
        if local.shape != param.to_local().shape:
            raise ValueError(
                f"LitEmaModel: shadow {i}: computed shard {tuple(local.shape)}, the parameter's is "
                f"{tuple(param.to_local().shape)}"
            )
        shards.append(
            DTensor.from_local(
                local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
            )
        )
    ema.shadow_params = shards
    ema.temp_stored_params = None
    ema._fused_update.clear()


@torch.no_grad()
def gather_shadows(ema) -> list[torch.Tensor]:
    """Full CPU copies of the shadows (a collective for sharded ones: call it on every process)."""
    return [(s.full_tensor() if is_dtensor(s) else s).detach().cpu().clone() for s in ema.shadow_params]


def _shadow_names(ema) -> list[str]:
    return list(ema._names) if ema._names is not None else [str(i) for i in range(len(ema.shadow_params))]


def save_shards(ema, folder: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Write this process's shadow shards (and where they sit in the full tensors) to ``ema_shard_<rank>``."""
    from safetensors.torch import save_file

    tensors, layout = {}, {}
    for name, shadow in zip(_shadow_names(ema), ema.shadow_params):
        if is_dtensor(shadow):
            start, _ = dim0_slice(shadow)
            local = shadow.to_local()
        else:
            start, local = 0, shadow
        tensors[name] = local.detach().cpu().contiguous()
        layout[name] = [start, list(shadow.shape)]
    path = Path(folder) / f"{SHARD_PREFIX}{rank}.safetensors"
    metadata = {"format": _FORMAT, "rank": str(rank), "world_size": str(world_size), "layout": json.dumps(layout)}
    save_file(tensors, str(path), metadata=metadata)
    return path


@torch.no_grad()
def load_shards(ema, folder: str | os.PathLike) -> None:
    """Fill ``ema``'s shadows (sharded or full) from the ``ema_shard_*`` files of a checkpoint, whatever layout wrote
    them: each tensor is assembled from the files' pieces and this process's shard is cut from it."""
    from safetensors import safe_open

    from ldm_compat.convert.checkpoint_io import CheckpointError

    folder = Path(folder)
    files = sorted(folder.glob(f"{SHARD_PREFIX}*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no {SHARD_PREFIX}*.safetensors (the EMA of a sharded run)")
    opened = []
    for path in files:
        handle = safe_open(str(path), "pt")
        metadata = handle.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise CheckpointError(f"{path}: not an EMA shard file (format {metadata.get('format')!r})")
        opened.append((path, handle, json.loads(metadata["layout"])))
    world_sizes = {len(files)} | {int(h.metadata()["world_size"]) for _, h, _ in opened}
    if len(world_sizes) != 1:
        raise CheckpointError(f"{folder}: {len(files)} EMA shard files, written by {sorted(world_sizes)} processes")
    shadows = ema.shadow_params
    for i, name in enumerate(_shadow_names(ema)):
        full = _assemble(name, opened, tuple(shadows[i].shape), folder)
        target = shadows[i]
        if is_dtensor(target):
            start, length = dim0_slice(target)
            target.to_local().copy_(full.narrow(0, start, length) if full.ndim else full)
        else:
            target.copy_(full)


def _assemble(name: str, opened, shape: tuple, folder: Path) -> torch.Tensor:
    pieces: dict[int, torch.Tensor] = {}
    for path, handle, layout in opened:
        if name not in layout:
            raise ValueError(f"{path}: no EMA shard for parameter {name!r}")
        start, global_shape = layout[name]
        if tuple(global_shape) != shape:
            raise ValueError(f"{path}: {name} has global shape {tuple(global_shape)}, the model's is {shape}")
        pieces.setdefault(start, handle.get_tensor(name))  # replicas (HSDP) hold the same piece
    if not shape:
        return pieces[0]
    end, ordered = 0, []
    for start in sorted(pieces):
        if start != end:
            raise ValueError(f"{folder}: EMA shards of {name} do not tile dim 0 (a piece starts at {start}, not {end})")
        ordered.append(pieces[start])
        end += pieces[start].shape[0]
    if end != shape[0]:
        raise ValueError(f"{folder}: EMA shards of {name} cover {end} of {shape[0]} rows")
    return torch.cat(ordered)


class ShardedEmaState:
    """What Accelerate checkpoints for a sharded EMA: its scalars and options; the shards go to ``save_shards``."""

    def __init__(self, ema):
        self.ema = ema

    def state_dict(self) -> dict:
        state = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
        state["sharded"] = True
        return state

    def load_state_dict(self, state: Mapping) -> None:
        state = dict(state)
        if not state.pop("sharded", False):
            raise ValueError("EMA state: the checkpoint was written by an unsharded run; resume it on the same layout")
        self.ema.load_state_dict(state)
