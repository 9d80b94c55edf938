"""DDPM on CelebA-HQ 256x256 (Ho et al. 2020, Section 4 and Appendix B).

The original `scripts/run_celebahq.py`: the 113.7M-parameter U-Net (ch_mult 1,1,2,2,4,4), no
dropout, Adam at 2e-5, batch 64, sampling with the posterior variance (fixedsmall).

    python -m diffusion_jax.main --config=configs/celeba_hq.py --workdir=/tmp/ddpm_celeba_hq

CelebA-HQ must be prepared by hand for tfds (`celeb_a_hq/256` is a manual download; see the tfds
catalogue). The paper shows samples only (no FID for CelebA-HQ 256).
"""

import ml_collections

from diffusion_jax.configs import cifar10


def get_config() -> ml_collections.ConfigDict:
    """Returns the CelebA-HQ 256x256 configuration: the CIFAR10 base plus its deltas."""
    config = cifar10.get_config()
    config.data.dataset = 'celeb_a_hq/256'
    config.data.image_size = 256
    config.data.eval_split = 'train'  # celeb_a_hq has a single split
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.dropout = 0.0
    config.diffusion.model_var_type = 'fixedsmall'
    config.training.batch_size = 64
    config.training.num_train_steps = 500_000
    config.optim.learning_rate = 2e-5
    config.sampling.batch_size = 64
    config.eval.batch_size = 64
    return config
