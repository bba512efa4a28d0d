"""The math of the modality-driven diffusion process: schedules, forward process, likelihoods and the ELBO.

Stable public API (SPEC §1): `schedules.make_schedule`, `process.q_step`, `q_marginal`, `q_sample`, `q_posterior`,
`p_mean`, and `losses.l0_noise_matching` .. `losses.elbo`, `losses.training_loss`.
"""

from mmdiff_jax.diffusion import likelihoods, losses, process, schedules

__all__ = ["likelihoods", "losses", "process", "schedules"]
