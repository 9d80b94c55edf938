"""Pretrained DDPM weights in the diffusers format -> our U-Net params and a ready workdir.

The original DDPM models (Ho et al. 2020: CIFAR10, CelebA-HQ, LSUN church/bedroom/cat) are
published as a diffusers `UNet2DModel` (`config.json`, `diffusion_pytorch_model.safetensors`),
alone or in the `unet/` folder of a pipeline. With the DDPM settings it is the paper's network
layer for layer. We read it with `safetensors` (no torch), rename and transpose every tensor onto
our tree, and refuse, naming it, any setting our network cannot reproduce exactly.
`python -m diffusion_jax.convert --diffusers_dir=DIR --workdir=OUT` writes OUT/config.json and a
step-0 checkpoint (params = EMA params = the weights) for --mode=sample, --mode=eval or training.

Names: conv_in, conv_norm_out, conv_out -> conv_in, norm_out, conv_out; time_embedding.linear_1
and linear_2 -> temb_dense0 and temb_dense1; down_blocks.i.{resnets.j, attentions.j,
downsamplers.0.conv} -> down_i_block_j, down_i_attn_j, down_i_downsample/conv; up_blocks.k.* ->
up_i_* alike, with i = L - 1 - k (diffusers goes up coarsest first); mid_block.{resnets.0,
attentions.0, resnets.1} -> mid_block_1, mid_attn_1, mid_block_2. Inside resnets time_emb_proj
-> temb_proj and conv_shortcut -> nin_shortcut; inside attentions group_norm, to_q, to_k, to_v,
to_out.0 (older files: query, key, value, proj_attn) -> norm, q, k, v, proj_out. Layouts: conv
[out, in, kh, kw] -> [kh, kw, in, out]; linear [out, in] (or 1x1 conv) -> [in, out]; GroupNorm
weight -> scale.
"""

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util
from jax.sharding import Mesh
from safetensors import SafetensorError
from safetensors.numpy import load_file

from diffusion_jax import checkpointing, config_lib, errors, experiment, image_io, parallel
from diffusion_jax import train_state as train_state_lib
from diffusion_jax.configs import cifar10

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'diffusion_pytorch_model.safetensors'
SCHEDULER_FILE = 'scheduler_config.json'

# Setting -> (diffusers' default, the values with which UNet2DModel is the DDPM U-Net exactly).
_FIXED = {
    '_class_name': ('UNet2DModel', ('UNet2DModel',)),
    'center_input_sample': (False, (False,)),  # True maps x to 2x - 1 first
    'time_embedding_type': ('positional', ('positional',)),
    'flip_sin_to_cos': (True, (False,)),  # the embedding is [sin, cos]
    'freq_shift': (0, (1,)),  # frequencies exp(-ln(10000) i / (half - 1))
    'norm_eps': (1e-5, (1e-6,)),  # tf.contrib group_norm's epsilon
    'downsample_padding': (1, (0,)),  # 0: pad bottom/right by 1, TF 'SAME' on even sizes
    'downsample_type': ('conv', ('conv',)),
    'upsample_type': ('conv', ('conv',)),
    'resnet_time_scale_shift': ('default', ('default',)),  # temb is added, not scale and shift
    'mid_block_type': ('UNetMidBlock2D', ('UNetMidBlock2D',)),
    'mid_block_scale_factor': (1, (1,)),
    'add_attention': (True, (True,)),
    'class_embed_type': (None, (None,)),
    'num_class_embeds': (None, (None,)),
    'act_fn': ('silu', ('silu', 'swish')),  # both x * sigmoid(x)
}
# The rest of UNet2DModel's defaults (diffusers 0.42) that we read, None aside.
_DEFAULTS = {
    'in_channels': 3,
    'out_channels': 3,
    'down_block_types': ('DownBlock2D',) + ('AttnDownBlock2D',) * 3,
    'up_block_types': ('AttnUpBlock2D',) * 3 + ('UpBlock2D',),
    'block_out_channels': (224, 448, 672, 896),
    'layers_per_block': 2,
    'norm_num_groups': 32,
    'attention_head_dim': 8,
}
_DOWN_TYPES = {'DownBlock2D': False, 'AttnDownBlock2D': True}  # block type -> has attention
_UP_TYPES = {'UpBlock2D': False, 'AttnUpBlock2D': True}
# diffusers beta_schedule -> ours (scaled_linear is our quad, squaredcos_cap_v2 our cosine).
_BETAS = {'linear': 'linear', 'scaled_linear': 'quad', 'squaredcos_cap_v2': 'cosine'}
_VARIANCES = dict(fixed_large='fixedlarge', fixed_small='fixedsmall', fixed_small_log='fixedsmall')
_LEGACY_NAMES = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
_RESNET = (('norm1', 'norm'), ('conv1', 'conv'), ('time_emb_proj', 'dense'), ('norm2', 'norm'))
_OUR_NAMES = {'time_emb_proj': 'temb_proj', 'conv_shortcut': 'nin_shortcut'}
_ATTENTION = {'group_norm': 'norm', 'to_q': 'q', 'to_k': 'k', 'to_v': 'v', 'to_out.0': 'proj_out'}


# A diffusers model our U-Net cannot represent exactly, or weights that do not fit it.
ConversionError = errors.ConversionError


def _same(a: Any, b: Any) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)  # True is not 1 here


def _check_unet(unet: dict[str, Any], u: dict[str, Any]) -> None:
    """Raises ConversionError for the first setting outside the DDPM architecture."""
    channels, down, up = u['block_out_channels'], u['down_block_types'], u['up_block_types']
    attn = {c for c, n in zip(channels, down, strict=False) if _DOWN_TYPES.get(n)}
    attn |= set(channels[-1:])  # and the middle
    supported = {key: values for key, (_, values) in _FIXED.items()} | {
        # One head: null (diffusers then uses each layer's channels), or those channels.
        'attention_head_dim': (None, *attn) if len(attn) == 1 else (None,),
        'attn_norm_num_groups': (None, u['norm_num_groups']),
        'time_embedding_dim': (None, 4 * channels[0]),
        'out_channels': (u['in_channels'], 2 * u['in_channels']),  # 2x: learned variance
    }
    for key, values in supported.items():
        if not any(_same(u.get(key), v) for v in values):
            absent = '' if key in unet else " (diffusers' default: the key is absent)"
            raise ConversionError(
                f'diffusers config {key}={u.get(key)!r}{absent} is not supported; the DDPM U-Net '
                f'needs {" or ".join(f"{key}={v!r}" for v in values)}'
            )
    if not len(channels) == len(down) == len(up) > 0:
        raise ConversionError('block_out_channels, down_ and up_block_types differ in length')
    for key, names, types in (('down', down, _DOWN_TYPES), ('up', up, _UP_TYPES)):
        if bad := [name for name in names if name not in types]:
            raise ConversionError(f'{key}_block_types {bad[0]!r} unsupported; use {sorted(types)}')
    if [_DOWN_TYPES[n] for n in down] != [_UP_TYPES[n] for n in reversed(up)]:
        raise ConversionError(f'attention must be at the same levels down and up: {down}, {up}')
    if any(c % channels[0] for c in channels):
        raise ConversionError(f'block_out_channels {channels} must be multiples of the first')
    size = u.get('sample_size')
    if not isinstance(size, int) and not (isinstance(size, list | tuple) and len(set(size)) == 1):
        raise ConversionError(f'sample_size {size!r} must be one int (square images)')


def config_from_diffusers(
    unet: dict[str, Any], scheduler: dict[str, Any] | None = None
) -> ml_collections.ConfigDict:
    """Our validated config: the cifar10 config with data, model and diffusion derived from these.

    Args:
        unet: a diffusers `UNet2DModel` config.json; absent keys take diffusers' defaults.
        scheduler: its DDPMScheduler config, or None to keep the paper's diffusion settings.

    Raises:
        ConversionError: a setting our U-Net or diffusion cannot reproduce exactly.
    """
    u = {**_DEFAULTS, **{key: default for key, (default, _) in _FIXED.items()}, **unet}
    _check_unet(unet, u)
    channels = [int(c) for c in u['block_out_channels']]
    size = u['sample_size']
    size = int(size[0] if isinstance(size, list | tuple) else size)
    config = cifar10.get_config()
    config.data.image_size, config.data.num_channels = size, int(u['in_channels'])
    m = config.model
    m.ch, m.ch_mult = channels[0], tuple(c // channels[0] for c in channels)
    m.num_res_blocks, m.num_groups = int(u['layers_per_block']), int(u['norm_num_groups'])
    levels = enumerate(u['down_block_types'])
    m.attn_resolutions = tuple(size // 2**i for i, name in levels if _DOWN_TYPES[name])
    m.dropout = float(unet.get('dropout', 0.1))  # absent: the paper's CIFAR10 rate
    learned = u['out_channels'] == 2 * u['in_channels']
    if learned:
        config.diffusion.model_var_type, config.diffusion.loss_type = 'learned_range', 'hybrid'
    if scheduler is not None:
        _apply_scheduler(config, scheduler, learned)
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        raise ConversionError(f'the derived config is invalid: {e}') from e
    return config


def _apply_scheduler(config: ml_collections.ConfigDict, s: dict[str, Any], learned: bool) -> None:
    """Sets config.diffusion and sampling.clip_denoised from a DDPMScheduler config."""
    settings = {  # key: (diffusers' default, supported value -> ours)
        'beta_schedule': ('linear', _BETAS),
        'prediction_type': ('epsilon', {'epsilon': 'eps', 'sample': 'xstart'}),
        # A U-Net with 2 x in_channels outputs predicts the variance: only 'learned_range'.
        'variance_type': ('fixed_small', {'learned_range': 0} if learned else _VARIANCES),
        'trained_betas': (None, {None: 0}),
        'thresholding': (False, {False: 0}),
        'rescale_betas_zero_snr': (False, {False: 0}),
        'clip_sample_range': (1.0, {1.0: 0}),
    }
    ours = {}
    for key, (default, table) in settings.items():
        value = s.get(key, default)
        if not any(_same(value, v) for v in table):
            raise ConversionError(f'scheduler {key}={value!r} is not supported; use {list(table)}')
        ours[key] = table[value]
    d = config.diffusion
    d.beta_schedule, d.model_mean_type = ours['beta_schedule'], ours['prediction_type']
    d.model_var_type = d.model_var_type if learned else ours['variance_type']
    d.beta_start = float(s.get('beta_start', 1e-4))  # DDPMScheduler's defaults
    d.beta_end = float(s.get('beta_end', 0.02))
    d.num_timesteps = int(s.get('num_train_timesteps', 1000))
    config.sampling.clip_denoised = bool(s.get('clip_sample', True))


def _plan(config: ml_collections.ConfigDict, names: set[str]) -> dict[str, tuple[str, str]]:
    """Our flat param path ('down_0_block_0/conv1/kernel') -> (diffusers name, layout)."""
    plan = {}

    def layer(ours: str, theirs: str, kind: str) -> None:  # kind: conv, dense or norm
        plan[f'{ours}/{"scale" if kind == "norm" else "kernel"}'] = (f'{theirs}.weight', kind)
        plan[f'{ours}/bias'] = (f'{theirs}.bias', 'vector')

    def resnet(ours: str, theirs: str) -> None:
        layers = [*_RESNET, ('conv2', 'conv')]
        if f'{theirs}.conv_shortcut.weight' in names:  # present iff the channels change
            layers.append(('conv_shortcut', 'dense'))
        for name, kind in layers:
            layer(f'{ours}/{_OUR_NAMES.get(name, name)}', f'{theirs}.{name}', kind)

    def attention(ours: str, theirs: str) -> None:
        for name, short in _ATTENTION.items():
            # Files saved by older diffusers use the legacy names (diffusers renames them too).
            legacy = f'{theirs}.{_LEGACY_NAMES.get(name, name)}'
            name = legacy if f'{legacy}.weight' in names else f'{theirs}.{name}'
            layer(f'{ours}/{short}', name, 'norm' if short == 'norm' else 'dense')

    m, levels = config.model, len(config.model.ch_mult)
    layer('conv_in', 'conv_in', 'conv')
    layer('temb_dense0', 'time_embedding.linear_1', 'dense')
    layer('temb_dense1', 'time_embedding.linear_2', 'dense')
    for i in range(levels):
        down, up = f'down_blocks.{i}', f'up_blocks.{levels - 1 - i}'
        attn = config.data.image_size // 2**i in m.attn_resolutions
        for j in range(m.num_res_blocks):
            resnet(f'down_{i}_block_{j}', f'{down}.resnets.{j}')
            if attn:
                attention(f'down_{i}_attn_{j}', f'{down}.attentions.{j}')
        if i != levels - 1:
            layer(f'down_{i}_downsample/conv', f'{down}.downsamplers.0.conv', 'conv')
        for j in range(m.num_res_blocks + 1):
            resnet(f'up_{i}_block_{j}', f'{up}.resnets.{j}')
            if attn:
                attention(f'up_{i}_attn_{j}', f'{up}.attentions.{j}')
        if i != 0:
            layer(f'up_{i}_upsample/conv', f'{up}.upsamplers.0.conv', 'conv')
    resnet('mid_block_1', 'mid_block.resnets.0')
    attention('mid_attn_1', 'mid_block.attentions.0')
    resnet('mid_block_2', 'mid_block.resnets.1')
    layer('norm_out', 'conv_norm_out', 'norm')
    layer('conv_out', 'conv_out', 'conv')
    return plan


def name_differences(expected: Any, actual: Any, noun: str) -> list[str]:
    """'N missing <noun>: a, b, ...' and 'N unexpected <noun>: ...' (at most 8 names each)."""
    problems = []
    expected, actual = set(expected), set(actual)
    for what, names in (('missing', expected - actual), ('unexpected', actual - expected)):
        if names:
            names = sorted(names)
            more = f' and {len(names) - 8} more' if len(names) > 8 else ''
            problems.append(f'{len(names)} {what} {noun}: {", ".join(names[:8])}{more}')
    return problems


def transform(name: str, w: np.ndarray, kind: str) -> np.ndarray:
    """A PyTorch tensor in our layout: conv [out, in, kh, kw] -> [kh, kw, in, out]; linear or
    1x1 conv [out, in(, 1(, 1))] -> [in, out]; GroupNorm weights and biases as they are."""
    w = np.asarray(w, np.float32)
    if kind == 'conv' and w.ndim == 4:
        return np.transpose(w, (2, 3, 1, 0))
    if kind == 'dense' and (w.ndim == 2 or (w.ndim >= 3 and set(w.shape[2:]) == {1})):
        return np.ascontiguousarray(w.reshape(w.shape[:2]).T)
    if kind in ('norm', 'vector') and w.ndim == 1:
        return w
    raise ConversionError(f'tensor {name} has shape {list(w.shape)}, not that of a {kind} layer')


def params_from_plan(
    plan: dict[str, tuple[str, Any]],
    tensors: dict[str, np.ndarray],
    config: ml_collections.ConfigDict,
    transform_fn: Any,
    source: str,
) -> dict[str, Any]:
    """Our nested params from a name plan, every tensor checked against the config's network.

    Args:
        plan: our flat param path ('down_0_block_0/conv1/kernel') -> (their tensor name, layout).
        tensors: their name -> array.
        config: builds the network the params must fit.
        transform_fn: (name, array, layout) -> the array in our layout.
        source: what describes their network, for messages ('config.json').

    Raises:
        ConversionError: naming every missing, unexpected and mis-shaped tensor.
    """
    if problems := name_differences({name for name, _ in plan.values()}, tensors, 'tensors'):
        raise ConversionError(f'the weights do not fit {source}: ' + '; '.join(problems))
    flat = {path: transform_fn(name, tensors[name], kind) for path, (name, kind) in plan.items()}
    # The tree model.init builds, without computing it.
    abstract = experiment.build(config).abstract_state.params
    expected = {k: v.shape for k, v in traverse_util.flatten_dict(abstract, sep='/').items()}
    problems = name_differences(expected, flat, 'params')
    wrong = [p for p in sorted(set(flat) & set(expected)) if flat[p].shape != expected[p]]
    if wrong:
        shapes = [f'{p} (from {plan[p][0]}) {flat[p].shape} != {expected[p]}' for p in wrong]
        problems.append(f'{len(wrong)} shapes differ (ours != expected): ' + ', '.join(shapes[:8]))
    if problems:
        raise ConversionError('the weights do not fit our U-Net: ' + '; '.join(problems))
    return traverse_util.unflatten_dict(flat, sep='/')


def convert_tensors(
    tensors: dict[str, np.ndarray], config: ml_collections.ConfigDict
) -> dict[str, Any]:
    """Our U-Net params from a diffusers `UNet2DModel` state dict.

    Args:
        tensors: diffusers name -> array, e.g. `conv_in.weight`: [ch, C, 3, 3].
        config: the config `config_from_diffusers` derived from the model's config.json.

    Returns:
        The nested float32 NumPy params of `experiment.build(config).model`, e.g.
        `params['conv_in']['kernel']`: [3, 3, C, ch]; checked against `model.init`'s tree.

    Raises:
        ConversionError: naming every missing, unexpected and mis-shaped tensor.
    """
    plan = _plan(config, set(tensors))
    return params_from_plan(plan, tensors, config, transform, 'config.json')


def _find(directory: str) -> tuple[str, str | None]:
    """(the UNet folder, the scheduler config or None) of a UNet folder or a pipeline root."""
    unet_dir = os.path.join(directory, 'unet')
    if not os.path.isfile(os.path.join(unet_dir, CONFIG_FILE)):
        unet_dir = directory
    if not os.path.isfile(os.path.join(unet_dir, CONFIG_FILE)):
        raise ConversionError(f'{directory} has no {CONFIG_FILE} (nor unet/{CONFIG_FILE})')
    if not os.path.isfile(os.path.join(unet_dir, WEIGHTS_FILE)):
        raise ConversionError(f'{unet_dir} has no {WEIGHTS_FILE} (re-save a .bin as safetensors)')
    for candidate in (os.path.join(directory, 'scheduler'), unet_dir):
        if os.path.isfile(os.path.join(candidate, SCHEDULER_FILE)):
            return unet_dir, os.path.join(candidate, SCHEDULER_FILE)
    return unet_dir, None


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f'{path} is not valid JSON: {e}') from e


def load_diffusers_unet(directory: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """Reads a diffusers-format DDPM U-Net into our config and params.

    Args:
        directory: a UNet folder (config.json, diffusion_pytorch_model.safetensors, optionally
            scheduler_config.json) or a pipeline root with unet/ (and scheduler/).

    Returns:
        (config, params): the validated config (see `config_from_diffusers`) and nested float32
        NumPy params for `model.apply({'params': params}, x, t, train=False)`, the model of
        `experiment.build(config)`, with x: [B, H, W, C] and t: [B] int.

    Raises:
        ConversionError: a missing file, an unsupported setting, or weights that do not fit.
    """
    unet_dir, scheduler_path = _find(directory)
    unet = _read_json(os.path.join(unet_dir, CONFIG_FILE))
    config = config_from_diffusers(unet, _read_json(scheduler_path) if scheduler_path else None)
    weights = os.path.join(unet_dir, WEIGHTS_FILE)
    try:
        tensors = load_file(weights)
    except SafetensorError as e:
        raise ConversionError(f'cannot read {weights}: {e}') from e
    return config, convert_tensors(tensors, config)


def has_checkpoints(workdir: str) -> bool:
    ckpt_dir = epath.Path(workdir) / 'checkpoints'
    return ckpt_dir.is_dir() and any(ckpt_dir.iterdir())


def write_workdir(
    config: ml_collections.ConfigDict, params: Any, workdir: str, mesh: Mesh | None = None
) -> None:
    """Writes `workdir/config.json` and a step-0 checkpoint with params = EMA params = `params`.

    The state is built as `train.train_and_evaluate` builds it, so it restores like its own.

    Args:
        config: the config the params belong to (e.g. from `load_diffusers_unet`).
        params: nested params of `experiment.build(config).model`, e.g. from `load_diffusers_unet`.
        workdir: a new or empty workdir (local path or URL that orbax accepts).
        mesh: the devices to place the state on; None: every device (`parallel.create_mesh`).

    Raises:
        ConversionError: `workdir/checkpoints` already holds checkpoints (nothing is written).
    """
    if has_checkpoints(workdir):
        raise ConversionError(f'{workdir}/checkpoints already has checkpoints; use a new --workdir')
    exp = experiment.build(config)
    state = train_state_lib.TrainState.create(
        apply_fn=exp.model.apply, params=params, tx=exp.tx, ema_params=jax.tree.map(np.copy, params)
    )
    # The state train_and_evaluate builds, as shapes only (`exp.abstract_state`): initialising it
    # would compile model.init (tens of seconds on a CPU) for parameters we replace anyway.
    if jax.eval_shape(lambda: state) != exp.abstract_state:
        raise ConversionError('the converted parameters do not fit the network the config builds')
    mesh = parallel.create_mesh() if mesh is None else mesh
    state = jax.device_put(state, parallel.replicated(mesh))
    weights, _ = config_lib.split_stored_config(config.to_dict())
    logging.info('the checkpoint defines %s', ', '.join(f'{k}={v!r}' for k, v in weights.items()))
    ckpt_dir = os.path.join(workdir, 'checkpoints')
    with checkpointing.Checkpointer(ckpt_dir, keep=1, save_every_steps=1) as ckpt:  # closes
        ckpt.save(0, state, meta={'config': config.to_dict(), 'step': 0}, force=True)
    image_io.save_json(os.path.join(workdir, 'config.json'), config.to_dict())


def convert_into_workdir(
    args: list[str], workdir: str, convert: Callable[[], tuple[ml_collections.ConfigDict, Any]]
) -> None:
    """A converter's command-line main: `convert()` -> (config, params) into a new `workdir`.

    Refuses leftover arguments and a workdir that has checkpoints before any work; a user
    error ends the run with one `error:` line and exit status 2, nothing written.
    """
    if len(args) > 1:
        errors.fail(f'unexpected arguments: {" ".join(args[1:])}', one_line=True)
    if has_checkpoints(workdir):  # before any work, so nothing is touched
        errors.fail(
            f'{workdir}/checkpoints already has checkpoints; use a new --workdir', one_line=True
        )
    try:
        config, params = convert()
        write_workdir(config, params, workdir)
    except (errors.UserError, OSError) as e:
        errors.fail(str(e), one_line=True)
    logging.info('wrote %s: use it as --workdir of --mode=sample or eval', workdir)


def run(argv: list[str] | None = None) -> None:
    """`python -m diffusion_jax.convert --diffusers_dir=DIR --workdir=OUT`; user errors exit 2.

    The flags are defined here, not on import, so that importing this module next to
    `diffusion_jax.main` (which has --workdir too) defines nothing twice.
    """
    from absl import app, flags

    source = flags.DEFINE_string('diffusers_dir', None, 'diffusers UNet folder or pipeline root.')
    workdir = flags.DEFINE_string('workdir', None, 'New workdir for config.json and checkpoints/.')
    dataset = flags.DEFINE_string(
        'dataset', None, 'tfds name for training and --mode=eval (default: cifar10).'
    )
    flags.mark_flags_as_required(['diffusers_dir', 'workdir'])

    def parse(args: list[str]) -> list[str]:
        try:
            return flags.FLAGS(args)
        except flags.Error as e:
            errors.fail(str(e), one_line=True)

    def convert() -> tuple[ml_collections.ConfigDict, Any]:
        config, params = load_diffusers_unet(source.value)
        if dataset.value:
            config.data.dataset = dataset.value
            config_lib.validate(config)
        return config, params

    app.run(lambda args: convert_into_workdir(args, workdir.value, convert), argv=argv,
            flags_parser=parse)  # fmt: skip


if __name__ == '__main__':
    run()
