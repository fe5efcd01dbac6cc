"""Conversion between original ``.ckpt``/``.safetensors`` + YAML and diffusers folders."""
