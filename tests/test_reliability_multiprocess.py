"""Two processes (``accelerate launch``, CPU, gloo) against one with the same global batch.

One launch trains 2 processes × 2 images and is stopped by a NaN loss on one process only (``--nan_policy stop``); a
second launch resumes it with ``latest`` and finishes, skipping (``--nan_policy skip``) a step where one process's
loss is NaN. Checked: the same weights (UNet, EMA, logvar) as 1 process × 4 images (whose batch has the same NaN half
in the same step) within 1e-5, at the checkpoint and at the end; both processes stop or skip together (a process
skipping alone would leave the other in the gradient all-reduce); the last good checkpoint is kept; every process
resumes its own RNG state and ends bit-identical to the other; checkpoints, the pipeline folder, samples, images and
tracker logs are written by the main process only.

CPU multi-process with Accelerate: ``accelerate launch --cpu --num_processes 2`` starts ONE process (its CPU path
expects MPI); ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`` starts two with gloo.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.checkpoint_compare import load_any, tensor_max_abs
from helpers.tiny_config import tiny_config, write_config

from ldm_compat.config import load_ldm_config
from ldm_compat.training.loop import Trainer, TrainOptions

ROOT = Path(__file__).resolve().parents[1]
PER_PROCESS, PROCESSES, STEPS, EVERY = 2, 2, 4, 2
NAN_RANK, NAN_STEP = 1, 2  # process 1's loss is NaN in the step after checkpoint-2: the first launch stops there
SKIP_STEP = 3  # the resumed launch skips the step after that (process 1's loss is NaN again)
TOL = 1e-5
# base_learning_rate 1e-5: Adam divides each gradient by its running RMS, so rounding-level differences in near-zero
# gradients (the two processes sum the batch in two halves) become steps of up to the learning rate; the weights'
# deviation grows with lr × steps (1.6e-5 after 4 steps at the default 1e-4 × 4, ~1e-6 here). Runs that differ in
# anything real (e.g. other noise) differ by ~lr × steps = 1.6e-4 here, far above the tolerance.
CONFIG = tiny_config(**{"model.base_learning_rate": 1.0e-5})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, out: Path, run: str, *args: str, env_extra: dict | None = None, timeout: int = 240):
    """``args``: options of examples/train.py, then dotlist overrides (argparse wants them in this order)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "LDM_TEST_RUN": run,
           **(env_extra or {})}  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(PROCESSES),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(ROOT / "tests" / "helpers" / "mp_train.py"),
           "--config", str(config), "--output_dir", str(out), "--report_to", "tensorboard",
           "--checkpointing_steps", str(EVERY), "--resume_from_checkpoint", "latest", "--sample_steps", "2",
           *args, f"data.params.batch_size={PER_PROCESS}"]  # fmt: skip
    # a hang (e.g. one process waiting in an all-reduce the other never joins) ends as TimeoutExpired
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    ranks = [json.loads((out / "ranks" / f"{run}-rank{r}.json").read_text()) for r in range(PROCESSES)
             if (out / "ranks" / f"{run}-rank{r}.json").exists()]  # fmt: skip
    return result, ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    config = write_config(root / "tiny.yaml", CONFIG)
    out = root / "two"
    stopped, stopped_ranks = launch(
        config, out, "stopped", f"lightning.trainer.max_steps={STEPS}",
        env_extra={"LDM_TEST_NAN_AT": f"{NAN_RANK}:{NAN_STEP}"},
    )  # fmt: skip
    snapshot = root / "checkpoint-at-stop"
    if (out / "checkpoints").is_dir():
        import shutil

        shutil.copytree(out / "checkpoints", snapshot)
    resumed, resumed_ranks = launch(
        config, out, "resumed", "--nan_policy", "skip", f"lightning.trainer.max_steps={STEPS}",
        "lightning.callbacks.image_logger.params.batch_frequency=1",
        env_extra={"LDM_TEST_NAN_AT": f"{NAN_RANK}:{SKIP_STEP}"},
    )  # fmt: skip
    # the same global batch on one process (in this process: the thread count does not matter at 1e-5), with
    # process 1's half of the batch NaN at SKIP_STEP
    one = root / "one"
    trainer = Trainer(
        load_ldm_config(config, [f"data.params.batch_size={PER_PROCESS * PROCESSES}"]),
        TrainOptions(output_dir=str(one), report_to="none", checkpointing_steps=EVERY, nan_policy="skip"),
    )
    get_input = trainer.get_input

    def poisoned(batch):
        x = get_input(batch)
        if trainer.state.global_step == SKIP_STEP:
            x[NAN_RANK * PER_PROCESS : (NAN_RANK + 1) * PER_PROCESS] = float("nan")
        return x

    trainer.get_input = poisoned
    trainer.fit()
    trainer.save_checkpoint()
    return {"out": out, "one": one, "snapshot": snapshot, "stopped": (stopped, stopped_ranks),
            "resumed": (resumed, resumed_ranks)}  # fmt: skip


def compare_with_one_process(two: Path, one: Path, step: int) -> dict[str, tuple[float, str]]:
    a, b = two / f"checkpoint-{step}", one / "checkpoints" / f"checkpoint-{step}"
    worst = {"weights+logvar": tensor_max_abs(load_any(a / "model.safetensors"), load_any(b / "model.safetensors"))}
    ema_a, ema_b = load_any(a / "custom_checkpoint_0.pkl"), load_any(b / "custom_checkpoint_0.pkl")
    assert ema_a["optimization_step"] == ema_b["optimization_step"] == step - (step > SKIP_STEP)
    shadows_a, shadows_b = ({str(i): t for i, t in enumerate(e["shadow_params"])} for e in (ema_a, ema_b))
    assert shadows_a and all(t.is_floating_point() for t in shadows_a.values())
    worst["ema"] = tensor_max_abs(shadows_a, shadows_b)
    return worst


def test_nan_on_one_process_stops_both_and_keeps_the_last_good_checkpoint(runs):
    result, ranks = runs["stopped"]
    assert result.returncode != 0, "the run did not stop on the NaN loss"
    assert f"step {NAN_STEP}: loss is nan (not finite); stopped" in result.stderr, result.stderr[-3000:]
    assert f"step {NAN_STEP}: another process's loss is not finite; stopped" in result.stderr, result.stderr[-3000:]
    assert len(ranks) == PROCESSES, "a process did not get to the end of its run"
    assert all(r["final"]["step"] == NAN_STEP for r in ranks), [r["final"]["step"] for r in ranks]
    saved = sorted(p.name for p in runs["snapshot"].iterdir())
    assert saved == [f"checkpoint-{NAN_STEP}"], saved  # the last good one, nothing partial
    files = sorted(p.name for p in (runs["snapshot"] / f"checkpoint-{NAN_STEP}").iterdir())
    assert [f"random_states_{r}.pkl" for r in range(PROCESSES)] == [f for f in files if f.startswith("random_")]


def test_every_process_resumes_its_own_state(runs):
    stopped_ranks, (result, ranks) = runs["stopped"][1], runs["resumed"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(ranks) == PROCESSES
    for before, after in zip(stopped_ranks, ranks):
        assert after["resumed"]["step"] == NAN_STEP
        # each process continues from its own RNG state as it was when the checkpoint was written
        assert after["resumed"]["rng"] == before["rng_at_save"][str(NAN_STEP)], f"rank {after['rank']}"
    assert ranks[0]["resumed"]["weights"] == ranks[1]["resumed"]["weights"]
    assert ranks[0]["final"] == ranks[1]["final"], "the processes ended in different states"
    # the skipped step counts as a step but updates nothing (no optimizer, LR or EMA step)
    assert ranks[0]["final"]["step"] == STEPS and ranks[0]["final"]["ema_num_updates"] == STEPS - 1


def test_two_processes_match_one_with_the_same_global_batch(runs):
    assert runs["resumed"][0].returncode == 0, runs["resumed"][0].stderr[-3000:]
    report = {}
    for step, where in [(NAN_STEP, runs["snapshot"]), (STEPS, runs["out"] / "checkpoints")]:
        for name, (diff, key) in compare_with_one_process(where, runs["one"], step).items():
            report[f"step {step} {name}"] = (diff, key)
            assert diff <= TOL, f"step {step} {name}: max |Δ| {diff:.3g} at {key} (> {TOL})"
    print({k: f"{v[0]:.2e}" for k, v in report.items()})


def test_main_process_alone_saves_samples_and_logs(runs):
    result, ranks = runs["resumed"]
    assert result.returncode == 0, result.stderr[-3000:]
    main, other = (r["events"] for r in sorted(ranks, key=lambda r: r["rank"]))
    # checkpoint-4 after the step and again at the end of train(): published twice, by the main process only
    assert main.get("publish_checkpoint") == 2 and not other.get("publish_checkpoint"), (main, other)
    assert main.get("sample") == STEPS - NAN_STEP and not other.get("sample"), (main, other)
    assert main.get("write_images") == STEPS - NAN_STEP and not other.get("write_images"), (main, other)
    assert main.get("tracker_log", 0) >= STEPS - NAN_STEP and not other.get("tracker_log"), (main, other)
    assert main.get("write_pipeline") == 1 and not other.get("write_pipeline"), (main, other)
    # the EMA is updated on every process (each keeps an identical copy, see test_every_process_resumes_...); the
    # skipped step does not update it
    assert main.get("ema_step") == other.get("ema_step") == STEPS - NAN_STEP - 1, (main, other)
    # tensorboard files are named events.out.tfevents.<time>.<host>.<pid>.<n>: all from the main processes
    writers = {int(p.name.split(".")[-2]) for p in (runs["out"] / "logs").rglob("events.out.tfevents.*")}
    mains = {r["pid"] for r in (*runs["stopped"][1], *ranks) if r["rank"] == 0}
    assert writers and writers <= mains, (writers, mains)
    checkpoint = runs["out"] / "checkpoints" / f"checkpoint-{STEPS}"
    assert {f"random_states_{r}.pkl" for r in range(PROCESSES)} <= {p.name for p in checkpoint.iterdir()}
    assert not [p for p in (runs["out"] / "checkpoints").iterdir() if p.name.startswith(".")]
