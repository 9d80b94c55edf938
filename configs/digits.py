"""The offline default: DDPM on scikit-learn's bundled 8x8 digits: `--config=configs/digits.py`.

The config itself is `diffusion_jax/configs/digits.py`, inside the package, so that a wheel install
and `diffusion_jax.convert` have it too; this file lets the command line name it by path.
"""

from diffusion_jax.configs.digits import get_config

__all__ = ['get_config']
