#!/usr/bin/env python
"""``examples/train.py`` for ``accelerate launch`` in the distributed tests.

- ``LDM_TEST_KILL_IN_SAVE=<step>``: every process SIGKILLs itself while checkpoint ``<step>`` is being written: after
  all its files (sharded model, optimizer, EMA shards, RNG states) are in the hidden temporary folder, before it is
  published, as a machine failure would. (A second run in the same processes is not possible: ``end_training``
  destroys the process group.)
- At the end each process writes ``<output_dir>/ranks/<run>-rank<i>.safetensors``: its local piece of every UNet
  parameter, EMA shadow and ``logvar`` (FSDP2: the DTensor's local shard; otherwise the full tensor), with the
  accelerator's view of the run (process index, number of processes, distributed type, FSDP2 or not) as metadata. The
  tests assemble the full tensors from these pieces with their own code.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TRAINER: list = []


def local(t: torch.Tensor) -> torch.Tensor:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.detach().cpu().contiguous().clone()


def instrument() -> None:
    import ldm_compat.training.distributed as distributed
    from ldm_compat.training.loop import Trainer

    init, save_state = Trainer.__init__, distributed.save_state
    kill_in_save = int(os.environ.get("LDM_TEST_KILL_IN_SAVE", "-1"))

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        TRAINER.append(self)

    def _save_state(accelerator, ema, folder):
        save_state(accelerator, ema, folder)
        if TRAINER and TRAINER[-1].state.global_step == kill_in_save:
            accelerator.wait_for_everyone()  # every process has written its part
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer.__init__, distributed.save_state = __init__, _save_state


def dump(trainer, out: Path, run: str) -> None:
    from safetensors.torch import save_file

    acc = trainer.accelerator
    module = acc.unwrap_model(trainer.module)
    tensors = {f"unet.{k}": local(p) for k, p in module.unet.named_parameters()}
    if trainer.ema is not None:
        tensors.update({f"ema.{k}": local(s) for k, s in zip(trainer.ema._names, trainer.ema.shadow_params)})
    tensors["logvar"] = local(module.objective.logvar)
    meta = {"rank": str(acc.process_index), "num_processes": str(acc.num_processes),
            "local_rank": str(acc.local_process_index), "distributed_type": str(acc.distributed_type),
            "fsdp2": str(bool(acc.is_fsdp2)), "pid": str(os.getpid()),
            "ema_num_updates": str(trainer.ema.num_updates if trainer.ema is not None else -1)}  # fmt: skip
    folder = out / "ranks"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / f"{run}-rank{acc.process_index}.safetensors"), meta)


def main() -> int:
    import faulthandler

    faulthandler.register(signal.SIGUSR1)  # a hang: kill -USR1 <pid> prints every thread's stack
    instrument()
    spec = importlib.util.spec_from_file_location("ldm_train_example", ROOT / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = sys.argv[1:]
    code = module.main(argv)
    if code == 0 and TRAINER:
        dump(TRAINER[-1], Path(argv[argv.index("--output_dir") + 1]), os.environ.get("LDM_TEST_RUN", "run"))
    return code


if __name__ == "__main__":
    sys.exit(main())
