"""Sampling: the whole reverse chain as one compiled program.

Ancestral sampling is the paper's Algorithm 2 (Ho et al. 2020); with fewer steps than T it uses
Improved DDPM's respacing (Nichol & Dhariwal 2021, section 4: betas recomputed from alpha_bar on
the kept steps). `ddim` is Song et al. 2021, eq. 12, with noise scale eta. Every step runs inside
one `jax.lax.scan`, so compile time and memory do not grow with the number of steps.

Image i of a call depends only on (rng, first_index + i): its noise comes from
`fold_in(rng, first_index + i)`, so batch size and device count do not change the images.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import options, parallel

# How many predicted x_0 snapshots `return_trajectory=True` records (the paper's Figure 6).
NUM_TRAJECTORY_FRAMES = 10

SampleFn = Callable[..., Any]


def spaced_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """`num_steps` evenly spaced timesteps from 0 to T-1 inclusive, increasing, unique."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f'num_steps must be in [1, {num_timesteps}], got {num_steps}')
    if num_steps == 1:
        return np.array([num_timesteps - 1])
    return np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int32)


def respace(
    d: diffusion_lib.GaussianDiffusion, timesteps: np.ndarray
) -> diffusion_lib.GaussianDiffusion:
    """The diffusion restricted to `timesteps`: beta_i = 1 - abar[tau_i] / abar[tau_{i-1}]."""
    alpha_bar = np.cumprod(1.0 - np.asarray(d.betas, np.float64))[timesteps]
    betas = 1.0 - alpha_bar / np.append(1.0, alpha_bar[:-1])
    return diffusion_lib.GaussianDiffusion.create(
        betas, d.model_mean_type, d.model_var_type, d.loss_type
    )


def _per_image_keys(rng: jax.Array, first_index: jax.Array, batch_size: int) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(first_index + jnp.arange(batch_size))


def _normal_per_image(keys: jax.Array, step: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape))(keys)


def make_sample_fn(
    model: Any,
    diffusion: diffusion_lib.GaussianDiffusion,
    *,
    batch_size: int,
    image_shape: tuple[int, int, int],
    sampler: str = 'ancestral',
    num_steps: int | None = None,
    eta: float = 0.0,
    clip_denoised: bool = True,
    return_trajectory: bool = False,
    mesh: Mesh | None = None,
) -> SampleFn:
    """Returns a jitted `sample_fn(params, rng, first_index=0)`.

    Args:
      model: linen module, `model.apply({'params': p}, x, t, train=False)`.
      diffusion: the diffusion the model was trained with.
      batch_size: images per call.
      image_shape: (H, W, C).
      sampler: 'ancestral' or 'ddim'.
      num_steps: reverse steps; None means all T (ancestral) and is required to be <= T.
      eta: DDIM noise scale (0 = deterministic); ignored by 'ancestral'.
      clip_denoised: clip the predicted x_0 to [-1, 1] at every step.
      return_trajectory: also return predicted x_0 at `NUM_TRAJECTORY_FRAMES` evenly spaced
        steps, [B, K, H, W, C], first frame the noisiest.
      mesh: shard the batch over this device mesh (`parallel.create_mesh()`), parameters
        replicated; `batch_size` must divide over its devices. None: default placement.

    Returns:
      `sample_fn(params, rng, first_index=0) -> images [B, H, W, C] float32 in [-1, 1]`
      (or `(images, trajectory)`); `first_index` offsets the per-image keys.
    """
    options.check_choice('sampler', sampler, options.SAMPLERS)
    num_steps = diffusion.num_timesteps if num_steps is None else num_steps
    timesteps = spaced_timesteps(diffusion.num_timesteps, num_steps)
    d = respace(diffusion, timesteps) if num_steps != diffusion.num_timesteps else diffusion
    model_t = jnp.asarray(timesteps)
    shape = (batch_size, *image_shape)
    frames = min(NUM_TRAJECTORY_FRAMES, num_steps)
    # Step i (counting down) records frame slot[i] when slot[i] >= 0.
    slot = np.full(num_steps, -1, np.int32)
    slot[spaced_timesteps(num_steps, frames)[::-1]] = np.arange(frames)
    slot = jnp.asarray(slot)

    def step(params, keys, x, i):
        t = jnp.full((batch_size,), i, jnp.int32)
        out = model.apply({'params': params}, x, jnp.full((batch_size,), model_t[i]), train=False)
        z = _normal_per_image(keys, i + 1, image_shape)
        if sampler == 'ancestral':
            return diffusion_lib.p_sample(d, out, x, t, z, clip_denoised=clip_denoised)
        pred_x0 = diffusion_lib.p_mean_variance(d, out, x, t, clip_denoised)['pred_xstart']
        eps = diffusion_lib.predict_eps_from_xstart(d, x, t, pred_x0)
        abar, abar_prev = d.alphas_cumprod[i], d.alphas_cumprod_prev[i]
        sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        mean = jnp.sqrt(abar_prev) * pred_x0 + jnp.sqrt(1 - abar_prev - sigma**2) * eps
        return mean + sigma * z, pred_x0

    def sample(params, rng, first_index):
        keys = _per_image_keys(rng, jnp.asarray(first_index, jnp.int32), batch_size)
        if mesh is not None:  # every device runs the whole chain on its slice of the batch
            keys = jax.lax.with_sharding_constraint(keys, parallel.batch_sharding(mesh))
        x_init = _normal_per_image(keys, 0, image_shape)
        traj_init = jnp.zeros((frames, *shape), jnp.float32)

        def body(carry, i):
            x, traj = carry
            x, pred_x0 = step(params, keys, x, i)
            if return_trajectory:
                k = slot[i]
                updated = jax.lax.dynamic_update_index_in_dim(traj, pred_x0, jnp.maximum(k, 0), 0)
                traj = jnp.where(k >= 0, updated, traj)
            return (x, traj), None

        (x, traj), _ = jax.lax.scan(body, (x_init, traj_init), jnp.arange(num_steps - 1, -1, -1))
        if return_trajectory:
            return x, jnp.moveaxis(traj, 0, 1)
        return x

    if mesh is None:
        jit_sample = jax.jit(sample)
    else:
        parallel.check_batch_size(batch_size, mesh.size, 'sampling batch_size')
        replicated = parallel.replicated(mesh)
        jit_sample = jax.jit(
            sample,
            in_shardings=(replicated, replicated, replicated),
            out_shardings=parallel.batch_sharding(mesh),
        )

    def sample_fn(params, rng, first_index=0):
        return jit_sample(params, rng, jnp.asarray(first_index, jnp.int32))

    # For ahead-of-time compilation (benchmarks): sample_fn.lower(params, rng).compile().
    sample_fn.lower = lambda params, rng, first_index=0: jit_sample.lower(
        params, rng, jnp.asarray(first_index, jnp.int32)
    )
    return sample_fn


def make_score_fn(model: Any, diffusion: diffusion_lib.GaussianDiffusion) -> Callable:
    """Returns `score_fn(params, x, t) = -eps(x, t) / sqrt(1 - alpha_bar_t)` (Song & Ermon link).

    x: [B, H, W, C]; t: [B] int. For x_0- or mean-predicting models eps is derived from the
    predicted x_0 (unclipped).
    """

    def score_fn(params, x, t):
        out = model.apply({'params': params}, x, t, train=False)
        if diffusion.model_mean_type == 'eps':
            eps = diffusion_lib.split_model_output(diffusion, out)[0]
        else:
            x0 = diffusion_lib.p_mean_variance(diffusion, out, x, t, False)['pred_xstart']
            eps = diffusion_lib.predict_eps_from_xstart(diffusion, x, t, x0)
        return -eps / diffusion.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]

    return score_fn


def make_interpolate_fn(
    model: Any,
    diffusion: diffusion_lib.GaussianDiffusion,
    *,
    image_shape: tuple[int, int, int],
    t: int,
    num_lambdas: int = 11,
    clip_denoised: bool = True,
) -> Callable:
    """Returns a jitted `interpolate_fn(params, x0_a, x0_b, rng)` (Ho et al. 2020, section 6.3).

    Both sources are noised to step `t` with the same noise (the stochastic encoder q(x_t|x_0)),
    the latents are mixed as (1 - lambda) x_t^a + lambda x_t^b for `num_lambdas` values of
    lambda evenly spaced in [0, 1], and each mix is denoised by the ancestral chain from t down
    to 0 (one `lax.scan` of t + 1 steps). The reverse noise is also shared across lambda, so
    neighbouring columns differ only through lambda.

    Args (of `interpolate_fn`):
      x0_a, x0_b: [H, W, C] source images in [-1, 1].
      rng: key for the encoder noise and the reverse chain.

    Returns:
      `interpolate_fn(...) -> [num_lambdas, H, W, C]` in [-1, 1]; the first and last entries are
      reconstructions of x0_a and x0_b from step t.
    """
    if not 0 <= t < diffusion.num_timesteps:
        raise ValueError(f'interpolation step t must be in [0, {diffusion.num_timesteps}), got {t}')
    if num_lambdas < 2:
        raise ValueError(f'num_lambdas must be >= 2, got {num_lambdas}')
    lambdas = jnp.linspace(0.0, 1.0, num_lambdas).reshape(-1, 1, 1, 1)

    def interpolate_fn(params, x0_a, x0_b, rng):
        enc_rng, dec_rng = jax.random.split(rng)
        noise = jax.random.normal(enc_rng, (1, *image_shape))
        t_enc = jnp.full((1,), t, jnp.int32)
        x_a = diffusion_lib.q_sample(diffusion, x0_a[None], t_enc, noise)
        x_b = diffusion_lib.q_sample(diffusion, x0_b[None], t_enc, noise)
        x_t = (1.0 - lambdas) * x_a + lambdas * x_b

        def body(x, i):
            ts = jnp.full((num_lambdas,), i, jnp.int32)
            out = model.apply({'params': params}, x, ts, train=False)
            z = jnp.broadcast_to(
                jax.random.normal(jax.random.fold_in(dec_rng, i), image_shape), x.shape
            )
            x, _ = diffusion_lib.p_sample(diffusion, out, x, ts, z, clip_denoised=clip_denoised)
            return x, None

        x, _ = jax.lax.scan(body, x_t, jnp.arange(t, -1, -1))
        return x

    return jax.jit(interpolate_fn)
