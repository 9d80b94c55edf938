"""`--mode=eval`: the paper's table (Ho et al. 2020, table 1) for a trained workdir.

For the checkpoint's EMA parameters:
* `config.eval.bpd`: the NLL bound in bits/dim on the eval split, its prior and decoder terms,
  the per-t curve and the rate-distortion curve (`evaluation.bpd`), as JSON and PNG plots;
* `config.eval.num_samples` > 0: that many samples, drawn through the resumable sharded sampler
  (`generate`), then
  - FID against the reference split and Inception Score (10 splits) with the standard Inception
    network when `config.eval.inception_weights` names a converted weights file (checked, with
    the reference statistics, before sampling starts). Each sampled batch goes through the
    network on the devices as it is drawn, into running statistics (`StreamingFidIs`): no host
    holds all the samples, and a resumed run feeds the images of its partial run first.
    Without the setting they are reported as skipped, with one line saying how to get the
    file;
  - for the digits dataset, the offline digits metrics (`evaluation.digits`), with real held-out
    digits for scale, and for a class-conditional model the class accuracy of the samples;
* `config.eval.guidance_sweep` (class-conditional models): the same sample metrics at each
  guidance scale w, as a table in the log, `eval/guidance_<step>.json` and a plot
  `eval/guidance_<step>.png` (the trade-off guidance papers show).
Results go to `WORKDIR/eval/metrics_<step>.json` (atomically) and TensorBoard, and a summary
table is logged at the end.
"""

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffusion_jax import (
    errors,
    experiment,
    generate,
    image_io,
    input_pipeline,
    lead,
    parallel,
    spacing,
    summary,
)
from diffusion_jax.evaluation import bpd, fid, inception

IS_SPLITS = 10  # as in the paper's table 1


class EvalError(errors.UserError, ValueError):
    """An evaluation that cannot run as configured (e.g. missing FID reference statistics)."""


def _nll(config, params, mesh, eval_dir: str, step: int) -> dict[str, Any]:
    e, exp = config.eval, experiment.build(config)
    parallel.check_batch_size(e.batch_size, jax.device_count(), 'config.eval.batch_size')
    batches = input_pipeline.eval_iterator(
        config.data,
        batch_size=e.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_examples=e.num_bpd_images,
        num_classes=config.model.num_classes,
    )
    timesteps = None
    if e.bpd_num_steps is not None:  # the bound of a respaced process
        timesteps = spacing.kept_timesteps(
            exp.diffusion.num_timesteps, e.bpd_num_steps, config.sampling.spacing
        )
    bpd_fn = bpd.make_bpd_fn(exp.model, exp.diffusion, mesh, timesteps)
    result = bpd.evaluate_bpd(
        bpd_fn,
        params,
        batches,
        mesh=mesh,
        batch_size=e.batch_size,
        rng=jax.random.key(config.sampling.seed),
    )
    writer = lead.LeadWriter()
    writer.json(os.path.join(eval_dir, f'bpd_{step}.json'), result)
    if writer.is_lead:
        bpd.save_plots(
            result,
            os.path.join(eval_dir, f'bpd_per_t_{step}.png'),
            os.path.join(eval_dir, f'rate_distortion_{step}.png'),
        )
    metrics = {
        'nll_bpd': result['total_bpd'],
        'prior_bpd': result['prior_bpd'],
        'decoder_bpd': result['decoder_bpd'],
        'nll_images': result['num_images'],
    }
    if timesteps is not None:
        metrics['nll_terms'] = len(timesteps)  # the respaced bound's T
    return metrics


def digits_scores(samples: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """The digits classifier's IS and FD of uint8 samples [N, 8, 8, 1], and of real digits.

    With `labels` [N] (a conditional model's), also the accuracy of the samples against them
    and the classifier's accuracy on the real held-out digits.
    """
    from diffusion_jax.evaluation import digits

    classifier = digits.get_classifier()
    ours = digits.digits_metrics(samples, classifier, labels)
    real = digits.real_digits_reference(classifier)
    scores = {'digits_is': ours['digits_is'], 'digits_fd': ours['digits_fd']}
    if labels is not None:
        scores['digits_accuracy'] = ours['digits_accuracy']
    scores.update(
        real_heldout_digits_is=real['digits_is'], real_heldout_digits_fd=real['digits_fd']
    )
    if labels is not None:
        scores['real_heldout_digits_accuracy'] = real['digits_accuracy']
    return scores


def _features(feature_fn, mesh, chunks, image_shape: tuple[int, ...], batch_size: int, stats):
    """Adds the Inception pool features of every process's uint8 chunks to `stats` everywhere.

    Args:
      feature_fn: `inception.make_feature_fn(params, mesh=mesh)`.
      mesh: the mesh over every device of every process.
      chunks: this process's uint8 image chunks [n <= batch_size // process_count, H, W, C];
        processes may yield different numbers of chunks and rows (all are used, none twice).
      image_shape: (H, W, C) of the images.
      batch_size: the global batch (a multiple of the device count); one compiled shape.
      stats: a `fid.RunningStats`; every process adds the same rows in the same order.
    """
    local = batch_size // jax.process_count()
    chunks = iter(chunks)
    while True:
        chunk = next(chunks, None)
        n = 0 if chunk is None else len(chunk)
        counts = np.asarray(multihost_utils.process_allgather(np.int32(n))).reshape(-1)
        if not counts.any():
            break
        padded = np.zeros((local, *image_shape), np.uint8)
        if n:
            padded[:n] = chunk
        if image_shape[-1] == 1:  # grayscale: the network wants RGB
            padded = np.repeat(padded, 3, axis=-1)
        pool, _ = feature_fn(parallel.global_batch({'image': padded}, mesh)['image'])
        # Process p supplied rows [p * local, p * local + counts[p]); the rest is padding.
        rows = np.concatenate([np.arange(p * local, p * local + c) for p, c in enumerate(counts)])
        stats.update(np.asarray(parallel.to_host(pool), np.float64)[rows])
        logging.info('Inception features of %d images', stats.count)


def _rgb_padded(images: jax.Array, multiple: int) -> jax.Array:
    """uint8 [B, H, W, C] -> [B rounded up to `multiple`, H, W, 3]: grey tiled, zero rows added."""
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    extra = -images.shape[0] % multiple
    return jnp.pad(images, ((0, extra), (0, 0), (0, 0), (0, 0)))


@functools.cache
def _inception_input(mesh: Mesh) -> Callable[[jax.Array], jax.Array]:
    """`_rgb_padded` to the device count, sharded along the batch: one jitted function a mesh."""
    return jax.jit(
        functools.partial(_rgb_padded, multiple=mesh.size),
        out_shardings=parallel.batch_sharding(mesh),
    )


class StreamingFidIs:
    """Inception features of each sampled batch, on the devices, into running FID/IS statistics.

    A `generate.OnBatch` consumer: call it with every batch of the N images in index order. It
    holds one batch of features and the [2048, 2048] moments, whatever N; every process ends
    with the same statistics.

    Args:
      feature_fn: `fn(uint8 [B, H, W, 3] sharded over mesh) -> (pool [B, D], logits [B, K])`.
      mesh: the mesh over every device of every process.
      num_samples: N; IS uses 10 splits (Ho et al. 2020, table 1), never of fewer than 100.
    """

    def __init__(self, feature_fn, mesh: Mesh, num_samples: int):
        self.stats = fid.RunningStats()
        splits = min(IS_SPLITS, max(1, num_samples // 100))
        self.scores = fid.RunningInceptionScore(num_samples, splits)
        self.feature_fn, self._mesh = feature_fn, mesh

    def __call__(self, images: jax.Array | np.ndarray, n: int, start: int) -> None:
        """Adds images start, ..., start + n - 1: the first n rows of uint8 [R, H, W, C]."""
        if isinstance(images, np.ndarray):  # the same on every process: placed like a sample
            rows, mesh = images.shape[0], self._mesh
            where = parallel.batch_sharding(mesh) if rows % mesh.size == 0 else None
            images = jax.make_array_from_callback(
                images.shape, where or parallel.replicated(mesh), lambda index: images[index]
            )
        pool, logits = self.feature_fn(_inception_input(self._mesh)(images))
        self.stats.update(np.asarray(parallel.to_host(pool)[:n], np.float64))
        self.scores.update(parallel.to_host(logits)[:n], start)
        logging.info('Inception features of %d images', self.stats.count)


def reference_stats_path(config: ml_collections.ConfigDict) -> str:
    """Where the FID reference statistics of the data live: next to the data by default."""
    e, data = config.eval, config.data
    if e.reference_stats:
        return e.reference_stats
    dataset = data.dataset.replace('/', '_')
    name = f'fid_stats_{dataset}_{e.reference_split}_{data.image_size}px.npz'
    if data.dataset in ('npz', 'folder') and data.path:
        path = data.path.rstrip('/')
        folder = os.path.dirname(path if image_io.is_url(path) else os.path.abspath(path))
    elif data.dataset == 'digits':
        folder = '~/.cache/diffusion_jax'
    else:
        folder = data.data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
    return os.path.join(os.path.expanduser(folder), name)


def _reference_exists(config) -> bool:
    """Whether process 0 sees the reference statistics file (every process gets its answer)."""
    exists = lead.LeadWriter().is_lead and epath.Path(reference_stats_path(config)).exists()
    return bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))


def check_reference(config) -> None:
    """Refuses early (before sampling) when FID would need missing reference statistics."""
    if not config.eval.compute_reference and not _reference_exists(config):
        raise EvalError(
            f'no FID reference statistics at {reference_stats_path(config)}: compute them once '
            'with --config.eval.compute_reference=True (or give '
            '--config.eval.reference_stats=FILE)'
        )


def _reference(config, feature_fn, mesh, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference split's (mu, sigma) on process 0, from the cache or computed and cached.

    Computing them uses every process (each reads its part of the split); other processes
    return their copy too, but only process 0 reads or writes the cache file.
    """
    path = reference_stats_path(config)
    if _reference_exists(config):
        if not lead.LeadWriter().is_lead:
            return np.zeros(()), np.zeros(())  # unused: only process 0 computes the FID
        try:
            stats = image_io.load_arrays(path, ['mu', 'sigma'])
            return stats['mu'], stats['sigma']
        except (OSError, KeyError, image_io.ArrayFileError) as e:
            raise EvalError(
                f'cannot read the FID reference statistics {path} ({e}); move it away and pass '
                '--config.eval.compute_reference=True to compute them again'
            ) from None
    check_reference(config)
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.eval_split = config.eval.reference_split
    batches = input_pipeline.eval_iterator(
        data,
        batch_size=batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    stats = fid.RunningStats()
    chunks = (image_io.to_uint8(b['image']) for b in batches)
    _features(feature_fn, mesh, chunks, experiment.image_shape(config), batch_size, stats)
    lead.LeadWriter().npz(path, mu=stats.mean, sigma=stats.covariance, count=stats.count)
    logging.info('wrote FID reference statistics of %d images to %s', stats.count, path)
    return stats.mean, stats.covariance


def load_inception(config) -> dict[str, Any] | None:
    """The FID Inception parameters; None when `config.eval.inception_weights` is unset."""
    if not config.eval.inception_weights:
        return None
    try:
        return inception.load_params(
            config.eval.inception_weights, source_sha256=config.eval.inception_sha256
        )
    except inception.InceptionWeightsError as e:
        raise EvalError(str(e)) from e


def fid_is(config, mesh: Mesh, streamed: StreamingFidIs | None) -> dict[str, Any]:
    """FID against the reference split and IS of the streamed samples, or 'skipped'.

    Every process takes part (the reference statistics may need computing); the returned
    numbers are meaningful on process 0.
    """
    if streamed is None:
        logging.warning('FID/IS skipped: no Inception weights; to get them, %s', inception.HOWTO)
        return {'fid': 'skipped', 'inception_score': 'skipped'}
    mu, sigma = _reference(config, streamed.feature_fn, mesh, _inception_batch(config, mesh))
    if not lead.LeadWriter().is_lead:
        return {}
    is_mean, is_std = streamed.scores.result()
    return {
        'fid': fid.frechet_distance(streamed.stats.mean, streamed.stats.covariance, mu, sigma),
        'inception_score': is_mean,
        'inception_score_std': is_std,
    }


def _inception_batch(config, mesh: Mesh) -> int:
    """`config.eval.batch_size` rounded down to a multiple of the devices (at least one each)."""
    return max(mesh.size, config.eval.batch_size // mesh.size * mesh.size)


def _table(metrics: dict[str, Any]) -> str:
    width = max(len(k) for k in metrics)
    lines = [f'{"metric".ljust(width)}  value', f'{"-" * width}  -----']
    for key, value in metrics.items():
        text = f'{value:.4f}' if isinstance(value, float) else str(value)
        lines.append(f'{key.ljust(width)}  {text}')
    return '\n'.join(lines)


def _samples(config, workdir, mesh, sampler, step, inception_params, suffix='') -> dict[str, Any]:
    """Draws `config.eval.num_samples` images and scores them as they come (FID/IS, digits).

    They go to `eval/samples_<step><suffix>.npz`.
    """
    s, num_samples = config.sampling, config.eval.num_samples
    streamed = None
    if inception_params is not None:
        feature_fn = inception.make_feature_fn(inception_params, mesh=mesh)
        streamed = StreamingFidIs(feature_fn, mesh, num_samples)
    path = os.path.join(workdir, 'eval', f'samples_{step}{suffix}.npz')
    sample_fn, params = sampler
    labels = generate.sample_labels(config, num_samples)
    generate.generate_to_npz(
        sample_fn,
        params,
        path=path,
        num_samples=num_samples,
        batch_size=s.batch_size,
        seed=s.seed,
        spec=generate.sample_spec(config, step),
        on_batch=streamed,
        labels=labels,
    )
    metrics: dict[str, Any] = {'num_samples': num_samples}
    if config.data.dataset == 'digits' and lead.LeadWriter().is_lead:
        # 64 bytes an image: the digits classifier reads the whole file on process 0.
        metrics.update(digits_scores(image_io.load_npz_rows(path, 'images'), labels))
    metrics.update(fid_is(config, mesh, streamed))
    return metrics


def _guidance_sweep(config, workdir, mesh, params, step, inception_params) -> list[dict]:
    """`_samples` at each w of `config.eval.guidance_sweep`: one row of scores per w.

    The run's own w reuses the samples scored already; the others go to
    `eval/samples_<step>_w<w>.npz`.
    """
    rows = []
    for w in config.eval.guidance_sweep:
        swept = config.copy_and_resolve_references()
        swept.sampling.guidance_scale = float(w)
        sampler = (experiment.build(swept).sampler(mesh), params)
        own = float(w) == float(config.sampling.guidance_scale)
        suffix = '' if own else f'_w{float(w):g}'
        scores = _samples(swept, workdir, mesh, sampler, step, inception_params, suffix)
        rows.append({'guidance_scale': float(w), **scores})
    return rows


def _sweep_table(rows: list[dict]) -> str:
    """The sweep as a text table: one line per w, one column per numeric score."""
    keys = [k for k, v in rows[0].items() if isinstance(v, float) and 'real_heldout' not in k]
    lines = ['  '.join(f'{k:>16}' for k in keys)]
    lines += ['  '.join(f'{row[k]:16.4f}' for k in keys) for row in rows]
    return '\n'.join(lines)


def _plot_sweep(rows: list[dict], path: str) -> None:
    """One panel per score against w, the real digits' level dashed where there is one."""
    import matplotlib

    matplotlib.use('Agg')
    from matplotlib import pyplot as plt

    scale = [row['guidance_scale'] for row in rows]
    names = [k for k in ('digits_accuracy', 'digits_is', 'digits_fd', 'fid', 'inception_score')
             if isinstance(rows[0].get(k), float)]  # fmt: skip
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        ax.plot(scale, [row[name] for row in rows], 'o-')
        if isinstance(real := rows[0].get(f'real_heldout_{name}'), float):
            ax.axhline(real, color='grey', linestyle='--', label='real held-out digits')
            ax.legend(fontsize=8)
        ax.set_xlabel('guidance scale w')
        ax.set_title(name)
    fig.suptitle('Classifier-free guidance: eps = (1 + w) eps(x, y) - w eps(x, null)')
    fig.tight_layout()
    bpd.save_figure(plt, fig, path)


def run_eval_mode(
    config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None
) -> dict[str, Any]:
    """`--mode=eval`; returns the metrics also written to `WORKDIR/eval/metrics_<step>.json`.

    `mesh`: the devices to evaluate on; None: every device of every process.
    """
    mesh = parallel.create_mesh() if mesh is None else mesh
    sample_fn, params, config, step = generate.load_sampler(
        workdir, config, mesh=mesh, step=config.sampling.checkpoint_step
    )
    # Refuse bad Inception weights or missing reference statistics before hours of sampling.
    inception_params = load_inception(config) if config.eval.num_samples else None
    if inception_params is not None:
        check_reference(config)
    eval_dir = os.path.join(workdir, 'eval')
    metrics: dict[str, Any] = {'checkpoint_step': step}
    if config.eval.bpd:
        metrics.update(_nll(config, params, mesh, eval_dir, step))
    if config.eval.num_samples:
        sampler = (sample_fn, params)
        metrics.update(_samples(config, workdir, mesh, sampler, step, inception_params))
    writer = lead.LeadWriter()
    if config.eval.num_samples and config.eval.guidance_sweep:
        rows = _guidance_sweep(config, workdir, mesh, params, step, inception_params)
        writer.json(os.path.join(eval_dir, f'guidance_{step}.json'), rows)
        if writer.is_lead:
            _plot_sweep(rows, os.path.join(eval_dir, f'guidance_{step}.png'))
            logging.info('guidance sweep (eval/guidance_%d.png):\n%s', step, _sweep_table(rows))
    path = os.path.join(eval_dir, f'metrics_{step}.json')
    writer.json(path, metrics)
    if writer.is_lead:
        with summary.SummaryWriter(eval_dir) as tensorboard:
            scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
            tensorboard.write_scalars(step, scalars)
        logging.info('wrote %s\n%s', path, _table(metrics))
    return metrics
