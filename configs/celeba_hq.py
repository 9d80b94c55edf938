"""The paper's CelebA-HQ 256x256 model: `--config=configs/celeba_hq.py`.

The config itself is `diffusion_jax/configs/celeba_hq.py`, inside the package, so that a wheel
install and `diffusion_jax.convert` have it too; this file lets the command line name it by path.
"""

from diffusion_jax.configs.celeba_hq import get_config

__all__ = ['get_config']
