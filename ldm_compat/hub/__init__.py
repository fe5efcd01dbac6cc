"""Hugging Face Hub: push a pipeline folder with a model card rendered from ``model_card_template.md``.

See ``docs/pipelines.md`` ("Pushing to the Hub").
"""

from ldm_compat.hub.model_card import card_context, render_model_card, sample_grid, template_text, write_card_extras
from ldm_compat.hub.push import files_to_push, push_folder, write_sample_grid

__all__ = [
    "card_context",
    "files_to_push",
    "push_folder",
    "render_model_card",
    "sample_grid",
    "template_text",
    "write_card_extras",
    "write_sample_grid",
]
