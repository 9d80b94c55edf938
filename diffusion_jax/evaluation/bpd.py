"""The NLL bound in bits/dim and the rate-distortion curve (Ho et al. 2020, sections 4.2-4.3).

One pass of `diffusion.calc_bpd_loop` over the eval split gives, per image, all T terms of the
variational bound (bits/dim), the prior term and the MSE of x_0 predicted from x_t. From them:

* the NLL bound: total = prior + sum_t L_t, with the decoder term L_0 (-log p(x_0 | x_1)) and the
  per-t curve reported separately (Table 2 of the paper: 3.75 bits/dim on the CIFAR10 test set);
* rate-distortion (section 4.3, Figure 5): having received x_t, a receiver has spent
  rate(t) = prior + sum_{s > t} L_s bits/dim (code indices; the decoder term L_0 completes the
  lossless code) and reconstructs x_0 with distortion(t) = RMSE of the predicted x_0 on the 0..255
  scale.

Batches are sharded over every device (`parallel`); sums are accumulated in float64 on the host.
"""

import io
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import image_io, parallel, sampling

PIXEL_SCALE = 127.5  # [-1, 1] -> [0, 255]


def make_bpd_fn(
    model: Any,
    diffusion: diffusion_lib.GaussianDiffusion,
    mesh,
    timesteps: np.ndarray | None = None,
) -> Any:
    """Jitted `bpd_fn(params, x_start [B, H, W, C], rng, labels)` -> `calc_bpd_loop`'s dict.

    Sharded over `mesh`. `labels` [B] are the images' classes for a class-conditional network
    (the bound of log p(x | y)); None for an unconditional one. With `timesteps` (the S kept
    timesteps of a respacing, `spacing.kept_timesteps`) it is the S-term bound of the respaced
    process (`sampling.respace`), the network seeing each kept step's original timestep, as
    Improved DDPM reports the bound for fewer steps.
    """
    d, model_t = diffusion, None
    if timesteps is not None and len(timesteps) != diffusion.num_timesteps:
        d, model_t = sampling.respace(diffusion, timesteps), jnp.asarray(timesteps, jnp.int32)

    def bpd_fn(params, x_start, rng, labels):
        def model_fn(x_t, t):
            t = t if model_t is None else model_t[t]
            return sampling.model_output(model, params, x_t, t, labels)

        return diffusion_lib.calc_bpd_loop(d, model_fn, x_start, rng)

    replicated, batched = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    in_shardings = (replicated, batched, replicated, batched)
    return jax.jit(bpd_fn, in_shardings=in_shardings, out_shardings=batched)


def evaluate_bpd(
    bpd_fn: Any,
    params: Any,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    mesh,
    batch_size: int,
    rng: jax.Array,
) -> dict[str, Any]:
    """Runs `bpd_fn` over `batches` and averages over images.

    Args:
      bpd_fn: from `make_bpd_fn`.
      params: the (EMA) parameters.
      batches: this process's {'image': float32 [b, H, W, C] in [-1, 1]} (and 'label' int32 [b]
        for a class-conditional network), b <= local batch; short batches are padded with
        copies of their first image and the padding is dropped.
      mesh: the device mesh.
      batch_size: the global batch size `bpd_fn` is run at (divides over the devices).
      rng: noise of batch k is `fold_in(rng, k)`.

    Returns:
      {'num_images', 'total_bpd', 'prior_bpd', 'decoder_bpd' (the t=0 term),
       'vb_per_t' [T] (mean L_t), 'rate_bpd' [T], 'distortion_rmse' [T]}: means over images.
    """
    local = batch_size // jax.process_count()
    sums: dict[str, np.ndarray] = {}
    count = 0
    for k, batch in enumerate(batches):
        n = batch['image'].shape[0]
        if n < local:
            batch = {key: np.concatenate([v, np.repeat(v[:1], local - n, axis=0)])
                     for key, v in batch.items()}  # fmt: skip
        x = parallel.global_batch(batch, mesh)
        out = bpd_fn(params, x['image'], jax.random.fold_in(rng, k), x.get('label'))
        # Each process keeps the rows it supplied, minus the padding.
        rows = {key: np.asarray(parallel.to_host(v), np.float64) for key, v in out.items()}
        start = jax.process_index() * local
        for key, value in rows.items():
            value = value[start : start + n]
            sums[key] = sums.get(key, 0.0) + value.sum(axis=0)
        count += n
    if count == 0:
        raise ValueError('no images to evaluate the NLL bound on')
    totals = {key: _sum_over_processes(value) for key, value in sums.items()}
    count = int(_sum_over_processes(np.float64(count)))
    mean = {key: value / count for key, value in totals.items()}
    vb = mean['vb']
    return {
        'num_images': count,
        'total_bpd': float(mean['total_bpd']),
        'prior_bpd': float(mean['prior_bpd']),
        'decoder_bpd': float(vb[0]),
        'vb_per_t': vb.tolist(),
        **rate_distortion(vb, float(mean['prior_bpd']), mean['xstart_mse']),
    }


def rate_distortion(
    vb: np.ndarray, prior_bpd: float, xstart_mse: np.ndarray
) -> dict[str, list[float]]:
    """rate(t) = prior + sum_{s > t} L_s (bits/dim); distortion(t) = 127.5 sqrt(MSE of x_0 | x_t).

    Args:
      vb: [T] mean bits/dim of each term L_t.
      prior_bpd: mean prior term.
      xstart_mse: [T] mean squared error of the predicted x_0 in [-1, 1] units.
    """
    after = np.concatenate([np.cumsum(vb[::-1])[::-1][1:], [0.0]])  # sum over s > t
    return {
        'rate_bpd': (prior_bpd + after).tolist(),
        'distortion_rmse': (PIXEL_SCALE * np.sqrt(xstart_mse)).tolist(),
    }


def _sum_over_processes(x: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x))).sum(axis=0)


def save_plots(result: dict[str, Any], bpd_path: str, rd_path: str) -> None:
    """PNG plots of the per-t bound and of rate-distortion (matplotlib, written atomically)."""
    import matplotlib

    matplotlib.use('Agg')
    from matplotlib import pyplot as plt

    vb = np.asarray(result['vb_per_t'])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(np.arange(len(vb)), np.maximum(vb, 1e-12))
    ax.set_xlabel('t (0 = decoder term)')
    ax.set_ylabel('L_t (bits/dim)')
    ax.set_title(f'NLL bound {result["total_bpd"]:.3f} bits/dim, {result["num_images"]} images')
    save_figure(plt, fig, bpd_path)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(np.arange(len(vb)), result['distortion_rmse'])
    axes[0].set_xlabel('t')
    axes[0].set_ylabel('distortion (RMSE, 0..255)')
    axes[1].plot(result['rate_bpd'], result['distortion_rmse'])
    axes[1].set_xlabel('rate (bits/dim received)')
    axes[1].set_ylabel('distortion (RMSE, 0..255)')
    fig.suptitle('Rate-distortion (Ho et al. 2020, section 4.3)')
    fig.tight_layout()
    save_figure(plt, fig, rd_path)


def save_figure(plt, fig, path: str) -> None:
    """Writes a matplotlib figure as a PNG, atomically, and closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=100)
    plt.close(fig)
    image_io.atomic_write_bytes(path, buf.getvalue())
