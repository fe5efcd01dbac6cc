"""Training beyond one process: what the loop needs from Accelerate's engines (DDP on one or many machines, FSDP2,
DeepSpeed ZeRO-2) and what it must not leave to them.

- ``accelerator_kwargs`` / ``check_distributed_setup``: around ``Accelerator(...)``. On a CPU-only machine
  Accelerate 1.15 silently drops its FSDP plugin (the state stays ``MULTI_CPU``: plain DDP) and DeepSpeed (every
  process believes it is process 0 of 1); here FSDP2 is switched on as asked and DeepSpeed gets gloo. FSDP1 and
  ZeRO-3 are refused: their flattened or partitioned parameters have no per-parameter EMA. A multi-machine run checks
  that ``--output_dir`` is one shared folder (checkpoints are assembled there by all processes).
- ``ema_checkpoint_object``: under FSDP2 the EMA becomes shard-local (``ema_sharded``) and Accelerate checkpoints
  only its scalars; ``save_state`` / ``load_state`` add each process's EMA shards.
- ``unsharded_components``: the UNet, objective and EMA as full, unsharded modules on the main process, gathered once
  (every process takes part) for the pipeline folder and the original checkpoint.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch

from ldm_compat.training.ema_sharded import (
    ShardedEmaState,
    gather_shadows,
    is_dtensor,
    load_shards,
    save_shards,
    shard_like,
)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def _accelerator_available() -> bool:
    from accelerate.utils import is_mps_available, is_npu_available, is_xpu_available

    return torch.cuda.is_available() or is_xpu_available() or is_npu_available() or is_mps_available()


def accelerator_kwargs() -> dict:
    """Extra ``Accelerator(...)`` arguments for the way the run was launched."""
    if not _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return {}
    if _env_flag("ACCELERATE_USE_CPU"):
        raise ValueError(
            "DeepSpeed with ACCELERATE_USE_CPU=1: Accelerate 1.15 then ignores DeepSpeed (plain DDP); unset "
            "ACCELERATE_USE_CPU to run DeepSpeed on the CPU (gloo)"
        )
    if int(os.environ.get("LOCAL_RANK", -1)) != -1 and not _accelerator_available():
        from accelerate.utils import InitProcessGroupKwargs

        # without a backend Accelerate 1.15 sets num_processes=1 on every process even though DeepSpeed initialised
        # the process group; gloo is the backend DeepSpeed's CPU accelerator uses
        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {}


def check_distributed_setup(
    accelerator, output_dir: str | os.PathLike, accumulate_grad_batches: int = 1, gradient_clip_val: float = 0.0
) -> None:
    """FSDP2 on the CPU as requested, refuse engines the EMA cannot follow, give DeepSpeed the original config's
    accumulation and clipping, check the output folder is shared."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if _env_flag("ACCELERATE_USE_FSDP") and state.distributed_type == DistributedType.MULTI_CPU:
        # Accelerate 1.15 builds the plugin but enables FSDP only for accelerator types; its FSDP2 code path works on
        # the CPU with gloo (prepare, sharded save_state/load_state), so use what was asked for
        plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables, as Accelerate does
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.print("FSDP on the CPU (gloo): enabled (Accelerate 1.15 would silently run plain DDP here)")
    if state.distributed_type == DistributedType.FSDP and state.fsdp_plugin.fsdp_version != 2:
        raise ValueError(
            "FSDP: fsdp_version 1 is not supported (its flat parameters have no per-parameter EMA); set fsdp_version: 2"
        )
    if state.distributed_type == DistributedType.DEEPSPEED:
        stage = state.deepspeed_plugin.zero_stage
        if stage == 3:
            raise ValueError(
                "DeepSpeed ZeRO-3 is not supported (its partitioned parameters would need a gather per EMA update); "
                "use ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml) or FSDP2 (configs/accelerate/fsdp2.yaml)"
            )
        _match_deepspeed(state.deepspeed_plugin.deepspeed_config, accumulate_grad_batches, gradient_clip_val)
    check_shared_output_dir(accelerator, output_dir)


def _match_deepspeed(config: dict, accumulate_grad_batches: int, gradient_clip_val: float) -> None:
    """DeepSpeed accumulates and clips itself (Accelerate's ``clip_grad_norm_`` is a no-op under it, and it fills an
    ``auto`` clipping with 1.0): take both from ``lightning.trainer``, refuse a config that says otherwise."""
    wanted = {"gradient_accumulation_steps": (int(accumulate_grad_batches), "accumulate_grad_batches"),
              "gradient_clipping": (float(gradient_clip_val), "gradient_clip_val")}  # fmt: skip
    for key, (value, option) in wanted.items():
        given = config.get(key, "auto")
        if given == "auto":
            config[key] = value
        elif float(given) != value:
            raise ValueError(
                f"DeepSpeed config {key}={given} but lightning.trainer.{option}={value}; leave {key} out of the "
                "accelerate config (or 'auto') so that it follows the training config"
            )


def is_multi_machine(accelerator) -> bool:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    return accelerator.num_processes > local


def check_shared_output_dir(accelerator, output_dir: str | os.PathLike) -> None:
    """On several machines, every process must see the same ``output_dir``: the main process writes a probe file
    with a fresh name, every process looks for it."""
    if not is_multi_machine(accelerator):
        return
    from accelerate.utils import broadcast_object_list

    folder = Path(output_dir)
    names = [f".shared-check-{uuid.uuid4().hex}" if accelerator.is_main_process else None]
    if accelerator.is_main_process:
        (folder / names[0]).write_text("written by the main process\n")
    broadcast_object_list(names, from_process=0)
    seen = torch.tensor([int((folder / names[0]).exists())], device=accelerator.device)
    seen = accelerator.gather(seen).tolist()
    if accelerator.is_main_process:
        (folder / names[0]).unlink(missing_ok=True)
    missing = [rank for rank, ok in enumerate(seen) if not ok]
    if missing:
        raise ValueError(
            f"--output_dir {folder}: not the same folder on every machine (process(es) {missing} do not see what "
            "the main process writes there); use a shared file system"
        )


# ------------------------------------------------------------------------------------------------- the EMA


def _check_fsdp2_unet(unet) -> None:
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(unet, FSDPModule):
        raise ValueError(
            "FSDP2: the UNet must be its own FSDP unit (sampling calls it outside the training module); use "
            "fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP with LDMUNetModel in fsdp_transformer_layer_cls_to_wrap "
            "(configs/accelerate/fsdp2.yaml)"
        )


def ema_checkpoint_object(accelerator, ema, module):
    """What to ``register_for_checkpointing`` for the EMA (after ``prepare``): the EMA itself, or under FSDP2 its
    scalars, the shadows having been cut into shards like the (now sharded) UNet parameters."""
    if not accelerator.is_fsdp2:
        return ema
    unet = accelerator.unwrap_model(module).unet
    _check_fsdp2_unet(unet)
    shard_like(ema, unet)
    return ShardedEmaState(ema)


def save_state(accelerator, ema, folder: str) -> None:
    """``accelerator.save_state`` plus, under FSDP2, this process's EMA shards (every process calls this)."""
    accelerator.save_state(folder)
    if ema is not None and accelerator.is_fsdp2:
        save_shards(ema, folder, accelerator.process_index, accelerator.num_processes)


def load_state(accelerator, ema, folder: str) -> None:
    accelerator.load_state(folder)
    if ema is not None and accelerator.is_fsdp2:
        load_shards(ema, folder)


# ------------------------------------------------------------------------------------------------- outputs


def _plain_class(module: torch.nn.Module) -> type:
    """The module's own class (FSDP2 swaps in a subclass ``FSDP<name>``)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if issubclass(cls, FSDPModule):
        cls = next(base for base in cls.__bases__ if not issubclass(base, FSDPModule))
    return cls


def _rebuild(module: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
    """An unsharded copy of ``module`` holding ``state_dict`` (built on the meta device: no second init)."""
    with torch.device("meta"):
        fresh = _plain_class(module).from_config(module.config)
    fresh.load_state_dict(state_dict, strict=True, assign=True)
    left = [name for name, t in [*fresh.named_parameters(), *fresh.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"unsharded copy of {type(fresh).__name__}: no value for {left[:3]}")
    return fresh.eval()


def unsharded_components(accelerator, module, ema):
    """``(unet, objective, ema)`` to write the pipeline folder from. Without FSDP2 the live ones. Under FSDP2 every
    process must call this (one gather of the weights and of the EMA shadows); the main process gets unsharded copies
    on the CPU, the others ``(None, None, None)``."""
    root = accelerator.unwrap_model(module)
    if not accelerator.is_fsdp2:
        return root.unet, root.objective, ema
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    shadows = gather_shadows(ema) if ema is not None else None
    if not accelerator.is_main_process:
        return None, None, None

    def part(prefix: str) -> dict:
        return {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}

    unet = _rebuild(root.unet, part("unet."))
    objective = root.objective
    if any(is_dtensor(t) for t in objective.parameters()):
        # the objective's own non-persistent buffers (schedule) are recomputed from its config
        objective = _plain_class(objective).from_config(objective.config)
        objective.load_state_dict(part("objective."), strict=True)
    full_ema = None
    if ema is not None:
        from ldm_compat.training.ema import LitEmaModel

        full_ema = LitEmaModel(unet, decay=ema.decay, use_num_updates=ema.use_num_updates, update=ema.update,
                               ldm_bug_compat=ema.ldm_bug_compat)  # fmt: skip
        scalars = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        full_ema.load_state_dict({**scalars, "shadow_params": shadows})
    return unet, objective, full_ema


__all__ = [
    "accelerator_kwargs",
    "check_distributed_setup",
    "check_shared_output_dir",
    "ema_checkpoint_object",
    "load_state",
    "save_state",
    "unsharded_components",
]
