"""Beta schedules for the forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).

`linear`, `quad`, `const` and `jsd` are the schedules of the original DDPM code (Ho et al. 2020;
the paper uses `linear` from 1e-4 to 0.02 with T=1000); `cosine` is Improved DDPM's
(Nichol & Dhariwal 2021, eq. 17), and so is `linear_iddpm`, the linear schedule with both
endpoints scaled by 1000 / T, so that any T destroys the signal as T=1000 does (at T=1000 it is
`linear`; it is not diffusers' `scaled_linear`, which is our `quad`). Tables are float64 NumPy;
`GaussianDiffusion.create` derives everything else from them in float64 and casts to float32
once.

`linear`, `quad` and `const` use the given endpoints for every T (the original code's form): at
T=250, `linear` leaves sqrt(alpha_bar_T) = 0.28, far from the N(0, I) that sampling starts from.
`endpoint_signal` says how much signal a schedule leaves.
"""

import math

import numpy as np

from diffusion_jax import options

# Improved DDPM, section 3.2: the offset s keeps beta_0 from being vanishingly small, and the
# clip at 0.999 avoids the singularity of the cosine schedule at t = T.
_COSINE_OFFSET = 0.008
_COSINE_MAX_BETA = 0.999
# config_lib warns about schedules that leave more of x_0 than this in x_T (sqrt(alpha_bar_T)).
MAX_ENDPOINT_SIGNAL = 0.01


def _cosine_alpha_bar(t: np.ndarray, num_timesteps: int) -> np.ndarray:
    """f(t) = cos(((t / T + s) / (1 + s)) * pi / 2)^2 for t in [0, T], unnormalised."""
    return np.cos((t / num_timesteps + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2


def get_beta_schedule(
    name: str,
    num_timesteps: int,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> np.ndarray:
    """Returns the betas of a named schedule.

    Args:
      name: one of `options.BETA_SCHEDULES`.
      num_timesteps: T, the number of diffusion steps (>= 1).
      beta_start: first beta of `linear` and `quad` (the paper's 1e-4); `linear_iddpm` scales it
        by 1000 / T.
      beta_end: last beta of `linear` and `quad`, and the value of `const` (the paper's 0.02);
        `linear_iddpm` scales it by 1000 / T.

    Returns:
      [T] float64 betas in (0, 1]; code index t is the paper's step t + 1.

    Raises:
      ValueError: for an unknown name or a non-positive `num_timesteps`.
    """
    options.check_choice('beta schedule', name, options.BETA_SCHEDULES)
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int | np.integer):
        raise ValueError(f'num_timesteps must be a positive int, got {num_timesteps!r}')
    if num_timesteps <= 0:
        raise ValueError(f'num_timesteps must be a positive int, got {num_timesteps}')
    n = int(num_timesteps)
    if name == 'linear':
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif name == 'linear_iddpm':
        scale = 1000.0 / n
        betas = np.linspace(scale * beta_start, scale * beta_end, n, dtype=np.float64)
    elif name == 'quad':
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    elif name == 'const':
        betas = np.full(n, beta_end, dtype=np.float64)
    elif name == 'jsd':
        # 1/T, 1/(T-1), ..., 1: the last step destroys the signal completely.
        betas = 1.0 / np.linspace(n, 1, n, dtype=np.float64)
    else:  # cosine
        alpha_bar = _cosine_alpha_bar(np.arange(n + 1, dtype=np.float64), n)
        alpha_bar = alpha_bar / alpha_bar[0]
        betas = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], _COSINE_MAX_BETA)
    if not (np.all(betas > 0) and np.all(betas <= 1)):
        raise ValueError(
            f'{name} schedule with beta_start={beta_start}, beta_end={beta_end} gives betas '
            'outside (0, 1]; choose 0 < beta_start <= beta_end < 1'
        )
    return betas


def endpoint_signal(betas: np.ndarray) -> float:
    """sqrt(alpha_bar_T): how much of x_0 is left in x_T (the sampler starts from pure noise)."""
    return float(np.sqrt(np.prod(1.0 - np.asarray(betas, np.float64))))
