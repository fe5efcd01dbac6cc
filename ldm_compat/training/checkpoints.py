"""Training checkpoints on disk: atomic ``checkpoint-<step>`` folders, ``latest`` lookup, total-limit pruning.

A checkpoint is written into a hidden temporary folder beside its final name, fsynced, then renamed; a run killed
mid-write leaves only the temporary folder, which ``latest`` never picks and the next save removes. A folder being
replaced or pruned is first renamed to a hidden name and only then deleted, so no visible ``checkpoint-<step>`` is ever
half-deleted. Before a resume every file is checked: readable, no pickle that would run code (``resolve_checkpoint``).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from ldm_compat.convert.checkpoint_io import CheckpointError

_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"
_OLD_PREFIX = ".old-checkpoint-"
# what Accelerate's random_states_<i>.pkl legitimately needs besides tensors: numpy arrays (the numpy RNG state)
_SAFE_NUMPY_GLOBALS = frozenset(
    {"numpy.dtype", "numpy.ndarray", "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"}
)


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
        if not found:
            return None
        path = found[-1]
    else:
        path = Path(spec)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {spec}: no such checkpoint folder")
    check_checkpoint_files(path)
    return path


def check_checkpoint_files(folder: str | os.PathLike) -> None:
    """Refuse a checkpoint folder with an unreadable file or a pickle that would run code when loaded (Accelerate
    loads some with ``weights_only=False``). Only headers and the pickles' global references are read; nothing is
    unpickled."""
    from safetensors import safe_open
    from torch.serialization import get_unsafe_globals_in_checkpoint

    for path in sorted(Path(folder).iterdir()):
        if not path.is_file():
            continue
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):
                    continue
            if path.suffix not in (".pkl", ".bin", ".pt", ".pth"):
                continue
            needed = get_unsafe_globals_in_checkpoint(str(path))
        except Exception as err:  # not a zip-format torch file, truncated, …
            reason = str(err).split(". ")[0].splitlines()[0] if str(err) else ""
            raise CheckpointError(f"{path}: unreadable checkpoint file ({type(err).__name__}: {reason})") from None
        unsafe = [name for name in needed if name not in _SAFE_NUMPY_GLOBALS and not name.startswith("numpy.dtypes.")]
        if unsafe:
            raise CheckpointError(
                f"{path}: refused — loading it would run code ({', '.join(unsafe[:3])}); resume only from "
                "checkpoints written by training"
            )


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [root, root.parent]:
        _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(
    directory: str | os.PathLike,
    step: int,
    save: Callable[[str], None],
    total_limit=None,
    *,
    is_main: bool = True,
    barrier: Callable[[], None] | None = None,
) -> Path:
    """Call ``save(tmp_dir)``, then atomically publish it as ``directory/checkpoint-<step>``; prune old ones.

    With several processes, every process calls this (``Accelerator.save_state`` writes each process's RNG state,
    ``random_states_<i>.pkl``; the rest only on the main one): ``is_main`` says which process prepares, publishes and
    prunes, ``barrier`` (``accelerator.wait_for_everyone``) keeps them in step.
    """
    directory, barrier = Path(directory), barrier or (lambda: None)
    final = directory / f"checkpoint-{step}"
    tmp = directory / f"{_TMP_PREFIX}{step}"
    if is_main:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in [*directory.glob(_TMP_PREFIX + "*"), *directory.glob(_OLD_PREFIX + "*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    save(str(tmp))
    barrier()
    if not is_main:
        barrier()
        return final
    _fsync_tree(tmp)
    old = _hide(final) if final.exists() else None  # a re-save of the same step: never half-delete the visible one
    os.replace(tmp, final)
    _fsync_dir(directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if total_limit is not None and total_limit > 0:
        for pruned in list_checkpoints(directory)[:-total_limit]:
            shutil.rmtree(_hide(pruned), ignore_errors=True)
    barrier()
    return final


def _hide(path: Path) -> Path:
    """Rename ``path`` to a hidden name (atomically) so that it can be deleted without being seen half-deleted."""
    hidden = path.parent / f"{_OLD_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    os.replace(path, hidden)
    return hidden
