"""The shard-local EMA on DTensors: two CPU processes (gloo), a model sharded with FSDP2's ``fully_shard``.

The model has uneven dim-0 splits: a (5, 3) weight over 2 processes (3 + 2 rows) and a (1, 5) weight (1 + 0 rows).
Checked on both processes, against an unsharded ``LitEmaModel`` fed the same full weights (the EMA is elementwise, so
bit for bit): the shards' shapes; several updates; ``ema_scope`` (copy in, restore); the gathered shadows' global
shapes and values; the shard files written by each process, read back into a fresh sharded EMA (the same layout) and
into an unsharded one (another layout); and that ``DTensor.from_local`` without ``shape=`` guesses the wrong global
shape here (the pitfall ``shard_like`` avoids).
"""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.multiprocessing as mp
from torch import nn

from ldm_compat.training.ema import LitEmaModel
from ldm_compat.training.ema_sharded import dim0_slice, gather_shadows, load_shards, save_shards, shard_like

WORLD = 2
STEPS = 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.SiLU(), nn.Linear(5, 1), nn.Linear(1, 4))


def perturb(model: nn.Module, step: int) -> None:
    """Move every parameter as an optimizer step would (the same everywhere: computed from full tensors)."""
    gen = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for p in model.parameters():
            delta = torch.randn(p.shape, generator=gen) * 0.1
            if hasattr(p, "to_local"):
                start, length = dim0_slice(p)
                p.to_local().add_(delta.narrow(0, start, length))
            else:
                p.add_(delta)


def worker(rank: int, port: int, folder: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        reference = make_model()  # unsharded twin
        ref_ema = LitEmaModel(reference, decay=0.9)
        model = make_model()
        ema = LitEmaModel(model, decay=0.9)
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        shard_like(ema, model)
        expected_rows = {
            0: {"0.weight": 3, "0.bias": 3, "2.weight": 1, "2.bias": 1, "3.weight": 2, "3.bias": 2},
            1: {"0.weight": 2, "0.bias": 2, "2.weight": 0, "2.bias": 0, "3.weight": 2, "3.bias": 2},
        }
        for name, shadow in zip(ema._names, ema.shadow_params):
            assert isinstance(shadow, DTensor) and shadow.dtype == torch.float32
            assert shadow.to_local().shape[0] == expected_rows[rank][name], (name, shadow.to_local().shape)
            assert shadow.shape == dict(reference.named_parameters())[name].shape

        for step in range(STEPS):
            perturb(model, step)
            perturb(reference, step)
            ema.step(model)
            ref_ema.step(reference)
        assert ema.num_updates == ref_ema.num_updates == STEPS

        full = gather_shadows(ema)
        for name, mine, ref in zip(ema._names, full, ref_ema.shadow_params):
            assert mine.shape == ref.shape, (name, mine.shape, ref.shape)
            assert torch.equal(mine, ref), f"{name}: gathered shadow differs"

        # ema_scope: the model holds the averages inside, its own weights after
        before = [p.full_tensor().clone() for p in model.parameters()]
        with ema.ema_scope(model):
            inside = [p.full_tensor() for p in model.parameters()]
        after = [p.full_tensor() for p in model.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(inside, ref_ema.shadow_params))
        assert all(torch.equal(a, b) for a, b in zip(after, before))

        # the trap: without shape=, from_local takes local rows × world size as the global shape
        weight = ema.shadow_params[0]
        guessed = DTensor.from_local(weight.to_local(), mesh, weight.placements, run_check=False)
        assert guessed.shape[0] == weight.to_local().shape[0] * WORLD != 5

        save_shards(ema, folder, rank, WORLD)
        dist.barrier()
        fresh = LitEmaModel(model, decay=0.9)  # built from the sharded model: shadows start as the current weights
        fresh.shadow_params = [torch.zeros(s.shape) for s in ema.shadow_params]
        shard_like(fresh, model)
        load_shards(fresh, folder)
        for a, b in zip(fresh.shadow_params, ema.shadow_params):
            assert torch.equal(a.to_local(), b.to_local()) and a.to_local().shape == b.to_local().shape
    finally:
        dist.destroy_process_group()


def _run(rank: int, port: int, folder: str, errors) -> None:
    try:
        worker(rank, port, folder)
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(folder) -> None:
    # fork: the children inherit the imported torch/diffusers (a spawned child spends seconds importing them)
    ctx = mp.get_context("fork")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_run, args=(rank, port, str(folder), errors)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not messages, "\n".join(messages)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def test_shard_local_ema_matches_an_unsharded_one_bit_for_bit(tmp_path):
    """Everything in ``worker`` on both processes; then another layout (one process, full shadows) reads the two
    processes' shard files: the uneven pieces tile dim 0 and give the unsharded EMA's values."""
    run_workers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema_shard_0.safetensors", "ema_shard_1.safetensors"]
    reference = make_model()
    ref_ema = LitEmaModel(reference, decay=0.9)
    for step in range(STEPS):
        perturb(reference, step)
        ref_ema.step(reference)
    ema = LitEmaModel(make_model(), decay=0.9)
    load_shards(ema, tmp_path)
    for name, a, b in zip(ema._names, ema.shadow_params, ref_ema.shadow_params):
        assert a.shape == b.shape and torch.equal(a, b), name
