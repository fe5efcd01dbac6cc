"""What the training loop remembers between the steps at which it reads the device: losses and non-finite checks.

A training step must not wait for the device (no ``.item()``, ``float()``, ``bool(tensor)``): the loop keeps the
detached loss tensors of each step in a ``DeviceSeries`` and reads them only at a *check point* (a log step, a
checkpoint, image logging, validation, the end of ``fit``), with one device-to-host copy for all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: entries kept as separate 0-d tensors before they are stacked into one 1-D tensor on the device (no sync)
CHUNK = 256


class DeviceSeries:
    """0-d device tensors appended one per step, read together. Appending costs no kernel; every ``CHUNK`` entries
    are stacked into one tensor (a device-side copy) so a long interval holds few, small tensors."""

    def __init__(self):
        self._chunks: list[torch.Tensor] = []
        self._tail: list[torch.Tensor] = []
        self.count = 0

    def append(self, value: torch.Tensor) -> None:
        self._tail.append(value.detach().reshape(()))
        self.count += 1
        if len(self._tail) >= CHUNK:
            self._chunks.append(torch.stack(self._tail))
            self._tail = []

    def values(self) -> torch.Tensor:
        """All entries since the last ``clear()``, one 1-D tensor on the device (float32 or wider)."""
        parts = self._chunks + ([torch.stack(self._tail)] if self._tail else [])
        values = parts[0] if len(parts) == 1 else torch.cat(parts)
        return values if values.dtype in (torch.float32, torch.float64) else values.float()

    def clear(self) -> None:
        self._chunks, self._tail, self.count = [], [], 0


@dataclass(frozen=True)
class Position:
    """Where the loop was when a micro-batch was drawn (the ``RunState`` fields)."""

    global_step: int
    epoch: int
    batch_in_epoch: int


def describe_loss(value: float) -> str:
    # with several processes this one's loss may be finite while another's is not
    return f"loss is {value} (not finite)" if not math.isfinite(value) else "another process's loss is not finite"


def all_finite(loss: torch.Tensor, accelerator) -> bool:
    """Whether the loss is finite on every process: a read of the device (``--nan_policy skip``, every step)."""
    finite = torch.isfinite(loss.detach()).all()
    if accelerator.num_processes > 1:
        # decide together: a process stepping alone would leave the others waiting in the next all-reduce
        return accelerator.reduce(finite.float(), reduction="sum").item() == accelerator.num_processes
    return bool(finite)


@dataclass(frozen=True)
class NonFinite:
    """The first micro-batch since the last check whose loss was not finite on some process."""

    position: Position
    local_value: float  # this process's loss there (finite when only another process's loss was not)

    def stop_message(self, checkpoints) -> str:
        return (
            f"step {self.position.global_step}: {describe_loss(self.local_value)}; stopped. The last good checkpoint "
            f"is in {checkpoints} (use --nan_policy skip to skip such batches)"
        )


class StepLog:
    """The losses of every micro-batch (for the non-finite check) and the logged values of every optimizer step
    since the last check point, on the device.

    ``gather`` is ``accelerator.gather`` (all processes' tensors, concatenated; identity on one process) and
    ``reduce_mean`` is ``accelerator.reduce(..., "mean")``: both are collectives, so every process must reach
    ``first_non_finite`` and ``means`` at the same steps, which the loop's check points (fixed step numbers) ensure.
    """

    def __init__(self):
        self._losses = DeviceSeries()
        self._positions: list[Position] = []
        self._logs: dict[str, DeviceSeries] = {}

    def watch(self, loss: torch.Tensor, position: Position) -> None:
        """Remember one micro-batch's loss (checked later) and where the loop was."""
        self._losses.append(loss)
        self._positions.append(position)

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        """One optimizer step's logged values (a skipped step adds nothing)."""
        for key, value in logs.items():
            self._logs.setdefault(key, DeviceSeries()).append(value)

    @property
    def pending(self) -> int:
        """Micro-batches watched since the last ``first_non_finite``."""
        return self._losses.count

    def first_non_finite(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> NonFinite | None:
        """Read (one sync) whether any watched loss, on any process, was not finite; forget the watched losses."""
        if not self._losses.count:
            return None
        losses = self._losses.values()
        bad = ~torch.isfinite(losses)
        index = torch.arange(losses.numel(), device=losses.device)
        first = torch.where(bad, index, losses.numel()).min()
        # every process the same micro-batch count: the smallest index over processes is the first bad micro-batch
        first_anywhere = gather(first.reshape(1)).min()
        found = int(first_anywhere)
        positions = self._positions
        self._losses.clear()
        self._positions = []
        if found >= losses.numel():
            return None
        return NonFinite(positions[found], float(losses[found]))

    def check(self, gather: Callable[[torch.Tensor], torch.Tensor], state, checkpoints) -> None:
        """Raise ``FloatingPointError`` naming the first non-finite loss since the last check, on any process.

        ``state`` (the loop's ``RunState``) is set back to that micro-batch's position, the step the message names;
        the weights, optimizer and EMA in memory are those of the check point (never saved: the loop checks before
        it writes anything).
        """
        bad = self.first_non_finite(gather)
        if bad is not None:
            state.load_state_dict(vars(bad.position))
            raise FloatingPointError(bad.stop_message(checkpoints))

    def means(self, reduce_mean: Callable[[dict], dict]) -> dict[str, float]:
        """The mean of each logged value since the last call, averaged over processes (one sync); then forget them."""
        if not self._logs:
            return {}
        stacked = {key: series.values().mean() for key, series in self._logs.items()}
        reduced = reduce_mean(stacked)
        keys = list(reduced)
        host = torch.stack([reduced[k].float() for k in keys]).tolist()
        self._logs = {}
        return dict(zip(keys, host))
