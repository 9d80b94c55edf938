"""Sampling from a trained workdir: `--mode=sample` and its Python helpers.

* `load_sampler` restores a checkpoint's EMA parameters with the config they were trained with
  and returns a ready `sample_fn(params, rng, first_index=0)` sharded over every device.
* `generate_to_npz` draws N images in batches and writes each batch as a shard file as soon as
  it is done, so a killed run of 50k images resumes where it stopped. Image i depends only on
  (seed, i) (see `sampling`), so the result does not depend on the batch size, the number of
  devices or where the run was interrupted. The final `.npz` is assembled from the shards a
  batch at a time and written atomically; an `on_batch` consumer (FID statistics) sees every
  batch as it is drawn, so no process ever holds all N images.
* `run_sample_mode` is `--mode=sample`: the npz, a PNG grid and, when asked, the interpolation
  strip of Ho et al. 2020, section 6.3. A class-conditional model's npz also holds `labels`, the
  class of each image, and its grid has one row per class.
"""

import io
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffusion_jax import (
    checkpointing,
    config_lib,
    errors,
    experiment,
    image_io,
    input_pipeline,
    lead,
    parallel,
    sampling,
)

_SHARD_RE = re.compile(r'images_(\d{8})_(\d{8})\.npz')


class SampleError(errors.UserError, ValueError):
    """A sampling request that cannot be carried out (no checkpoint, conflicting partial run)."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, 'checkpoints')


def restore_ema(
    workdir: str, config: ml_collections.ConfigDict, mesh: Mesh, step: int | None = None
) -> tuple[experiment.Experiment, Any, int]:
    """The experiment of a workdir's checkpoint and its EMA parameters, replicated over `mesh`.

    The checkpoint's stored config decides the network, diffusion and image format
    (`config_lib.with_checkpoint_weights`), everything else comes from `config`, and the merged
    config is validated before anything is restored. The checkpoints are opened read-only and
    only the EMA parameters are read, so a training job saving next to it is never disturbed
    and the optimizer settings do not matter. Without `step`, the newest complete step that
    restores is used.

    Returns:
      (the experiment built from the merged config, the EMA params, the restored step).

    Raises:
      SampleError: the workdir has no complete checkpoint.
      config_lib.ConfigError: the settings do not fit the checkpoint's network or diffusion.
      checkpointing.CheckpointError: no tried step restores.
    """
    no_checkpoint = SampleError(
        f'no checkpoint in {checkpoint_dir(workdir)}: train first '
        '(--mode=train with the same --workdir), or pass the workdir of a trained run'
    )
    if not epath.Path(checkpoint_dir(workdir)).is_dir():  # do not create it
        raise no_checkpoint
    with checkpointing.Checkpointer.read_only(checkpoint_dir(workdir)) as ckpt:
        if ckpt.latest_valid_step() is None:
            raise no_checkpoint
        failures = []
        for candidate in ckpt.candidate_steps(step):
            try:
                meta = ckpt.restore_meta(candidate)
                merged = config_lib.with_checkpoint_weights(meta.get('config', {}), config)
                config_lib.validate(merged, training=False)  # the effective settings, first
                exp = experiment.build(merged)
                target = exp.restore_target(mesh).ema_params
                which = config_lib.ema_subtree(meta.get('config', {}), merged)
                return exp, ckpt.restore_subtree(which, target, candidate), candidate
            except checkpointing.CheckpointError as e:
                if step is not None:
                    raise
                failures.append(f'step {candidate}: {e}')
                logging.warning('%s; trying the previous step', e)
    raise checkpointing.CheckpointError(
        f'no checkpoint in {checkpoint_dir(workdir)} could be restored; tried '
        + '; '.join(failures)
        + ' (damaged files, or a checkpoint of another model; nothing was changed)'
    )


def load_sampler(
    workdir: str,
    config: ml_collections.ConfigDict,
    *,
    mesh: Mesh | None = None,
    step: int | None = None,
    batch_size: int | None = None,
    sampler: str | None = None,
    num_steps: Any = None,
) -> tuple[sampling.SampleFn, Any, ml_collections.ConfigDict, int]:
    """Restores a checkpoint's EMA parameters and builds a sampler sharded over `mesh`.

    Args:
      workdir: a training workdir (its `checkpoints/` folder).
      config: supplies the sampling settings; data/model/diffusion come from the checkpoint.
      mesh: the devices to sample on; None: every device of every process.
      step: restore this step; None means the newest complete one.
      batch_size: images per call; None means `config.sampling.batch_size`.
      sampler, num_steps: override `config.sampling.sampler` / `num_steps`.

    Returns:
      (sample_fn, ema_params, the merged config, the restored step); call
      `sample_fn(ema_params, rng, first_index)` -> [batch_size, H, W, C] in [-1, 1].

    Raises:
      SampleError: the workdir has no complete checkpoint.
    """
    mesh = parallel.create_mesh() if mesh is None else mesh
    exp, params, restored_step = restore_ema(workdir, config, mesh, step)
    sample_fn = exp.sampler(mesh, batch_size=batch_size, sampler=sampler, num_steps=num_steps)
    return sample_fn, params, exp.config, restored_step


def sample_spec(config: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
    """Everything besides the seed and the count that changes a sampled image.

    A partial run resumes only under the same spec (`generate_to_npz`), so images of two
    samplers are never mixed in one file.
    """
    s = config.sampling
    spec = {
        'checkpoint_step': step,
        'sampler': s.sampler,
        'num_steps': s.num_steps,
        'eta': s.eta,
        'clip_denoised': s.clip_denoised,
    }
    if s.spacing != 'even':  # the default keeps older specs' form: their partial runs resume
        spec['spacing'] = s.spacing
    if s.ema_decay is not None:
        spec['ema_decay'] = s.ema_decay
    if config.model.num_classes:  # likewise for unconditional specs
        spec.update(class_label=s.class_label, guidance_scale=s.guidance_scale)
    return spec


def sample_labels(config: ml_collections.ConfigDict, num_samples: int) -> np.ndarray | None:
    """int32 [num_samples]: the class of each image the config draws; None if unconditional."""
    if not config.model.num_classes:
        return None
    indices = np.arange(num_samples, dtype=np.int32)
    return sampling.image_labels(indices, config.model.num_classes, config.sampling.class_label)


def _shard_index(shard_dir: str) -> list[tuple[int, int, epath.Path]]:
    """The shard files that cover images 0, 1, ... without a gap, as (start, end, path).

    Shards of an earlier run with another batch size may overlap; of those starting inside the
    covered prefix, the one reaching furthest is kept.
    """
    shards = sorted(
        (int(m[1]), int(m[2]), path)
        for path in epath.Path(shard_dir).glob('images_*.npz')
        if (m := _SHARD_RE.fullmatch(path.name))
    )
    index, covered = [], 0
    for start, end, path in shards:
        if start > covered:
            break
        if end > covered:
            index.append((start, end, path))
            covered = end
    return index


def _read_rows(
    shard_dir: str, index: list[tuple[int, int, epath.Path]], start: int, stop: int
) -> np.ndarray:
    """Images [start, stop) from the shards of `index` (`_shard_index`), reading only those."""
    parts, at = [], start
    for first, end, path in index:
        if end <= at or first >= stop:
            continue
        with np.load(io.BytesIO(path.read_bytes())) as f:
            parts.append(f['images'][at - first : stop - first])
        at = min(end, stop)
    if at != stop:
        raise SampleError(f'the shards in {shard_dir} miss images {at} to {stop}; delete it')
    return np.concatenate(parts)


def _open_shard_dir(shard_dir: str, spec: dict[str, Any]) -> int:
    """Creates `shard_dir` for `spec`, or checks a partial run's spec; returns images done."""
    spec_path = epath.Path(shard_dir) / 'spec.json'
    if spec_path.exists():
        old = json.loads(spec_path.read_text())
        if old != spec:
            diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
            raise SampleError(
                f'{shard_dir} holds a partial sampling run with other settings ({", ".join(diff)} '
                'differ): rerun with the same settings to resume it, or delete the folder'
            )
        index = _shard_index(shard_dir)
        return index[-1][1] if index else 0
    image_io.save_json(str(spec_path), spec)
    return 0


def _stored_spec(path: str) -> dict[str, Any] | None:
    """The spec a finished samples file was drawn with; None for a file without one."""
    try:
        with epath.Path(path).open('rb') as f, np.load(f) as archive:
            return json.loads(str(archive['spec'])) if 'spec' in archive.files else None
    except (OSError, ValueError) as e:
        raise SampleError(f'{path} exists but cannot be read ({e}); move it away') from e


def _check_start(path: str, shard_dir: str, spec: dict[str, Any]) -> int:
    """Images already drawn for `spec`: N for a finished file, a partial run's count, or 0.

    Raises:
      SampleError: `path` or `shard_dir` holds images of other settings (they are kept).
    """
    if epath.Path(path).exists():
        old = _stored_spec(path)
        if old != spec:
            diff = 'unknown' if old is None else ', '.join(_differing(old, spec))
            raise SampleError(
                f'{path} already holds samples of other settings ({diff}): move it away, or '
                'rerun with the same settings to reuse it'
            )
        return spec['num_samples']
    return _open_shard_dir(shard_dir, spec)


def _differing(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return [f'{k} {old.get(k)!r} there, {new.get(k)!r} now' for k in keys]


def _agree_on_start(path: str, spec: dict[str, Any], writer: lead.LeadWriter) -> int:
    """`_check_start` on process 0; every process learns the answer (or the refusal)."""
    done, refusal = 0, None
    if writer.is_lead:
        try:
            done = _check_start(path, path + '.partial', spec)
        except SampleError as e:
            done, refusal = -1, e
    done = int(multihost_utils.broadcast_one_to_all(np.int32(done)))
    if done < 0:
        raise refusal or SampleError(f'process 0 refused to sample into {path}; see its log')
    return done


# on_batch(images, n, start): uint8 images [R >= n, H, W, C] whose first n rows are images
# start, ..., start + n - 1, the same global array on every process (a jax.Array from the
# sampler, or a NumPy array read back from a partial run's shards).
OnBatch = Callable[[jax.Array | np.ndarray, int, int], None]


@jax.jit
def to_uint8(images: jax.Array) -> jax.Array:
    """`image_io.to_uint8` on the devices, keeping the sharding: [B, H, W, C] -> uint8."""
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def _replay(chunks, done: int, batch_size: int, on_batch: OnBatch, writer) -> None:
    """Hands images [0, done) already on disk to `on_batch`, a batch at a time.

    Process 0 reads each batch (`chunks`: an iterator of consecutive arrays of `batch_size`
    rows, the last one shorter; None on the other processes) and broadcasts it, so no process
    holds more than one batch. Each batch is padded to `batch_size` rows: one compiled shape.
    """
    shape = np.zeros(4, np.int32)
    for start in range(0, done, batch_size):
        n = min(batch_size, done - start)
        rows = next(chunks) if writer.is_lead else None
        if start == 0:
            shape[:] = (batch_size, *rows.shape[1:]) if writer.is_lead else 0
            shape = np.asarray(multihost_utils.broadcast_one_to_all(shape))
        padded = np.zeros(tuple(shape), np.uint8)
        if writer.is_lead:
            padded[:n] = rows
        on_batch(np.asarray(multihost_utils.broadcast_one_to_all(padded)), n, start)


def _replay_from_disk(path, done, num_samples, batch_size, on_batch, writer) -> None:
    """`_replay` of a finished file (done == N) or of a partial run's shards."""
    if not writer.is_lead:
        chunks = None
    elif done == num_samples and epath.Path(path).exists():
        chunks = image_io.iter_npz_rows(path, 'images', batch_size)
    else:
        shard_dir = path + '.partial'
        index = _shard_index(shard_dir)
        chunks = (
            _read_rows(shard_dir, index, start, min(start + batch_size, done))
            for start in range(0, done, batch_size)
        )
    _replay(chunks, done, batch_size, on_batch, writer)


def generate_to_npz(
    sample_fn: sampling.SampleFn,
    params: Any,
    *,
    path: str,
    num_samples: int,
    batch_size: int,
    seed: int,
    spec: dict[str, Any],
    on_batch: OnBatch | None = None,
    labels: np.ndarray | None = None,
) -> None:
    """Draws `num_samples` images into `path` (array `images`, uint8 [N, H, W, C]), resumably.

    Each batch is written to `<path>.partial/images_<start>_<end>.npz` as soon as it is done; a
    rerun with the same `spec` skips the images already there. The final file is assembled from
    the shards a batch at a time, written atomically, and the shard folder removed. Only process
    0 writes; no process holds more than a batch of images. A finished `path` drawn with the
    same settings is reused (its images go to `on_batch`); one of other settings is refused.

    Args:
      sample_fn, params: `sample_fn(params, rng, first_index)` -> [batch_size, H, W, C].
      path: the output .npz.
      num_samples: N >= 1, any size (the last batch is cut); batch_size: images per call.
      seed: image i uses `fold_in(key(seed), i)`.
      spec: JSON-able description of the run (checkpoint step, sampler, ...); a partial run
        with another spec is refused, not mixed in.
      on_batch: called with every image in index order (`OnBatch`), those of a partial run
        first, on every process: streaming consumers such as FID statistics.
      labels: int [N], the class `sample_fn` gives each image (`sample_labels`), stored as
        array `labels`; None: an unconditional model.
    """
    if num_samples < 1:
        raise SampleError(f'num_samples must be >= 1, got {num_samples}')
    shard_dir, writer = path + '.partial', lead.LeadWriter()
    spec = {**spec, 'seed': seed, 'num_samples': num_samples}
    done = _agree_on_start(path, spec, writer)
    if done == num_samples:
        logging.info('%s already holds these %d samples; reusing it', path, num_samples)
    elif done:
        logging.info('resuming: %d of %d images already in %s', done, num_samples, shard_dir)
    if done and on_batch is not None:
        _replay_from_disk(path, done, num_samples, batch_size, on_batch, writer)
    rng, interactive = jax.random.key(seed), writer.is_lead and sys.stderr.isatty()
    with tqdm.tqdm(
        initial=done, total=num_samples, unit='img', disable=not interactive, dynamic_ncols=True
    ) as bar:
        for start in range(done, num_samples, batch_size):
            end = min(start + batch_size, num_samples)
            images = to_uint8(sample_fn(params, rng, start))
            shard = os.path.join(shard_dir, f'images_{start:08d}_{end:08d}.npz')
            writer.npz(shard, images=parallel.to_host(images)[: end - start])
            if on_batch is not None:
                on_batch(images, end - start, start)
            bar.update(end - start)
            if not interactive:
                logging.info('sampled %d of %d images', end, num_samples)
    if writer.is_lead and not epath.Path(path).exists():  # not already finished
        _write_final(shard_dir, path, num_samples, batch_size, spec, labels)
    multihost_utils.sync_global_devices('generate_to_npz: written')


def _write_final(shard_dir, path, num_samples: int, batch_size: int, spec, labels) -> None:
    """Joins the shards' first `num_samples` images into `path`, a batch at a time.

    The file also holds `spec` (array `spec`, its JSON), which a rerun compares, and `labels`
    when given.
    """
    index = _shard_index(shard_dir)
    first = _read_rows(shard_dir, index, 0, 1)
    chunks = (
        _read_rows(shard_dir, index, start, min(start + batch_size, num_samples))
        for start in range(0, num_samples, batch_size)
    )
    shape = (num_samples, *first.shape[1:])
    small = {'spec': np.asarray(json.dumps(spec, sort_keys=True))}
    if labels is not None:
        small['labels'] = np.asarray(labels, np.int32)
    image_io.save_npz_rows(path, 'images', shape, np.uint8, chunks, **small)
    epath.Path(shard_dir).rmtree()


def _source_images(config: ml_collections.ConfigDict, indices: list[int]) -> np.ndarray:
    """Images `indices` of the eval split, float32 [len(indices), H, W, C] in [-1, 1]."""
    wanted = max(indices) + 1
    batches = input_pipeline.eval_iterator(config.data, batch_size=wanted, num_examples=wanted)
    images = np.concatenate([b['image'] for b in batches])
    if len(images) < wanted:
        raise SampleError(
            f'config.sampling.interpolate={config.sampling.interpolate!r}: the '
            f'{config.data.eval_split!r} split has only {len(images)} images'
        )
    return images[indices]


def _write_interpolation(config, workdir, params, step, sources: np.ndarray) -> str:
    """Writes the strip [source a, the interpolants, source b] as a PNG; returns its path."""
    s = config.sampling
    i, j = (int(k) for k in s.interpolate.split(','))
    exp = experiment.build(config)
    t = s.interpolate_t if s.interpolate_t is not None else exp.diffusion.num_timesteps // 2
    interpolate_fn = sampling.make_interpolate_fn(
        exp.model,
        exp.diffusion,
        image_shape=exp.image_shape,
        t=t,
        num_lambdas=s.interpolate_num,
        clip_denoised=s.clip_denoised,
    )
    mixed = interpolate_fn(params, sources[0], sources[1], jax.random.key(s.seed))
    strip = image_io.to_uint8(np.concatenate([sources[:1], np.asarray(mixed), sources[1:]]))
    path = os.path.join(workdir, 'samples', f'interpolate_{step}_{i}_{j}_t{t}.png')
    lead.LeadWriter().grid(path, strip, ncol=len(strip), size=64 * len(strip))
    return path


def grid_layout(
    config: ml_collections.ConfigDict, images: np.ndarray
) -> tuple[np.ndarray, int | None]:
    """(images, column count) for a grid of the first images the config draws: one row per
    class for a conditional model (`image_io.rows_by_class`), as they are (None) otherwise."""
    labels = sample_labels(config, len(images))
    return (images, None) if labels is None else image_io.rows_by_class(images, labels)


def _write_grid(config: ml_collections.ConfigDict, path: str, grid_path: str) -> None:
    """The PNG grid of the first 100 images of `path` (one row per class if conditional)."""
    writer = lead.LeadWriter()
    if not writer.is_lead:
        return
    images, ncol = grid_layout(config, image_io.load_npz_rows(path, 'images', 100))
    writer.grid(grid_path, images, ncol=ncol)


def run_sample_mode(
    config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None
) -> str:
    """`--mode=sample`: `config.sampling.num_samples` images into `samples/samples_<step>.npz`.

    Also writes a PNG grid of the first (up to) 100 images next to it, and the interpolation strip
    when `config.sampling.interpolate` is set. `mesh`: the devices to sample on; None: every
    device of every process. Returns the npz path.
    """
    s = config.sampling
    sample_fn, params, config, step = load_sampler(
        workdir, config, mesh=mesh, step=s.checkpoint_step
    )
    path = os.path.join(workdir, 'samples', f'samples_{step}.npz')
    # The interpolation's source images first: a bad index is refused before any sampling.
    pair = [int(k) for k in s.interpolate.split(',')] if s.interpolate else []
    sources = _source_images(config, pair) if pair else None
    logging.info('sampling %d images from checkpoint step %d into %s', s.num_samples, step, path)
    generate_to_npz(
        sample_fn,
        params,
        path=path,
        num_samples=s.num_samples,
        batch_size=s.batch_size,
        seed=s.seed,
        spec=sample_spec(config, step),
        labels=sample_labels(config, s.num_samples),
    )
    grid_path = os.path.join(workdir, 'samples', f'samples_{step}.png')
    _write_grid(config, path, grid_path)
    logging.info('wrote %s (%d images) and %s', path, s.num_samples, grid_path)
    if pair:
        strip = _write_interpolation(config, workdir, params, step, sources)
        logging.info('wrote %s', strip)
    return path
