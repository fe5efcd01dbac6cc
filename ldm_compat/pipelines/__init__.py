"""Pipelines: ``LDMCompatPipeline`` samples like the original ``p_sample_loop`` / ``DDIMSampler``.

See ``docs/pipelines.md`` for the folder format, loading (local folders and Hub repo ids) and pushing.
"""

from pathlib import Path

from ldm_compat.pipelines.output import LDMCompatPipelineOutput
from ldm_compat.pipelines.pipeline_ldm_compat import LDMCompatPipeline

#: keyword arguments that make plain ``DiffusionPipeline.from_pretrained(folder, **DIFFUSERS_LOAD_KWARGS)`` build an
#: ``LDMCompatPipeline`` for any folder this package writes (see ``diffusers_entry.py``)
DIFFUSERS_LOAD_KWARGS = {
    "custom_pipeline": str(Path(__file__).with_name("diffusers_entry.py")),
    "trust_remote_code": True,
}

__all__ = ["DIFFUSERS_LOAD_KWARGS", "LDMCompatPipeline", "LDMCompatPipelineOutput"]
