"""Our U-Net config as diffusers `UNet2DModel` keyword arguments (no torch needed).

The settings are those `diffusion_jax.convert` requires of a diffusers model to be our network
exactly (its `_FIXED` table): sin-then-cos timestep embedding with frequencies spaced by
half - 1 (`flip_sin_to_cos=False`, `freq_shift=1`), GroupNorm epsilon 1e-6, TF-style stride-2
downsampling that pads only bottom/right (`downsample_padding=0`), single-head attention
(`attention_head_dim=None`: one head as wide as the layer), and attention blocks at the same
levels going down and up. `tests/bench_peer_test.py` checks the mapping with `convert`.
"""

from typing import Any

import ml_collections

# diffusion_jax.models.layers.GROUP_NORM_EPSILON (the test checks it), written out so that the
# peer's process does not import JAX before it has timed anything.
GROUP_NORM_EPSILON = 1e-6
_LEARNED_VAR_TYPES = ('learned', 'learned_range')  # the network also outputs a variance


def unet2d_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """diffusers `UNet2DModel(**kwargs)` with the same layers and parameters as our U-Net.

    Args:
        config: our experiment config; reads `data.image_size`, `data.num_channels`,
            `model.*` and `diffusion.model_var_type`.

    Returns:
        The keyword arguments; the model maps [B, C, S, S] images and [B] (or scalar) integer
        timesteps to [B, out_channels, S, S].

    Raises:
        ValueError: a setting diffusers' UNet2DModel cannot reproduce (e.g. average-pool
            resampling).
    """
    m, size = config.model, config.data.image_size
    if not m.resamp_with_conv:
        raise ValueError('model.resamp_with_conv=False has no UNet2DModel equivalent')
    levels = range(len(m.ch_mult))
    attention = [size // 2**i in m.attn_resolutions for i in levels]
    channels = config.data.num_channels
    learned = config.diffusion.model_var_type in _LEARNED_VAR_TYPES
    return {
        'sample_size': size,
        'in_channels': channels,
        'out_channels': 2 * channels if learned else channels,
        'block_out_channels': tuple(m.ch * mult for mult in m.ch_mult),
        'layers_per_block': m.num_res_blocks,
        'down_block_types': tuple('AttnDownBlock2D' if a else 'DownBlock2D' for a in attention),
        'up_block_types': tuple('AttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(attention)),
        'mid_block_type': 'UNetMidBlock2D',
        'attention_head_dim': None,
        'norm_num_groups': m.num_groups,
        'norm_eps': GROUP_NORM_EPSILON,
        'act_fn': 'silu',
        'dropout': m.dropout,
        'time_embedding_type': 'positional',
        'flip_sin_to_cos': False,
        'freq_shift': 1,
        'downsample_padding': 0,
        'downsample_type': 'conv',
        'upsample_type': 'conv',
        'resnet_time_scale_shift': 'default',
        'center_input_sample': False,
        'add_attention': True,
    }
