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
  Traces stored on one machine are therefore matched to a float32 tolerance (``TRACE_ATOL``) on any other.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import load_file

SCHEDULES = Path(__file__).parent / "fixtures" / "ldm_schedules"
META = json.loads((SCHEDULES / "schedules.json").read_text())

# The chains: 5 to 50 steps (20 for p_sample_loop, up to 50 for DDIM). Their values reach |x| ≈ 9, where one
# float32 ulp is 9.5e-7 (4.8e-7 at 4 to 8, where most values lie). Measured on two machines of this project's
# kind: Intel vs AMD AVX512 differ by 6e-8 to 4.8e-6 (issue 13). Measured on the AMD EPYC one:
# - our float32 chains against the traces: 0.0 (its kernels are those the traces were made with);
# - our chains run in float64 (the same float32 schedule and noise) against the float32 traces: at most 5.3e-6
#   (eps_quad_eta05, 50 steps, |x| ≤ 7.6), 2.2e-6 for the x0 chain, 2.8e-7 for the p_sample_loop chains. This is
#   how far the original's own float32 rounding took its traces from the exact chain;
# - our float32 chains with each denoiser output element moved one ulp up or down (or kept) at random at every
#   step, a model of another CPU's kernels: at most 5.7e-6 from the unmoved chain (20 random runs per trace);
#   with each sample element moved as well: at most 9.1e-6.
# 1e-5 covers all of these. The tests can still fail: a slip far smaller than a wrong formula moves the chains by
# much more (measured): the denoiser given t+1 instead of t (its output moves by 5e-4) ≥ 3.2e-4, eta 1% too large
# ≥ 8e-3 (where eta > 0), the x0 chain sampled without the original's bug 8.5.
TRACE_ATOL = 1e-5


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
