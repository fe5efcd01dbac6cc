"""Loader for the original code's schedule buffers and sampler traces in ``tests/fixtures/ldm_schedules``, and the
float32 tolerance for comparing a sampling chain with them. See the README in that folder.

What is exact and what is not:
- The 12 schedule buffers are computed in float64 numpy and cast to float32, by the original and by us alike.
  Casting hides any last-bit float64 difference, so they are compared bit for bit on every machine.
- A sampling chain is float32 arithmetic run 5 to 50 times in a row. Some of it goes through vector math
  kernels (``tanh`` in the denoiser, ``exp`` of the log variance, ``sqrt``) that are not correctly rounded: on
  the AMD EPYC machine with torch 2.13, 16% of float32 ``sqrt``, 1% of ``exp`` and 0.1% of ``tanh`` results on
  random inputs differ from the correctly rounded value. The kernel chosen differs between CPUs (an Intel and an
  AMD AVX512 machine disagree in the last bit), and each step carries the previous steps' differences along.
  Traces stored on one machine are therefore matched to a float32 tolerance (``trace_atol``) on any other.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import load_file

SCHEDULES = Path(__file__).parent / "fixtures" / "ldm_schedules"
META = json.loads((SCHEDULES / "schedules.json").read_text())

# The tolerance, with the measurements behind it. The DDPM and DDIM chains make 5 to 50 model calls on values up
# to |x| ≈ 9 (one float32 ulp at 4 to 8 is 4.8e-7); the PLMS chains (tests/fixtures/ldm_plms) make 2 to 21, some on
# far larger values (a 3-step cosine chain's x̂0 reaches 9142, guided chains 99). Each call adds its own last-bit
# differences and carries the earlier ones along, and they scale with the values. So the tolerance is
# TRACE_ATOL = 1e-5 for up to 25 calls on values up to 8, in proportion to the calls and to the largest value
# beyond that (trace_atol; 50 calls: 2e-5; |x| = 9142: 1.1e-2, about 10 ulps of it). Measured, in fractions of
# each trace's tolerance (23 traces):
# - Intel vs AMD AVX512 machines of this project's kind: 6e-8 to 4.8e-6 on the DDPM/DDIM traces (issue 13), at
#   most 48%;
# - on the AMD EPYC one, our float32 chains against the traces: 0.0 (its kernels made them);
# - our chains run in float64 (the same float32 schedule and noise) against the float32 traces: at most 29%
#   (5.3e-6 on the 50-step eps_quad_eta05, 3.1e-6 on the 21-call PLMS eps_quad_20). This is how far the
#   original's own float32 rounding took its traces from the exact chain;
# - our float32 chains with each model output element moved one ulp up or down (or kept) at random at every call,
#   a model of another CPU's kernels (20 random runs per trace): at most 36%; with each sample element moved as
#   well at every step, an upper bound (the real kernels differ on a few % of their results): at most 77%.
# The tests can still fail: a slip far smaller than a wrong formula moves the DDPM/DDIM chains by much more: the
# denoiser given t+1 instead of t (its output moves by 5e-4) ≥ 3.2e-4, eta 1% too large ≥ 8e-3 (where eta > 0),
# the x0 chain sampled without the original's bug 8.5.
TRACE_ATOL = 1e-5


def trace_atol(evaluations: int, *references: torch.Tensor) -> float:
    """The tolerance for a chain of ``evaluations`` model calls stored on another machine, whose values are
    ``references``: ``TRACE_ATOL`` for up to 25 calls on values up to |x| = 8, growing in proportion to the number
    of calls and to the largest value beyond that."""
    largest = max(ref.abs().max().item() for ref in references)
    return TRACE_ATOL * max(1.0, evaluations / 25) * max(1.0, largest / 8.0)


@cache
def trace_tensors() -> dict[str, torch.Tensor]:
    return load_file(SCHEDULES / "schedules.safetensors")


def original_buffers(name: str, names) -> dict[str, torch.Tensor]:
    """The original ``register_schedule`` buffers of schedule case ``name``."""
    tensors = trace_tensors()
    return {key: tensors[f"schedule.{name}.{key}"] for key in names}


def synthetic_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The stand-in denoiser the traces were generated with (generate.py); computes in the dtype of ``x``."""
    return torch.tanh(x * 0.9) * 0.8 + (t.to(x.dtype) / 100.0).reshape(-1, 1, 1, 1) * 0.05


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()
