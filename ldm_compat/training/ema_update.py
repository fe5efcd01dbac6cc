"""The arithmetic of the original ``LitEma`` update, fused over all parameters with ``torch._foreach_*`` calls.

``LitEma.forward`` does, per parameter, ``shadow.sub_(one_minus_decay * (shadow - param))`` with a float32
``one_minus_decay``: three float32 roundings. ``fused_ema_update`` reproduces exactly those roundings over lists of
tensors (``method="exact"``), or rounds once with ``torch._foreach_lerp_`` (``method="lerp"``).

The decay arithmetic (LitEma's float32 and int32 scalars) is done in Python floats rounded to float32, never with
tensors: an EMA step then reads nothing from the device (a training step stays free of host synchronisation).
"""

from __future__ import annotations

import struct

import torch

_FLOAT32 = struct.Struct("f")

# elements per chunk of the exact update: accelerator, CPU. A CPU chunk's temporary stays in cache.
DEFAULT_CHUNK_ELEMENTS = {"accelerator": 1 << 26, "cpu": 1 << 18}


def as_float32(value: float) -> float:
    """``value`` rounded to float32 (to nearest, ties to even), as LitEma's ``decay`` buffer stores it
    (0.9999 -> 0.99989998...)."""
    return _FLOAT32.unpack(_FLOAT32.pack(value))[0]


def litema_decay(decay: float, num_updates: int) -> float:
    """The decay LitEma uses at counter value ``num_updates`` (already incremented), as a float32 value.

    ``min(decay, (1 + n) / (10 + n))`` with an int32 ``n`` and float32 division, exactly as ``LitEma.forward``; a
    negative ``n`` (``use_num_upates=False``) means a constant ``decay``. The quotient of two float32 values is
    computed in double and rounded to float32, which is the correctly rounded float32 quotient (double carries more
    than 2·24 + 2 bits, so the second rounding cannot differ).
    """
    decay32 = as_float32(decay)
    if num_updates < 0:
        return decay32
    # the original's int32 counter: (1 + n) and (10 + n) wrap like int32, then convert to float32
    one_plus, ten_plus = (_int32(num_updates + k) for k in (1, 10))
    warmup = as_float32(as_float32(one_plus) / as_float32(ten_plus))
    return warmup if warmup < decay32 else decay32  # Python's min(): the first argument on ties


def _int32(value: int) -> int:
    return (value + 2**31) % 2**32 - 2**31


def one_minus_float32(decay: float) -> float:
    """LitEma's ``1.0 - decay`` with a float32 ``decay`` tensor: the difference rounded to float32."""
    return as_float32(1.0 - as_float32(decay))


def _as_shadow_dtype(shadows: list[torch.Tensor], params: list[torch.Tensor], lo: int, hi: int) -> list[torch.Tensor]:
    """``params[lo:hi]`` copied into new tensors shaped, strided and typed like ``shadows[lo:hi]`` (one fused call)."""
    return torch.ops.aten._foreach_copy(shadows[lo:hi], params[lo:hi])


def chunk_bounds(tensors: list[torch.Tensor], budget: int) -> list[tuple[int, int]]:
    """Consecutive index ranges of ``tensors`` holding about ``budget`` elements each (at least one tensor)."""
    bounds, start, total = [], 0, 0
    for i, t in enumerate(tensors):
        total += t.numel()
        if total >= budget:
            bounds.append((start, i + 1))
            start, total = i + 1, 0
    if start < len(tensors):
        bounds.append((start, len(tensors)))
    return bounds


def fused_exact_update(shadows: list[torch.Tensor], params: list[torch.Tensor], one_minus_decay: float, budget: int):
    """The accelerator path of the exact update: 3 (4 with half parameters) fused calls per chunk of ``budget``
    elements, with fresh temporaries (an accelerator's caching allocator makes them cheap)."""
    same_dtype = all(s.dtype == p.dtype for s, p in zip(shadows, params))
    for lo, hi in chunk_bounds(shadows, budget):
        if same_dtype:
            diff = torch._foreach_sub(shadows[lo:hi], params[lo:hi])
            torch._foreach_mul_(diff, one_minus_decay)
            torch._foreach_sub_(shadows[lo:hi], diff)
        else:
            diff = _as_shadow_dtype(shadows, params, lo, hi)
            torch._foreach_sub_(diff, shadows[lo:hi])  # param - shadow = -(shadow - param), exactly
            torch._foreach_mul_(diff, one_minus_decay)
            torch._foreach_add_(shadows[lo:hi], diff)


def fused_lerp_update(shadows: list[torch.Tensor], params: list[torch.Tensor], one_minus_decay: float, budget: int):
    """``"lerp"``: one ``torch._foreach_lerp_`` (lerp needs equal dtypes: half parameters are first copied to float32,
    exactly, chunk by chunk)."""
    if all(s.dtype == p.dtype for s, p in zip(shadows, params)):
        torch._foreach_lerp_(shadows, params, one_minus_decay)
        return
    for lo, hi in chunk_bounds(shadows, budget):
        torch._foreach_lerp_(shadows[lo:hi], _as_shadow_dtype(shadows, params, lo, hi), one_minus_decay)


class FusedEmaUpdate:
    """``shadows[i] -= one_minus_decay * (shadows[i] - params[i])`` for all ``i`` in a few ``torch._foreach_*`` calls.

    ``"exact"`` keeps LitEma's three roundings (``d = s - p``; ``d *= 1 - decay``; ``s -= d``), chunk by chunk so the
    temporaries stay small. On the CPU the temporaries are views of one reusable workspace: fresh model-sized
    temporaries cost more in page faults than the arithmetic. ``"lerp"`` is one ``torch._foreach_lerp_`` (one
    rounding, up to an ulp away from LitEma per update).

    On an accelerator every call takes ``torch._foreach_*``'s fused multi-tensor path (a few kernels per chunk, not
    one per tensor), which needs equal dtypes and strides within each call. Float32 shadows of a bf16/fp16 model
    get there through one fused dtype-converting ``_foreach_copy`` of the parameters into float32 temporaries
    (exact: every half value is a float32 value), then ``shadow += (1 - decay) * (param - shadow)``, which rounds
    exactly as LitEma's ``shadow -= (1 - decay) * (shadow - param)`` (rounding to nearest is symmetric in sign).
    """

    def __init__(self):
        self._plan_key = None
        self._plan: list[tuple[int, int, list[torch.Tensor]]] = []

    def __call__(
        self,
        shadows: list[torch.Tensor],
        params: list[torch.Tensor],
        one_minus_decay: float,
        method: str = "exact",
        chunk_elements: int | None = None,
    ) -> None:
        if not shadows:
            return
        on_cpu = shadows[0].device.type == "cpu"
        budget = chunk_elements or DEFAULT_CHUNK_ELEMENTS["cpu" if on_cpu else "accelerator"]
        if method == "lerp":
            fused_lerp_update(shadows, params, one_minus_decay, budget)
            return
        if on_cpu and all(s.dtype == shadows[0].dtype for s in shadows):
            for lo, hi, work in self._workspace_plan(shadows, budget):
                torch._foreach_copy_(work, shadows[lo:hi])
                torch._foreach_sub_(work, params[lo:hi])
                torch._foreach_mul_(work, one_minus_decay)
                torch._foreach_sub_(shadows[lo:hi], work)
            return
        fused_exact_update(shadows, params, one_minus_decay, budget)

    def _workspace_plan(self, shadows: list[torch.Tensor], budget: int):
        """Chunks of ``shadows`` with, for each, views of one shared workspace shaped like the chunk's tensors."""
        # the plan depends only on the shapes (the workspace is not tied to particular shadow tensors)
        key = (budget, shadows[0].dtype, shadows[0].device, tuple(s.shape for s in shadows))
        if key != self._plan_key:
            bounds = chunk_bounds(shadows, budget)
            size = max(sum(shadows[i].numel() for i in range(lo, hi)) for lo, hi in bounds)
            workspace = torch.empty(size, dtype=shadows[0].dtype, device=shadows[0].device)
            plan = []
            for lo, hi in bounds:
                views, offset = [], 0
                for s in shadows[lo:hi]:
                    views.append(workspace[offset : offset + s.numel()].view(s.shape))
                    offset += s.numel()
                plan.append((lo, hi, views))
            self._plan_key, self._plan = key, plan
        return self._plan

    def clear(self) -> None:
        """Drop the cached workspace (it is rebuilt on the next CPU update)."""
        self._plan_key, self._plan = None, []
