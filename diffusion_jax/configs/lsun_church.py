"""DDPM on LSUN church_outdoor 256x256 (Ho et al. 2020, Table 3: FID 7.89).

The original `scripts/run_lsun.py` church model: the CelebA-HQ 256x256 architecture (113.7M
parameters), trained at lr 2e-5, batch 64, for 1.2M steps.

    python -m diffusion_jax.main --config=configs/lsun_church.py --workdir=/tmp/ddpm_church
"""

import ml_collections

from diffusion_jax.configs import celeba_hq


def get_config() -> ml_collections.ConfigDict:
    """Returns the LSUN church configuration: the CelebA-HQ config plus its deltas."""
    config = celeba_hq.get_config()
    config.data.dataset = 'lsun/church_outdoor'
    config.data.eval_split = 'validation'
    config.training.num_train_steps = 1_200_000
    return config
