"""The paper's CIFAR10 model (Ho et al. 2020, Table 1): `--config=configs/cifar10.py`.

The config itself is `diffusion_jax/configs/cifar10.py`, inside the package, so that a wheel install
and `diffusion_jax.convert` have it too; this file lets the command line name it by path.
"""

from diffusion_jax.configs.cifar10 import get_config

__all__ = ['get_config']
