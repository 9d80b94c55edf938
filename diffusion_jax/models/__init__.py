"""Denoising networks for DDPM (Ho et al. 2020), built from the config.

`get_model` is the only place `config.model` is unpacked; the networks themselves take plain
arguments.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import options
from diffusion_jax.models import layers, unet

_MODELS = {'ddpm_unet': unet.UNet}


def _get_dtype(name: str, key: str) -> Any:
    options.check_choice(f'config.model.{key}', name, options.DTYPES)
    return jnp.dtype(name)


# The computation-only options that take 'auto': (their choices, what 'auto' is per platform, what
# it is on a platform not named there).
_AUTO_OPTIONS = {
    'conv_impl': (options.CONV_IMPLS, options.AUTO_CONV_IMPL, 'xla'),
    'upsample_impl': (options.UPSAMPLE_IMPLS, options.AUTO_UPSAMPLE_IMPL, 'repeat'),
    'nin_impl': (options.NIN_IMPLS, options.AUTO_NIN_IMPL, 'dense'),
    'conv_vjp': (options.CONV_VJPS, options.AUTO_CONV_VJP, 'jax'),
}


def resolve(key: str, name: str, platform: str | None = None) -> str:
    """`config.model.<key>` (a key of `_AUTO_OPTIONS`: conv_impl, upsample_impl, nin_impl,
    conv_vjp) checked, with 'auto' resolved for `platform` ('cpu', 'gpu', 'tpu'; None: this
    machine's default backend)."""
    choices, auto, default = _AUTO_OPTIONS[key]
    options.check_choice(f'config.model.{key}', name, choices)
    if name != 'auto':
        return name
    return auto.get(platform or jax.default_backend(), default)


def get_model(config: ml_collections.ConfigDict, device: Any = None) -> unet.UNet:
    """Builds the denoising network that `config.model` describes.

    Args:
        config: the experiment config; reads `model.*`, `data.num_channels`,
            `diffusion.model_var_type` and, for `model.rescale_timesteps`,
            `diffusion.num_timesteps`.
        device: the device whose cuDNN support and platform decide the attention,
            `conv_impl`, `upsample_impl`, `nin_impl` and `conv_vjp` 'auto'; None (the
            default): this machine's first device.

    Returns:
        An unbound UNet whose output has `num_channels` channels, or twice that when the
        variance is learned. Its attention blocks use cuDNN's fused attention where the device
        supports it (`layers.cudnn_max_head_dim`, asked here once).
    """
    m = config.model
    options.check_choice('model', m.name, options.MODELS)
    num_channels = config.data.num_channels
    learned_var = config.diffusion.model_var_type in options.LEARNED_VAR_TYPES
    platform = None if device is None else device.platform
    return _MODELS[m.name](
        ch=m.ch,
        out_ch=2 * num_channels if learned_var else num_channels,
        # A ConfigDict may hold these as lists (e.g. after a command-line override).
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        resamp_with_conv=m.resamp_with_conv,
        num_groups=m.num_groups,
        norm_epsilon=m.norm_epsilon,
        num_heads=m.num_heads,
        num_head_channels=m.num_head_channels,
        scale_shift_norm=m.use_scale_shift_norm,
        time_embedding=m.time_embedding,
        downsample_padding=m.downsample_padding,
        conv_impl=resolve('conv_impl', m.conv_impl, platform),
        upsample_impl=resolve('upsample_impl', m.upsample_impl, platform),
        nin_impl=resolve('nin_impl', m.nin_impl, platform),
        conv_vjp=resolve('conv_vjp', m.conv_vjp, platform),
        dtype=_get_dtype(m.dtype, 'dtype'),
        param_dtype=_get_dtype(m.param_dtype, 'param_dtype'),
        cudnn_max_head_dim=layers.cudnn_max_head_dim(device),
        remat=m.remat,
        timestep_scale=1000.0 / config.diffusion.num_timesteps if m.rescale_timesteps else 1.0,
        num_classes=m.num_classes,
    )
