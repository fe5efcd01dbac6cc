"""Pipelines: ``DiffusionPipeline`` subclasses that sample like the original ``p_sample_loop`` / ``DDIMSampler``."""
