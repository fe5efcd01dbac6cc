"""Pipelines: ``LDMCompatPipeline`` samples like the original ``p_sample_loop`` / ``DDIMSampler``.

See ``docs/pipelines.md`` for the folder format, loading (local folders and Hub repo ids) and pushing.
"""

from ldm_compat.pipelines.output import LDMCompatPipelineOutput
from ldm_compat.pipelines.pipeline_ldm_compat import LDMCompatPipeline

__all__ = ["LDMCompatPipeline", "LDMCompatPipelineOutput"]
