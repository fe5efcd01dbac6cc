"""The original ldm/lr_scheduler.py schedules, the main.py learning-rate rule, and build_lr_scheduler."""

import io

import numpy as np
import pytest
import torch

from ldm_compat.training.lr_schedulers import (
    LambdaLinearScheduler,
    LambdaWarmUpCosineScheduler,
    LambdaWarmUpCosineScheduler2,
    build_lr_scheduler,
    scaled_learning_rate,
)

# ---------------------------------------------------------------------------------------------------------------
# Independent references, written from the formulas of CompVis latent-diffusion ldm/lr_scheduler.py
# (see /work/shared/notes/ldm.md §1.7): step n → multiplier.


def ref_cosine(n, W, lr_min, lr_max, lr_start, D):
    if n < W:
        return (lr_max - lr_start) / W * n + lr_start
    t = min((n - W) / (D - W), 1.0)
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + np.cos(t * np.pi))


def ref_cycle(n, cycle_lengths):
    ends = np.cumsum([0] + list(cycle_lengths))
    for c, end in enumerate(ends[1:]):
        if n <= end:
            return c, n - ends[c]
    return None, None


def ref_cosine2(n, W, f_min, f_max, f_start, L):
    c, n = ref_cycle(n, L)
    if n < W[c]:
        return (f_max[c] - f_start[c]) / W[c] * n + f_start[c]
    t = min((n - W[c]) / (L[c] - W[c]), 1.0)
    return f_min[c] + 0.5 * (f_max[c] - f_min[c]) * (1 + np.cos(t * np.pi))


def ref_linear(n, W, f_min, f_max, f_start, L):
    c, n = ref_cycle(n, L)
    if n < W[c]:
        return (f_max[c] - f_start[c]) / W[c] * n + f_start[c]
    return f_min[c] + (f_max[c] - f_min[c]) * (L[c] - n) / L[c]


# inpainting_big (CompVis models/ldm/inpainting_big/config.yaml)
INPAINTING = dict(warm_up_steps=1000, max_decay_steps=50000, lr_start=0.001, lr_max=0.1, lr_min=0.0001)
# LDM/SD configs' LambdaLinearScheduler (lsun_churches-ldm-kl-8.yaml)
SD_LINEAR = dict(warm_up_steps=[10000], cycle_lengths=[10000000000000], f_start=[1.0e-6], f_max=[1.0], f_min=[1.0])
CYCLES = dict(warm_up_steps=[10, 5, 0], f_min=[0.1, 0.0, 0.5], f_max=[1.0, 0.5, 2.0], f_start=[0.0, 0.2, 1.0])
CYCLES["cycle_lengths"] = [100, 50, 40]


def _steps(*edges):
    points = {0, 1}
    for e in edges:
        points.update({e - 1, e, e + 1})
    return sorted(p for p in points if p >= 0)


def test_warm_up_cosine_matches_formula():
    sched = LambdaWarmUpCosineScheduler(**INPAINTING)
    for n in _steps(1000, 25000, 50000, 60000) + list(range(0, 51000, 997)):
        ref = ref_cosine(n, 1000, 0.0001, 0.1, 0.001, 50000)
        assert sched(n) == ref, n
        assert sched.last_lr == sched(n)
    # the values the original gives for inpainting_big (notes §1.7, run on the original code)
    assert sched.schedule(0) == pytest.approx(1e-3)
    assert sched.schedule(1000) == pytest.approx(0.1)
    assert sched.schedule(50000) == pytest.approx(1e-4)


def test_warm_up_cosine2_matches_formula_over_cycles():
    sched = LambdaWarmUpCosineScheduler2(**CYCLES)
    args = [CYCLES[k] for k in ("warm_up_steps", "f_min", "f_max", "f_start", "cycle_lengths")]
    for n in [n for n in _steps(10, 100, 105, 150, 190) if n <= 190] + list(range(0, 191, 7)):
        assert sched(n) == ref_cosine2(n, *args), n
    # a step equal to a cycle's cumulative end belongs to that cycle (n <= end), the next one starts the next cycle
    assert sched(100) == pytest.approx(0.1)  # end of cycle 0: f_min
    assert sched(101) == pytest.approx(0.2 + (0.5 - 0.2) / 5 * 1)  # cycle 1, n=1 of its warm-up
    assert sched.total_steps == 190


def test_linear_matches_formula_and_keeps_the_discontinuity():
    sched = LambdaLinearScheduler(**CYCLES)
    args = [CYCLES[k] for k in ("warm_up_steps", "f_min", "f_max", "f_start", "cycle_lengths")]
    for n in range(0, 191):
        assert sched(n) == ref_linear(n, *args), n
    # notes §1.7 (run on the original): W=100, L=1000, 0→1→0 jumps from 0.99 to 0.9 at the end of the warm-up
    jump = LambdaLinearScheduler(warm_up_steps=[100], f_min=[0.0], f_max=[1.0], f_start=[0.0], cycle_lengths=[1000])
    assert jump(99) == pytest.approx(0.99)
    assert jump(100) == pytest.approx(0.9)


def test_sd_linear_config_is_warm_up_then_constant():
    sched = LambdaLinearScheduler(**SD_LINEAR)
    assert sched(0) == pytest.approx(1e-6)
    assert sched(5000) == pytest.approx(
        ref_linear(5000, *[SD_LINEAR[k] for k in ("warm_up_steps", "f_min", "f_max", "f_start", "cycle_lengths")])
    )
    assert sched(10000) == 1.0 and sched(10**9) == 1.0


@pytest.mark.parametrize("cls", [LambdaWarmUpCosineScheduler2, LambdaLinearScheduler])
def test_past_the_last_cycle_is_a_clear_error(cls):
    sched = cls(**CYCLES)
    sched(190)
    with pytest.raises(ValueError, match="step 191 is past the last cycle"):
        sched(191)


def test_mismatched_lists_raise():
    with pytest.raises(ValueError, match="same length"):
        LambdaLinearScheduler(warm_up_steps=[1, 2], f_min=[0.0], f_max=[1.0], f_start=[0.0], cycle_lengths=[10])
    with pytest.raises(ValueError, match="expected a list"):
        LambdaLinearScheduler(warm_up_steps=1, f_min=[0.0], f_max=[1.0], f_start=[0.0], cycle_lengths=[10])


def test_verbosity_interval_prints(capsys):
    sched = LambdaWarmUpCosineScheduler(**INPAINTING, verbosity_interval=10)
    sched(10)
    sched(11)
    assert capsys.readouterr().out.count("current step") == 1


# ---------------------------------------------------------------------------------------------------------------


def test_scaled_learning_rate_is_main_py_rule():
    assert scaled_learning_rate(1e-4, 16, 2, 4) == pytest.approx(2 * 4 * 16 * 1e-4)
    assert scaled_learning_rate(1e-4, 16, 2, 4, scale_lr=False) == 1e-4
    with pytest.raises(ValueError, match="batch_size"):
        scaled_learning_rate(1e-4, 0)
    with pytest.raises(ValueError, match="base_learning_rate"):
        scaled_learning_rate(-1.0, 4)


def _optimizer(lr=2.0):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(scheduler, steps):
    out = [scheduler.optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
        out.append(scheduler.optimizer.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("prefix", ["ldm.lr_scheduler.", "ldm_compat.training.lr_schedulers."])
def test_build_original_target_is_lambda_lr(prefix):
    config = {"target": prefix + "LambdaLinearScheduler", "params": CYCLES}
    scheduler = build_lr_scheduler(_optimizer(2.0), config)
    args = [CYCLES[k] for k in ("warm_up_steps", "f_min", "f_max", "f_start", "cycle_lengths")]
    # LambdaLR applies the multiplier of step 0 at construction (notes §1.6: base 2.0 gives 2e-6 with SD's f_start)
    assert _lrs(scheduler, 30) == pytest.approx([2.0 * ref_linear(n, *args) for n in range(31)], rel=1e-12)
    sd = build_lr_scheduler(_optimizer(2.0), {"target": prefix + "LambdaLinearScheduler", "params": SD_LINEAR})
    assert sd.optimizer.param_groups[0]["lr"] == pytest.approx(2e-6)


def test_build_resumes_from_state_dict():
    config = {"target": "ldm.lr_scheduler.LambdaWarmUpCosineScheduler", "params": dict(INPAINTING, max_decay_steps=40)}
    config["params"]["warm_up_steps"] = 10
    a = build_lr_scheduler(_optimizer(), config)
    full = _lrs(a, 25)
    b = build_lr_scheduler(_optimizer(), config)
    _lrs(b, 12)
    buffer = io.BytesIO()
    torch.save(b.state_dict(), buffer)
    buffer.seek(0)
    c = build_lr_scheduler(_optimizer(), config)
    c.load_state_dict(torch.load(buffer, weights_only=True))
    c.optimizer.param_groups[0]["lr"] = b.optimizer.param_groups[0]["lr"]
    assert _lrs(c, 13) == pytest.approx(full[12:], rel=1e-15)


def test_build_none_is_constant():
    scheduler = build_lr_scheduler(_optimizer(0.5), None)
    assert _lrs(scheduler, 3) == [0.5] * 4


@pytest.mark.parametrize("name", ["cosine", "linear", "constant_with_warmup"])
def test_build_diffusers_names(name):
    from diffusers.optimization import get_scheduler

    ours = build_lr_scheduler(_optimizer(), {"name": name, "num_warmup_steps": 3}, num_training_steps=20)
    theirs = get_scheduler(name, _optimizer(), num_warmup_steps=3, num_training_steps=20)
    assert _lrs(ours, 20) == _lrs(theirs, 20)


def test_build_errors_are_one_line_value_errors():
    with pytest.raises(ValueError, match="scheduler_config.target='ldm.lr_scheduler.Nope'"):
        build_lr_scheduler(_optimizer(), {"target": "ldm.lr_scheduler.Nope"})
    with pytest.raises(ValueError, match="params for LambdaLinearScheduler"):
        build_lr_scheduler(_optimizer(), {"target": "ldm.lr_scheduler.LambdaLinearScheduler", "params": {}})
    with pytest.raises(ValueError, match="scheduler_config.name='bogus'"):
        build_lr_scheduler(_optimizer(), {"name": "bogus"})
    with pytest.raises(ValueError, match="needs num_training_steps"):
        build_lr_scheduler(_optimizer(), {"name": "cosine", "num_warmup_steps": 1})
    with pytest.raises(ValueError, match="cover only 190"):
        build_lr_scheduler(_optimizer(), {"target": "LambdaLinearScheduler", "params": CYCLES}, num_training_steps=191)
    with pytest.raises(ValueError, match="either target"):
        build_lr_scheduler(_optimizer(), {"target": "LambdaLinearScheduler", "name": "cosine"})
