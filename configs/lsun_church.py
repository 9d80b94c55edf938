"""The paper's LSUN Church 256x256 model: `--config=configs/lsun_church.py`.

The config itself is `diffusion_jax/configs/lsun_church.py`, inside the package, so that a wheel
install and `diffusion_jax.convert` have it too; this file lets the command line name it by path.
"""

from diffusion_jax.configs.lsun_church import get_config

__all__ = ['get_config']
