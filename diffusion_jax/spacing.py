"""Which timesteps of a T-step diffusion a respaced chain keeps (NumPy only).

Sampling with fewer steps than T (Nichol & Dhariwal 2021, section 4) keeps a subset of the
timesteps and recomputes the betas on it (`sampling.respace`). Which subset:

* an int n with spacing 'even' (the default): n timesteps from 0 to T - 1 inclusive, evenly
  spaced and rounded half away from zero (`even_timesteps`);
* an int n with spacing 'iddpm', a section string such as '25' or '10,15,20', or a tuple of
  section counts: Improved DDPM's `space_timesteps` rule. [0, T) is cut into len(counts)
  sections of T // len(counts) steps (the first T % len(counts) one longer); section i keeps
  counts[i] steps at a fractional stride (size - 1) / (count - 1) accumulated from its start,
  each rounded half to even (`iddpm_timesteps`). The two rules differ on ties: for T = 50 and
  25 steps 'even' keeps 24 where 'iddpm' keeps 25;
* 'ddimN': DDIM's fixed stride, 0, s, 2s, ... with the smallest integer stride s that gives
  exactly N steps.

None keeps all T. This module imports neither JAX nor TensorFlow, so `config_lib` validates a
respacing instantly.
"""

import itertools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

SPACINGS = ('even', 'iddpm')  # how an int `num_steps` is spread over [0, T)
_DDIM = re.compile(r'ddim(\d+)')
_SECTIONS = re.compile(r'\d+(,\d+)*')


def even_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """`num_steps` evenly spaced timesteps from 0 to T-1 inclusive, increasing, unique."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f'num_steps must be in [1, {num_timesteps}], got {num_steps}')
    if num_steps == 1:
        return np.array([num_timesteps - 1])
    return np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int32)


def iddpm_timesteps(num_timesteps: int, counts: Sequence[int]) -> np.ndarray:
    """Improved DDPM's section rule (see the module docstring): int32 [sum(counts)], sorted."""
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f'section counts must be positive, got {list(counts)}')
    base, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = base + (i < extra)
        if count > size:
            raise ValueError(
                f'section {i} of T={num_timesteps} has {size} steps, fewer than the {count} '
                'asked for'
            )
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        # Accumulated, not multiplied: the float sums decide the rounding of ties exactly as
        # a running index does.
        offsets = itertools.accumulate(itertools.repeat(stride, count - 1), initial=0.0)
        kept.extend(start + round(offset) for offset in offsets)
        start += size
    return np.asarray(sorted(set(kept)), np.int32)


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """0, s, 2s, ... < T with the smallest integer stride s giving exactly `num_steps` steps."""
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == num_steps:
            return np.arange(0, num_timesteps, stride, dtype=np.int32)
    raise ValueError(f'no integer stride gives exactly {num_steps} of T={num_timesteps} steps')


def kept_timesteps(num_timesteps: int, num_steps: Any, spacing: str = 'even') -> np.ndarray:
    """The timesteps a chain keeps: int32 [S], increasing, in [0, T).

    Args:
      num_timesteps: T of the trained diffusion.
      num_steps: None (all T), an int, a section string ('25', '10,15,20'), 'ddimN', or a
        tuple or list of section counts; see the module docstring.
      spacing: how an int is spread: 'even' or 'iddpm'.

    Raises:
      ValueError: a form or a count that cannot be kept from T steps, naming the fix.
    """
    if spacing not in SPACINGS:
        raise ValueError(f'unknown spacing {spacing!r}; choose one of {list(SPACINGS)}')
    if num_steps is None:
        return np.arange(num_timesteps, dtype=np.int32)
    if isinstance(num_steps, bool):
        raise ValueError(f'num_steps must be an int, a string or a tuple, got {num_steps!r}')
    if isinstance(num_steps, int | np.integer):
        if spacing == 'even':
            return even_timesteps(num_timesteps, int(num_steps))
        return iddpm_timesteps(num_timesteps, [int(num_steps)])
    if isinstance(num_steps, str):
        text = num_steps.replace(' ', '')
        if match := _DDIM.fullmatch(text):
            return ddim_timesteps(num_timesteps, int(match[1]))
        if _SECTIONS.fullmatch(text):
            return iddpm_timesteps(num_timesteps, [int(c) for c in text.split(',')])
    elif isinstance(num_steps, tuple | list) and all(
        isinstance(c, int | np.integer) and not isinstance(c, bool) for c in num_steps
    ):
        return iddpm_timesteps(num_timesteps, [int(c) for c in num_steps])
    raise ValueError(
        f"num_steps {num_steps!r} is not a respacing: use an int, 'ddimN', a section string "
        "such as '10,15,20', or a tuple of section counts"
    )
