#!/usr/bin/env python
"""``examples/train.py`` for ``accelerate launch``, instrumented: what each process did goes to a JSON file.

Usage: ``accelerate launch ... tests/helpers/mp_train.py <examples/train.py arguments>``. Each process writes
``<output_dir>/ranks/<run>-rank<i>.json`` (``run`` from ``LDM_TEST_RUN``, default ``run``) with:
- ``events``: how often it published a checkpoint, sampled, wrote images, logged to a tracker, wrote the pipeline
  folder, stepped the EMA;
- ``rng_at_save``: a hash of its torch/numpy/python RNG states when each checkpoint was written;
- ``resumed``: the step, RNG hash and weight hash right after ``--resume_from_checkpoint``;
- ``final``: hashes of the UNet, EMA, logvar, optimizer state, loop state and RNG at the end.
``LDM_TEST_NAN_AT=<rank>:<step>[,...]`` makes that process's input NaN at that global step (a non-finite loss).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
RECORD: dict = {"events": Counter(), "rng_at_save": {}, "resumed": None, "final": None}
TRAINER: list = []


def digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def rng_digest() -> str:
    state = (random.getstate(), np.random.get_state()[1].tobytes(), torch.get_rng_state().numpy().tobytes())
    return hashlib.sha256(pickle.dumps(state)).hexdigest()[:16]


def weights_digest(trainer) -> str:
    unet = trainer.accelerator.unwrap_model(trainer.module).unet
    return digest(*unet.state_dict().values())


def optimizer_digest(trainer) -> str:
    tensors = []
    for state in trainer.optimizer.state_dict()["state"].values():
        tensors += [v if isinstance(v, torch.Tensor) else torch.tensor(float(v)) for _, v in sorted(state.items())]
    return digest(*tensors)


def count(name: str):
    def wrap(fn):
        def wrapper(*args, **kwargs):
            RECORD["events"][name] += 1
            return fn(*args, **kwargs)

        return wrapper

    return wrap


def instrument() -> None:
    import accelerate.tracking

    import ldm_compat.convert.training_folder as training_folder
    import ldm_compat.training.checkpoints as checkpoints
    import ldm_compat.training.image_logging as image_logging
    from ldm_compat.pipelines.pipeline_ldm_compat import LDMCompatPipeline
    from ldm_compat.training.ema import LitEmaModel
    from ldm_compat.training.loop import Trainer

    checkpoints._fsync_tree = count("publish_checkpoint")(checkpoints._fsync_tree)
    LDMCompatPipeline.__call__ = count("sample")(LDMCompatPipeline.__call__)
    image_logging.write_image_log = count("write_images")(image_logging.write_image_log)
    accelerate.tracking.TensorBoardTracker.log = count("tracker_log")(accelerate.tracking.TensorBoardTracker.log)
    training_folder.write_training_folder = count("write_pipeline")(training_folder.write_training_folder)
    LitEmaModel.step = count("ema_step")(LitEmaModel.step)

    init, resume, save = Trainer.__init__, Trainer.resume, Trainer.save_checkpoint
    get_input = Trainer.get_input

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        TRAINER.append(self)

    def _resume(self):
        resume(self)
        if self.options.resume_from_checkpoint:
            RECORD["resumed"] = {"step": self.state.global_step, "rng": rng_digest(), "weights": weights_digest(self)}

    def save_checkpoint(self):
        RECORD["rng_at_save"][str(self.state.global_step)] = rng_digest()
        return save(self)

    nan_at = {tuple(map(int, item.split(":"))) for item in os.environ.get("LDM_TEST_NAN_AT", "").split(",") if item}

    def _get_input(self, batch):
        x = get_input(self, batch)
        if (self.accelerator.process_index, self.state.global_step) in nan_at:
            x = x * float("nan")
        return x

    Trainer.__init__, Trainer.resume, Trainer.save_checkpoint = __init__, _resume, save_checkpoint
    Trainer.get_input = _get_input


def final_record(trainer) -> dict:
    ema = trainer.ema
    return {
        "step": trainer.state.global_step,
        "loop_state": trainer.state.state_dict(),
        "weights": weights_digest(trainer),
        "ema": digest(*ema.shadow_params) if ema is not None else None,
        "ema_num_updates": int(ema.num_updates) if ema is not None else None,
        "logvar": digest(trainer.objective.logvar),
        "optimizer": optimizer_digest(trainer),
        "rng": rng_digest(),
    }


def main() -> int:
    instrument()
    spec = importlib.util.spec_from_file_location("ldm_train_example", ROOT / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = sys.argv[1:]
    out = Path(argv[argv.index("--output_dir") + 1])
    try:
        return module.main(argv)
    finally:
        if TRAINER:
            trainer = TRAINER[-1]
            RECORD["rank"], RECORD["pid"] = trainer.accelerator.process_index, os.getpid()
            RECORD["num_processes"] = trainer.accelerator.num_processes
            RECORD["final"] = final_record(trainer)
            folder = out / "ranks"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{os.environ.get('LDM_TEST_RUN', 'run')}-rank{RECORD['rank']}.json"
            (folder / name).write_text(json.dumps(RECORD, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
