"""Flax NNX networks: layers, the U-Net denoiser, and the composed multimodal model."""
