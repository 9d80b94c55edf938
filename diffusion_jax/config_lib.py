"""Config validation: every problem in an experiment config, found before anything is built.

`validate(config)` checks a `ConfigDict` with the sections of `configs/cifar10.py` against
`SCHEMA` (the expected type of each dotted key, whether None is allowed, the choices of string
enums, numeric ranges) and against the constraints that tie keys together: the DDPM U-Net's
downsampling and attention resolutions (Ho et al. 2020, Appendix B), GroupNorm divisibility,
beta schedule endpoints, and which losses can train which variance (Nichol & Dhariwal 2021,
Section 3.1: L_simple leaves a learned variance untrained). It raises one `ConfigError` whose
message has one line per problem, `config.<section>.<key>: <what is wrong> (<the fix>)`.

`main` runs `load_config_file` / `validate` before JAX initialises; this module imports neither
JAX nor TensorFlow so that check stays instant.
"""

import difflib
import importlib.machinery
import importlib.util
import math
import numbers
import os
import re
import reprlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import ml_collections
from absl import logging

from diffusion_jax import errors, options, spacing


class ConfigError(errors.UserError, ValueError):
    """A bad config or config file; the message has one line per problem."""


class FloatTuple(tuple):
    """The schema type of a tuple (or list) of numbers, such as guidance scales."""


class Respacing:
    """The schema type of a respacing (`spacing.kept_timesteps`): an int, str or int tuple."""


class Field(NamedTuple):
    """What one config key may hold.

    `type` is int, float (ints accepted), bool, str, tuple (a tuple or list of ints) or
    `FloatTuple` (a tuple or list of numbers) or `Respacing` (an int, a string or a tuple of
    ints; checked against T by `_check_num_steps`); a bool is never an int or a float. `nullable`
    allows None (`config_dict.placeholder` fields). `choices` lists a string enum's values.
    `bounds` is a numeric range in interval notation, '[0, 1)' or '(0, inf)', applied to every
    entry of a tuple. `nonempty` rejects '' and ().
    """

    type: type
    nullable: bool = False
    choices: tuple[str, ...] = ()
    bounds: str = ''
    nonempty: bool = False


_POSITIVE = '[1, inf)'  # for ints
_NON_NEGATIVE = '[0, inf)'

# Exactly the fields of configs/cifar10.py, in its order.
SCHEMA: dict[str, Field] = {
    'data.dataset': Field(str, nonempty=True),  # free text: a tfds name, 'digits', 'folder', 'npz'
    'data.data_dir': Field(str, nullable=True),
    'data.path': Field(str, nullable=True),
    'data.image_size': Field(int, bounds=_POSITIVE),
    'data.num_channels': Field(int, bounds=_POSITIVE),
    'data.random_flip': Field(bool),
    'data.loader': Field(str, choices=options.LOADERS),
    'data.train_split': Field(str, nonempty=True),
    'data.eval_split': Field(str, nonempty=True),
    'model.name': Field(str, choices=options.MODELS),
    'model.ch': Field(int, bounds=_POSITIVE),
    'model.ch_mult': Field(tuple, bounds=_POSITIVE, nonempty=True),
    'model.num_res_blocks': Field(int, bounds=_POSITIVE),
    'model.attn_resolutions': Field(tuple),
    'model.dropout': Field(float, bounds='[0, 1)'),
    'model.resamp_with_conv': Field(bool),
    'model.num_groups': Field(int, bounds=_POSITIVE),
    'model.num_heads': Field(int, bounds=_POSITIVE),
    'model.num_head_channels': Field(int, bounds=_NON_NEGATIVE),  # 0: num_heads decides
    'model.use_scale_shift_norm': Field(bool),
    'model.norm_epsilon': Field(float, bounds='(0, 1)'),
    'model.time_embedding': Field(str, choices=options.TIME_EMBEDDINGS),
    'model.downsample_padding': Field(str, choices=options.DOWNSAMPLE_PADDINGS),
    'model.dtype': Field(str, choices=options.DTYPES),
    'model.param_dtype': Field(str, choices=options.DTYPES),
    'model.remat': Field(bool),
    'model.conv_impl': Field(str, choices=options.CONV_IMPLS),
    'model.upsample_impl': Field(str, choices=options.UPSAMPLE_IMPLS),
    'model.nin_impl': Field(str, choices=options.NIN_IMPLS),
    'model.conv_vjp': Field(str, choices=options.CONV_VJPS),
    'model.rescale_timesteps': Field(bool),
    'model.num_classes': Field(int, bounds=_NON_NEGATIVE),  # 0: unconditional
    'diffusion.num_timesteps': Field(int, bounds='[2, inf)'),  # t=0 needs a t=1 to clip to
    'diffusion.beta_schedule': Field(str, choices=options.BETA_SCHEDULES),
    'diffusion.beta_start': Field(float),  # range depends on the schedule: _check_betas
    'diffusion.beta_end': Field(float),
    'diffusion.model_mean_type': Field(str, choices=options.MODEL_MEAN_TYPES),
    'diffusion.model_var_type': Field(str, choices=options.MODEL_VAR_TYPES),
    'diffusion.loss_type': Field(str, choices=options.LOSS_TYPES),
    'training.batch_size': Field(int, bounds=_POSITIVE),
    'training.num_microbatches': Field(int, bounds=_POSITIVE),  # divides it: _check_microbatches
    'training.num_train_steps': Field(int, bounds=_NON_NEGATIVE),
    'training.steps_per_call': Field(int, bounds=_POSITIVE),  # train.steps_per_call
    'training.log_every_steps': Field(int, bounds=_POSITIVE),
    'training.checkpoint_every_steps': Field(int, bounds=_POSITIVE),
    'training.keep_checkpoints': Field(int, bounds=_POSITIVE),
    'training.sample_every_steps': Field(int, bounds=_NON_NEGATIVE),  # 0 disables
    'training.seed': Field(int),
    'training.t_sampler': Field(str, choices=options.T_SAMPLERS),
    'training.max_nonfinite_steps': Field(int, bounds=_POSITIVE),
    'training.allow_config_change': Field(bool),
    'training.label_dropout': Field(float, bounds='[0, 1)'),  # _check_conditioning
    'training.eval_every_steps': Field(int, bounds=_NON_NEGATIVE),  # 0 disables
    'training.eval_num_samples': Field(int, bounds='[2, inf)'),
    'training.best_metric': Field(str, choices=options.BEST_METRICS),  # _check_training_eval
    'optim.optimizer': Field(str, choices=options.OPTIMIZERS),
    'optim.learning_rate': Field(float, bounds='(0, inf)'),
    'optim.warmup_steps': Field(int, bounds=_NON_NEGATIVE),
    'optim.grad_clip': Field(float, bounds=_NON_NEGATIVE),  # 0 disables
    'optim.weight_decay': Field(float, bounds=_NON_NEGATIVE),
    'optim.beta1': Field(float, bounds='(0, 1)'),
    'optim.beta2': Field(float, bounds='(0, 1)'),
    'optim.eps': Field(float, bounds='(0, inf)'),
    'optim.ema_decay': Field(float, bounds='[0, 1)'),
    'optim.ema_decays': Field(FloatTuple, bounds='[0, 1)'),
    'sampling.sampler': Field(str, choices=options.SAMPLERS),
    'sampling.num_steps': Field(Respacing, nullable=True),  # against T: _check_num_steps
    'sampling.spacing': Field(str, choices=spacing.SPACINGS),
    'sampling.eta': Field(float, bounds=_NON_NEGATIVE),
    'sampling.clip_denoised': Field(bool),
    'sampling.num_samples': Field(int, bounds=_POSITIVE),
    'sampling.batch_size': Field(int, bounds=_POSITIVE),
    'sampling.seed': Field(int),
    'sampling.checkpoint_step': Field(int, nullable=True, bounds=_NON_NEGATIVE),
    'sampling.ema_decay': Field(float, nullable=True, bounds='[0, 1)'),  # ema_subtree
    'sampling.interpolate': Field(str),  # '' or 'I,J': _check_interpolate
    'sampling.interpolate_t': Field(int, nullable=True, bounds=_NON_NEGATIVE),
    'sampling.interpolate_num': Field(int, bounds='[2, inf)'),
    'sampling.class_label': Field(int, bounds='[-1, inf)'),  # < num_classes: _check_conditioning
    'sampling.guidance_scale': Field(float, bounds=_NON_NEGATIVE),
    'eval.batch_size': Field(int, bounds=_POSITIVE),
    'eval.bpd': Field(bool),
    'eval.num_bpd_images': Field(int, nullable=True, bounds=_POSITIVE),
    'eval.bpd_num_steps': Field(Respacing, nullable=True),  # against T: _check_num_steps
    'eval.num_samples': Field(int, bounds=_NON_NEGATIVE),
    'eval.inception_weights': Field(str, nullable=True),
    'eval.inception_sha256': Field(str),
    'eval.reference_stats': Field(str, nullable=True),
    'eval.compute_reference': Field(bool),
    'eval.reference_split': Field(str, nonempty=True),
    'eval.guidance_sweep': Field(FloatTuple, bounds=_NON_NEGATIVE),
}

# section -> its keys, in schema order.
_SECTIONS: dict[str, list[str]] = {}
for _section, _, _key in (dotted.partition('.') for dotted in SCHEMA):
    _SECTIONS.setdefault(_section, []).append(_key)

_NAMES = {
    int: 'an int',
    float: 'a float',
    bool: 'a bool',
    str: 'a str',
    tuple: 'a tuple of ints',
    FloatTuple: 'a tuple of numbers',
    Respacing: "an int, 'ddimN', a section string such as '10,15,20' or a tuple of ints",
}
_MISSING = object()


def _line(key: str, what: str, fix: str) -> str:
    return f'config.{key}: {what} ({fix})'


def _did_you_mean(name: str, candidates: list[str], prefix: str) -> str | None:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f'did you mean {prefix}{close[0]}?' if close else None


def _check_structure(config: ml_collections.ConfigDict) -> Iterator[str]:
    """Unknown and missing sections and keys."""
    for name in config:
        if name not in _SECTIONS:
            fix = _did_you_mean(name, list(_SECTIONS), 'config.')
            yield _line(name, 'unknown section', fix or f'the sections are {list(_SECTIONS)}')
    for section, keys in _SECTIONS.items():
        sub = config.get(section, _MISSING)
        if sub is _MISSING:
            yield _line(section, 'missing section', 'add it; configs/cifar10.py has them all')
        elif not isinstance(sub, ml_collections.ConfigDict):
            got = f'must be a section (ConfigDict), got {type(sub).__name__}'
            yield _line(section, got, 'configs/cifar10.py shows its keys')
        else:
            for key in sub:
                if key not in keys:
                    yield _line(f'{section}.{key}', 'unknown key', _unknown_key_fix(section, key))
            for key in keys:
                if key not in sub:
                    yield _line(f'{section}.{key}', 'missing', 'add it; configs/cifar10.py has all')


def _unknown_key_fix(section: str, key: str) -> str:
    """A close name in the same section, else the same name in another section, else the list."""
    suggestion = _did_you_mean(key, _SECTIONS[section], f'config.{section}.')
    elsewhere = [dotted for dotted in SCHEMA if dotted.endswith(f'.{key}')]
    if suggestion or elsewhere:
        return suggestion or f'did you mean config.{elsewhere[0]}?'
    return f'remove it; config.{section} takes {_SECTIONS[section]}'


def _has_type(value: Any, expected: type) -> bool:
    if expected is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # bool subclasses int, but True is no batch size
        return False
    if expected is int:
        return isinstance(value, numbers.Integral)
    if expected is float:
        return isinstance(value, numbers.Real)
    if expected is str:
        return isinstance(value, str)
    if expected is Respacing and (_has_type(value, int) or isinstance(value, str)):
        return True
    entry = float if expected is FloatTuple else int
    return isinstance(value, tuple | list) and all(_has_type(x, entry) for x in value)


def _type_problem(key: str, field: Field, value: Any) -> str | None:
    expected = _NAMES[field.type]
    if value is None:
        if field.nullable:
            return None
        return _line(key, f'is None but must be {expected}', 'only placeholder fields may be None')
    if _has_type(value, field.type):
        return None
    what = f'must be {expected}, got {type(value).__name__} {reprlib.repr(value)}'
    if isinstance(value, bool) and field.type in (int, float):
        return _line(key, what, f'a bool is not a number here; write {expected}')
    if isinstance(value, str) and field.type in (int, float):
        try:
            field.type(value)
            return _line(key, what, f'write {value.strip()} without quotes')
        except ValueError:
            pass
    return _line(key, what, f'write {expected}')


def _parse_bounds(bounds: str) -> tuple[float, float, bool, bool]:
    lo, hi = (float(part) for part in bounds[1:-1].split(','))
    return lo, hi, bounds[0] == '(', bounds[-1] == ')'


def _in_bounds(x: float, bounds: str) -> bool:
    lo, hi, lo_open, hi_open = _parse_bounds(bounds)
    above = x > lo if lo_open else x >= lo
    below = x < hi if hi_open else x <= hi
    return above and below  # NaN fails both


def _describe_bounds(bounds: str, is_int: bool) -> tuple[str, str]:
    """('must be ...', the fix) for a range in interval notation."""
    lo, hi, lo_open, _ = _parse_bounds(bounds)
    if hi == math.inf and lo_open and lo == 0:
        return 'must be positive', 'use a value > 0'
    if hi == math.inf and is_int and lo == 1:
        return 'must be positive', 'use 1 or more'
    if hi == math.inf and not lo_open:
        return f'must be >= {lo:g}', f'use {lo:g} or more'
    return f'must be in {bounds}', f'use a value in {bounds}'


def _value_problem(key: str, field: Field, value: Any) -> str | None:
    """Choices, emptiness and range of a value of the right type."""
    if field.choices and value not in field.choices:
        fix = f'choose one of {sorted(field.choices)}'
        close = difflib.get_close_matches(value, field.choices, n=1)
        if close:
            fix = f'did you mean {close[0]!r}? {fix}'
        return _line(key, f'unknown value {value!r}', fix)
    if field.nonempty and not (value.strip() if isinstance(value, str) else value):
        return _line(key, 'must not be empty', 'see the comment on this key in configs/cifar10.py')
    if not field.bounds:
        return None
    is_tuple = field.type in (tuple, FloatTuple)
    entries = value if is_tuple else (value,)
    if all(_in_bounds(x, field.bounds) for x in entries):
        return None
    what, fix = _describe_bounds(field.bounds, field.type in (int, tuple))
    if is_tuple:
        what = f'entries {what}'
    return _line(key, f'{what}, got {value!r}', fix)


def _check_field(key: str, field: Field, value: Any) -> str | None:
    problem = _type_problem(key, field, value)
    if problem or value is None:
        return problem
    return _value_problem(key, field, value)


def _have(values: dict[str, Any], *keys: str) -> bool:
    """Whether every key passed its own checks and is not None."""
    return all(values.get(key) is not None for key in keys)


def _check_data_path(v: dict[str, Any]) -> Iterator[str]:
    dataset = v.get('data.dataset')
    if dataset in ('folder', 'npz') and 'data.path' in v and not v['data.path']:
        what = f'is not set, but data.dataset {dataset!r} reads from it'
        target = 'an image folder' if dataset == 'folder' else 'an .npz file'
        yield _line('data.path', what, f'set it to {target}')


def _check_resolutions(v: dict[str, Any]) -> Iterator[str]:
    """The U-Net halves the image len(ch_mult) - 1 times; attention must hit one of its sizes."""
    if not _have(v, 'data.image_size', 'model.ch_mult'):
        return
    size, levels = v['data.image_size'], len(v['model.ch_mult'])
    factor = options.downsampling_factor(v['model.ch_mult'])
    if size % factor:
        lower = size // factor * factor
        sizes = ' or '.join(str(s) for s in (lower, lower + factor) if s > 0)
        most = (size & -size).bit_length()  # size & -size is the largest power of 2 dividing it
        what = f'{size} is not divisible by {factor}, as the {levels} levels of model.ch_mult need'
        levels_text = f'{most} level' if most == 1 else f'{most} levels'
        fix = f'use a multiple of {factor} such as {sizes}, or at most {levels_text} in ch_mult'
        yield _line('data.image_size', what, fix)
        return
    seen = options.unet_resolutions(size, v['model.ch_mult'])
    if bad := [r for r in v.get('model.attn_resolutions') or () if r not in seen]:
        if len(bad) == 1:
            what = f'resolution {bad[0]} never occurs'
        else:
            what = f'resolutions {", ".join(map(str, bad))} never occur'
        yield _line('model.attn_resolutions', f'{what}; the U-Net sees {seen}', 'choose from those')


def _check_group_norm(v: dict[str, Any]) -> Iterator[str]:
    """GroupNorm splits the channels of conv_in (ch) and of every level (ch * mult) evenly."""
    if not _have(v, 'model.ch', 'model.ch_mult', 'model.num_groups'):
        return
    ch, groups = v['model.ch'], v['model.num_groups']
    counts = sorted({ch, *(ch * mult for mult in v['model.ch_mult'])})
    if bad := [c for c in counts if c % groups]:
        gcd = math.gcd(*counts)
        largest = max(d for d in range(1, min(groups, gcd) + 1) if gcd % d == 0)
        what = f'GroupNorm({groups}) cannot split the channel counts {bad} of model.ch={ch}'
        fix = f'make model.ch * ch_mult multiples of {groups}, or set num_groups to {largest}'
        yield _line('model.num_groups', what, fix)


def _check_attention_heads(v: dict[str, Any]) -> Iterator[str]:
    """The heads split the channels of every attention block: the middle's and the listed sizes'."""
    if not _have(v, 'model.ch', 'model.ch_mult', 'data.image_size', 'model.num_heads'):
        return
    ch, mult = v['model.ch'], v['model.ch_mult']
    sizes = options.unet_resolutions(v['data.image_size'], mult)
    attn = v.get('model.attn_resolutions') or ()
    attended = [ch * m for m, size in zip(mult, sizes, strict=True) if size in attn]
    counts = sorted({ch * mult[-1], *attended})
    head_channels = v.get('model.num_head_channels')
    if head_channels:
        if bad := [c for c in counts if c % head_channels]:
            what = f"{head_channels} does not divide the attention blocks' channel counts {bad}"
            fix = f'use a common divisor of {counts}, or 0 to use model.num_heads'
            yield _line('model.num_head_channels', what, fix)
    elif bad := [c for c in counts if c % v['model.num_heads']]:
        what = f"{v['model.num_heads']} heads cannot split the attention blocks' channels {bad}"
        yield _line('model.num_heads', what, f'use a common divisor of {counts}')


def _check_betas(v: dict[str, Any]) -> Iterator[str]:
    """linear, quad and const need 0 < beta_start <= beta_end < 1 (cosine and jsd ignore them);
    linear_iddpm needs its scaled end, beta_end * 1000 / T, below 1."""
    start, end = v.get('diffusion.beta_start'), v.get('diffusion.beta_end')
    schedule, steps = v.get('diffusion.beta_schedule'), v.get('diffusion.num_timesteps')
    if schedule not in ('linear', 'linear_iddpm', 'quad', 'const') or start is None or end is None:
        return
    if schedule == 'linear_iddpm' and steps and end * 1000 / steps >= 1:
        what = f'{end!r} * 1000 / T is {end * 1000 / steps:.3g} for T={steps}: betas above 1'
        fix = f"use T > {int(end * 1000)}, or beta_schedule 'cosine'"
        yield _line('diffusion.beta_end', what, fix)
    if not start > 0:
        yield _line('diffusion.beta_start', f'must be > 0, got {start!r}', 'the paper uses 1e-4')
    if not end < 1:
        yield _line('diffusion.beta_end', f'must be < 1, got {end!r}', 'the paper uses 0.02')
    if start > end:
        what = f'{start!r} exceeds diffusion.beta_end {end!r}'
        yield _line('diffusion.beta_start', what, f'{schedule!r} betas must not decrease')


def _check_loss_and_variance(v: dict[str, Any]) -> Iterator[str]:
    """Only a variational loss trains a learned variance, and 'hybrid' needs one to train."""
    loss, var = v.get('diffusion.loss_type'), v.get('diffusion.model_var_type')
    if loss is None or var is None:
        return
    if problem := options.loss_and_variance_problem(loss, var):
        yield _line('diffusion.loss_type', *problem)


def _check_weight_decay(v: dict[str, Any]) -> Iterator[str]:
    decay = v.get('optim.weight_decay')
    if decay is not None and decay > 0 and v.get('optim.optimizer') == 'adam':
        what = f"{decay!r} needs optimizer 'adamw', but optim.optimizer is 'adam'"
        yield _line('optim.weight_decay', what, "set optimizer 'adamw', or weight_decay 0.0")


def _check_num_steps(v: dict[str, Any]) -> Iterator[str]:
    """Each respacing must keep a valid subset of the T timesteps."""
    num_timesteps, how = v.get('diffusion.num_timesteps'), v.get('sampling.spacing', 'even')
    for key in ('sampling.num_steps', 'eval.bpd_num_steps'):
        steps = v.get(key)
        if steps is None or num_timesteps is None:
            continue
        if _has_type(steps, int) and steps > num_timesteps:
            what = f'{steps} exceeds diffusion.num_timesteps {num_timesteps}'
            yield _line(key, what, f'use at most {num_timesteps}, or None for all T')
            continue
        try:
            spacing.kept_timesteps(num_timesteps, steps, how)
        except ValueError as e:
            fix = f'keep at most T={num_timesteps} steps, or None for all T'
            yield _line(key, f'{steps!r}: {e}', fix)


def _check_label_dropout(v: dict[str, Any]) -> Iterator[str]:
    dropout = v.get('training.label_dropout')
    if dropout and v.get('model.num_classes') == 0:
        what = f'{dropout!r} drops labels, but the model is unconditional (model.num_classes 0)'
        yield _line('training.label_dropout', what, 'set model.num_classes, or label_dropout 0.0')


def _check_conditional_sampling(v: dict[str, Any]) -> Iterator[str]:
    """Class labels and guidance need a conditional network; a class id must be one of it."""
    num_classes = v.get('model.num_classes')
    if num_classes is None:
        return
    label, scale = v.get('sampling.class_label'), v.get('sampling.guidance_scale')
    sweep = v.get('eval.guidance_sweep')
    if num_classes == 0:
        only = 'for a class-conditional model (model.num_classes > 0) only'
        if label is not None and label >= 0:
            yield _line('sampling.class_label', f'{label} names a class', f'use -1; {only}')
        if scale:
            yield _line('sampling.guidance_scale', f'{scale!r} guides', f'use 0.0; {only}')
        if sweep:
            yield _line('eval.guidance_sweep', f'{tuple(sweep)!r} guides', f'use (); {only}')
    elif label is not None and label >= num_classes:
        what = f'{label} is not a class of the model (model.num_classes {num_classes})'
        yield _line('sampling.class_label', what, f'use -1 (every class) or 0..{num_classes - 1}')


def _check_interpolate(v: dict[str, Any]) -> Iterator[str]:
    pair = v.get('sampling.interpolate')
    if pair and not re.fullmatch(r'\d+,\d+', pair):
        what = f'{pair!r} is not two image indices'
        yield _line('sampling.interpolate', what, "write 'I,J', e.g. '0,1', or '' to skip it")


def _check_interpolate_t(v: dict[str, Any]) -> Iterator[str]:
    t, num_timesteps = v.get('sampling.interpolate_t'), v.get('diffusion.num_timesteps')
    if t is not None and num_timesteps is not None and t >= num_timesteps:
        what = f'{t} is not below diffusion.num_timesteps {num_timesteps}'
        yield _line('sampling.interpolate_t', what, f'use 0..{num_timesteps - 1}')


def _check_eval_samples(v: dict[str, Any]) -> Iterator[str]:
    if v.get('eval.num_samples') == 1:
        what = '1 image has no covariance for FID (or the digits FD)'
        yield _line('eval.num_samples', what, 'use 0 to skip sample metrics, or at least 2')


def _check_microbatches(v: dict[str, Any]) -> Iterator[str]:
    batch, slices = v.get('training.batch_size'), v.get('training.num_microbatches')
    if batch is not None and slices is not None and batch % slices:
        divisors = [k for k in range(1, batch + 1) if batch % k == 0]
        nearest = min(divisors, key=lambda k: (abs(k - slices), k))
        what = f'{slices} does not divide training.batch_size {batch}'
        yield _line('training.num_microbatches', what, f'use a divisor of it, e.g. {nearest}')


def _check_training_eval(v: dict[str, Any]) -> Iterator[str]:
    every, metric = v.get('training.eval_every_steps'), v.get('training.best_metric')
    digits, weights = v.get('data.dataset') == 'digits', v.get('eval.inception_weights')
    if every and not digits and not weights:
        what = f'{every} but there is nothing to score: FID/IS need Inception weights'
        fix = 'pass --config.eval.inception_weights=FILE, or 0 to turn it off'
        yield _line('training.eval_every_steps', what, fix)
    if metric and not every:
        what = f'{metric!r} needs evaluation during training'
        yield _line('training.best_metric', what, 'set training.eval_every_steps > 0')
    if metric in ('fid', 'inception_score') and not weights:
        what = f'{metric!r} needs Inception weights'
        yield _line('training.best_metric', what, 'pass --config.eval.inception_weights=FILE')
    if metric in ('digits_fd', 'digits_is') and 'data.dataset' in v and not digits:
        what = f'{metric!r} is measured on the digits dataset only'
        yield _line('training.best_metric', what, "use 'fid' or 'inception_score'")


_CROSS_CHECKS = (
    _check_interpolate,
    _check_training_eval,
    _check_microbatches,
    _check_data_path,
    _check_resolutions,
    _check_attention_heads,
    _check_group_norm,
    _check_betas,
    _check_loss_and_variance,
    _check_weight_decay,
    _check_eval_samples,
)
# Checks of the caller's settings against the network's diffusion: sample and eval take the
# diffusion from the checkpoint, so they run these on the merged config (`restore_ema`).
_AGAINST_THE_WEIGHTS = (_check_num_steps, _check_interpolate_t, _check_conditional_sampling)
# Checks of training settings against the network, which sample and eval do not train.
_TRAINING_CHECKS = (_check_label_dropout,)


def validate(
    config: ml_collections.ConfigDict,
    *,
    weights_from_checkpoint: bool = False,
    training: bool = True,
) -> None:
    """Checks a whole experiment config and reports every problem at once.

    Args:
        config: an experiment config with the sections and keys of `configs/cifar10.py`.
        weights_from_checkpoint: the `WEIGHT_KEYS` will come from a checkpoint (sample and
            eval modes): skip the checks that compare other settings with them, which
            `generate.restore_ema` runs on the merged config.
        training: the config will train (False: sample or eval); only then are the training
            settings checked against the network (`_TRAINING_CHECKS`).

    Raises:
        ConfigError: listing every problem, one line each, as
            `config.<section>.<key>: <what is wrong> (<the fix>)`. A key whose own type or
            range is wrong is left out of the checks that combine it with other keys.
    """
    if not isinstance(config, ml_collections.ConfigDict):
        got = type(config).__name__
        raise ConfigError(f'config: must be an ml_collections.ConfigDict, got {got}')
    problems = list(_check_structure(config))
    values = {}  # the keys that passed their own checks
    for key, field in SCHEMA.items():
        section, name = key.split('.')
        sub = config.get(section)
        value = sub.get(name, _MISSING) if isinstance(sub, ml_collections.ConfigDict) else _MISSING
        if value is _MISSING:
            continue  # reported by _check_structure
        problem = _check_field(key, field, value)
        if problem:
            problems.append(problem)
        else:
            values[key] = value
    checks = _CROSS_CHECKS if weights_from_checkpoint else _CROSS_CHECKS + _AGAINST_THE_WEIGHTS
    if training and not weights_from_checkpoint:
        checks += _TRAINING_CHECKS
    for check in checks:
        problems.extend(check(values))
    if problems:
        raise ConfigError('\n'.join(problems))
    if not weights_from_checkpoint:
        _warn_about_the_endpoint(values)


def _warn_about_the_endpoint(v: dict[str, Any]) -> None:
    """Warns when x_T keeps more than `schedules.MAX_ENDPOINT_SIGNAL` of x_0."""
    from diffusion_jax import schedules  # NumPy only

    schedule, steps = v.get('diffusion.beta_schedule'), v.get('diffusion.num_timesteps')
    if schedule is None or steps is None:
        return
    betas = schedules.get_beta_schedule(
        schedule, steps, beta_start=v['diffusion.beta_start'], beta_end=v['diffusion.beta_end']
    )
    signal = schedules.endpoint_signal(betas)
    if signal > schedules.MAX_ENDPOINT_SIGNAL:
        logging.warning(
            'config.diffusion: the %r schedule with T=%d leaves sqrt(alpha_bar_T) = %.3f of the '
            'image in x_T (more than %g), but sampling starts from pure noise; consider '
            "beta_schedule 'linear_iddpm' (endpoints scaled by 1000 / T) or 'cosine'",
            schedule,
            steps,
            signal,
            schedules.MAX_ENDPOINT_SIGNAL,
        )


# model.* keys that change how the network is computed, not its weights or its outputs.
_COMPUTATION_ONLY_KEYS = (
    'model.remat',
    'model.conv_impl',
    'model.upsample_impl',
    'model.nin_impl',
    'model.conv_vjp',
)
# Weight keys added after checkpoints were first written, with the value that such older
# checkpoints were trained with: a stored config without the key means that value.
_LATER_WEIGHT_KEYS = {
    'model.rescale_timesteps': False,
    'model.num_classes': 0,
    'model.num_heads': 1,
    'model.num_head_channels': 0,
    'model.use_scale_shift_norm': False,
    'model.norm_epsilon': 1e-6,
    'model.time_embedding': 'ddpm',
    'model.downsample_padding': 'same',
}

# What a checkpoint's weights mean: the network, the diffusion it was trained for and the image
# format. Everything else (data locations, training, optimizer, sampling and eval settings) is
# free to change between the run that saved a checkpoint and the run that uses it.
WEIGHT_KEYS = (
    *(
        key
        for key in SCHEMA
        if key.startswith(('model.', 'diffusion.')) and key not in _COMPUTATION_ONLY_KEYS
    ),
    'data.image_size',
    'data.num_channels',
)


def _comparable(value: Any) -> Any:
    """JSON turns tuples into lists; compare both as tuples."""
    return tuple(value) if isinstance(value, tuple | list) else value


def split_stored_config(stored: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits a checkpoint's stored config into what defines its weights and what is free.

    Args:
        stored: the config dict saved with a checkpoint (its meta['config']), sections of keys.

    Returns:
        (weights, free): `{'section.key': value}` of the `WEIGHT_KEYS` present in `stored`, and of
        every other key; lists (JSON's tuples) come back as tuples.
    """
    weights, free = {}, {}
    for section, keys in stored.items():
        for key, value in keys.items() if isinstance(keys, dict) else ():
            dotted = f'{section}.{key}'
            (weights if dotted in WEIGHT_KEYS else free)[dotted] = _comparable(value)
    if weights:  # a checkpoint from before a key existed was trained with its old meaning
        weights = {**_LATER_WEIGHT_KEYS, **weights}
    return weights, free


def weight_changes(stored: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """The `WEIGHT_KEYS` whose value in `config` differs from a checkpoint's stored config.

    Training refuses to resume with any of them (unless config.training.allow_config_change).

    Args:
        stored: the config dict saved with a checkpoint (its meta['config']).
        config: the config of the run about to resume.

    Returns:
        One 'config.<key>: checkpoint <old>, now <new>' line per differing key (a key missing
        from `stored` counts as differing), in schema order; empty when the run may resume.
    """
    weights, _ = split_stored_config(stored)
    changes = []
    for key in WEIGHT_KEYS:
        section, name = key.split('.')
        old, new = weights.get(key, _MISSING), _comparable(config[section][name])
        if old is _MISSING or old != new:
            shown = 'absent' if old is _MISSING else repr(old)
            changes.append(f'config.{key}: checkpoint {shown}, now {new!r}')
    return changes


# Training keys that shape the train state beside the network (with the value that checkpoints
# without the key had): a run resumes only with the checkpoint's value.
STATE_KEYS = {'training.t_sampler': 'uniform', 'optim.ema_decays': ()}


def state_changes(stored: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """'config.<key>: checkpoint <old>, now <new>' for each `STATE_KEYS` key that differs."""
    changes = []
    for key, old_default in STATE_KEYS.items():
        section, name = key.split('.')
        old = _comparable(stored.get(section, {}).get(name, old_default))
        new = _comparable(config[section][name])
        if old != new:
            changes.append(f'config.{key}: checkpoint {old!r}, now {new!r}')
    return changes


def ema_subtree(stored: dict[str, Any], config: ml_collections.ConfigDict) -> str:
    """The train state's field that holds the EMA `config.sampling.ema_decay` names.

    'ema_params' for None or the checkpoint's optim.ema_decay; 'extra_ema/ema_<i>' for the i-th
    (from 1) of its optim.ema_decays.

    Raises:
        ConfigError: the checkpoint keeps no EMA of that rate.
    """
    wanted, optim = config.sampling.ema_decay, stored.get('optim', {})
    primary, extra = optim.get('ema_decay'), list(optim.get('ema_decays', ()))
    if wanted is None or wanted == primary:
        return 'ema_params'
    if wanted in extra:
        return f'extra_ema/ema_{extra.index(wanted) + 1}'
    kept = [r for r in [primary, *extra] if r is not None]
    raise ConfigError(
        f'config.sampling.ema_decay: the checkpoint keeps no EMA of rate {wanted!r} (use one of '
        f"{kept}, or None for optim.ema_decay's)"
    )


def with_checkpoint_weights(
    stored: dict[str, Any], config: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """A copy of `config` with the `WEIGHT_KEYS` of a checkpoint's stored config.

    The weights only make sense with the network, diffusion and image format they were trained
    with; everything else stays the caller's (sampling and eval settings, data locations). Each
    value taken from the checkpoint that differs from `config`'s is logged. `config` is not
    modified.
    """
    merged = ml_collections.ConfigDict(config.to_dict())
    weights, _ = split_stored_config(stored)
    for key, value in weights.items():
        section, name = key.split('.')
        current = _comparable(config[section].get(name))
        if current != value:
            logging.warning("config.%s: using the checkpoint's %r, not %r", key, value, current)
        merged[section][name] = value
    return merged


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Loads a config file the way `config_flags.DEFINE_config_file` does, without validating it.

    Args:
        path: a Python file defining `get_config()`, e.g. 'configs/cifar10.py'. A variant can
            build on a shipped config with `from diffusion_jax.configs import cifar10`.

    Returns:
        The locked ConfigDict that `get_config()` returns (locked as with `lock_config=True`).

    Raises:
        ConfigError: the file is missing, fails to import, has no `get_config`, or does not
            return a ConfigDict; the message is one line naming the file.
    """
    if not os.path.isfile(path):
        raise ConfigError(f'config file {path!r} does not exist (pass e.g. configs/cifar10.py)')
    stem = os.path.splitext(os.path.basename(path))[0]
    loader = importlib.machinery.SourceFileLoader(f'_config_file_{stem}', path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    try:  # the file is user code: whatever it raises becomes one line naming the file
        loader.exec_module(module)
        get_config = getattr(module, 'get_config', None)
        config = get_config() if callable(get_config) else None
    except Exception as err:
        hint = 'run from the repository root' if isinstance(err, ImportError) else 'fix the file'
        raise ConfigError(f'config file {path!r} failed to load: {err!r} ({hint})') from err
    if not callable(get_config):
        raise ConfigError(f'config file {path!r} has no get_config() (define one)')
    if not isinstance(config, ml_collections.ConfigDict):
        got = type(config).__name__
        raise ConfigError(f'config file {path!r}: get_config() returned {got}, not a ConfigDict')
    config.lock()
    return config
