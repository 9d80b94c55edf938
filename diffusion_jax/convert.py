"""Pretrained DDPM weights in the diffusers format -> our U-Net and a ready workdir.

The original DDPM checkpoints (CIFAR10, CelebA-HQ, LSUN church/bedroom/cat) are published in the
diffusers format: a `config.json` and `diffusion_pytorch_model.safetensors` describing a
`UNet2DModel`, which with the DDPM settings is the paper's network layer for layer. This module
reads them with `safetensors` (no torch), renames and transposes every tensor onto our parameter
tree, and refuses any diffusers setting our network cannot reproduce exactly.

    python -m diffusion_jax.convert --diffusers_dir=DIR --workdir=OUT

writes `OUT/config.json` and a checkpoint at step 0 whose parameters and EMA parameters are the
imported weights, so `--mode=sample` and `--mode=eval` work on OUT.

Layouts: torch convolutions are [out, in, kh, kw] and ours [kh, kw, in, out]; torch linear
layers are [out, in] and ours [in, out]; 1x1 convolutions (shortcuts, old attention layers)
become our dense layers.
"""

import json
import os
import sys
from typing import Any

import jax
import ml_collections
import numpy as np

from configs import cifar10

WEIGHTS_FILE = 'diffusion_pytorch_model.safetensors'

# diffusers setting -> the only value our network reproduces exactly.
_REQUIRED = {
    'act_fn': 'silu',
    'flip_sin_to_cos': False,
    'freq_shift': 1,
    'time_embedding_type': 'positional',
    'norm_eps': 1e-6,
    'downsample_padding': 0,  # pad bottom/right before the stride-2 conv, like TF 'SAME'
    'resnet_time_scale_shift': 'default',
    'center_input_sample': False,
    'add_attention': True,
    'class_embed_type': None,
    'num_class_embeds': None,
    'downsample_type': 'conv',
    'upsample_type': 'conv',
    'mid_block_type': 'UNetMidBlock2D',
    'mid_block_scale_factor': 1,
    'attn_norm_num_groups': None,
    'time_embedding_dim': None,
}
_DOWN_TYPES = {'DownBlock2D': False, 'AttnDownBlock2D': True}
_UP_TYPES = {'UpBlock2D': False, 'AttnUpBlock2D': True}
_VARIANCE = {
    'fixed_large': 'fixedlarge',
    'fixed_small': 'fixedsmall',
    'fixed_small_log': 'fixedsmall',
}


class ConversionError(ValueError):
    """A diffusers model our U-Net cannot represent, or weights that do not fit it."""


def _find(directory: str) -> tuple[str, str | None]:
    """(the UNet folder, the scheduler config or None) of a UNet folder or a pipeline root."""
    for unet_dir in (os.path.join(directory, 'unet'), directory):
        if os.path.exists(os.path.join(unet_dir, 'config.json')):
            break
    else:
        raise ConversionError(f'{directory} has no config.json (nor unet/config.json)')
    if not os.path.exists(os.path.join(unet_dir, WEIGHTS_FILE)):
        raise ConversionError(f'{unet_dir} has no {WEIGHTS_FILE}')
    for candidate in (
        os.path.join(directory, 'scheduler', 'scheduler_config.json'),
        os.path.join(directory, 'scheduler_config.json'),
    ):
        if os.path.exists(candidate):
            return unet_dir, candidate
    return unet_dir, None


def config_from_diffusers(
    unet: dict[str, Any], scheduler: dict[str, Any] | None = None
) -> ml_collections.ConfigDict:
    """Our config for a diffusers `UNet2DModel` config (and optionally its DDPM scheduler)."""
    for key, value in _REQUIRED.items():
        if key in unet and unet[key] != value:
            raise ConversionError(
                f'diffusers config {key}={unet[key]!r} is not supported; the DDPM U-Net needs '
                f'{value!r}'
            )
    channels = list(unet['block_out_channels'])
    down, up = list(unet['down_block_types']), list(unet['up_block_types'])
    # diffusers' default head size is 8: heads = channels / 8. The DDPM network has one head,
    # which diffusers expresses as None (or the channel count of each attention layer).
    head_dim = unet.get('attention_head_dim', 8)
    attn_channels = [c for c, n in zip(channels, down, strict=True) if n.startswith('Attn')]
    if head_dim is not None and any(head_dim != c for c in [*attn_channels, channels[-1]]):
        raise ConversionError(
            f'diffusers config attention_head_dim={head_dim!r} means multi-head attention; the '
            'DDPM U-Net has one head (attention_head_dim null)'
        )
    for name in down:
        if name not in _DOWN_TYPES:
            raise ConversionError(f'down block {name!r} not supported; use {sorted(_DOWN_TYPES)}')
    for name in up:
        if name not in _UP_TYPES:
            raise ConversionError(f'up block {name!r} not supported; use {sorted(_UP_TYPES)}')
    if [_DOWN_TYPES[n] for n in down] != [_UP_TYPES[n] for n in reversed(up)]:
        raise ConversionError('attention must sit at the same levels on the way down and up')
    if channels[0] == 0 or any(c % channels[0] for c in channels):
        raise ConversionError(f'block_out_channels {channels} must be multiples of the first')
    size = unet['sample_size']
    size = size[0] if isinstance(size, list | tuple) else size
    config = cifar10.get_config()
    config.data.image_size = int(size)
    config.data.num_channels = int(unet.get('in_channels', 3))
    config.data.dataset = 'npz'  # a placeholder: point --config.data at your data to train on
    m = config.model
    m.ch = channels[0]
    m.ch_mult = tuple(c // channels[0] for c in channels)
    m.num_res_blocks = int(unet.get('layers_per_block', 2))
    m.attn_resolutions = tuple(
        config.data.image_size // 2**i for i, name in enumerate(down) if _DOWN_TYPES[name]
    )
    m.num_groups = int(unet.get('norm_num_groups', 32))
    m.dropout = float(unet.get('dropout', 0.0))
    out_channels = int(unet.get('out_channels', config.data.num_channels))
    if out_channels == 2 * config.data.num_channels:
        config.diffusion.model_var_type = 'learned_range'
        config.diffusion.loss_type = 'hybrid'
    elif out_channels != config.data.num_channels:
        raise ConversionError(f'out_channels={out_channels} must be in_channels or twice it')
    if scheduler:
        _apply_scheduler(config, scheduler)
    return config


def _apply_scheduler(config: ml_collections.ConfigDict, scheduler: dict[str, Any]) -> None:
    d = config.diffusion
    d.num_timesteps = int(scheduler.get('num_train_timesteps', d.num_timesteps))
    schedule = scheduler.get('beta_schedule', 'linear')
    if schedule == 'linear':
        d.beta_schedule = 'linear'
        d.beta_start = float(scheduler.get('beta_start', d.beta_start))
        d.beta_end = float(scheduler.get('beta_end', d.beta_end))
    elif schedule == 'squaredcos_cap_v2':
        d.beta_schedule = 'cosine'
    else:
        raise ConversionError(f'scheduler beta_schedule={schedule!r} is not supported')
    variance = scheduler.get('variance_type', 'fixed_small')
    if config.diffusion.model_var_type.startswith('learned'):
        pass  # the network's extra channels decide
    elif variance in _VARIANCE:
        d.model_var_type = _VARIANCE[variance]
    else:
        raise ConversionError(f'scheduler variance_type={variance!r} is not supported')
    config.sampling.clip_denoised = bool(scheduler.get('clip_sample', True))
    if scheduler.get('prediction_type', 'epsilon') != 'epsilon':
        raise ConversionError('only epsilon-predicting schedulers are supported')


def _conv(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # [out, in, kh, kw] -> [kh, kw, in, out]


def _dense(w: np.ndarray) -> np.ndarray:
    return (w[:, :, 0, 0] if w.ndim == 4 else w).T  # [out, in(, 1, 1)] -> [in, out]


class _Reader:
    """Takes tensors out of the safetensors dict by name, remembering which were used."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors, self.used = tensors, set()

    def get(self, *names: str) -> np.ndarray:
        for name in names:
            if name in self.tensors:
                self.used.add(name)
                return np.asarray(self.tensors[name], np.float32)
        raise ConversionError(f'the weights have no tensor {names[0]!r}')

    def conv(self, prefix: str) -> dict[str, np.ndarray]:
        return {'kernel': _conv(self.get(f'{prefix}.weight')), 'bias': self.get(f'{prefix}.bias')}

    def dense(self, *prefixes: str) -> dict[str, np.ndarray]:
        kernel = self.get(*(f'{p}.weight' for p in prefixes))
        return {'kernel': _dense(kernel), 'bias': self.get(*(f'{p}.bias' for p in prefixes))}

    def norm(self, prefix: str) -> dict[str, np.ndarray]:
        return {'scale': self.get(f'{prefix}.weight'), 'bias': self.get(f'{prefix}.bias')}

    def resnet(self, prefix: str) -> dict[str, Any]:
        block = {
            'norm1': self.norm(f'{prefix}.norm1'),
            'conv1': self.conv(f'{prefix}.conv1'),
            'temb_proj': self.dense(f'{prefix}.time_emb_proj'),
            'norm2': self.norm(f'{prefix}.norm2'),
            'conv2': self.conv(f'{prefix}.conv2'),
        }
        if f'{prefix}.conv_shortcut.weight' in self.tensors:
            block['nin_shortcut'] = self.dense(f'{prefix}.conv_shortcut')
        return block

    def attention(self, prefix: str) -> dict[str, Any]:
        # Current diffusers names first, then the names of older saved models.
        return {
            'norm': self.norm(f'{prefix}.group_norm'),
            'q': self.dense(f'{prefix}.to_q', f'{prefix}.query'),
            'k': self.dense(f'{prefix}.to_k', f'{prefix}.key'),
            'v': self.dense(f'{prefix}.to_v', f'{prefix}.value'),
            'proj_out': self.dense(f'{prefix}.to_out.0', f'{prefix}.proj_attn'),
        }


def convert_tensors(
    tensors: dict[str, np.ndarray], config: ml_collections.ConfigDict
) -> dict[str, Any]:
    """Our parameter tree from a diffusers `UNet2DModel` state dict (name -> numpy array)."""
    r, m = _Reader(tensors), config.model
    levels = len(m.ch_mult)
    attn = [config.data.image_size // 2**i in m.attn_resolutions for i in range(levels)]
    params: dict[str, Any] = {
        'conv_in': r.conv('conv_in'),
        'temb_dense0': r.dense('time_embedding.linear_1'),
        'temb_dense1': r.dense('time_embedding.linear_2'),
        'mid_block_1': r.resnet('mid_block.resnets.0'),
        'mid_attn_1': r.attention('mid_block.attentions.0'),
        'mid_block_2': r.resnet('mid_block.resnets.1'),
        'norm_out': r.norm('conv_norm_out'),
        'conv_out': r.conv('conv_out'),
    }
    for i in range(levels):
        down, up = f'down_blocks.{i}', f'up_blocks.{levels - 1 - i}'  # diffusers: coarsest first
        for j in range(m.num_res_blocks):
            params[f'down_{i}_block_{j}'] = r.resnet(f'{down}.resnets.{j}')
            if attn[i]:
                params[f'down_{i}_attn_{j}'] = r.attention(f'{down}.attentions.{j}')
        if i != levels - 1:
            params[f'down_{i}_downsample'] = {'conv': r.conv(f'{down}.downsamplers.0.conv')}
        for j in range(m.num_res_blocks + 1):
            params[f'up_{i}_block_{j}'] = r.resnet(f'{up}.resnets.{j}')
            if attn[i]:
                params[f'up_{i}_attn_{j}'] = r.attention(f'{up}.attentions.{j}')
        if i != 0:
            params[f'up_{i}_upsample'] = {'conv': r.conv(f'{up}.upsamplers.0.conv')}
    unused = sorted(set(tensors) - r.used)
    if unused:
        raise ConversionError(f'{len(unused)} tensors have no place in our U-Net, e.g. {unused[0]}')
    _check_against_model(params, config)
    return params


def _check_against_model(params: dict[str, Any], config: ml_collections.ConfigDict) -> None:
    from diffusion_jax import models, train

    model = models.get_model(config)
    x = jax.ShapeDtypeStruct((1, *train.image_shape(config)), np.float32)
    t = jax.ShapeDtypeStruct((1,), np.int32)
    expected = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t, train=False), x, t)
    want = {jax.tree_util.keystr(k): v.shape for k, v in _leaves(expected['params'])}
    got = {jax.tree_util.keystr(k): v.shape for k, v in _leaves(params)}
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            raise ConversionError(
                f'parameter {key}: the converted weights have shape {got.get(key)}, our U-Net '
                f'expects {want.get(key)}'
            )


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def load_diffusers_unet(directory: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """Reads a diffusers-format DDPM U-Net folder (or pipeline root) into (config, params).

    Raises:
      ConversionError: missing files, unsupported settings, or weights that do not fit.
    """
    from safetensors.numpy import load_file

    unet_dir, scheduler_path = _find(directory)
    with open(os.path.join(unet_dir, 'config.json')) as f:
        unet = json.load(f)
    scheduler = None
    if scheduler_path:
        with open(scheduler_path) as f:
            scheduler = json.load(f)
    config = config_from_diffusers(unet, scheduler)
    tensors = load_file(os.path.join(unet_dir, WEIGHTS_FILE))
    return config, convert_tensors(tensors, config)


def write_workdir(config: ml_collections.ConfigDict, params: Any, workdir: str) -> None:
    """`workdir/config.json` and a step-0 checkpoint with params = EMA params = `params`."""
    from diffusion_jax import checkpointing, image_io, models, parallel, train
    from diffusion_jax import train_state as train_state_lib

    ckpt_dir = os.path.join(workdir, 'checkpoints')
    if os.path.exists(ckpt_dir) and os.listdir(ckpt_dir):
        raise ConversionError(f'{ckpt_dir} already has checkpoints; choose a new --workdir')
    tx, _ = train_state_lib.create_optimizer(config.optim)
    state = train_state_lib.create_train_state(
        models.get_model(config), tx, jax.random.PRNGKey(0), train.image_shape(config)
    )
    state = state.replace(params=params, ema_params=jax.tree.map(np.copy, params))
    state = jax.device_put(state, parallel.replicated(parallel.create_mesh()))
    with checkpointing.Checkpointer(ckpt_dir, keep=1, save_every_steps=1) as ckpt:
        ckpt.save(0, state, meta={'config': config.to_dict()}, force=True)
    image_io.save_json(os.path.join(workdir, 'config.json'), config.to_dict())


def main(argv: list[str]) -> None:
    from absl import app, flags

    source = flags.DEFINE_string('diffusers_dir', None, 'diffusers UNet folder or pipeline root.')
    workdir = flags.DEFINE_string('workdir', None, 'Where to write config.json and checkpoints/.')

    def run(_):
        if not source.value or not workdir.value:
            sys.stderr.write('error: --diffusers_dir and --workdir are both required\n')
            sys.exit(2)
        try:
            config, params = load_diffusers_unet(source.value)
            write_workdir(config, params, workdir.value)
        except (ConversionError, OSError) as e:
            sys.stderr.write(f'error: {e}\n')
            sys.exit(2)
        print(f'wrote {workdir.value}: sample with --mode=sample --workdir={workdir.value}')

    app.run(run, argv)


if __name__ == '__main__':
    main(sys.argv)
