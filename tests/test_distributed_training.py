"""Training on Accelerate's engines beyond one process, on the CPU (gloo), with real ``accelerate launch`` runs.

Runs (tiny config, 2 images per process, 4 steps, checkpoints every 2, validation with and without the EMA at step 3
(whose best loss also saves checkpoint-3), logged samples at step 4):
- ``ddp1``: one machine, two processes (DDP);
- ``ddp2``: two "machines" of one process each on this machine (``--num_machines 2 --machine_rank 0|1``, two
  launchers; ``--num_processes`` is the total over all machines);
- ``killed``: FSDP2 (``configs/accelerate/fsdp2.yaml``), every process SIGKILLed while checkpoint-4 is being written,
  after all its files are in the hidden temporary folder and before it is published: that folder is the
  uninterrupted run's checkpoint-4 (kept aside here), ``latest`` is checkpoint-3;
- ``resumed``: the same command again (``--resume_from_checkpoint latest``), to the end.

Checked: ``ddp2`` equals ``ddp1`` bit for bit (every checkpoint file, RNG states included, the pipeline folder, the
original checkpoint); the resumed FSDP2 run's checkpoint-4 equals the uninterrupted one bit for bit (sharded model
and optimizer, EMA shards, RNG states, loop state); FSDP2 equals DDP within a float32 tolerance; the pipeline folder
and original checkpoint the FSDP2 run wrote (gathered from shards) equal, bit for bit, those written from an
unsharded model assembled here from the processes' raw local shards (the output convolution's single row sits on
process 0, process 1 holds an empty shard of it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.checkpoint_compare import differences, folder_differences, load_any, tensor_max_abs
from helpers.tiny_config import tiny_config, write_config
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "helpers" / "dist_train.py"
PER_PROCESS, PROCESSES, STEPS, EVERY = 2, 2, 4, 2
VALIDATE = 3  # validation (training weights, then the EMA's) at step 3; its best val/loss saves checkpoint-3
OVERRIDES = [f"data.params.batch_size={PER_PROCESS}", f"lightning.trainer.max_steps={STEPS}",
             f"lightning.callbacks.image_logger.params.batch_frequency={STEPS}", "data.params.validation={}",
             f"lightning.trainer.val_check_interval={VALIDATE}"]  # fmt: skip
# base_learning_rate 1e-5 as in test_reliability_multiprocess: FSDP2 and DDP reduce the gradients in different
# collectives, and AdamW turns rounding in near-zero gradients into steps of up to the learning rate
CONFIG = tiny_config(**{"model.base_learning_rate": 1.0e-5})
TOL = 1e-5
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(run: str, **extra) -> dict:
    """The launch environment; an ``extra`` value of ``None`` removes that variable."""
    out = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "LDM_TEST_RUN": run,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra}  # fmt: skip
    return {k: v for k, v in out.items() if v is not None}


def launch_cmd(launcher: list[str], config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--mixed_precision", "no",
            "--dynamo_backend", "no", str(HELPER), "--config", str(config), "--output_dir", str(out),
            "--report_to", "none", "--checkpointing_steps", str(EVERY), "--resume_from_checkpoint", "latest",
            "--sample_steps", "2", "--export-original", *OVERRIDES]  # fmt: skip


def communicate(procs: list[subprocess.Popen]) -> list[subprocess.CompletedProcess]:
    """Wait for the launchers; on a hang kill each launcher's whole process group (its workers too)."""
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


def start(launcher: list[str], config: Path, out: Path, name: str, **extra) -> subprocess.Popen:
    return subprocess.Popen(launch_cmd(launcher, config, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(name, **extra), cwd=ROOT, start_new_session=True)  # fmt: skip


def run(launcher: list[str], config: Path, out: Path, name: str, **extra) -> subprocess.CompletedProcess:
    return communicate([start([*launcher, "--main_process_port", str(free_port())], config, out, name, **extra)])[0]


def run_two_machines(config: Path, out: Path, name: str) -> list[subprocess.CompletedProcess]:
    """Two launchers, one per "machine", started together as on a cluster."""
    port = free_port()
    launchers = [["--multi_gpu", "--num_processes", str(PROCESSES), "--num_machines", "2", "--machine_rank",
                  str(machine), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
                 for machine in range(2)]  # fmt: skip
    return communicate([start(launcher, config, out, name) for launcher in launchers])


def _encode(value):
    if isinstance(value, subprocess.CompletedProcess):
        return {"__run__": [value.returncode, value.stdout, value.stderr]}
    if isinstance(value, Path):
        return {"__path__": str(value)}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def _decode(value):
    if isinstance(value, dict):
        if "__run__" in value:
            return subprocess.CompletedProcess([], *value["__run__"])
        if "__path__" in value:
            return Path(value["__path__"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def once(tmp_path_factory, name: str, compute) -> dict:
    """``compute(folder)`` once per test session, also under pytest-xdist, where each worker would otherwise build
    the module fixture again (the launches are the expensive part): the first worker computes, the others wait for
    it and read its results."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return compute(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # this session's folder, common to its workers
    done = shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            folder = shared / name
            folder.mkdir()
            done.write_text(json.dumps(_encode(compute(folder))))
    return _decode(json.loads(done.read_text()))


def _runs(root: Path) -> dict:
    config = write_config(root / "tiny.yaml", CONFIG)
    fsdp = ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"), "--num_processes", str(PROCESSES)]
    out = {"root": root, "config": config}
    out["ddp1"] = run(["--multi_gpu", "--num_processes", str(PROCESSES), "--num_machines", "1"], config,
                      root / "ddp1", "ddp1")  # fmt: skip
    out["ddp2"] = run_two_machines(config, root / "ddp2", "ddp2")
    out["fsdp"] = kill_in_save_then_resume(fsdp, config, root, "fsdp")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return once(tmp_path_factory, "distributed", _runs)


def kill_in_save_then_resume(launcher: list[str], config: Path, root: Path, name: str, **extra) -> dict:
    """Kill every process while checkpoint-4 is written (keeping that complete, unpublished folder aside as the
    uninterrupted run's checkpoint-4), then run the same command again."""
    checkpoints = root / name / "checkpoints"
    out = {"killed": run(launcher, config, root / name, f"{name}-killed", LDM_TEST_KILL_IN_SAVE=str(STEPS), **extra)}
    out["after_kill"] = sorted(p.name for p in checkpoints.iterdir()) if checkpoints.is_dir() else []
    if (checkpoints / f".tmp-checkpoint-{STEPS}").is_dir():  # the next save removes it
        shutil.copytree(checkpoints / f".tmp-checkpoint-{STEPS}", root / f"{name}-uninterrupted")
    out["resumed"] = run(launcher, config, root / name, f"{name}-resumed", **extra)
    out["root"] = root
    return out


def ok(result) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


def rank_meta(folder: Path, run: str) -> list[dict]:
    return [safe_open(str(folder / "ranks" / f"{run}-rank{r}.safetensors"), "pt").metadata() for r in range(PROCESSES)]


def test_two_machines_equal_one_machine_bit_for_bit(runs):
    ok(runs["ddp1"])
    for result in runs["ddp2"]:
        ok(result)
    one, two = runs["root"] / "ddp1", runs["root"] / "ddp2"
    # really two machines of one process each (every process is its machine's local main process)
    assert [m["local_rank"] for m in rank_meta(two, "ddp2")] == ["0", "0"]
    assert [m["local_rank"] for m in rank_meta(one, "ddp1")] == ["0", "1"]
    assert {m["num_processes"] for m in rank_meta(two, "ddp2")} == {str(PROCESSES)}
    assert (one / "checkpoints/best.json").read_text() == (two / "checkpoints/best.json").read_text()
    for step in (EVERY, VALIDATE, STEPS):
        name = f"checkpoints/checkpoint-{step}"
        assert not folder_differences(one / name, two / name), folder_differences(one / name, two / name)
    assert not folder_differences(one / "pipeline", two / "pipeline")
    assert not differences(load_any(one / "original/model.ckpt"), load_any(two / "original/model.ckpt"))
    assert (one / "original/model.yaml").read_text() == (two / "original/model.yaml").read_text()


def pipeline_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        out.update({f"{path.relative_to(folder)}:{k}": v for k, v in load_any(path).items()})
    return out


def check_matches_ddp(runs, folder: Path, what: str) -> None:
    ok(runs["ddp1"])
    ddp, other = pipeline_tensors(runs["root"] / "ddp1" / "pipeline"), pipeline_tensors(folder / "pipeline")
    assert len(ddp) > 100
    diff, where = tensor_max_abs(ddp, other)
    print(f"{what} vs DDP after {STEPS} steps: max |Δ| {diff:.3g} at {where}")
    assert diff <= TOL, f"{what} vs DDP: max |Δ| {diff:.3g} at {where} (> {TOL})"


def test_fsdp2_matches_ddp(runs):
    fsdp = runs["fsdp"]
    ok(fsdp["resumed"])
    assert {m["fsdp2"] for m in rank_meta(runs["root"] / "fsdp", "fsdp-resumed")} == {"True"}
    check_matches_ddp(runs, runs["root"] / "fsdp", "FSDP2")


def dcp_state(folder: Path, tmp: Path) -> dict:
    """A DCP folder (FSDP2's sharded model or optimizer) read back as one state dict (no process group needed)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    tmp.mkdir(parents=True, exist_ok=True)
    target = tmp / f"{folder.name}.pt"
    dcp_to_torch_save(str(folder), str(target))
    return torch.load(target, weights_only=False)


def check_kill_and_resume(runs, name: str, expected: set[str]) -> tuple[Path, Path]:
    """The resumed run's checkpoint-4 equals the uninterrupted one file by file (pickles and safetensors by value;
    safetensors orders empty tensors arbitrarily, so those are compared by name); returns both folders."""
    killed, resumed = runs[name]["killed"], runs[name]["resumed"]
    assert killed.returncode != 0, "the run was not killed"
    # killed while checkpoint-4 was written: only the hidden temporary folder has it, latest is checkpoint-3 (the
    # best validation loss so far)
    saved = [f"checkpoint-{EVERY}", f"checkpoint-{VALIDATE}"]
    after_kill = runs[name]["after_kill"]
    assert after_kill == [f".tmp-checkpoint-{STEPS}", "best.json", *saved], (after_kill, killed.stderr[-3000:])
    ok(resumed)
    root = runs[name]["root"]
    checkpoints = root / name / "checkpoints"
    assert f"resumed from {checkpoints / f'checkpoint-{VALIDATE}'} at step {VALIDATE}" in resumed.stdout
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.json", *saved, f"checkpoint-{STEPS}"]
    a, b = root / f"{name}-uninterrupted", checkpoints / f"checkpoint-{STEPS}"
    assert expected <= {p.name for p in b.iterdir()}, sorted(p.name for p in b.iterdir())
    found = [d for d in folder_differences(a, b) if not d.startswith("ema_shard_")]
    assert not found, found
    for shard in sorted(b.glob("ema_shard_*.safetensors")):
        pair = [dict(sorted(load_any(x / shard.name).items())) for x in (a, b)]
        assert not differences(*pair, shard.name), differences(*pair, shard.name)
    return a, b


def test_fsdp2_kill_and_resume_is_bit_identical(runs, tmp_path):
    expected = {"pytorch_model_fsdp_0", "optimizer_0", "ema_shard_0.safetensors", "ema_shard_1.safetensors",
                "random_states_0.pkl", "random_states_1.pkl", "custom_checkpoint_0.pkl"}  # fmt: skip
    a, b = check_kill_and_resume(runs, "fsdp", expected)
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        found = differences(dcp_state(a / part, tmp_path / "a"), dcp_state(b / part, tmp_path / "b"), part)
        assert not found, found[:5]


def assemble(folder: Path, run: str) -> dict[str, torch.Tensor]:
    """Full tensors from the processes' raw local pieces (rank order along dim 0, as FSDP2 shards)."""
    pieces = [load_any(folder / "ranks" / f"{run}-rank{r}.safetensors") for r in range(PROCESSES)]
    return {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}


def test_sharded_save_equals_an_unsharded_one_bit_for_bit(runs, tmp_path):
    from ldm_compat.config import load_ldm_config
    from ldm_compat.convert.export import diffusers_to_original
    from ldm_compat.convert.training_folder import write_training_folder
    from ldm_compat.models.unet_ldm import LDMUNetModel
    from ldm_compat.schedulers.scheduling_ldm_ddpm import LDMDDPMScheduler
    from ldm_compat.training.ema import LitEmaModel
    from ldm_compat.training.objective import DDPMObjective

    ok(runs["fsdp"]["resumed"])
    fsdp = runs["root"] / "fsdp"
    ranks = [load_any(fsdp / "ranks" / f"fsdp-resumed-rank{r}.safetensors") for r in range(PROCESSES)]
    # the output convolution (1 channel) is split unevenly: 1 row on process 0, none on process 1
    assert [r["unet.out.2.weight"].shape[0] for r in ranks] == [1, 0]
    assert [r["ema.out.2.bias"].shape[0] for r in ranks] == [1, 0]
    full = assemble(fsdp, "fsdp-resumed")
    config = load_ldm_config(runs["config"], OVERRIDES)
    params = config.model.params
    unet = LDMUNetModel.from_ldm_config(params.unet_config)
    unet.load_state_dict({k[len("unet.") :]: v for k, v in full.items() if k.startswith("unet.")})
    objective = DDPMObjective.from_ldm_config(params)
    with torch.no_grad():
        objective.logvar.copy_(full["logvar"])
    ema = LitEmaModel(unet)
    ema.shadow_params = [full[f"ema.{name}"].clone() for name in ema._names]
    ema.num_updates = STEPS
    loop_state = load_any(fsdp / "checkpoints" / f"checkpoint-{STEPS}" / "custom_checkpoint_1.pkl")
    folder = tmp_path / "pipeline"
    write_training_folder(
        folder, unet=unet, scheduler=LDMDDPMScheduler.from_ldm_config(params), objective=objective, ema=ema,
        config=config, global_step=loop_state["global_step"], epoch=loop_state["epoch"],
    )  # fmt: skip
    ckpt = tmp_path / "original" / "model.ckpt"
    diffusers_to_original(folder, ckpt, config_output=ckpt.with_suffix(".yaml"))
    assert not folder_differences(fsdp / "pipeline", folder), folder_differences(fsdp / "pipeline", folder)
    assert not differences(load_any(fsdp / "original/model.ckpt"), load_any(ckpt))
    assert (fsdp / "original/model.yaml").read_text() == ckpt.with_suffix(".yaml").read_text()


def test_fsdp2_checkpoint_keeps_the_layout_on_disk(runs):
    """What a sharded checkpoint holds: Accelerate's DCP folders, one EMA shard file and one RNG file per process,
    the EMA scalars (no shadows) in the custom state."""
    ok(runs["fsdp"]["resumed"])
    checkpoint = runs["root"] / "fsdp" / "checkpoints" / f"checkpoint-{STEPS}"
    ema_state = load_any(checkpoint / "custom_checkpoint_0.pkl")
    assert ema_state["sharded"] is True and "shadow_params" not in ema_state
    assert ema_state["optimization_step"] == STEPS
    shards = [load_any(checkpoint / f"ema_shard_{r}.safetensors") for r in range(PROCESSES)]
    assert shards[0].keys() == shards[1].keys() and len(shards[0]) > 50
    assert shards[0]["out.2.weight"].shape[0] == 1 and shards[1]["out.2.weight"].shape[0] == 0
    assert not [p for p in checkpoint.parent.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def deepspeed_runs(runs, tmp_path_factory):
    """DeepSpeed ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml), killed in the save of checkpoint-4 and resumed;
    only where DeepSpeed is installed (not a dependency). On the CPU: no ACCELERATE_USE_CPU (Accelerate would then
    ignore DeepSpeed), DeepSpeed's CPU accelerator with gloo."""
    pytest.importorskip("deepspeed")
    launcher = ["--config_file", str(ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"),
                "--num_processes", str(PROCESSES)]  # fmt: skip

    def compute(root: Path) -> dict:
        return kill_in_save_then_resume(launcher, runs["config"], root, "deepspeed", ACCELERATE_USE_CPU=None,
                                        DS_ACCELERATOR="cpu")  # fmt: skip

    deepspeed = once(tmp_path_factory, "deepspeed", compute)
    return {**runs, "deepspeed": deepspeed}


def test_deepspeed_zero2_trains_like_ddp_with_the_ema_and_resumes_bit_identically(deepspeed_runs):
    runs = deepspeed_runs
    check_kill_and_resume(runs, "deepspeed", {"pytorch_model", "custom_checkpoint_0.pkl", "random_states_1.pkl"})
    folder = runs["deepspeed"]["root"] / "deepspeed"
    meta = rank_meta(folder, "deepspeed-resumed")
    assert {m["distributed_type"] for m in meta} == {"DistributedType.DEEPSPEED"}
    assert {m["ema_num_updates"] for m in meta} == {str(STEPS)}
    # weights replicated under ZeRO-2: every process holds the same full weights and the same EMA
    ranks = [load_any(folder / "ranks" / f"deepspeed-resumed-rank{r}.safetensors") for r in range(PROCESSES)]
    assert not differences(ranks[0], ranks[1])
    # the EMA in the checkpoint is the full LitEma state, as without DeepSpeed
    ema_state = load_any(folder / "checkpoints" / f"checkpoint-{STEPS}" / "custom_checkpoint_0.pkl")
    assert len(ema_state["shadow_params"]) == len([k for k in ranks[0] if k.startswith("ema.")])
    check_matches_ddp(runs, folder, "DeepSpeed ZeRO-2")
