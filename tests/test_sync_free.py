"""A training step reads nothing from the device: no ``.item()``, ``float()``, ``bool(tensor)``, … between check points.

On a GPU each such read is a host synchronisation (``torch.cuda.set_sync_debug_mode("error")`` raises on it; the GPU
suite checks that). On the CPU there is no device, so ``SyncDetector`` counts the calls that would be one: the
tensor-to-Python conversions, made from any code but torch's own (whose optimizer reads its CPU step counters).
Also here: what ``--nan_policy stop`` does with a NaN between check points, and the EMA's fused float32 update of a
bf16 model (the precondition of CUDA's multi-tensor fast path, checked op by op).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers.tiny_config import tiny_config, write_config
from torch.utils._python_dispatch import TorchDispatchMode

from ldm_compat.config import load_ldm_config
from ldm_compat.training.ema import LitEmaModel
from ldm_compat.training.ema_update import (
    FusedEmaUpdate,
    fused_exact_update,
    fused_lerp_update,
    litema_decay,
    one_minus_float32,
)
from ldm_compat.training.loop import Trainer, TrainOptions

TORCH_DIR = str(Path(torch.__file__).parent)
READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__", "__format__")


class SyncDetector:
    """Counts tensor reads (``READS``) per optimizer step of a ``Trainer``, with where each came from.

    A step's window runs from the end of the previous step's ``_after_step`` (or the first batch) to the end of its
    own, so it holds the data loading, the step and its logging/check point.
    """

    def __init__(self, monkeypatch, trainer: Trainer):
        self.per_step: dict[int, Counter] = {}
        self._window: Counter | None = None
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name)))
        train_batch, after_step = trainer._train_batch, trainer._after_step

        def _train_batch(module, batch):
            if self._window is None:
                self._window = Counter()
            return train_batch(module, batch)

        def _after_step(batch, logs):
            after_step(batch, logs)
            self.per_step[trainer.state.global_step] = self._window
            self._window = Counter()

        monkeypatch.setattr(trainer, "_train_batch", _train_batch)
        monkeypatch.setattr(trainer, "_after_step", _after_step)

    def _wrap(self, method):
        detector = self

        def read(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            if detector._window is not None and not caller.f_code.co_filename.startswith(TORCH_DIR):
                where = f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} {method.__name__}"
                detector._window[where] += 1
            return method(tensor, *args, **kwargs)

        return read


def make_trainer(tmp_path, *, nan_policy="stop", **changes) -> Trainer:
    config = tiny_config(**{"lightning.trainer.max_steps": 7, "lightning.trainer.log_every_n_steps": 3,
                            "lightning.trainer.gradient_clip_val": 1.0, **changes})  # fmt: skip
    options = TrainOptions(output_dir=str(tmp_path / "run"), report_to="none", checkpointing_steps=None,
                           nan_policy=nan_policy)  # fmt: skip
    return Trainer(load_ldm_config(write_config(tmp_path / "c.yaml", config)), options)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_no_read_of_the_device_between_check_points(tmp_path, monkeypatch, accumulate):
    trainer = make_trainer(tmp_path, **{"lightning.trainer.accumulate_grad_batches": accumulate})
    assert trainer.ema is not None and trainer.objective.config.learn_logvar  # EMA and logvar steps included
    detector = SyncDetector(monkeypatch, trainer)
    trainer.fit()
    assert sorted(detector.per_step) == list(range(1, 8))
    reads = {step: dict(c) for step, c in detector.per_step.items() if c}
    # steps 3 and 6 log (log_every_n_steps=3), 7 is the last: the only ones that read the device
    assert set(reads) == {3, 6, 7}, reads
    assert trainer.last_logged["global_step"] == 7 and trainer.last_logged["train/loss"] > 0


def test_the_detector_sees_a_read_in_a_step(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)
    draw = trainer._draw_t_and_noise

    def draw_and_read(x):
        float(x.mean())  # the kind of per-step sync the loop must not make
        return draw(x)

    monkeypatch.setattr(trainer, "_draw_t_and_noise", draw_and_read)
    detector = SyncDetector(monkeypatch, trainer)
    trainer.fit()
    assert all(any("__float__" in where for where in detector.per_step[s]) for s in range(1, 8)), detector.per_step


def test_skip_policy_reads_one_flag_per_step(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, nan_policy="skip")
    detector = SyncDetector(monkeypatch, trainer)
    trainer.fit()
    for step in (1, 2, 4, 5):
        assert list(detector.per_step[step].values()) == [1], detector.per_step[step]  # the all_finite check


def test_stop_policy_stops_at_the_next_check_point_naming_the_first_bad_step(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)
    get_input, batches = trainer.get_input, []

    def poisoned(batch):
        batches.append(trainer.state.global_step)
        x = get_input(batch)
        return x * float("nan") if trainer.state.global_step in (1, 2) else x

    monkeypatch.setattr(trainer, "get_input", poisoned)
    with pytest.raises(FloatingPointError, match=r"^step 1: loss is nan \(not finite\); stopped\. The last good"):
        trainer.fit()
    assert batches == [0, 1, 2]  # the run went on to the check point after step 3 ...
    assert trainer.state.global_step == 1 and trainer.state.batch_in_epoch == 1  # ... and names the bad batch
    assert trainer.last_logged == {}  # nothing was logged from the bad interval


# ------------------------------------------------------------------------------------------------------------ EMA
def bf16_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Linear(6, 5))
    return model.to(torch.bfloat16).to(memory_format=torch.channels_last)


def litema_reference(shadows, params, one_minus_decay):
    """The original per-parameter update in float32: ``shadow -= (1 - decay) * (shadow - param)``."""
    for s, p in zip(shadows, params):
        s.sub_(one_minus_decay * (s - p.float()))


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))


@pytest.mark.parametrize("path", ["trainer_cpu", "accelerator"])
def test_float32_shadows_of_a_bf16_model_follow_litema_bit_for_bit(path):
    model = bf16_model()
    ema = LitEmaModel(model)
    assert all(s.dtype == torch.float32 for s in ema.shadow_params)
    assert all(s.stride() == p.stride() for s, p in zip(ema.shadow_params, model.parameters()))
    reference = [s.clone() for s in ema.shadow_params]
    for n in range(1, 6):
        perturb(model)
        one_minus_decay = one_minus_float32(litema_decay(0.9999, n))
        with torch.no_grad():
            if path == "trainer_cpu":
                ema.step(model)
            else:  # the accelerator's code path, on CPU tensors
                fused_exact_update(ema.shadow_params, list(model.parameters()), one_minus_decay, budget=100)
            litema_reference(reference, list(model.parameters()), one_minus_decay)
        assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, reference)), n
        assert all(s.dtype == torch.float32 for s in ema.shadow_params)


def test_lerp_of_a_bf16_model_keeps_float32_shadows():
    model = bf16_model()
    shadows = [p.detach().float() for p in model.parameters()]
    expected = [s.clone() for s in shadows]
    perturb(model)
    with torch.no_grad():
        fused_lerp_update(shadows, list(model.parameters()), 0.25, budget=100)
        torch._foreach_lerp_(expected, [p.float() for p in model.parameters()], 0.25)
    assert all(s.dtype == torch.float32 and torch.equal(s, e) for s, e in zip(shadows, expected))


class ForeachCalls(TorchDispatchMode):
    """Records every aten op and its tensor-list arguments (ops issued inside another op are not seen)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func.overloadpacket.__name__, [a for a in args if isinstance(a, (list, tuple))]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accelerator_update_is_a_few_fused_calls_on_the_fast_path(dtype):
    """CUDA runs a ``_foreach_*`` call as one multi-tensor kernel chain only if, within the call, every list has one
    dtype (two lists the same dtype, except the dtype-converting copy) and the lists' tensors match in shape and
    stride; otherwise it launches one kernel per tensor. The accelerator path must meet that for every call."""
    model = bf16_model().to(dtype)
    ema = LitEmaModel(model)
    params = list(model.parameters())
    for method, update in (("exact", fused_exact_update), ("lerp", fused_lerp_update)):
        with ForeachCalls() as recorder, torch.no_grad():
            update(ema.shadow_params, params, 0.001, budget=1 << 20)
        names = [name for name, _ in recorder.calls]
        assert all(name.startswith("_foreach_") for name in names), names
        expected = {("exact", torch.float32): 3, ("exact", torch.bfloat16): 4, ("lerp", torch.float32): 1,
                    ("lerp", torch.bfloat16): 2}[(method, dtype)]  # fmt: skip
        assert len(names) == expected, names
        for name, lists in recorder.calls:
            assert len({t.dtype for t in lists[0]}) == 1 and all(len({t.dtype for t in lst}) == 1 for lst in lists)
            if name != "_foreach_copy":
                assert len({lst[0].dtype for lst in lists}) == 1, (name, [lst[0].dtype for lst in lists])
            for tensors in zip(*lists):
                assert len({(t.shape, t.stride()) for t in tensors}) == 1, name


def test_cpu_update_of_a_bf16_model_uses_the_float32_workspace():
    model = bf16_model()
    ema = LitEmaModel(model)
    update = FusedEmaUpdate()
    perturb(model)
    with torch.no_grad():
        update(ema.shadow_params, list(model.parameters()), 0.001)  # builds the workspace (once)
    with ForeachCalls() as recorder, torch.no_grad():
        update(ema.shadow_params, list(model.parameters()), 0.001)
    assert [name for name, _ in recorder.calls] == ["_foreach_copy_", "_foreach_sub_", "_foreach_mul_", "_foreach_sub_"]
