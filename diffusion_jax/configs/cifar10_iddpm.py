"""Improved DDPM's CIFAR10 recipe (Nichol & Dhariwal 2021): `--config=configs/cifar10_iddpm.py`.

Their released `cifar10_uncond_50M_500K.pt` model: `--image_size 32 --num_channels 128
--num_res_blocks 3 --learn_sigma True --dropout 0.3 --diffusion_steps 4000 --noise_schedule
cosine --lr 1e-4 --batch_size 128`, with their script defaults: 4-head attention at 16x16 and 8x8,
scale-shift GroupNorm, timesteps rescaled to [0, 1000), the hybrid loss with a learned
interpolated variance, one EMA at 0.9999, and AdamW without weight decay, warm-up or clipping.
The network has 52,546,438 parameters, as their `create_model` gives for these flags. Its
PyTorch conventions (the [cos, sin] timestep embedding, GroupNorm epsilon 1e-5, symmetric
padding in the stride-2 convs) make it the same function as theirs, so that their checkpoint
converts exactly:

    python -m diffusion_jax.convert_iddpm --checkpoint=cifar10_uncond_50M_500K.pt \\
        --config=configs/cifar10_iddpm.py --workdir=DIR
    python -m diffusion_jax.main --config=configs/cifar10_iddpm.py --workdir=DIR --mode=sample \\
        --config.sampling.num_steps=100

Or train it: `python -m diffusion_jax.main --config=configs/cifar10_iddpm.py --workdir=DIR`.
Sampling takes all 4000 steps unless `sampling.num_steps` respaces the chain, as their
`--timestep_respacing` does.
"""

import ml_collections

from diffusion_jax.configs import cifar10


def get_config() -> ml_collections.ConfigDict:
    """Returns Improved DDPM's CIFAR10 configuration: the CIFAR10 base plus its deltas."""
    config = cifar10.get_config()
    m = config.model
    m.num_res_blocks = 3
    m.attn_resolutions = (16, 8)
    m.num_heads = 4
    m.use_scale_shift_norm = True
    m.dropout = 0.3
    m.rescale_timesteps = True
    m.time_embedding = 'iddpm'
    m.norm_epsilon = 1e-5
    m.downsample_padding = 'symmetric'

    d = config.diffusion
    d.num_timesteps = 4000
    d.beta_schedule = 'cosine'
    d.model_var_type = 'learned_range'
    d.loss_type = 'hybrid'

    config.data.random_flip = False  # improved-diffusion's loader does not flip
    config.training.num_train_steps = 500_000
    config.optim.learning_rate = 1e-4
    config.optim.warmup_steps = 0
    config.optim.grad_clip = 0.0
    return config
