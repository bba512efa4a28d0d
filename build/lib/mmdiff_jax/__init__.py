"""mmdiff_jax: multimodal, multitask diffusion models (the MT-Diffusion family) in JAX/Flax."""

__version__ = "0.1.0"
