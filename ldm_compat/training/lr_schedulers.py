"""The original ``ldm/lr_scheduler.py`` warm-up schedules and the ``main.py`` learning-rate rule.

Each schedule maps an optimizer step ``n`` to a *multiplier* of the learning rate (despite the original docstrings'
"use with a base_lr of 1.0": ``LambdaLR`` multiplies the optimizer's learning rate by it). The original wires them as
``LambdaLR(optimizer, lr_lambda=schedule.schedule)`` stepped once per optimizer step (``interval: step``);
``build_lr_scheduler`` does the same, and also accepts diffusers' ``get_scheduler`` names.

Differences from the original, all about failure modes (the values are the original's):

* ``LambdaWarmUpCosineScheduler2`` / ``LambdaLinearScheduler`` past the end of the last cycle: the original's
  ``find_in_interval`` returns ``None`` and the next line raises ``TypeError``; here a ``ValueError`` names the step
  and the cycles' total length, and ``build_lr_scheduler(num_training_steps=...)`` reports it before training.
* Mismatched list lengths: the original ``assert``; here a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "LambdaLinearScheduler",
    "LambdaWarmUpCosineScheduler",
    "LambdaWarmUpCosineScheduler2",
    "build_lr_scheduler",
    "scaled_learning_rate",
]


class LambdaWarmUpCosineScheduler:
    """Linear warm-up from ``lr_start`` to ``lr_max`` over ``warm_up_steps``, then a half cosine down to ``lr_min``,
    reached at ``max_decay_steps`` and held after (``ldm.lr_scheduler.LambdaWarmUpCosineScheduler``).

    ``verbosity_interval > 0`` prints the multiplier every that many steps, as the original.
    """

    def __init__(self, warm_up_steps, lr_min, lr_max, lr_start, max_decay_steps, verbosity_interval=0):
        self.lr_warm_up_steps = warm_up_steps
        self.lr_start = lr_start
        self.lr_min = lr_min
        self.lr_max = lr_max
        self.lr_max_decay_steps = max_decay_steps
        self.last_lr = 0.0
        self.verbosity_interval = verbosity_interval

    def schedule(self, n, **kwargs) -> float:
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            print(f"current step: {n}, recent lr-multiplier: {self.last_lr}")
        if n < self.lr_warm_up_steps:
            value = (self.lr_max - self.lr_start) / self.lr_warm_up_steps * n + self.lr_start
        else:
            progress = min((n - self.lr_warm_up_steps) / (self.lr_max_decay_steps - self.lr_warm_up_steps), 1.0)
            value = self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + float(np.cos(progress * np.pi)))
        self.last_lr = value
        return value

    def __call__(self, n, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class LambdaWarmUpCosineScheduler2:
    """Repeated cycles, each a linear warm-up from ``f_start`` to ``f_max`` then a half cosine to ``f_min`` at the
    cycle's end (``ldm.lr_scheduler.LambdaWarmUpCosineScheduler2``). All arguments but ``verbosity_interval`` are
    lists, one entry per cycle; step ``n`` belongs to the first cycle whose cumulative end is ``≥ n``.
    """

    def __init__(self, warm_up_steps, f_min, f_max, f_start, cycle_lengths, verbosity_interval=0):
        lists = {"warm_up_steps": warm_up_steps, "f_min": f_min, "f_max": f_max, "f_start": f_start}
        lists["cycle_lengths"] = cycle_lengths
        for name, value in lists.items():
            if not isinstance(value, Sequence) or isinstance(value, str):
                raise ValueError(f"{type(self).__name__}.{name}={value!r}: expected a list (one entry per cycle)")
        if len({len(v) for v in lists.values()}) != 1:
            lengths = ", ".join(f"{k}: {len(v)}" for k, v in lists.items())
            raise ValueError(f"{type(self).__name__}: the lists must have the same length ({lengths})")
        self.lr_warm_up_steps = list(warm_up_steps)
        self.f_start = list(f_start)
        self.f_min = list(f_min)
        self.f_max = list(f_max)
        self.cycle_lengths = list(cycle_lengths)
        # cumulative cycle ends, starting with 0 (the original: np.cumsum([0] + cycle_lengths))
        self.cum_cycles = [0]
        for length in self.cycle_lengths:
            self.cum_cycles.append(self.cum_cycles[-1] + length)
        self.last_f = 0.0
        self.verbosity_interval = verbosity_interval

    @property
    def total_steps(self):
        """The last step the cycles cover (steps ``0 … total_steps`` are valid)."""
        return self.cum_cycles[-1]

    def find_in_interval(self, n) -> int:
        for cycle, end in enumerate(self.cum_cycles[1:]):
            if n <= end:
                return cycle
        raise ValueError(
            f"{type(self).__name__}: step {n} is past the last cycle (cycle_lengths sum to {self.total_steps}); "
            "lengthen cycle_lengths or stop earlier"
        )

    def _locate(self, n) -> tuple[int, Any]:
        cycle = self.find_in_interval(n)
        n = n - self.cum_cycles[cycle]
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            print(f"current step: {n}, recent lr-multiplier: {self.last_f}, current cycle {cycle}")
        return cycle, n

    def _warm_up(self, cycle: int, n) -> float:
        return (self.f_max[cycle] - self.f_start[cycle]) / self.lr_warm_up_steps[cycle] * n + self.f_start[cycle]

    def schedule(self, n, **kwargs) -> float:
        cycle, n = self._locate(n)
        if n < self.lr_warm_up_steps[cycle]:
            value = self._warm_up(cycle, n)
        else:
            span = self.cycle_lengths[cycle] - self.lr_warm_up_steps[cycle]
            progress = min((n - self.lr_warm_up_steps[cycle]) / span, 1.0)
            value = self.f_min[cycle] + 0.5 * (self.f_max[cycle] - self.f_min[cycle]) * (
                1 + float(np.cos(progress * np.pi))
            )
        self.last_f = value
        return value

    def __call__(self, n, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):
    """Per cycle: linear warm-up, then a linear ramp from ``f_max`` to ``f_min`` (``ldm.lr_scheduler.
    LambdaLinearScheduler``; Stable Diffusion's configs use it as "10k warm-up steps, then constant").

    As in the original, the ramp is measured from the *cycle start*, not from the end of the warm-up:
    ``f = f_min + (f_max − f_min)(L − n)/L``. With ``f_min ≠ f_max`` the multiplier therefore jumps at the end of
    the warm-up (e.g. 0.99 → 0.9 for W=100, L=1000, f 0→1→0); this is kept so that runs reproduce.
    """

    def schedule(self, n, **kwargs) -> float:
        cycle, n = self._locate(n)
        if n < self.lr_warm_up_steps[cycle]:
            value = self._warm_up(cycle, n)
        else:
            length = self.cycle_lengths[cycle]
            value = self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (length - n) / length
        self.last_f = value
        return value


SCHEDULERS = {
    cls.__name__: cls for cls in (LambdaWarmUpCosineScheduler, LambdaWarmUpCosineScheduler2, LambdaLinearScheduler)
}
# the module paths a config may name them by
_PREFIXES = ("ldm.lr_scheduler.", "ldm_compat.training.lr_schedulers.", "")


def scaled_learning_rate(
    base_lr: float, batch_size: int, accumulate: int = 1, num_processes: int = 1, scale_lr: bool = True
) -> float:
    """``main.py``'s rule: ``accumulate_grad_batches × num_gpus × batch_size × base_learning_rate`` (``--scale_lr``,
    on by default), else ``base_lr`` unchanged.

    ``num_processes`` is the total number of training processes (all nodes). The original counted only the local
    GPUs of ``--gpus`` and ignored ``num_nodes``; pass the local count to reproduce that.
    """
    for name, value in (("batch_size", batch_size), ("accumulate", accumulate), ("num_processes", num_processes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"scaled_learning_rate: {name}={value!r}: expected a positive integer")
    if not isinstance(base_lr, (int, float)) or isinstance(base_lr, bool) or not base_lr > 0:
        raise ValueError(f"model.base_learning_rate={base_lr!r}: expected a positive number")
    if not scale_lr:
        return float(base_lr)
    return accumulate * num_processes * batch_size * float(base_lr)


def _original_schedule(config: Mapping[str, Any]):
    target = str(config["target"])
    name = next((target[len(p) :] for p in _PREFIXES if target.startswith(p) and target[len(p) :] in SCHEDULERS), None)
    if name is None:
        raise ValueError(
            f"scheduler_config.target={target!r}: expected one of "
            + ", ".join(f"ldm.lr_scheduler.{n}" for n in SCHEDULERS)
        )
    params = dict(config.get("params") or {})
    try:
        return SCHEDULERS[name](**params)
    except TypeError as err:  # missing/unknown constructor argument
        raise ValueError(f"scheduler_config.params for {name}: {err}") from None


def _diffusers_scheduler(optimizer, config: Mapping[str, Any], num_training_steps: int | None):
    from diffusers.optimization import SchedulerType, get_scheduler

    name = config["name"]
    names = [s.value for s in SchedulerType]
    if name not in names:
        raise ValueError(f"scheduler_config.name={name!r}: expected one of {', '.join(names)}")
    options = {k: v for k, v in config.items() if k != "name"}
    allowed = {"num_warmup_steps", "num_training_steps", "num_cycles", "power", "step_rules", "last_epoch"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"scheduler_config: unknown key(s) {', '.join(unknown)} for name={name!r}")
    options.setdefault("num_training_steps", num_training_steps)
    if options["num_training_steps"] is None and name not in ("constant", "constant_with_warmup", "piecewise_constant"):
        raise ValueError(f"scheduler_config: name={name!r} needs num_training_steps (or the run's max_steps)")
    try:
        return get_scheduler(name, optimizer, **options)
    except (ValueError, TypeError) as err:
        raise ValueError(f"scheduler_config (name={name!r}): {err}") from None


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    scheduler_config: Mapping[str, Any] | None,
    *,
    num_training_steps: int | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate scheduler of ``model.params.scheduler_config``, to be stepped once per optimizer step.

    * ``{target: ldm.lr_scheduler.<Class>, params: {...}}`` → ``LambdaLR(optimizer, <Class>(**params).schedule)``,
      as ``LatentDiffusion.configure_optimizers`` (``LambdaLR`` applies the multiplier of step 0 at once).
    * ``{name: <diffusers name>, num_warmup_steps: ..., num_training_steps: ...}`` → ``diffusers.optimization.
      get_scheduler`` (``num_training_steps`` defaults to the argument, the run's ``max_steps``).
    * ``None`` → a constant multiplier of 1 (the original used no scheduler; one is returned anyway so that the
      training state always has the same parts).

    ``num_training_steps`` (optional) lets the cyclic schedules fail now, not mid-run, if the run outlasts them.
    Note: ``accelerator.prepare`` wraps the scheduler so that one ``step()`` advances it ``num_processes`` times
    (unless ``split_batches``); a loop that wants "one schedule step per optimizer step" must account for that.
    """
    from ldm_compat.config import to_plain

    config = to_plain(scheduler_config)
    if config is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=_constant)
    if not isinstance(config, Mapping):
        raise ValueError(f"scheduler_config: expected a mapping, got {type(config).__name__}")
    if "target" in config and "name" in config:
        raise ValueError("scheduler_config: give either target (ldm.lr_scheduler class) or name (diffusers), not both")
    if "name" in config:
        return _diffusers_scheduler(optimizer, config, num_training_steps)
    if "target" not in config:
        raise ValueError("scheduler_config: expected 'target' (e.g. ldm.lr_scheduler.LambdaLinearScheduler) or 'name'")
    schedule = _original_schedule(config)
    total = getattr(schedule, "total_steps", None)
    if num_training_steps is not None and total is not None and num_training_steps > total:
        raise ValueError(
            f"scheduler_config: the run has {num_training_steps} steps but cycle_lengths cover only {total}"
        )
    # a bound method, as the original: LambdaLR's state_dict then stores no schedule object (only last_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule.schedule)


def _constant(step: int) -> float:
    return 1.0
