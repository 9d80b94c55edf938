"""diffusion_jax: denoising diffusion probabilistic models (Ho et al. 2020) in JAX/Flax."""

from diffusion_jax import xla_cpu

__version__ = '0.1.0'

# Before JAX starts its CPU backend: the XLA:CPU options this project measured to be faster.
xla_cpu.apply_defaults()
