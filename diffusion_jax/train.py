"""Training: the pure train step (Algorithm 1 of Ho et al. 2020) and the loop around it.

`train_step` is compiled once with `jax.jit`, the state donated, parameters replicated and the
global batch sharded over every device (see `parallel`). Randomness comes from one stored base
key folded with the step, so a resumed run draws exactly the numbers an uninterrupted run would.
"""

import dataclasses
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from diffusion_jax import (
    checkpointing,
    config_lib,
    errors,
    experiment,
    generate,
    image_io,
    input_pipeline,
    lead,
    parallel,
    preemption,
    sampling,
    summary,
    timestep_sampling,
    train_eval,
    workdir_lock,
    xla_cpu,
)
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import train_state as train_state_lib

NUM_T_BUCKETS = 4  # loss is also reported per quarter of [0, T)
# The label-dropout coins of step s come from fold_in(step key, this): a stream of their own, so
# conditioning leaves the unconditional draws (t, noise, dropout) as they are.
_LABEL_DROPOUT_STREAM = 3
CLASSES_FILE = 'classes.json'  # the name of each class id, written for conditional runs


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


def _microbatches(tree: Any, k: int) -> Any:
    """Every array [B, ...] of `tree` as k slices [k, B / k, ...]; slice i holds rows i, i + k, ...

    Strided rather than contiguous: each device's rows of the global batch are split evenly
    among the slices, so every device works on every slice.
    """
    return jax.tree.map(lambda a: jnp.swapaxes(a.reshape(-1, k, *a.shape[1:]), 0, 1), tree)


def _whole_batch(tree: Any) -> Any:
    """Inverts `_microbatches`: [k, B / k, ...] -> [B, ...] in the original row order."""
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1).reshape(-1, *a.shape[2:]), tree)


def drop_labels(
    labels: jax.Array, rng: jax.Array, label_dropout: float, num_classes: int
) -> jax.Array:
    """Replaces each label [B] by the null id `num_classes` with probability `label_dropout`.

    The coins are drawn for the whole (global) batch from `rng`, so they depend on neither the
    device count nor the microbatches.
    """
    if not label_dropout:
        return labels
    dropped = jax.random.bernoulli(rng, label_dropout, labels.shape)
    return jnp.where(dropped, jnp.asarray(num_classes, labels.dtype), labels)


def _loss_and_grads(
    params: Any,
    apply_fn: Callable[..., jax.Array],
    diffusion: diffusion_lib.GaussianDiffusion,
    batch: tuple[jax.Array, ...],
    dropout_rng: jax.Array,
    num_microbatches: int,
) -> tuple[dict[str, jax.Array], Any]:
    """(per-example losses {'loss', 'mse', 'vb'} [B], gradient of the mean weighted loss).

    `batch` is (x_start [B, H, W, C], t [B], noise [B, H, W, C], labels [B] or None for an
    unconditional network, loss weights [B] or None for 1). With k = `num_microbatches`
    > 1, a `lax.scan` runs the network on k slices of B / k examples and averages their
    gradients: the same mean-loss gradient (to float rounding) in the activation memory of one
    slice. Slice i's dropout key is `fold_in(dropout_rng, i)`.
    """

    def mean_loss(params, x_start, t, noise, labels, weights, rng):
        def model_fn(x_t, t):
            return apply_fn({'params': params}, x_t, t, labels, train=True, rngs={'dropout': rng})

        losses = diffusion_lib.training_losses(diffusion, model_fn, x_start, t, noise)
        return jnp.mean(_weighted(losses['loss'], weights)), losses

    value_and_grad = jax.value_and_grad(mean_loss, has_aux=True)
    if num_microbatches == 1:
        (_, losses), grads = value_and_grad(params, *batch, dropout_rng)
        return losses, grads

    def one_slice(grad_sum, inputs):
        index, part = inputs
        (_, losses), grads = value_and_grad(params, *part, jax.random.fold_in(dropout_rng, index))
        return jax.tree.map(jnp.add, grad_sum, grads), losses

    zeros = jax.tree.map(jnp.zeros_like, params)
    slices = (jnp.arange(num_microbatches), _microbatches(batch, num_microbatches))
    grad_sum, losses = jax.lax.scan(one_slice, zeros, slices)
    grads = jax.tree.map(lambda g: g / num_microbatches, grad_sum)
    return _whole_batch(losses), grads


def _weighted(losses: jax.Array, weights: jax.Array | None) -> jax.Array:
    return losses if weights is None else losses * weights


def _step_inputs(batch, step_rng, diffusion, history, num_classes: int, label_dropout: float):
    """((x_start, t, noise, labels or None, weights or None), dropout key): the step's draws.

    Globally shaped draws: every device gets different numbers, and the numbers do not depend
    on how many devices share the batch. t is uniform, or drawn from the loss `history`
    (`timestep_sampling`) with its loss weights.
    """
    x_start = batch['image']
    t_rng, noise_rng, dropout_rng = jax.random.split(step_rng, 3)
    weights = None
    if history is None:
        t = jax.random.randint(t_rng, x_start.shape[:1], 0, diffusion.num_timesteps)
    else:
        t, weights = timestep_sampling.draw(t_rng, history, x_start.shape[0])
    noise = jax.random.normal(noise_rng, x_start.shape, x_start.dtype)
    labels = None
    if num_classes:
        label_rng = jax.random.fold_in(step_rng, _LABEL_DROPOUT_STREAM)
        labels = drop_labels(batch['label'], label_rng, label_dropout, num_classes)
    return (x_start, t, noise, labels, weights), dropout_rng


def _updated(state, grads, ema_decays: tuple[float, ...], t: jax.Array, losses: jax.Array):
    """The state after the optimizer step, the EMAs and (if kept) the timestep loss history.

    `ema_decays` are the rates of `ema_params` and then of each `extra_ema` entry.
    """
    new_state = state.apply_gradients(grads=grads)

    def ema(old, decay):
        return optax.incremental_update(new_state.params, old, 1.0 - decay)

    new_state = new_state.replace(ema_params=ema(state.ema_params, ema_decays[0]))
    if state.extra_ema is not None:
        extra = {f'ema_{i}': ema(state.extra_ema[f'ema_{i}'], ema_decays[i])
                 for i in range(1, len(ema_decays))}  # fmt: skip
        new_state = new_state.replace(extra_ema=extra)
    if state.loss_history is not None:
        history = timestep_sampling.update(state.loss_history, t, losses)
        new_state = new_state.replace(loss_history=history)
    return new_state


def train_step(
    state: train_state_lib.TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    diffusion: diffusion_lib.GaussianDiffusion,
    ema_decay: float,
    learning_rate_fn: optax.Schedule,
    num_microbatches: int = 1,
    num_classes: int = 0,
    label_dropout: float = 0.0,
    ema_decays: tuple[float, ...] = (),
) -> tuple[train_state_lib.TrainState, dict[str, jax.Array]]:
    """One optimizer step on L_simple (or the configured loss).

    Args:
      state: the train state (replicated).
      batch: {'image': [B, H, W, C] float32 in [-1, 1]}, the global batch (sharded), and for a
        class-conditional network 'label': int32 [B] in [0, num_classes).
      rng: the run's base key (replicated); the step's key is `fold_in(rng, state.step)`.
      diffusion: the diffusion.
      ema_decay: EMA decay of the parameters.
      learning_rate_fn: the schedule, for logging the step's learning rate.
      num_microbatches: k slices of B / k examples through the network, gradients averaged,
        one optimizer step (`_loss_and_grads`). t and the noise are drawn for the whole batch
        first, so k changes neither.
      num_classes: K of a class-conditional network (K is its null label); 0: unconditional.
      label_dropout: the probability that a label is replaced by the null label (`drop_labels`,
        coins from the step's key: a resumed run drops the same labels).
      ema_decays: the rates of `state.extra_ema`'s EMAs, in order.

    Returns:
      (new state, metrics): scalar `nonfinite` (1.0 when the loss or a gradient was not finite
      and the update was skipped, else 0.0), `loss`, `mse`, `vb`, `grad_norm` (before clipping),
      `learning_rate`, and `loss_q0`..`loss_q3`, the loss of examples whose t falls in each
      quarter of [0, T) (NaN if a quarter got no example). With `state.loss_history` (the
      loss-second-moment sampler) t is drawn from it, `loss` is weighted by 1 / (T p_t) and the
      history takes the step's losses.
    """
    step_rng = jax.random.fold_in(rng, state.step)
    inputs, dropout_rng = _step_inputs(
        batch, step_rng, diffusion, state.loss_history, num_classes, label_dropout
    )
    losses, grads = _loss_and_grads(
        state.params, state.apply_fn, diffusion, inputs, dropout_rng, num_microbatches
    )
    t, loss = inputs[1], jnp.mean(_weighted(losses['loss'], inputs[4]))
    decays = (ema_decay, *ema_decays)
    new_state = _updated(state, grads, decays, t, losses['loss'])
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


# XLA options of the train step on a CPU (BENCHMARKS.md, the attempts table of issue #20): LLVM's
# optimisation level 1 instead of 3 compiles the digits network's step in about 20 s instead of
# 24 on 2 cores and runs it as fast, with the same numbers (0 runs it 4x slower); XLA:CPU's
# fast-compile preset, which skips its costliest optimisation passes, takes the 10-step call's
# compilation from about 26 s to 17 s, at the same speed and within float32 rounding.
# Accelerators keep XLA's defaults; on a CPU, an option that XLA_FLAGS set keeps their value.
CPU_TRAIN_STEP_COMPILER_OPTIONS = {
    'xla_backend_optimization_level': 1,
    'xla_cpu_opt_preset': 'CPU_OPT_PRESET_FAST_COMPILE',
}


def train_step_compiler_options(mesh: Mesh) -> dict[str, Any] | None:
    """`CPU_TRAIN_STEP_COMPILER_OPTIONS` for a mesh of CPU devices, less those XLA_FLAGS name;
    None (XLA's defaults) on other devices or when XLA_FLAGS name them all."""
    if mesh.devices.flat[0].platform != 'cpu':
        return None
    options = {
        key: value
        for key, value in CPU_TRAIN_STEP_COMPILER_OPTIONS.items()
        if not xla_cpu.xla_flags_name(f'--{key}')
    }
    return options or None


def train_steps(
    state: train_state_lib.TrainState,
    batches: tuple[dict[str, jax.Array], ...],
    rng: jax.Array,
    *,
    step_fn: Callable,
) -> tuple[train_state_lib.TrainState, dict[str, jax.Array]]:
    """`len(batches)` calls of `step_fn(state, batch, rng)` as one `lax.scan`: the same steps.

    Returns:
      (new state, metrics): the last step's metrics, and `nonfinite_steps`, every step's
      `nonfinite` flag ([len(batches)]).
    """
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *batches)  # [k, B, ...]
    state, metrics = jax.lax.scan(lambda s, batch: step_fn(s, batch, rng), state, stacked)
    last = {key: value[-1] for key, value in metrics.items()}
    return state, {**last, 'nonfinite_steps': metrics['nonfinite']}


def steps_per_call(training: ml_collections.ConfigDict) -> int:
    """`training.steps_per_call` reduced to divide each cadence the loop acts on (logging,
    checkpoints, sample grids, evaluation), so that a call of that many steps from a multiple of
    it never passes a step that must log, save, draw or score."""
    cadences = (
        training.log_every_steps,
        training.checkpoint_every_steps,
        training.sample_every_steps,
        training.eval_every_steps,
    )
    return math.gcd(training.steps_per_call, *(every for every in cadences if every))


def make_jit_train_step(config, diffusion, learning_rate_fn, mesh, num_steps: int = 1):
    """`train_step` jitted once with shardings, the state donated, compiled with
    `train_step_compiler_options(mesh)`; with `num_steps` > 1, `train_steps` of that many steps,
    called with a tuple of `num_steps` global batches."""
    step_fn = functools.partial(
        train_step,
        diffusion=diffusion,
        ema_decay=config.optim.ema_decay,
        learning_rate_fn=learning_rate_fn,
        num_microbatches=config.training.num_microbatches,
        num_classes=config.model.num_classes,
        label_dropout=config.training.label_dropout,
        ema_decays=tuple(config.optim.ema_decays),
    )
    if num_steps > 1:
        step_fn = functools.partial(train_steps, step_fn=step_fn)
    replicated = parallel.replicated(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(replicated, parallel.batch_sharding(mesh), replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
        compiler_options=train_step_compiler_options(mesh),
    )


class _Progress:
    """A tqdm bar on an interactive terminal, plain log lines otherwise (CI, files, non-lead)."""

    def __init__(self, start: int, total: int, batch_size: int, *, lead: bool):
        self.interactive = lead and sys.stderr.isatty()
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

    Each call's flags are read one call late, when the next call is already queued, so the
    check does not stall the device pipeline.
    """

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row, self.in_a_row, self.total = max_in_a_row, 0, 0
        self.pending: tuple[int, jax.Array] | None = None

    def check(self, step: int | None, flags: jax.Array | None) -> None:
        """Reads the previous call's flags, then remembers this one's (None: flush).

        Args:
            step: the steps done after this call.
            flags: the `nonfinite` flag of the call's step, or [n] flags of its last n steps.
        """
        previous, self.pending = self.pending, None if step is None else (step, flags)
        if previous is None:
            return
        last, prev_flags = previous
        prev_flags = np.atleast_1d(jax.device_get(prev_flags))
        for done, flag in enumerate(prev_flags, start=last - len(prev_flags) + 1):
            self._count(done, bool(flag))

    def _count(self, done: int, nonfinite: bool) -> None:
        if not nonfinite:
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


class _StepCalls:
    """The loop's compiled calls: `steps_per_call(training)` steps per call from each multiple
    of it, single steps elsewhere (after a resume from another step, and at the end). Each is
    compiled on first use."""

    def __init__(self, exp: experiment.Experiment, mesh: Mesh):
        self.exp, self.mesh = exp, mesh
        training = exp.config.training
        self.per_call, self.total = steps_per_call(training), training.num_train_steps
        if self.per_call != training.steps_per_call:
            logging.info(
                'training.steps_per_call %d -> %d: a divisor of every logging, checkpoint, '
                'sample and eval cadence',
                training.steps_per_call,
                self.per_call,
            )
        self.compiled: dict[int, Callable] = {}

    def size(self, step: int) -> int:
        """The steps of the call that starts after `step` steps."""
        whole = step % self.per_call == 0 and step + self.per_call <= self.total
        return self.per_call if whole else 1

    def __call__(self, state, batches: list, rng: jax.Array):
        """`len(batches)` steps from `state`: (new state, metrics)."""
        n = len(batches)
        if n not in self.compiled:
            if n < self.per_call:
                logging.info(
                    'from step %d, single steps (their own compiled call): a call of '
                    'training.steps_per_call=%d steps starts only on a multiple of it and ends '
                    'by step %d',
                    int(state.step),
                    self.per_call,
                    self.total,
                )
            config, exp = self.exp.config, self.exp
            self.compiled[n] = make_jit_train_step(
                config, exp.diffusion, exp.learning_rate_fn, self.mesh, num_steps=n
            )
        return self.compiled[n](state, batches[0] if n == 1 else tuple(batches), rng)


def _grid_sampler(exp: experiment.Experiment, mesh: Mesh) -> sampling.SampleFn | None:
    """The sampler of the grids written during training (up to 64 images), or None if off.

    The paper's chain whatever `config.sampling` says: ancestral, all T steps.
    """
    config = exp.config
    if not config.training.sample_every_steps:
        return None
    return exp.sampler(
        mesh,
        batch_size=min(config.sampling.num_samples, 64),  # any size: the sampler pads it
        sampler='ancestral',
        num_steps=exp.diffusion.num_timesteps,
    )


def _check_resumable(meta: dict, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a checkpoint made with another network, diffusion or image shape.

    A train state of another shape (`config_lib.STATE_KEYS`) is refused even with
    allow_config_change: it cannot be restored.
    """
    if shape := config_lib.state_changes(meta.get('config', {}), config):
        raise config_lib.ConfigError(
            'the workdir holds checkpoints whose train state has another shape: '
            + '; '.join(shape)
            + ' (use the saved value, or another --workdir)'
        )
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


def _start(
    exp: experiment.Experiment, ckpt: checkpointing.Checkpointer, rng: jax.Array, mesh: Mesh
) -> tuple[train_state_lib.TrainState, Iterator[dict[str, np.ndarray]]]:
    """The initial or resumed state and this process's batches from its step on.

    Nothing is written before the checkpoint and the data are accepted; on any error the
    checkpointer is closed.
    """
    config = exp.config
    try:
        if ckpt.latest_valid_step() is None:
            state = exp.init_state(rng, mesh)
        else:  # restored into the state's shapes: no need to initialise what is overwritten
            _check_resumable(ckpt.restore_meta(), config)
            state, _ = ckpt.restore(exp.restore_target(mesh), set_aside_failed=True)
            logging.info('resumed from step %d', int(state.step))
        local_batches = input_pipeline.train_iterator(
            config.data,
            global_batch_size=config.training.batch_size,
            seed=config.training.seed,
            start_step=int(state.step),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            num_classes=config.model.num_classes,
        )
    except BaseException:
        ckpt.close()
        raise
    return state, local_batches


@dataclasses.dataclass
class _Run:
    """The loop's fixed parts: what each step reports, saves and draws, and where."""

    config: ml_collections.ConfigDict
    workdir: str
    ckpt: checkpointing.Checkpointer
    files: lead.LeadWriter
    events: summary.SummaryWriter | None
    progress: _Progress
    sample_fn: sampling.SampleFn | None
    sample_rng: jax.Array
    last_saved: int
    evaluator: train_eval.Evaluator | None = None
    config_written: bool = False

    def write_config(self) -> None:
        """`config.json` (and a conditional run's `classes.json`), once per run: after its first
        step ran (an out-of-memory batch size fails that step and leaves the old file)."""
        if not self.config_written:
            self.files.json(os.path.join(self.workdir, 'config.json'), self.config.to_dict())
            self.config_written = True
            if self.config.model.num_classes and self.files.is_lead:
                names = input_pipeline.class_names(self.config.data, self.config.data.train_split)
                if names is not None:
                    self.files.json(os.path.join(self.workdir, CLASSES_FILE), names)

    def after_step(self, done: int, state, metrics: dict[str, jax.Array]) -> None:
        """Logs, checkpoints and samples as the config asks after step `done`."""
        training = self.config.training
        if not self.config_written:
            jax.block_until_ready(metrics)  # the first step really ran
            self.write_config()
        if done % training.log_every_steps == 0 or done == training.num_train_steps:
            scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
            scalars.update(self.progress.update(done, scalars))
            if self.events is not None:
                self.events.write_scalars(done, scalars)
        else:
            self.progress.update(done, None)
        # Asking orbax costs ~30 ms even when it declines, so only ask when it is due.
        due = done % training.checkpoint_every_steps == 0
        if due and self.ckpt.save(done, state, meta=self.meta(done)):
            self.last_saved = done
        if self.sample_fn and done % training.sample_every_steps == 0:
            self.write_samples(done, state)
        if self.evaluator is not None and self.evaluator.due(done):
            scores = self.evaluator(done, state)
            if self.events is not None:
                self.events.write_scalars(done, {f'eval/{k}': v for k, v in scores.items()})

    def finish(self, state) -> None:
        """Saves the last step unless it is saved; draws the final grid unless it is drawn."""
        final, training = int(state.step), self.config.training
        self.write_config()
        if final != self.last_saved:
            self.ckpt.save(final, state, meta=self.meta(final), force=True)
        every = training.sample_every_steps  # 0 (no grids) leaves sample_fn None
        if self.sample_fn and final == training.num_train_steps and final % every:
            self.write_samples(final, state)

    def meta(self, step: int) -> dict:
        """A checkpoint's JSON: the config, and the step, which its directory name must match."""
        return {'config': self.config.to_dict(), 'step': step}

    def write_samples(self, step: int, state) -> None:
        """Samples with the EMA parameters; the lead writes a PNG grid and a TensorBoard image."""
        rng = jax.random.fold_in(self.sample_rng, step)
        images = image_io.to_uint8(parallel.to_host(self.sample_fn(state.ema_params, rng)))
        path = os.path.join(self.workdir, 'samples', f'grid_{step:08d}.png')
        images, ncol = generate.grid_layout(self.config, images)  # a row per class if conditional
        grid = self.files.grid(path, images, ncol=ncol)
        if grid is not None:  # the lead
            self.events.write_images(step, {'samples': grid[None]})
            logging.info('step %d: wrote %s', step, path)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None
) -> train_state_lib.TrainState:
    """Trains (or resumes) the model described by `config`, writing everything under `workdir`.

    Writes `config.json`, TensorBoard scalars, checkpoints under `checkpoints/` and sample grids
    under `samples/` (from the lead process). `mesh`: the devices to train on; None: every
    device of every process. Returns the final state.

    One training at a time per workdir: the run holds `WORKDIR/train.lock` (`workdir_lock`),
    and a second one refuses with `workdir_lock.WorkdirLockedError`.
    """
    mesh = parallel.create_mesh() if mesh is None else mesh
    with workdir_lock.hold(workdir):
        return _train(config, workdir, mesh)


def _train(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh):
    """`train_and_evaluate` inside the workdir's lock."""
    training = config.training
    parallel.check_batch_size(training.batch_size, mesh.size, 'config.training.batch_size')
    init_rng, train_rng, sample_rng = jax.random.split(jax.random.key(training.seed), 3)
    exp = experiment.build(config)
    logging.info('model: %s parameters; %d devices', f'{exp.num_params:,}', mesh.size)
    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, 'checkpoints'),
        keep=training.keep_checkpoints,
        save_every_steps=training.checkpoint_every_steps,
    )
    state, local_batches = _start(exp, ckpt, init_rng, mesh)
    start_step, files = int(state.step), lead.LeadWriter()
    batches = parallel.prefetch_to_mesh(local_batches, mesh)
    calls = _StepCalls(exp, mesh)
    progress = _Progress(
        start_step, training.num_train_steps, training.batch_size, lead=files.is_lead
    )
    run = _Run(config, workdir, ckpt, files, files.summary(workdir), progress,
               _grid_sampler(exp, mesh), sample_rng, last_saved=start_step)  # fmt: skip
    try:
        if training.eval_every_steps:
            run.evaluator = train_eval.Evaluator(exp, mesh, workdir)
        with preemption.PreemptionGuard() as guard:
            nonfinite = _NonFiniteSteps(training.max_nonfinite_steps)
            step = start_step
            while step < training.num_train_steps:
                n = calls.size(step)
                state, metrics = calls(state, [next(batches) for _ in range(n)], train_rng)
                step += n
                nonfinite.check(step, metrics.pop('nonfinite_steps', metrics['nonfinite']))
                run.after_step(step, state, metrics)
                if guard.should_stop(step):
                    logging.warning('preemption requested: saving step %d and stopping', step)
                    break
            nonfinite.check(None, None)  # the last step's flag
            run.finish(state)
    finally:
        progress.close()
        if run.events is not None:
            run.events.close()
        if run.evaluator is not None:
            run.evaluator.close()
        ckpt.close()
    logging.info('finished at step %d; workdir %s', int(state.step), workdir)
    return state
