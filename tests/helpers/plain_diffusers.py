"""Run code in a fresh interpreter that sees ldm_compat as ``pip install ldm_compat`` would install it.

The test process imports this checkout through ``PYTHONPATH``; the virtual environment's own install of the package
may be older (an editable install's metadata is written when it is installed). The entry points that installing
gives — the ``torch.backends`` hook that imports ``ldm_compat`` with torch (``ldm_compat_autoload``) — are read
from this checkout's ``pyproject.toml`` and put in a distribution's metadata on the child's ``sys.path``, which is
where ``importlib.metadata`` (and so torch) finds installed packages' entry points.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]


def entry_points_text() -> str:
    """``entry_points.txt`` of the distribution that ``pyproject.toml`` describes."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    groups = dict(project.get("entry-points", {}))
    if "scripts" in project:
        groups["console_scripts"] = project["scripts"]
    return "".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in entries.items()) + "\n"
        for group, entries in groups.items()
    )


def installed_metadata(directory: Path) -> Path:
    """A ``*.dist-info`` folder in ``directory`` declaring this checkout's entry points; returns ``directory``."""
    dist_info = directory / "ldm_compat_checkout-0.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: ldm_compat_checkout\nVersion: 0\n")
    (dist_info / "entry_points.txt").write_text(entry_points_text())
    return directory


def run_fresh(code: str, tmp_path: Path, env: dict | None = None, timeout: int = 300) -> str:
    """Run ``code`` in a fresh interpreter (private HF_HOME, offline, this checkout installed); return stdout."""
    site = installed_metadata(tmp_path / "site")
    path = os.pathsep.join([str(REPO_ROOT), str(site)])
    child_env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH=path)
    child_env.pop("TORCH_DEVICE_BACKEND_AUTOLOAD", None)
    child_env.update(env or {})
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=child_env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout
