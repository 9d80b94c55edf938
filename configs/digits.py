"""DDPM on scikit-learn's bundled 8x8 digits: the offline default that runs on a laptop CPU.

The paper's method unchanged (T=1000 linear betas, eps-prediction, L_simple, EMA, ancestral
sampling with sigma^2 = beta) on the 1,797 8x8 grayscale digits that ship inside scikit-learn,
so a newcomer gets a real run with no download and no accelerator. The images are used at their
native 8x8 size; their 17 grey levels are mapped to [-1, 1] like 8-bit pixels.

    python -m diffusion_jax.main --config=configs/digits.py --workdir=/tmp/ddpm_digits
"""

import ml_collections

from configs import cifar10


def get_config() -> ml_collections.ConfigDict:
    """Returns the digits configuration: the CIFAR10 base plus its deltas."""
    config = cifar10.get_config()
    config.data.dataset = 'digits'
    config.data.image_size = 8
    config.data.num_channels = 1
    config.data.random_flip = False  # digits are not mirror-symmetric

    config.model.ch = 64
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.1

    config.training.batch_size = 128
    config.training.num_train_steps = 10_000
    config.training.log_every_steps = 100
    config.training.checkpoint_every_steps = 1000
    config.training.sample_every_steps = 2500

    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 500
    config.optim.ema_decay = 0.999

    config.sampling.num_samples = 100
    config.sampling.batch_size = 100
    config.eval.batch_size = 500
    return config
