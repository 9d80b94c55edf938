"""diffusion_jax: denoising diffusion probabilistic models (Ho et al. 2020) in JAX/Flax."""

__version__ = '0.1.0'
