"""Benchmarks of diffusion_jax: they measure what the command line runs, with its CPU defaults."""

from diffusion_jax import host_malloc, xla_cpu

xla_cpu.apply_defaults()
host_malloc.apply_default()
