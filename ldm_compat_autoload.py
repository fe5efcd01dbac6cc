"""Imports ``ldm_compat`` whenever torch is imported: a ``torch.backends`` entry point of the ldm_compat package.

Why: a folder written for a stock diffusers pipeline names its components ``["ldm_compat", "LDMUNetModel"]`` in
``model_index.json``. diffusers 0.42.1 resolves such a library only from ``sys.modules`` (it no longer imports a
module because a repository names one), so plain ``DiffusionPipeline.from_pretrained(folder)`` with only diffusers
imported works only if ``ldm_compat`` has been imported. torch imports the ``torch.backends`` entry points of
installed packages when it is imported (its out-of-tree backend plugin mechanism, on by default), and diffusers
imports torch; this hook only imports the ``ldm_compat`` package, whose public names load lazily (nothing else is
imported, no torch state is touched). ``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` turns all such hooks off; diffusers then
says to ``import ldm_compat`` first.

This module lives outside the package on purpose: if ``ldm_compat`` cannot be imported, ``import torch`` must not
fail (torch turns an exception here into a RuntimeError); a warning says why the hook did nothing.
"""


def load() -> None:
    """The entry point torch calls while it is imported."""
    try:
        import ldm_compat  # noqa: F401
    except Exception as err:  # noqa: BLE001 - never break `import torch`
        import warnings

        warnings.warn(f"ldm_compat_autoload: ldm_compat could not be imported ({err})", stacklevel=2)
