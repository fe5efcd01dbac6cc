"""Comparing training checkpoint folders and pipeline folders file by file, value by value (test helper)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file


def load_any(path: Path):
    """A checkpoint file's content: safetensors → tensors; anything else → ``torch.load`` (our own test files)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=False)


def differences(a, b, where: str = "") -> list[str]:
    """Every place where ``a`` and ``b`` differ (tensors bit for bit, dtypes and shapes included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{where}: tensor vs {type(b).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"]
        return [] if torch.equal(a, b) else [f"{where}: values differ (max {_max_abs(a, b):.3g})"]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return [] if np.array_equal(np.asarray(a), np.asarray(b)) else [f"{where}: arrays differ"]
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return [f"{where}: keys differ ({sorted(set(a) ^ set(b), key=str)[:5]} or order)"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return [f"{where}: {type(a).__name__}[{len(a)}] vs {type(b).__name__}[{len(b)}]"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.is_floating_point():
        return (a.double() - b.double()).abs().max().item()
    return float((a != b).sum())


def folder_files(folder: Path) -> dict[str, Path]:
    folder = Path(folder)
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def folder_differences(a: Path, b: Path, suffixes=(".safetensors", ".bin", ".pkl", ".json")) -> list[str]:
    """Differences between two folders: their file sets, then each checkpoint/JSON file's content."""
    fa, fb = folder_files(a), folder_files(b)
    if set(fa) != set(fb):
        return [f"file sets differ: only in {a}: {sorted(set(fa) - set(fb))}, only in {b}: {sorted(set(fb) - set(fa))}"]
    out = []
    for name, path in fa.items():
        if path.suffix not in suffixes:
            continue
        if path.suffix == ".json":
            if path.read_text() != fb[name].read_text():
                out.append(f"{name}: text differs")
            continue
        out += differences(load_any(path), load_any(fb[name]), name)
    return out


def tensor_max_abs(a: dict, b: dict) -> tuple[float, str]:
    """The largest absolute difference between two tensor dicts with the same keys, and where it is."""
    assert list(a) == list(b), f"keys differ: {sorted(set(a) ^ set(b))[:5]}"
    worst = max(((_max_abs(a[k], b[k]), k) for k in a), default=(0.0, ""))
    return worst


def is_complete(folder: Path, expected: set[str]) -> str | None:
    """``None`` when ``folder`` holds exactly the ``expected`` files and each loads; else what is wrong."""
    files = folder_files(folder)
    if set(files) != expected:
        return f"{folder.name}: files {sorted(files)}, expected {sorted(expected)}"
    for name, path in files.items():
        try:
            load_any(path)
        except Exception as err:  # a half-written file
            return f"{folder.name}/{name}: does not load ({type(err).__name__})"
    return None
