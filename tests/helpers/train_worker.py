#!/usr/bin/env python
"""A fork server for the kill-and-resume tests: import the training stack once, then run each job in a fresh child.

Each stdin line is a JSON job ``{"argv": [...], "log": path, "die": {...} | null, "kill_after": seconds | null}``;
the child runs ``examples/train.py``'s ``main(argv)`` and is ended by a real ``SIGKILL`` — sent by itself at a chosen
point (``die``) or by this server after ``kill_after`` seconds. One JSON line answers each job:
``{"exit": code | null, "signal": number | null, "seconds": wall time}``.

``die`` hooks (``step`` is the global step whose checkpoint the hook waits for):
- ``{"at": "after_step", "step": N}``: right after optimizer step N (and its checkpoint, if any) — between saves.
- ``{"at": "save_started", "step": N}``: the temporary folder exists, nothing is written yet.
- ``{"at": "partial_file", "step": N, "file": "optimizer.bin"}``: half of that file is on disk, the rest never comes.
- ``{"at": "before_publish", "step": N}``: every file written and fsynced, the folder not yet renamed.
- ``{"at": "deleting", "step": N}``: the first folder deleted after checkpoint N is written (an old ``checkpoint-N``
  being replaced, or a pruned one) is half deleted.

Forking is safe here: the server never runs a parallel torch op (``OMP_NUM_THREADS=1``) and creates no Accelerator.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(hook: dict) -> None:
    import shutil

    import accelerate.checkpointing
    import torch

    import ldm_compat.training.checkpoints as ckpt
    from ldm_compat.training.loop import Trainer

    at, step = hook["at"], int(hook["step"])
    if at == "after_step":
        after = Trainer._after_step

        def _after_step(self, batch, logs):
            after(self, batch, logs)
            if self.state.global_step == step:
                die()

        Trainer._after_step = _after_step
        return

    def ours(path) -> bool:  # a write for the checkpoint of `step`
        return Path(path).name == f"{ckpt._TMP_PREFIX}{step}" or Path(path).parent.name == f"{ckpt._TMP_PREFIX}{step}"

    if at == "save_started":
        write = ckpt.write_checkpoint

        def write_checkpoint(directory, n, save, *args, **kwargs):
            return write(directory, n, (lambda tmp: die()) if n == step else save, *args, **kwargs)

        import ldm_compat.training.loop as loop

        loop.write_checkpoint = write_checkpoint
    elif at == "partial_file":
        real_save = accelerate.checkpointing.save

        def save(obj, f, *args, **kwargs):
            if ours(f) and Path(f).name == hook.get("file", "optimizer.bin"):
                buffer = io.BytesIO()
                torch.save(obj, buffer)
                data = buffer.getvalue()
                with open(f, "wb") as out:
                    out.write(data[: len(data) // 2])
                    out.flush()
                    os.fsync(out.fileno())
                die()
            return real_save(obj, f, *args, **kwargs)

        accelerate.checkpointing.save = save
    elif at in ("before_publish", "deleting"):
        fsync_tree = ckpt._fsync_tree
        armed = []

        def _fsync_tree(root):
            fsync_tree(root)
            if ours(root):
                if at == "before_publish":
                    die()
                armed.append(True)

        ckpt._fsync_tree = _fsync_tree
        if at == "deleting":
            rmtree = shutil.rmtree

            class _Shutil:  # the checkpoints module's view of shutil: rmtree half-deletes, then the process dies
                def __getattr__(self, name):
                    return getattr(shutil, name)

                @staticmethod
                def rmtree(path, *args, **kwargs):
                    if armed and Path(path).is_dir():
                        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
                        for p in files[: max(1, len(files) // 2)]:
                            p.unlink()
                        die()
                    return rmtree(path, *args, **kwargs)

            ckpt.shutil = _Shutil()
    else:
        raise ValueError(f"unknown die hook {hook}")


def child(job: dict, train_main) -> None:
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
    sys.stderr = sys.stdout
    code = 1
    try:
        if job.get("die"):
            install(job["die"])
        code = train_main(job["argv"])
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        os._exit(code)


def main() -> None:
    # the whole training stack, imported once (the children inherit it)
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import sklearn.datasets  # noqa: F401
    import torch  # noqa: F401

    import ldm_compat.convert.export  # noqa: F401
    import ldm_compat.convert.training_folder  # noqa: F401
    import ldm_compat.pipelines.pipeline_ldm_compat  # noqa: F401
    import ldm_compat.training.data  # noqa: F401
    import ldm_compat.training.ema  # noqa: F401
    import ldm_compat.training.loop  # noqa: F401
    import ldm_compat.training.lr_schedulers  # noqa: F401
    import ldm_compat.training.objective  # noqa: F401

    spec = importlib.util.spec_from_file_location("ldm_train_example", ROOT / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            child(job, module.main)
        killed_by_us, status = False, None
        if job.get("kill_after") is not None:
            deadline = start + float(job["kill_after"])
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                status = None
                if time.monotonic() >= deadline:
                    os.kill(pid, signal.SIGKILL)
                    killed_by_us = True
                    break
                time.sleep(0.002)
        if status is None:
            _, status = os.waitpid(pid, 0)
        answer = {
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "killed_by_server": killed_by_us,
            "seconds": round(time.monotonic() - start, 3),
        }
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
