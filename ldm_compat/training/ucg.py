"""Stable Diffusion 2's ``ucg_training``: unconditional-guidance dropout of batch entries during training.

``model.params.ucg_training`` is ``{batch_key: {p: probability, val: replacement}}``. Before each training step the
original (stablediffusion ``DDPM.training_step``) replaced every ``batch[key][i]`` by ``val`` (``None`` meaning the
empty string) with probability ``p``, drawing ``np.random.RandomState().choice(2, p=[1 - p, p])`` once per entry from
an *unseeded* generator, in the order of the keys, then of the entries.

Here the draws are seeded:

* ``generator=None`` (default): ``torch.rand`` on torch's global generator, which ``accelerate.utils.set_seed`` seeds
  and ``Accelerator.save_state`` saves, so a resumed run draws the same masks as an uninterrupted one.
* a ``torch.Generator`` or ``np.random.Generator``: one uniform per entry, ``u < p``.
* a ``np.random.RandomState``: exactly the original's calls (``choice(2, p=[1 - p, p])`` per entry), so a
  ``RandomState(seed)`` reproduces the original's masks for that seed.

Entries: lists (captions, the original's use) get ``val`` at the chosen positions. Tensors and arrays (e.g.
``class_label``) are supported too — the original would write into them in place, or fail for a string ``val`` —
here they are copied, never modified in place, and ``val`` must be a number or a tensor that broadcasts to one
entry (for class labels: the index of the "null" class the model was built with, e.g. ``num_classes - 1``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["apply_ucg", "check_ucg_training", "ucg_mask"]


def check_ucg_training(ucg_training: Mapping | None, where: str = "model.params.ucg_training") -> dict[str, dict]:
    """Validate ``{key: {p, val}}`` and return it as plain dicts (``p`` as float; ``val`` as given)."""
    from ldm_compat.config import to_plain

    config = to_plain(ucg_training) or {}
    if not isinstance(config, Mapping):
        raise ValueError(f"{where}: expected a mapping {{batch_key: {{p, val}}}}, got {type(config).__name__}")
    checked = {}
    for key, spec in config.items():
        if not isinstance(spec, Mapping) or "p" not in spec:
            raise ValueError(f"{where}.{key}: expected a mapping with p (probability) and val, got {spec!r}")
        unknown = sorted(set(spec) - {"p", "val"})
        if unknown:
            raise ValueError(f"{where}.{key}: unknown key(s) {', '.join(map(str, unknown))} (expected p, val)")
        p = spec["p"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"{where}.{key}.p={p!r}: expected a probability in [0, 1]")
        checked[str(key)] = {"p": float(p), "val": spec.get("val")}
    return checked


def ucg_mask(n: int, p: float, generator=None) -> np.ndarray:
    """``n`` independent draws, ``True`` with probability ``p`` (see the module docstring for ``generator``)."""
    if isinstance(generator, np.random.RandomState):
        # the original's call, entry by entry, so that the random stream is consumed the same way
        return np.array([bool(generator.choice(2, p=[1 - p, p])) for _ in range(n)], dtype=bool)
    if isinstance(generator, np.random.Generator):
        return generator.random(n) < p
    if generator is None or isinstance(generator, torch.Generator):
        return (torch.rand(n, generator=generator, dtype=torch.float64) < p).numpy()
    raise ValueError(
        f"ucg generator: expected None, torch.Generator, np.random.Generator or np.random.RandomState, "
        f"got {type(generator).__name__}"
    )


def _replace(values: Any, mask: np.ndarray, val: Any, key: str) -> Any:
    if isinstance(values, (torch.Tensor, np.ndarray)):
        if isinstance(val, str):
            raise ValueError(
                f"ucg_training.{key}.val={val!r}: batch[{key!r}] is a tensor; give a number (e.g. the null class "
                "index) or a tensor, not a string"
            )
        if isinstance(values, np.ndarray):
            out = values.copy()
            out[mask] = np.asarray(val, dtype=values.dtype)
            return out
        out = values.clone()
        out[torch.as_tensor(mask, device=values.device)] = torch.as_tensor(
            val, dtype=values.dtype, device=values.device
        )
        return out
    if isinstance(values, (list, tuple)):
        replaced = [val if drop else value for value, drop in zip(values, mask)]
        return type(values)(replaced) if isinstance(values, tuple) else replaced
    raise ValueError(f"batch[{key!r}] ({type(values).__name__}): ucg_training needs a list, tensor or array")


def apply_ucg(
    batch: Mapping[str, Any],
    ucg_training: Mapping | None,
    generator=None,
    *,
    num_processes: int = 1,
    process_index: int = 0,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Return ``(new_batch, masks)``: ``batch`` with the ``ucg_training`` replacements, and per key which entries
    were replaced. ``batch`` itself is not modified (the original changed it in place).

    ``num_processes``/``process_index``: every process draws the masks of the whole global batch and keeps its own
    slice, so N processes × b entries drop what 1 process × N·b entries drops (the random streams stay together)."""
    config = check_ucg_training(ucg_training)
    new_batch = dict(batch)
    masks: dict[str, np.ndarray] = {}
    for key, spec in config.items():
        if key not in batch:
            raise ValueError(f"ucg_training.{key}: the batch has no key {key!r} (keys: {', '.join(map(str, batch))})")
        values = batch[key]
        n = len(values)
        mask = ucg_mask(n * num_processes, spec["p"], generator)[process_index * n : (process_index + 1) * n]
        val = "" if spec["val"] is None else spec["val"]
        new_batch[key] = _replace(values, mask, val, key)
        masks[key] = mask
    return new_batch, masks
