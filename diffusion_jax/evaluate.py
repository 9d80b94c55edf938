"""`--mode=eval`: the paper's table (Ho et al. 2020, table 1) for a trained workdir.

For the checkpoint's EMA parameters:
* `config.eval.bpd`: the NLL bound in bits/dim on the eval split, its prior and decoder terms,
  the per-t curve and the rate-distortion curve (`evaluation.bpd`), as JSON and PNG plots;
* `config.eval.num_samples` > 0: that many samples, drawn through the resumable sharded sampler
  (`generate`), then
  - FID against the reference split and Inception Score (10 splits) with the standard Inception
    network when `config.eval.inception_weights` names a converted weights file; otherwise they
    are reported as skipped, with one line saying how to get the file;
  - for the digits dataset, the offline digits metrics (`evaluation.digits`), with real held-out
    digits for scale.
Results go to `WORKDIR/eval/metrics_<step>.json` (atomically) and TensorBoard, and a summary
table is logged at the end.
"""

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import generate, image_io, input_pipeline, models, parallel, train
from diffusion_jax.evaluation import bpd, fid, inception

IS_SPLITS = 10  # as in the paper's table 1


class EvalError(ValueError):
    """An evaluation that cannot run as configured (e.g. missing FID reference statistics)."""


def _nll(config, params, mesh, eval_dir: str, step: int) -> dict[str, Any]:
    e = config.eval
    parallel.check_batch_size(e.batch_size, jax.device_count(), 'config.eval.batch_size')
    batches = input_pipeline.eval_iterator(
        config.data,
        batch_size=e.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_examples=e.num_bpd_images,
    )
    bpd_fn = bpd.make_bpd_fn(models.get_model(config), train.create_diffusion(config), mesh)
    result = bpd.evaluate_bpd(
        bpd_fn,
        params,
        batches,
        mesh=mesh,
        batch_size=e.batch_size,
        rng=jax.random.PRNGKey(config.sampling.seed),
    )
    if jax.process_index() == 0:
        image_io.save_json(os.path.join(eval_dir, f'bpd_{step}.json'), result)
        bpd.save_plots(
            result,
            os.path.join(eval_dir, f'bpd_per_t_{step}.png'),
            os.path.join(eval_dir, f'rate_distortion_{step}.png'),
        )
    return {
        'nll_bpd': result['total_bpd'],
        'prior_bpd': result['prior_bpd'],
        'decoder_bpd': result['decoder_bpd'],
        'nll_images': result['num_images'],
    }


def _digits(samples: np.ndarray) -> dict[str, Any]:
    from diffusion_jax.evaluation import digits

    classifier = digits.get_classifier()
    ours = digits.digits_metrics(samples, classifier)
    real = digits.real_digits_reference(classifier)
    return {
        'digits_is': ours['digits_is'],
        'digits_fd': ours['digits_fd'],
        'real_heldout_digits_is': real['digits_is'],
        'real_heldout_digits_fd': real['digits_fd'],
    }


def _accumulate(feature_fn, chunks, batch_size: int, stats: fid.RunningStats) -> np.ndarray:
    """Adds the pool features of uint8 image chunks [n <= batch_size, H, W, C] to `stats`.

    Returns the logits of all the images, [N, 1008] float64.
    """
    logits = []
    for chunk in chunks:
        n = len(chunk)
        if n < batch_size:  # keep one compiled shape; the padding is dropped
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n, axis=0)])
        if chunk.shape[-1] == 1:  # grayscale: the network wants RGB
            chunk = np.repeat(chunk, 3, axis=-1)
        pool, logit = feature_fn(chunk)
        stats.update(np.asarray(pool, np.float64)[:n])
        logits.append(np.asarray(logit, np.float64)[:n])
        logging.info('Inception features of %d images', stats.count)
    return np.concatenate(logits)


def reference_stats_path(config: ml_collections.ConfigDict) -> str:
    """Where the FID reference statistics of the data live: next to the data by default."""
    e, d = config.eval, config.data
    if e.reference_stats:
        return e.reference_stats
    name = f'fid_stats_{d.dataset.replace("/", "_")}_{e.reference_split}_{d.image_size}px.npz'
    if d.dataset in ('npz', 'folder') and d.path:
        folder = os.path.dirname(os.path.abspath(d.path.rstrip('/')))
    elif d.dataset == 'digits':
        folder = os.path.expanduser('~/.cache/diffusion_jax')
    else:
        folder = d.data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
    return os.path.join(os.path.expanduser(folder), name)


def _reference(config, feature_fn, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference split's (mu, sigma), from the cache or computed once and cached."""
    path = reference_stats_path(config)
    if os.path.exists(path):
        with np.load(path) as f:
            return f['mu'], f['sigma']
    if not config.eval.compute_reference:
        raise EvalError(
            f'no FID reference statistics at {path}: compute them once with '
            '--config.eval.compute_reference=True (or give --config.eval.reference_stats=FILE)'
        )
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.eval_split = config.eval.reference_split
    batches = input_pipeline.eval_iterator(data, batch_size=batch_size)
    stats = fid.RunningStats()
    _accumulate(feature_fn, (image_io.to_uint8(b['image']) for b in batches), batch_size, stats)
    image_io.save_npz(path, mu=stats.mean, sigma=stats.covariance, count=stats.count)
    logging.info('wrote FID reference statistics of %d images to %s', stats.count, path)
    return stats.mean, stats.covariance


def _fid_is(config, samples: np.ndarray) -> dict[str, Any]:
    """FID and IS of uint8 samples [N, H, W, C], or why they were skipped (lead process only)."""
    path = config.eval.inception_weights
    if not path:
        logging.warning('FID/IS skipped: no Inception weights; to get them, %s', inception.HOWTO)
        return {'fid': 'skipped', 'inception_score': 'skipped'}
    try:
        params = inception.load_params(path)
    except inception.InceptionWeightsError as e:
        logging.warning('FID/IS skipped: %s', e)
        return {'fid': 'skipped', 'inception_score': 'skipped'}
    mesh = parallel.create_mesh(jax.local_devices())
    batch_size = max(mesh.size, config.eval.batch_size // mesh.size * mesh.size)
    feature_fn = inception.make_feature_fn(params, mesh=mesh)
    stats = fid.RunningStats()
    chunks = (samples[i : i + batch_size] for i in range(0, len(samples), batch_size))
    logits = _accumulate(feature_fn, chunks, batch_size, stats)
    mu, sigma = _reference(config, feature_fn, batch_size)
    # 10 splits as in the paper, but never splits of fewer than 100 images.
    splits = min(IS_SPLITS, max(1, len(samples) // 100))
    is_mean, is_std = fid.inception_score(logits, splits=splits)
    return {
        'fid': fid.frechet_distance(stats.mean, stats.covariance, mu, sigma),
        'inception_score': is_mean,
        'inception_score_std': is_std,
    }


def _table(metrics: dict[str, Any]) -> str:
    width = max(len(k) for k in metrics)
    lines = [f'{"metric".ljust(width)}  value', f'{"-" * width}  -----']
    for key, value in metrics.items():
        text = f'{value:.4f}' if isinstance(value, float) else str(value)
        lines.append(f'{key.ljust(width)}  {text}')
    return '\n'.join(lines)


def run_eval_mode(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """`--mode=eval`; returns the metrics also written to `WORKDIR/eval/metrics_<step>.json`."""
    from clu import metric_writers  # imports TensorFlow: keep it off the package import path

    s = config.sampling
    sample_fn, params, config, step = generate.load_sampler(workdir, config, step=s.checkpoint_step)
    eval_dir = os.path.join(workdir, 'eval')
    metrics: dict[str, Any] = {'checkpoint_step': step}
    if config.eval.bpd:
        metrics.update(_nll(config, params, parallel.create_mesh(), eval_dir, step))
    if config.eval.num_samples:
        samples = generate.generate_to_npz(
            sample_fn,
            params,
            path=os.path.join(eval_dir, f'samples_{step}.npz'),
            num_samples=config.eval.num_samples,
            batch_size=s.batch_size,
            seed=s.seed,
            spec={'checkpoint_step': step, 'sampler': s.sampler, 'num_steps': s.num_steps},
        )
        if jax.process_index() == 0:
            metrics['num_samples'] = len(samples)
            if config.data.dataset == 'digits':
                metrics.update(_digits(samples))
            metrics.update(_fid_is(config, samples))
    if jax.process_index() == 0:
        path = os.path.join(eval_dir, f'metrics_{step}.json')
        image_io.save_json(path, metrics)
        writer = metric_writers.SummaryWriter(os.path.join(workdir, 'eval'))
        writer.write_scalars(step, {k: v for k, v in metrics.items() if isinstance(v, float)})
        writer.close()
        logging.info('wrote %s\n%s', path, _table(metrics))
    return metrics
