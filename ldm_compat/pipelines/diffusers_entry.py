"""Entry file for plain ``DiffusionPipeline.from_pretrained`` of any ldm_compat folder.

diffusers resolves ``_class_name`` only among its own classes, so a folder naming ``LDMCompatPipeline`` needs this
file as ``custom_pipeline`` (diffusers copies it into its modules cache and imports it; it only re-exports the
installed class, so the loaded pipeline *is* ``ldm_compat.LDMCompatPipeline``)::

    from diffusers import DiffusionPipeline
    import ldm_compat.pipelines

    pipe = DiffusionPipeline.from_pretrained(folder, **ldm_compat.pipelines.DIFFUSERS_LOAD_KWARGS)

``DIFFUSERS_LOAD_KWARGS`` is ``{"custom_pipeline": <this file>, "trust_remote_code": True}``: diffusers asks for
``trust_remote_code`` for any code file, local ones included; the code run is this installed file.
"""

from ldm_compat.pipelines.pipeline_ldm_compat import LDMCompatPipeline

__all__ = ["LDMCompatPipeline"]
