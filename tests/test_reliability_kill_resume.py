"""Kill and resume: SIGKILL at a random step and in every phase of a checkpoint write, resume with ``latest``.

Every interrupted run must end bit-identical to the uninterrupted one: UNet, EMA, optimizer, logvar, LR schedule, RNG
states, loop position (the whole final checkpoint folder) and the written pipeline folder. A checkpoint being written
when the process dies is never picked up as ``latest``, and no visible ``checkpoint-<step>`` is ever incomplete.

The runs are real processes (``examples/train.py``'s ``main``) forked from ``helpers/train_worker.py``, which imports
the training stack once; each is ended by a real ``SIGKILL``. The random choices (the step, the kill times) come from
``LDM_COMPAT_RELIABILITY_SEED`` when set, else from a fresh seed that every failure message reports.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.checkpoint_compare import folder_differences, folder_files, is_complete
from helpers.tiny_config import write_config

from ldm_compat.training.checkpoints import list_checkpoints, resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 4, 2  # optimizer steps per run, checkpoint interval
SEED = int(os.environ.get("LDM_COMPAT_RELIABILITY_SEED") or random.SystemRandom().randrange(2**31))
SIGKILL = int(signal.SIGKILL)


class Worker:
    """Client of ``helpers/train_worker.py``: each ``run`` is one training process, possibly killed."""

    def __init__(self, config: Path, logs: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}  # fmt: skip
        self.config, self.logs, self.count = config, logs, 0
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "helpers" / "train_worker.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )  # fmt: skip
        assert self._answer(240).get("ready"), "the train worker did not start"

    def _answer(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise TimeoutError(f"no answer from the train worker in {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the train worker exited ({self.proc.wait()})")
        return json.loads(line)

    def run(self, out: Path, *extra: str, die: dict | None = None, kill_after: float | None = None) -> dict:
        """Run (or resume: ``--resume_from_checkpoint latest`` is always passed) a training into ``out``."""
        self.count += 1
        log = self.logs / f"run{self.count}-{out.name}.log"
        argv = ["--config", str(self.config), "--output_dir", str(out), "--report_to", "none",
                "--checkpointing_steps", str(EVERY), "--resume_from_checkpoint", "latest", *extra]  # fmt: skip
        job = {"argv": argv, "log": str(log), "die": die, "kill_after": kill_after}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        answer = self._answer(300)
        answer["log"] = log.read_text() if log.exists() else ""
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill_resume")
    config = write_config(root / "tiny.yaml")
    (root / "logs").mkdir()
    client = Worker(config, root / "logs")
    yield client
    client.close()


@pytest.fixture(scope="module")
def reference(worker, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    answer = worker.run(out)
    assert answer["exit"] == 0, answer["log"][-3000:]
    return {"out": out, "seconds": answer["seconds"], "files": set(folder_files(checkpoint(out, EVERY)))}


def checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"checkpoint-{step}"


def visible_problems(out: Path, expected_files: set[str]) -> list[str]:
    """Every visible ``checkpoint-<step>`` folder that is not complete (must be none, at every moment)."""
    return [p for p in (is_complete(c, expected_files) for c in list_checkpoints(out / "checkpoints")) if p]


def assert_same_as_reference(reference: dict, out: Path, context: str) -> None:
    final = folder_differences(checkpoint(reference["out"], STEPS), checkpoint(out, STEPS))
    assert not final, f"{context}: final checkpoint differs from the uninterrupted run: {final[:8]}"
    pipeline = folder_differences(reference["out"] / "pipeline", out / "pipeline")
    assert not pipeline, f"{context}: pipeline folder differs from the uninterrupted run: {pipeline[:8]}"
    hidden = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not hidden, f"{context}: temporary folders left after the resumed run: {hidden}"


def resume_to_the_end(worker, out: Path, context: str) -> dict:
    answer = worker.run(out)
    assert answer["exit"] == 0, f"{context}: the resumed run failed:\n{answer['log'][-3000:]}"
    return answer


def test_kill_between_checkpoints_then_resume_latest(worker, reference, tmp_path):
    rng = random.Random(SEED)
    step = rng.choice([s for s in range(1, STEPS) if s % EVERY])
    context = f"SIGKILL after step {step} (seed {SEED})"
    out = tmp_path / "run"
    answer = worker.run(out, die={"at": "after_step", "step": step})
    assert answer["signal"] == SIGKILL, f"{context}: the run was not killed: {answer}"
    last = step // EVERY * EVERY
    latest = resolve_checkpoint("latest", out / "checkpoints")
    assert (latest.name if latest else None) == (f"checkpoint-{last}" if last else None), context
    assert not visible_problems(out, reference["files"]), context
    resumed = resume_to_the_end(worker, out, context)
    expected = f"resumed from {checkpoint(out, last)}" if last else "no checkpoint yet, starting a new run"
    assert expected in resumed["log"], f"{context}: {resumed['log'][-2000:]}"
    assert_same_as_reference(reference, out, context)


@pytest.mark.parametrize(
    "die",
    [
        {"at": "save_started"},
        {"at": "partial_file", "file": "model.safetensors"},
        {"at": "partial_file", "file": "optimizer.bin"},
        {"at": "partial_file", "file": "custom_checkpoint_0.pkl"},  # the EMA
        {"at": "before_publish"},
    ],
    ids=lambda d: d["at"] + (f"-{d['file']}" if "file" in d else ""),
)
def test_kill_while_writing_a_checkpoint_is_never_latest(worker, reference, tmp_path, die):
    context = f"SIGKILL while writing checkpoint-{STEPS} ({die})"
    out = tmp_path / "run"
    answer = worker.run(out, die={**die, "step": STEPS})
    assert answer["signal"] == SIGKILL, f"{context}: the run was not killed: {answer}"
    partial = out / "checkpoints" / f".tmp-checkpoint-{STEPS}"
    assert partial.is_dir(), f"{context}: the kill did not happen mid-write"
    if die["at"] == "partial_file":
        assert is_complete(partial, reference["files"]) is not None, f"{context}: the file was written whole"
    assert not checkpoint(out, STEPS).exists(), context
    assert resolve_checkpoint("latest", out / "checkpoints") == checkpoint(out, STEPS - EVERY), context
    assert not visible_problems(out, reference["files"]), context
    resumed = resume_to_the_end(worker, out, context)
    assert f"resumed from {checkpoint(out, STEPS - EVERY)}" in resumed["log"], context
    assert_same_as_reference(reference, out, context)


@pytest.mark.parametrize("pruning", [False, True], ids=["replacing-same-step", "pruning-old"])
def test_kill_while_deleting_an_old_checkpoint(worker, reference, tmp_path, pruning):
    """The last step is saved twice (after the step, then at the end of ``train``): the second save replaces the
    first; with ``--checkpoints_total_limit 1`` the previous checkpoint is pruned. A kill half way through either
    deletion must not leave a half-deleted folder under a ``checkpoint-<step>`` name."""
    context = f"SIGKILL while {'pruning' if pruning else 'replacing'} a checkpoint"
    out = tmp_path / "run"
    extra = ("--checkpoints_total_limit", "1") if pruning else ()
    answer = worker.run(out, *extra, die={"at": "deleting", "step": STEPS})
    assert answer["signal"] == SIGKILL, f"{context}: the run was not killed: {answer}"
    problems = visible_problems(out, reference["files"])
    assert not problems, f"{context}: incomplete checkpoint folders are visible: {problems}"
    assert resolve_checkpoint("latest", out / "checkpoints") == checkpoint(out, STEPS), context
    resume_to_the_end(worker, out, context)
    assert_same_as_reference(reference, out, context)


def test_kills_at_random_moments_lose_nothing(worker, reference, tmp_path):
    """Kill the same command again and again at random moments (from outside), then let it finish."""
    rng = random.Random(SEED + 1)
    out, outcomes = tmp_path / "run", []
    for _attempt in range(6):
        delay = rng.uniform(0.05, reference["seconds"])
        answer = worker.run(out, kill_after=delay)
        found = [p.name for p in list_checkpoints(out / "checkpoints")]
        partial = [p.name for p in (out / "checkpoints").glob(".*")] if (out / "checkpoints").exists() else []
        outcomes.append(f"kill at {delay:.2f}s: {'killed' if answer['signal'] else 'finished'}, {found}, {partial}")
        context = f"seed {SEED}, attempts: {outcomes}"
        assert answer["exit"] in (0, None), f"{context}: the run failed:\n{answer['log'][-3000:]}"
        assert not visible_problems(out, reference["files"]), context
        if answer["exit"] == 0:
            break
    else:
        resume_to_the_end(worker, out, context)
    print("\n".join(outcomes))
    assert_same_as_reference(reference, out, context)


def test_a_tampered_checkpoint_is_refused_on_resume(reference, tmp_path):
    """``latest`` runs no code from the checkpoint folder: Accelerate loads its pickles with ``weights_only=False``,
    so each pickle's globals are checked first (read, never executed). Proven with a canary."""
    import shutil

    import torch

    from ldm_compat.convert.checkpoint_io import CheckpointError
    from ldm_compat.training.checkpoints import check_checkpoint_files

    folder = tmp_path / "checkpoints" / f"checkpoint-{STEPS}"
    shutil.copytree(checkpoint(reference["out"], STEPS), folder)
    check_checkpoint_files(folder)  # the real thing passes (numpy RNG state included)
    canary = tmp_path / "canary"
    state = torch.load(folder / "custom_checkpoint_1.pkl", weights_only=True)
    torch.save({**state, "payload": _Canary(str(canary))}, folder / "custom_checkpoint_1.pkl")
    with pytest.raises(CheckpointError, match=r"custom_checkpoint_1\.pkl: refused") as info:
        resolve_checkpoint("latest", tmp_path / "checkpoints")
    assert "\n" not in str(info.value) and not canary.exists()
    torch.load(folder / "custom_checkpoint_1.pkl", weights_only=False)  # what a plain resume would have done
    assert canary.exists(), "the canary does not work"


class _Canary:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # creates the canary file when unpickled with code execution
