"""Training checkpoints on disk: atomic ``checkpoint-<step>`` folders, ``latest`` lookup, total-limit pruning.

A checkpoint is written into a hidden temporary folder beside its final name, fsynced, then renamed; a run killed
mid-write leaves only the temporary folder, which ``latest`` never picks and the next save removes.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest (lowest step) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: str, directory: str | os.PathLike) -> Path | None:
    """``latest`` → the newest complete checkpoint (None when there is none); a path → that folder, checked."""
    if spec == "latest":
        found = list_checkpoints(directory)
        return found[-1] if found else None
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {spec}: no such checkpoint folder")
    return path


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [root, root.parent]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_checkpoint(directory: str | os.PathLike, step: int, save: Callable[[str], None], total_limit=None) -> Path:
    """Call ``save(tmp_dir)``, then atomically publish it as ``directory/checkpoint-<step>``; prune old ones."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(_TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = directory / f"checkpoint-{step}"
    tmp = directory / f"{_TMP_PREFIX}{step}"
    tmp.mkdir()
    save(str(tmp))
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if total_limit is not None and total_limit > 0:
        for old in list_checkpoints(directory)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final
