"""Improved DDPM's CIFAR10 recipe: `--config=configs/cifar10_iddpm.py`.

The config itself is `diffusion_jax/configs/cifar10_iddpm.py`, inside the package, so that a
wheel install and `diffusion_jax.convert` have it too; this file lets the command line name it by
path.
"""

from diffusion_jax.configs.cifar10_iddpm import get_config

__all__ = ['get_config']
