"""Importance-sampled timesteps: Improved DDPM's loss-second-moment sampler (section 3.3).

L_vlb's terms differ by orders of magnitude across t, so drawing t uniformly makes its gradient
noisy. Nichol & Dhariwal 2021 draw t with probability p_t proportional to sqrt(E[L_t^2]) and
weight each example's loss by 1 / (T p_t), which keeps the objective's expectation:

* the history keeps the last `HISTORY_PER_TERM` losses of every t;
* until every t has that many, t is uniform (and every weight 1);
* then p_t = (1 - `UNIFORM_PROB`) sqrt(mean of L_t^2) / sum + `UNIFORM_PROB` / T.

The history is part of the train state (`TrainState.loss_history`), so checkpoints and exact
resume hold. It is updated with the unweighted losses of the whole global batch, in batch order
(`update`), so it does not depend on the device or host count: under `jit` the batch is one
global array and its losses are gathered from every device.
"""

import jax
import jax.numpy as jnp

HISTORY_PER_TERM = 10
UNIFORM_PROB = 0.001

# {'losses': float32 [T, HISTORY_PER_TERM], 'counts': int32 [T]}
History = dict[str, jax.Array]


def init_history(num_timesteps: int) -> History:
    """An empty history: no loss seen for any t."""
    return {
        'losses': jnp.zeros((num_timesteps, HISTORY_PER_TERM), jnp.float32),
        'counts': jnp.zeros((num_timesteps,), jnp.int32),
    }


def probabilities(history: History) -> jax.Array:
    """p [T]: uniform until every t has a full history, then the loss-second-moment rule."""
    losses, counts = history['losses'], history['counts']
    num_timesteps = counts.shape[0]
    warm = jnp.all(counts == HISTORY_PER_TERM)
    rms = jnp.sqrt(jnp.mean(jnp.square(losses), axis=1))
    p = rms / jnp.maximum(jnp.sum(rms), jnp.finfo(jnp.float32).tiny)
    p = p * (1.0 - UNIFORM_PROB) + UNIFORM_PROB / num_timesteps
    return jnp.where(warm, p, 1.0 / num_timesteps)


def draw(rng: jax.Array, history: History, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """(t int32 [B] drawn from `probabilities`, the loss weights 1 / (T p_t) [B])."""
    p = probabilities(history)
    t = jax.random.categorical(rng, jnp.log(p), shape=(batch_size,)).astype(jnp.int32)
    return t, 1.0 / (p.shape[0] * p[t])


def update(history: History, t: jax.Array, losses: jax.Array) -> History:
    """The history after the per-example losses [B] at timesteps t [B], taken in batch order.

    A t whose history is full drops its oldest loss; otherwise the loss fills the next slot.
    """

    def one(h, example):
        ti, loss = example
        count, row = h['counts'][ti], h['losses'][ti]
        shifted = jnp.concatenate([row[1:], loss[None]])
        filled = row.at[jnp.minimum(count, HISTORY_PER_TERM - 1)].set(loss)
        row = jnp.where(count == HISTORY_PER_TERM, shifted, filled)
        counts = h['counts'].at[ti].set(jnp.minimum(count + 1, HISTORY_PER_TERM))
        return {'losses': h['losses'].at[ti].set(row), 'counts': counts}, None

    return jax.lax.scan(one, history, (t, losses.astype(jnp.float32)))[0]
