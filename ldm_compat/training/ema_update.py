"""The arithmetic of the original ``LitEma`` update, fused over all parameters with ``torch._foreach_*`` calls.

``LitEma.forward`` does, per parameter, ``shadow.sub_(one_minus_decay * (shadow - param))`` with a float32
``one_minus_decay``: three float32 roundings. ``fused_ema_update`` reproduces exactly those roundings over lists of
tensors (``method="exact"``), or rounds once with ``torch._foreach_lerp_`` (``method="lerp"``).
"""

from __future__ import annotations

import torch

# elements per chunk of the exact update: accelerator, CPU. A CPU chunk's temporary stays in cache.
DEFAULT_CHUNK_ELEMENTS = {"accelerator": 1 << 26, "cpu": 1 << 18}


def as_float32(value: float) -> float:
    """``value`` rounded to float32, as LitEma's ``decay`` buffer stores it (0.9999 -> 0.99989998...)."""
    return float(torch.tensor(value, dtype=torch.float32))


def litema_decay(decay: float, num_updates: int) -> float:
    """The decay LitEma uses at counter value ``num_updates`` (already incremented), as a float32 value.

    ``min(decay, (1 + n) / (10 + n))`` with an int32 ``n`` and float32 division, exactly as ``LitEma.forward``; a
    negative ``n`` (``use_num_upates=False``) means a constant ``decay``.
    """
    decay_t = torch.tensor(decay, dtype=torch.float32)
    if num_updates < 0:
        return float(decay_t)
    n = torch.tensor(num_updates, dtype=torch.int32)
    warmup = (1 + n) / (10 + n)  # int32 / int32 -> float32 true division, as in the original
    return float(warmup if warmup < decay_t else decay_t)  # Python's min(): the first argument on ties


def one_minus_float32(decay: float) -> float:
    """LitEma's ``1.0 - decay`` with a float32 ``decay`` tensor: the difference rounded to float32."""
    return float(1.0 - torch.tensor(decay, dtype=torch.float32))


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


class FusedEmaUpdate:
    """``shadows[i] -= one_minus_decay * (shadows[i] - params[i])`` for all ``i`` in a few ``torch._foreach_*`` calls.

    ``"exact"`` keeps LitEma's three roundings (``d = s - p``; ``d *= 1 - decay``; ``s -= d``), chunk by chunk so the
    temporaries stay small. On the CPU the temporaries are views of one reusable workspace: fresh model-sized
    temporaries cost more in page faults than the arithmetic. ``"lerp"`` is one ``torch._foreach_lerp_`` (one
    rounding, up to an ulp away from LitEma per update).
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
        if method == "lerp":
            if all(s.dtype == p.dtype for s, p in zip(shadows, params)):
                torch._foreach_lerp_(shadows, params, one_minus_decay)
            else:  # lerp needs equal dtypes; a float32 shadow of a bf16 parameter takes the promoting path
                torch._foreach_add_(shadows, torch._foreach_sub(params, shadows), alpha=one_minus_decay)
            return
        on_cpu = shadows[0].device.type == "cpu"
        budget = chunk_elements or DEFAULT_CHUNK_ELEMENTS["cpu" if on_cpu else "accelerator"]
        if on_cpu and all(s.dtype == shadows[0].dtype for s in shadows):
            for lo, hi, work in self._workspace_plan(shadows, budget):
                torch._foreach_copy_(work, shadows[lo:hi])
                torch._foreach_sub_(work, params[lo:hi])
                torch._foreach_mul_(work, one_minus_decay)
                torch._foreach_sub_(shadows[lo:hi], work)
            return
        # accelerators: their caching allocators make fresh temporaries cheap
        for lo, hi in chunk_bounds(shadows, budget):
            diff = torch._foreach_sub(shadows[lo:hi], params[lo:hi])
            torch._foreach_mul_(diff, one_minus_decay)
            torch._foreach_sub_(shadows[lo:hi], diff)

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
