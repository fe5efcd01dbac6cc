"""Alias of ``ldm_compat.hub`` (pushing pipeline folders with a model card), importable from the pipelines package."""

from ldm_compat.hub import push_folder, render_model_card, write_card_extras, write_sample_grid

__all__ = ["push_folder", "render_model_card", "write_card_extras", "write_sample_grid"]
