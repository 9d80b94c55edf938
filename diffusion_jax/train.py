"""Training: the pure train step (Algorithm 1 of Ho et al. 2020) and the loop around it.

`train_step` is compiled once with `jax.jit`, the state donated, parameters replicated and the
global batch sharded over every device (see `parallel`). Randomness comes from one stored base
key folded with the step, so a resumed run draws exactly the numbers an uninterrupted run would.
"""

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from diffusion_jax import (
    checkpointing,
    config_lib,
    errors,
    experiment,
    image_io,
    input_pipeline,
    parallel,
    preemption,
    sampling,
    summary,
)
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import train_state as train_state_lib

NUM_T_BUCKETS = 4  # loss is also reported per quarter of [0, T)


def _skip_if_nonfinite(
    new_state: train_state_lib.TrainState,
    state: train_state_lib.TrainState,
    loss: jax.Array,
    grads: optax.Updates,
) -> tuple[train_state_lib.TrainState, jax.Array]:
    """`new_state` if the loss and every gradient are finite, else `state` with the step + 1.

    A non-finite loss or gradient leaves params, EMA and optimizer state as they were; the step
    still counts, so the rng stream and the data order stay those of a clean run.

    Returns:
      (the state to keep, scalar bool `finite`).
    """
    finite = jnp.isfinite(loss) & jnp.all(
        jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    )
    kept = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        new_state,
        state.replace(step=state.step + 1),
    )
    return kept, finite


def _loss_per_quarter(loss: jax.Array, t: jax.Array, num_timesteps: int) -> dict[str, jax.Array]:
    """The mean of `loss` [B] over the examples whose t [B] falls in each quarter of [0, T).

    Returns:
      {'loss_q0': .., 'loss_q3': ..}, scalars; NaN for a quarter that got no example.
    """
    bucket = t * NUM_T_BUCKETS // num_timesteps
    metrics = {}
    for q in range(NUM_T_BUCKETS):
        mask = bucket == q
        count = jnp.sum(mask)
        total = jnp.sum(jnp.where(mask, loss, 0.0))
        metrics[f'loss_q{q}'] = jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)
    return metrics


def train_step(
    state: train_state_lib.TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    diffusion: diffusion_lib.GaussianDiffusion,
    ema_decay: float,
    learning_rate_fn: optax.Schedule,
) -> tuple[train_state_lib.TrainState, dict[str, jax.Array]]:
    """One optimizer step on L_simple (or the configured loss).

    Args:
      state: the train state (replicated).
      batch: {'image': [B, H, W, C] float32 in [-1, 1]}, the global batch (sharded).
      rng: the run's base key (replicated); the step's key is `fold_in(rng, state.step)`.
      diffusion: the diffusion.
      ema_decay: EMA decay of the parameters.
      learning_rate_fn: the schedule, for logging the step's learning rate.

    Returns:
      (new state, metrics): scalar `nonfinite` (1.0 when the loss or a gradient was not finite
      and the update was skipped, else 0.0), `loss`, `mse`, `vb`, `grad_norm` (before clipping),
      `learning_rate`, and `loss_q0`..`loss_q3`, the loss of examples whose t falls in each
      quarter of [0, T) (NaN if a quarter got no example).
    """
    x_start = batch['image']
    b = x_start.shape[0]
    # Globally shaped draws: every device gets different numbers, and the numbers do not
    # depend on how many devices share the batch.
    t_rng, noise_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, state.step), 3)
    t = jax.random.randint(t_rng, (b,), 0, diffusion.num_timesteps)
    noise = jax.random.normal(noise_rng, x_start.shape, x_start.dtype)

    def loss_fn(params):
        def model_fn(x_t, t):
            return state.apply_fn(
                {'params': params}, x_t, t, train=True, rngs={'dropout': dropout_rng}
            )

        losses = diffusion_lib.training_losses(diffusion, model_fn, x_start, t, noise)
        return jnp.mean(losses['loss']), losses

    (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads)
    ema = optax.incremental_update(new_state.params, state.ema_params, 1.0 - ema_decay)
    new_state = new_state.replace(ema_params=ema)
    new_state, finite = _skip_if_nonfinite(new_state, state, loss, grads)
    metrics = {
        'nonfinite': 1.0 - finite.astype(jnp.float32),
        'loss': loss,
        'mse': jnp.mean(losses['mse']),
        'vb': jnp.mean(losses['vb']),
        'grad_norm': optax.tree.norm(grads),
        'learning_rate': learning_rate_fn(state.step),
    }
    metrics.update(_loss_per_quarter(losses['loss'], t, diffusion.num_timesteps))
    return new_state, metrics


def make_jit_train_step(config, diffusion, learning_rate_fn, mesh):
    """`train_step` jitted once with shardings, the state donated."""
    step_fn = functools.partial(
        train_step,
        diffusion=diffusion,
        ema_decay=config.optim.ema_decay,
        learning_rate_fn=learning_rate_fn,
    )
    replicated = parallel.replicated(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(replicated, parallel.batch_sharding(mesh), replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


class _Progress:
    """A tqdm bar on an interactive terminal, plain log lines otherwise (CI, files, non-lead)."""

    def __init__(self, start: int, total: int, batch_size: int):
        self.interactive = jax.process_index() == 0 and sys.stderr.isatty()
        self.batch_size, self.total = batch_size, total
        self.last_step, self.last_time = start, time.perf_counter()
        self.bar = None
        if self.interactive:
            import tqdm  # only interactive runs need it

            self.bar = tqdm.tqdm(initial=start, total=total, unit='step', dynamic_ncols=True)

    def update(self, step: int, scalars: dict[str, float] | None) -> dict[str, float]:
        """Advances to `step` (completed steps); with scalars, also reports throughput."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
        if scalars is None:
            return {}
        now = time.perf_counter()
        steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        rates = {'steps_per_sec': steps_per_sec, 'images_per_sec': steps_per_sec * self.batch_size}
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f'{scalars["loss"]:.4f}', img_s=f'{rates["images_per_sec"]:.0f}', refresh=False
            )
        else:
            logging.info(
                'step %d/%d: loss %.5f, %.2f steps/s, %.0f images/s',
                step,
                self.total,
                scalars['loss'],
                steps_per_sec,
                rates['images_per_sec'],
            )
        return rates

    def close(self):
        if self.bar is not None:
            self.bar.close()


class NonFiniteError(errors.UserError, FloatingPointError):
    """Too many steps in a row had a non-finite loss or gradient."""


class _NonFiniteSteps:
    """Counts skipped (non-finite) steps and stops the run after too many in a row.

    Each step's flag is read one step late, when the next step is already queued, so the check
    does not stall the device pipeline.
    """

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row, self.in_a_row, self.total = max_in_a_row, 0, 0
        self.pending: tuple[int, jax.Array] | None = None

    def check(self, step: int | None, flag: jax.Array | None) -> None:
        """Reads the previous step's flag, then remembers this one's (None: flush)."""
        previous, self.pending = self.pending, None if step is None else (step, flag)
        if previous is None:
            return
        done, prev_flag = previous
        if not float(jax.device_get(prev_flag)):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        logging.warning(
            'step %d: non-finite loss or gradient; update skipped (%d in a row, %d in all)',
            done,
            self.in_a_row,
            self.total,
        )
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f'{self.in_a_row} steps in a row (up to step {done}) had a non-finite loss or '
                'gradient; stopping with the last checkpoint intact. Lower '
                '--config.optim.learning_rate, check the data, or raise '
                '--config.training.max_nonfinite_steps.'
            )


def _write_samples(
    workdir: str, step: int, sample_fn, state, rng: jax.Array, writer: summary.SummaryWriter | None
) -> None:
    """Samples with the EMA parameters and writes a PNG grid (lead process only)."""
    images = image_io.to_uint8(
        parallel.to_host(sample_fn(state.ema_params, jax.random.fold_in(rng, step)))
    )
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, 'samples', f'grid_{step:08d}.png')
    grid = image_io.save_grid(path, images)
    writer.write_images(step, {'samples': grid[None]})
    logging.info('step %d: wrote %s', step, path)


def _check_resumable(meta: dict, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a checkpoint made with another network, diffusion or image shape."""
    changes = config_lib.weight_changes(meta.get('config', {}), config)
    if not changes:
        return
    if config.training.allow_config_change:
        logging.warning('resuming despite config changes: %s', '; '.join(changes))
        return
    raise config_lib.ConfigError(
        'the workdir holds checkpoints of another config: '
        + '; '.join(changes)
        + ' (use the saved values, another --workdir, or '
        '--config.training.allow_config_change=True to resume anyway)'
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> train_state_lib.TrainState:
    """Trains (or resumes) the model described by `config`, writing everything under `workdir`.

    Writes `config.json`, TensorBoard scalars, checkpoints under `checkpoints/` and sample grids
    under `samples/`. Returns the final state.
    """
    mesh = parallel.create_mesh()
    batch_size = config.training.batch_size
    parallel.check_batch_size(batch_size, jax.device_count(), 'config.training.batch_size')
    rng = jax.random.key(config.training.seed)
    init_rng, train_rng, sample_rng = jax.random.split(rng, 3)

    exp = experiment.build(config)
    state = exp.init_state(init_rng, mesh)
    logging.info('model: %s parameters; %d devices', f'{exp.num_params:,}', jax.device_count())

    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, 'checkpoints'),
        keep=config.training.keep_checkpoints,
        save_every_steps=config.training.checkpoint_every_steps,
    )
    try:  # nothing is written before the checkpoint and the data are accepted
        if ckpt.latest_valid_step() is not None:
            _check_resumable(ckpt.restore_meta(), config)
            state, _ = ckpt.restore(state, set_aside_failed=True)
            logging.info('resumed from step %d', int(state.step))
        start_step = int(state.step)
        local_batches = input_pipeline.train_iterator(
            config.data,
            global_batch_size=batch_size,
            seed=config.training.seed,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    except BaseException:
        ckpt.close()
        raise
    meta = {'config': config.to_dict()}
    batches = parallel.prefetch_to_mesh(local_batches, mesh)
    if jax.process_index() == 0:
        image_io.save_json(os.path.join(workdir, 'config.json'), config.to_dict())
    jit_train_step = make_jit_train_step(config, exp.diffusion, exp.learning_rate_fn, mesh)
    sample_fn = None
    if config.training.sample_every_steps:
        # Up to 64 images for the grid, a multiple of the device count.
        devices = jax.device_count()
        sample_fn = sampling.make_sample_fn(
            exp.model,
            exp.diffusion,
            batch_size=max(devices, min(config.sampling.num_samples, 64) // devices * devices),
            image_shape=exp.image_shape,
            clip_denoised=config.sampling.clip_denoised,
            mesh=mesh,
        )
    num_steps = config.training.num_train_steps
    progress = _Progress(start_step, num_steps, batch_size)
    # TensorBoard events from the lead process only; the others report nothing.
    writer = summary.SummaryWriter(workdir) if jax.process_index() == 0 else None
    last_saved = start_step
    try:
        with preemption.PreemptionGuard() as guard:
            nonfinite = _NonFiniteSteps(config.training.max_nonfinite_steps)
            for step in range(start_step, num_steps):
                batch = next(batches)
                state, metrics = jit_train_step(state, batch, train_rng)
                done = step + 1
                nonfinite.check(done, metrics['nonfinite'])
                scalars = None
                if done % config.training.log_every_steps == 0 or done == num_steps:
                    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    scalars.update(progress.update(done, scalars))
                    if writer is not None:
                        writer.write_scalars(done, scalars)
                else:
                    progress.update(done, None)
                # Asking orbax costs ~30 ms even when it declines, so only ask when it is due.
                due = done % config.training.checkpoint_every_steps == 0
                if due and ckpt.save(done, state, meta=meta):
                    last_saved = done
                if sample_fn and done % config.training.sample_every_steps == 0:
                    _write_samples(workdir, done, sample_fn, state, sample_rng, writer)
                if guard.should_stop(done):
                    logging.warning('preemption requested: saving step %d and stopping', done)
                    break
            nonfinite.check(None, None)  # the last step's flag
            final = int(state.step)
            if final != last_saved:
                ckpt.save(final, state, meta=meta, force=True)
            if sample_fn and final == num_steps and final % config.training.sample_every_steps:
                _write_samples(workdir, final, sample_fn, state, sample_rng, writer)
    finally:
        progress.close()
        if writer is not None:
            writer.close()
        ckpt.close()
    logging.info('finished at step %d; workdir %s', int(state.step), workdir)
    return state
