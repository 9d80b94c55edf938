"""`--mode=eval`: the paper's table (Ho et al. 2020, table 1) for a trained workdir.

For the checkpoint's EMA parameters:
* `config.eval.bpd`: the NLL bound in bits/dim on the eval split, its prior and decoder terms,
  the per-t curve and the rate-distortion curve (`evaluation.bpd`), as JSON and PNG plots;
* `config.eval.num_samples` > 0: that many samples, drawn through the resumable sharded sampler
  (`generate`), then
  - FID against the reference split and Inception Score (10 splits) with the standard Inception
    network when `config.eval.inception_weights` names a converted weights file (checked, with
    the reference statistics, before sampling starts; features run on every device of every
    host); without the setting they are reported as skipped, with one line saying how to get
    the file;
  - for the digits dataset, the offline digits metrics (`evaluation.digits`), with real held-out
    digits for scale.
Results go to `WORKDIR/eval/metrics_<step>.json` (atomically) and TensorBoard, and a summary
table is logged at the end.
"""

import io
import os
from typing import Any

import jax
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
    parallel,
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
    )
    bpd_fn = bpd.make_bpd_fn(exp.model, exp.diffusion, mesh)
    result = bpd.evaluate_bpd(
        bpd_fn,
        params,
        batches,
        mesh=mesh,
        batch_size=e.batch_size,
        rng=jax.random.key(config.sampling.seed),
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


def _features(
    feature_fn, mesh, chunks, image_shape: tuple[int, ...], batch_size: int, stats
) -> np.ndarray:
    """Inception pool features of every process's uint8 chunks, added to `stats` everywhere.

    Args:
      feature_fn: `inception.make_feature_fn(params, mesh=mesh)`.
      mesh: the mesh over every device of every process.
      chunks: this process's uint8 image chunks [n <= batch_size // process_count, H, W, C];
        processes may yield different numbers of chunks and rows (all are used, none twice).
      image_shape: (H, W, C) of the images.
      batch_size: the global batch (a multiple of the device count); one compiled shape.
      stats: a `fid.RunningStats`; every process adds the same rows in the same order.

    Returns:
      The logits of all the images of all processes, [N, 1008] float64, on every process.
    """
    local = batch_size // jax.process_count()
    logits = []
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
        pool, logit = feature_fn(parallel.global_batch({'image': padded}, mesh)['image'])
        pool, logit = parallel.to_host(pool), parallel.to_host(logit)
        # Process p supplied rows [p * local, p * local + counts[p]); the rest is padding.
        rows = np.concatenate([np.arange(p * local, p * local + c) for p, c in enumerate(counts)])
        stats.update(np.asarray(pool, np.float64)[rows])
        logits.append(np.asarray(logit, np.float64)[rows])
        logging.info('Inception features of %d images', stats.count)
    return np.concatenate(logits)


def _sample_chunks(samples: np.ndarray, batch_size: int):
    """This process's share of each global chunk of `samples` (the same array on every process)."""
    local = batch_size // jax.process_count()
    for i in range(0, len(samples), batch_size):
        start = i + jax.process_index() * local
        yield samples[start : min(start + local, i + batch_size, len(samples))]


def reference_stats_path(config: ml_collections.ConfigDict) -> str:
    """Where the FID reference statistics of the data live: next to the data by default."""
    e, d = config.eval, config.data
    if e.reference_stats:
        return e.reference_stats
    name = f'fid_stats_{d.dataset.replace("/", "_")}_{e.reference_split}_{d.image_size}px.npz'
    if d.dataset in ('npz', 'folder') and d.path:
        path = d.path.rstrip('/')
        folder = os.path.dirname(path if image_io.is_url(path) else os.path.abspath(path))
    elif d.dataset == 'digits':
        folder = '~/.cache/diffusion_jax'
    else:
        folder = d.data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
    return os.path.join(os.path.expanduser(folder), name)


def _reference_exists(config) -> bool:
    """Whether process 0 sees the reference statistics file (every process gets its answer)."""
    exists = jax.process_index() == 0 and epath.Path(reference_stats_path(config)).exists()
    return bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))


def _check_reference(config) -> None:
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
        if jax.process_index() != 0:
            return np.zeros(()), np.zeros(())  # unused: only process 0 computes the FID
        with np.load(io.BytesIO(epath.Path(path).read_bytes())) as f:
            return f['mu'], f['sigma']
    _check_reference(config)
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
    if jax.process_index() == 0:
        image_io.save_npz(path, mu=stats.mean, sigma=stats.covariance, count=stats.count)
        logging.info('wrote FID reference statistics of %d images to %s', stats.count, path)
    return stats.mean, stats.covariance


def _load_inception(config) -> dict[str, Any] | None:
    """The FID Inception parameters; None when `config.eval.inception_weights` is unset."""
    if not config.eval.inception_weights:
        return None
    try:
        return inception.load_params(
            config.eval.inception_weights, source_sha256=config.eval.inception_sha256
        )
    except inception.InceptionWeightsError as e:
        raise EvalError(str(e)) from e


def _fid_is(config, samples: np.ndarray, params: dict[str, Any] | None) -> dict[str, Any]:
    """FID and IS of uint8 samples [N, H, W, C] (the same on every process), or 'skipped'.

    Every process takes part (features are computed on every device of every host); the
    returned numbers are meaningful on process 0.
    """
    if params is None:
        logging.warning('FID/IS skipped: no Inception weights; to get them, %s', inception.HOWTO)
        return {'fid': 'skipped', 'inception_score': 'skipped'}
    mesh = parallel.create_mesh()
    devices = jax.device_count()
    batch_size = max(devices, config.eval.batch_size // devices * devices)
    feature_fn = inception.make_feature_fn(params, mesh=mesh)
    stats = fid.RunningStats()
    chunks = _sample_chunks(samples, batch_size)
    logits = _features(feature_fn, mesh, chunks, samples.shape[1:], batch_size, stats)
    mu, sigma = _reference(config, feature_fn, mesh, batch_size)
    if jax.process_index() != 0:
        return {}
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


def run_eval_mode(
    config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None
) -> dict[str, Any]:
    """`--mode=eval`; returns the metrics also written to `WORKDIR/eval/metrics_<step>.json`.

    `mesh`: the devices to evaluate on; None: every device of every process.
    """
    s = config.sampling
    mesh = parallel.create_mesh() if mesh is None else mesh
    sample_fn, params, config, step = generate.load_sampler(
        workdir, config, mesh=mesh, step=s.checkpoint_step
    )
    # Refuse bad Inception weights or missing reference statistics before hours of sampling.
    inception_params = _load_inception(config) if config.eval.num_samples else None
    if inception_params is not None:
        _check_reference(config)
    eval_dir = os.path.join(workdir, 'eval')
    metrics: dict[str, Any] = {'checkpoint_step': step}
    if config.eval.bpd:
        metrics.update(_nll(config, params, mesh, eval_dir, step))
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
        if inception_params is not None and jax.process_count() > 1:
            shape = (config.eval.num_samples, *experiment.image_shape(config))
            mine = samples if jax.process_index() == 0 else np.zeros(shape, np.uint8)
            samples = np.asarray(multihost_utils.broadcast_one_to_all(mine))
        metrics.update(_fid_is(config, samples, inception_params))
    if jax.process_index() == 0:
        path = os.path.join(eval_dir, f'metrics_{step}.json')
        image_io.save_json(path, metrics)
        with summary.SummaryWriter(os.path.join(workdir, 'eval')) as writer:
            writer.write_scalars(step, {k: v for k, v in metrics.items() if isinstance(v, float)})
        logging.info('wrote %s\n%s', path, _table(metrics))
    return metrics
