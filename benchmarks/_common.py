"""Shared helpers of the benchmark scripts: device setup, interleaved timing, machine facts, tables, JSON.

Conventions (as ``bench_ema.py``): every contender is measured in the same process and run, round by round in turn,
so a drifting machine load hits each alike; figures are medians of the timed iterations after warm-up; ratios are
against a baseline measured in the same run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from datetime import datetime, timezone

import torch


def setup_device(device: str, threads: int | None) -> torch.device:
    """Check ``device`` and set the CPU thread count (TF32 and other CUDA settings stay at PyTorch's defaults)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {device}: expected cpu or cuda")
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads {threads}: expected a positive integer")
        torch.set_num_threads(threads)
    return dev


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing (float32) on the CPU: the issue's measuring convention."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    cases: Mapping[str, Callable[[], object]],
    device: torch.device,
    *,
    rounds: int,
    iters: int,
    warmup: int,
    between: Callable[[str], None] | None = None,
    after: Callable[[str], None] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Time ``cases`` in interleaved rounds: ``warmup`` untimed calls each, then ``rounds`` × (``iters`` timed calls
    of each case in turn; the order rotates every round so no case always runs first or after the same one).

    Returns ``{name: {"wall": [s, …], "cpu": [s, …]}}`` (``cpu``: process CPU time of all threads, a cross-check
    when other processes share the cores). ``between(name)`` / ``after(name)`` run untimed around each block of
    ``iters`` calls (e.g. to reset and read CUDA peak-memory statistics).
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
        synchronize(device)
    names = list(cases)
    times = {name: {"wall": [], "cpu": []} for name in cases}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = cases[name]
            if between is not None:
                between(name)
            for _ in range(iters):
                synchronize(device)
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                synchronize(device)
                times[name]["wall"].append(time.perf_counter() - w0)
                times[name]["cpu"].append(time.process_time() - c0)
            if after is not None:
                after(name)
    return times


class CudaPeaks:
    """Per-contender CUDA peak memory of interleaved blocks: pass ``between``/``after`` to ``interleaved``.

    ``peaks[name]`` is the most a block of ``name`` allocated on top of what was allocated when it began (nothing
    is recorded on the CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peaks: dict[str, int] = {}
        self._start = 0

    def between(self, name: str) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)

    def after(self, name: str) -> None:
        if self.device.type == "cuda":
            delta = torch.cuda.max_memory_allocated(self.device) - self._start
            self.peaks[name] = max(self.peaks.get(name, 0), delta)


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median, min, max and interquartile range of ``samples`` seconds, in milliseconds."""
    ms = sorted(s * 1e3 for s in samples)
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1], "iqr_ms": q[2] - q[0], "n": len(ms)}


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not on every platform
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """Facts that make a figure reproducible: date, device, versions, threads, load average now."""
    import diffusers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "loadavg_start": loadavg(),
    }


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (prints readably and pastes into RESULTS.md as is)."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, report: Mapping) -> None:
    if path:
        report = dict(report)
        report["loadavg_end"] = loadavg()
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")


def add_common_arguments(parser, *, threads_default: int | None = 2) -> None:
    """``--device``, ``--threads``, ``--json``: the options every script takes."""
    parser.add_argument("--device", default="cpu", help="cpu (default: float32) or cuda (bf16 autocast)")
    parser.add_argument(
        "--threads", type=int, default=threads_default,
        help=f"torch.set_num_threads on the CPU (default {threads_default}: the issue's CPU target)",
    )  # fmt: skip
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON here")


class RandomImages(torch.utils.data.Dataset):
    """``length`` random ``h w c`` images in [-1, 1] held in memory, as original training items ``{"image": …}``.

    A data set that costs nothing to read, so training benchmarks time the loop, not decoding (``bench_train.py``
    names it as ``data.params.train.target: _common.RandomImages``, built like the original's datasets).
    """

    def __init__(self, size: int, channels: int = 3, length: int = 256, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(length, size, size, channels, generator=g) * 2 - 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index]}
