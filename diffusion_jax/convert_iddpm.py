"""Improved DDPM checkpoints (openai/improved-diffusion `.pt` state dicts) -> our params, workdir.

Their `UNetModel` is our U-Net with Improved DDPM's options (`configs/cifar10_iddpm.py`):
multi-head attention, scale-shift GroupNorm, and three PyTorch conventions, the [cos, sin]
timestep embedding (`model.time_embedding='iddpm'`), GroupNorm epsilon 1e-5 and symmetric
padding of the stride-2 conv (`model.downsample_padding='symmetric'`). A `.pt` file holds only
the weights, so the config that describes them is given, and every tensor is checked against it.

    python -m diffusion_jax.convert_iddpm --checkpoint=cifar10_uncond_50M_500K.pt \\
        --config=configs/cifar10_iddpm.py --workdir=OUT

writes OUT/config.json and a step-0 checkpoint (params = EMA params = the weights). Reading
`.pt` needs torch (CPU build enough), imported only then; an `.npz` of the same state dict
(name -> array) needs nothing.

Names: time_embed.0 / .2 -> temb_dense0 / 1; input_blocks.0.0 -> conv_in; input_blocks.k, one
per res block (.0, with .1 its attention) or Downsample (.0.op), level by level ->
down_i_block_j, down_i_attn_j, down_i_downsample/conv; middle_block.0/.1/.2 -> mid_block_1,
mid_attn_1, mid_block_2; output_blocks.k, coarsest level first, -> up_i_block_j, up_i_attn_j and
up_i_upsample/conv (the level's last k); out.0 / .2 -> norm_out / conv_out. In res blocks
in_layers.0 / .2, emb_layers.1, out_layers.0 / .3, skip_connection -> norm1, conv1, temb_proj,
norm2, conv2, nin_shortcut. Attention: norm, qkv, proj_out -> norm, q k v, proj_out, where
qkv's 3C outputs are per head [q_h, k_h, v_h] (their legacy order). A class-conditional model's
label_emb [K, E] gets a zero row for our null label K, which they never trained.
"""

import os
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import config_lib, convert, errors

ConversionError = errors.ConversionError

# What our config must say so that our network computes theirs: key -> (value, why).
CONVENTIONS = {
    'model.time_embedding': ('iddpm', 'their embedding is [cos, sin] with frequencies 1/half'),
    'model.norm_epsilon': (1e-5, "their GroupNorm has PyTorch's epsilon"),
    'model.downsample_padding': ('symmetric', 'their stride-2 conv pads 1 on every side'),
}
_RESNET = {
    'in_layers.0': ('norm1', 'norm'),
    'in_layers.2': ('conv1', 'conv'),
    'emb_layers.1': ('temb_proj', 'dense'),
    'out_layers.0': ('norm2', 'norm'),
    'out_layers.3': ('conv2', 'conv'),
}


def check_conventions(config: ml_collections.ConfigDict) -> None:
    """Raises ConversionError naming each `CONVENTIONS` key the config sets otherwise."""
    problems = []
    for key, (value, why) in CONVENTIONS.items():
        section, name = key.split('.')
        if key == 'model.downsample_padding' and not config.model.resamp_with_conv:
            continue  # average pooling has no padding to choose
        if config[section][name] != value:
            problems.append(f'config.{key} is {config[section][name]!r}, not {value!r} ({why})')
    if problems:
        fix = 'start from configs/cifar10_iddpm.py, or set these with --config.model.<key>'
        raise ConversionError('; '.join(problems) + f'; {fix}')


def _heads(config: ml_collections.ConfigDict, channels: int) -> int:
    m = config.model
    return channels // m.num_head_channels if m.num_head_channels else m.num_heads


def _plan(config: ml_collections.ConfigDict, names: set[str]) -> dict[str, tuple[str, Any]]:
    """Our flat param path -> (their tensor name, its layout: a kind, or ('qkv', i, heads))."""
    plan: dict[str, tuple[str, Any]] = {}
    m, levels = config.model, len(config.model.ch_mult)

    def layer(ours: str, theirs: str, kind: Any) -> None:
        plan[f'{ours}/{"scale" if kind == "norm" else "kernel"}'] = (f'{theirs}.weight', kind)
        plan[f'{ours}/bias'] = (f'{theirs}.bias', 'vector')

    def resnet(ours: str, theirs: str) -> None:
        for their_name, (name, kind) in _RESNET.items():
            layer(f'{ours}/{name}', f'{theirs}.{their_name}', kind)
        if f'{theirs}.skip_connection.weight' in names:  # present iff the channels change
            layer(f'{ours}/nin_shortcut', f'{theirs}.skip_connection', 'dense')

    def attention(ours: str, theirs: str, channels: int) -> None:
        layer(f'{ours}/norm', f'{theirs}.norm', 'norm')
        for i, name in enumerate('qkv'):
            kind = ('qkv', i, _heads(config, channels))
            plan[f'{ours}/{name}/kernel'] = (f'{theirs}.qkv.weight', kind)
            plan[f'{ours}/{name}/bias'] = (f'{theirs}.qkv.bias', kind)
        layer(f'{ours}/proj_out', f'{theirs}.proj_out', 'dense')

    layer('temb_dense0', 'time_embed.0', 'dense')
    layer('temb_dense1', 'time_embed.2', 'dense')
    if m.num_classes:
        plan['label_emb/embedding'] = ('label_emb.weight', 'embedding')
    layer('conv_in', 'input_blocks.0.0', 'conv')
    k = 1
    for i in range(levels):
        attn = config.data.image_size // 2**i in m.attn_resolutions
        for j in range(m.num_res_blocks):
            resnet(f'down_{i}_block_{j}', f'input_blocks.{k}.0')
            if attn:
                attention(f'down_{i}_attn_{j}', f'input_blocks.{k}.1', m.ch * m.ch_mult[i])
            k += 1
        if i != levels - 1:
            if m.resamp_with_conv:
                layer(f'down_{i}_downsample/conv', f'input_blocks.{k}.0.op', 'conv')
            k += 1
    resnet('mid_block_1', 'middle_block.0')
    attention('mid_attn_1', 'middle_block.1', m.ch * m.ch_mult[-1])
    resnet('mid_block_2', 'middle_block.2')
    k = 0
    for i in reversed(range(levels)):
        attn = config.data.image_size // 2**i in m.attn_resolutions
        for j in range(m.num_res_blocks + 1):
            resnet(f'up_{i}_block_{j}', f'output_blocks.{k}.0')
            if attn:
                attention(f'up_{i}_attn_{j}', f'output_blocks.{k}.1', m.ch * m.ch_mult[i])
            if i and j == m.num_res_blocks and m.resamp_with_conv:
                layer(f'up_{i}_upsample/conv', f'output_blocks.{k}.{2 if attn else 1}.conv', 'conv')
            k += 1
    layer('norm_out', 'out.0', 'norm')
    layer('conv_out', 'out.2', 'conv')
    return plan


def _transform(name: str, w: np.ndarray, kind: Any) -> np.ndarray:
    """Their tensor in our layout: qkv rows [heads, 3, d] -> q, k or v's [heads * d], the label
    embedding with a null row, the rest as `convert.transform` lays it out."""
    w = np.asarray(w, np.float32)
    if isinstance(kind, tuple):  # ('qkv', which of q k v, heads)
        _, which, heads = kind
        rows = w.shape[0]
        if rows % (3 * heads):
            raise ConversionError(f'tensor {name} has {rows} rows, not 3 x {heads} heads x d')
        part = w.reshape(heads, 3, rows // (3 * heads), *w.shape[1:])[:, which]
        part = part.reshape(rows // 3, *w.shape[1:])
        return part if part.ndim == 1 else np.ascontiguousarray(part.reshape(part.shape[:2]).T)
    if kind == 'embedding' and w.ndim == 2:
        return np.concatenate([w, np.zeros_like(w[:1])])  # the null label K: never trained
    return convert.transform(name, w, kind)


def convert_state_dict(
    state: dict[str, np.ndarray], config: ml_collections.ConfigDict
) -> dict[str, Any]:
    """Our U-Net params from an Improved DDPM `UNetModel` state dict.

    Args:
        state: their name -> array, e.g. `input_blocks.0.0.weight`: [ch, C, 3, 3].
        config: our config describing their network (`configs/cifar10_iddpm.py` and overrides).

    Returns:
        The nested float32 NumPy params of `experiment.build(config).model`, e.g.
        `params['conv_in']['kernel']`: [3, 3, C, ch]; checked against `model.init`'s tree.

    Raises:
        ConversionError: a convention the config sets otherwise (`CONVENTIONS`), or every
            missing, unexpected and mis-shaped tensor.
    """
    check_conventions(config)
    plan = _plan(config, set(state))
    params = convert.params_from_plan(plan, state, config, _transform, 'the config')
    if config.model.num_classes:
        logging.warning(
            'Improved DDPM has no null label: its embedding (label %d) is zero, so classifier-'
            'free guidance (sampling.guidance_scale) means nothing for these weights',
            config.model.num_classes,
        )
    return params


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Their state dict from a `.pt` file (needs torch) or an `.npz` of the same names.

    Raises:
        ConversionError: the file is missing or unreadable, or torch is needed and missing.
    """
    if not os.path.isfile(path):
        raise ConversionError(f'no such checkpoint file: {path}')
    if path.endswith('.npz'):
        try:
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError) as e:
            raise ConversionError(f'cannot read {path}: {e}') from e
    try:
        import torch  # only this path needs torch
    except ImportError as e:
        raise ConversionError(
            f'reading {path} needs torch: pip install torch (a CPU build is enough), or save '
            'its state dict elsewhere as .npz (name -> array) and pass that'
        ) from e
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise ConversionError(f'cannot read {path} with torch.load: {e}') from e
    if not isinstance(state, dict):
        raise ConversionError(f'{path} holds a {type(state).__name__}, not a state dict')
    return {k: v.detach().float().numpy() for k, v in state.items()}


def run(argv: list[str] | None = None) -> None:
    """`python -m diffusion_jax.convert_iddpm --checkpoint=F --config=C --workdir=OUT`."""
    from absl import app, flags
    from ml_collections import config_flags

    checkpoint = flags.DEFINE_string('checkpoint', None, 'Their .pt state dict (or an .npz).')
    workdir = flags.DEFINE_string('workdir', None, 'New workdir for config.json and checkpoints/.')
    config_flag = config_flags.DEFINE_config_file(
        'config', None, 'Our config for their network, e.g. configs/cifar10_iddpm.py.'
    )
    flags.mark_flags_as_required(['checkpoint', 'workdir', 'config'])

    def parse(args: list[str]) -> list[str]:
        try:
            return flags.FLAGS(args)
        except (flags.Error, AttributeError, KeyError, OSError, ImportError, SyntaxError) as e:
            errors.fail(f'bad flags: {str(e).splitlines()[-1].strip()}', one_line=True)

    def converted() -> tuple[ml_collections.ConfigDict, Any]:
        config = config_flag.value
        config_lib.validate(config)
        return config, convert_state_dict(load_state_dict(checkpoint.value), config)

    app.run(lambda args: convert.convert_into_workdir(args, workdir.value, converted), argv=argv,
            flags_parser=parse)  # fmt: skip


if __name__ == '__main__':
    run()
