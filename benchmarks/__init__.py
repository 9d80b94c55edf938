"""Benchmarks of diffusion_jax: they measure what the command line runs, its XLA:CPU default too."""

from diffusion_jax import xla_cpu

xla_cpu.apply_defaults()
