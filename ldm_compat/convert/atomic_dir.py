"""Publishing a whole output folder atomically: build it in a hidden temporary folder, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(output_dir: str | os.PathLike, overwrite: bool = False, option: str = "--output"):
    """Yield a temporary folder beside ``output_dir``; on success it replaces ``output_dir`` in one rename.

    On any error (or a kill) the temporary folder is removed (or left hidden, never under the final name), so no
    half-written output is ever visible. An existing ``output_dir`` is refused unless ``overwrite``.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{option} {output_dir}: already exists (pass --overwrite to replace it)")
    parent = output_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=parent))
    except OSError as err:
        raise PermissionError(f"{option} {output_dir}: cannot write there ({err.strerror})") from None
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        if output_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".old", dir=parent))
            os.replace(output_dir, trash / "old")
            os.replace(tmp, output_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
