"""The loss-second-moment timestep sampler against a NumPy statement of Improved DDPM's rule,
and in the train step: its history is train state, resumes exactly and is the same on 8 devices."""

import tempfile

import fast_compile
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest

from diffusion_jax import config_lib, timestep_sampling, train

K, U = 10, 0.001  # the paper's history length and uniform mixture, restated


class NumpyLossSecondMoment:
    """Improved DDPM section 3.3, written out with Python loops over examples."""

    def __init__(self, num_timesteps):
        self.history = np.zeros((num_timesteps, K))
        self.counts = np.zeros(num_timesteps, int)

    def probabilities(self):
        num_timesteps = len(self.counts)
        if not (self.counts == K).all():
            return np.full(num_timesteps, 1.0 / num_timesteps)
        w = np.sqrt(np.mean(self.history**2, axis=1))
        w = w / w.sum()
        return w * (1 - U) + U / num_timesteps

    def update(self, ts, losses):
        for t, loss in zip(ts, losses, strict=True):
            if self.counts[t] == K:
                self.history[t] = np.append(self.history[t, 1:], loss)
            else:
                self.history[t, self.counts[t]] = loss
                self.counts[t] += 1


class RuleTest(absltest.TestCase):
    def test_history_and_probabilities_follow_the_numpy_rule(self):
        rng = np.random.default_rng(0)
        ours, reference = timestep_sampling.init_history(6), NumpyLossSecondMoment(6)
        update = jax.jit(timestep_sampling.update)
        for step in range(30):  # repeated t in a batch, and histories that overflow
            ts = rng.integers(0, 6, 8)
            losses = rng.exponential(1.0 + np.arange(6)[ts])
            ours = update(ours, jnp.asarray(ts, jnp.int32), jnp.asarray(losses, jnp.float32))
            reference.update(ts, losses)
            np.testing.assert_array_equal(ours['counts'], reference.counts)
            np.testing.assert_allclose(ours['losses'], reference.history, rtol=1e-6)
            p = timestep_sampling.probabilities(ours)
            np.testing.assert_allclose(p, reference.probabilities(), rtol=1e-5)
            if step == 2:
                self.assertFalse((reference.counts == K).all())  # still uniform here
        self.assertTrue((reference.counts == K).all())  # and warm by the end
        self.assertGreater(float(p[5] / p[0]), 2.0)  # larger losses are drawn more often

    def test_draws_follow_p_and_weigh_by_one_over_t_p(self):
        history = {
            'losses': jnp.tile(jnp.asarray([1.0, 2.0, 4.0, 8.0])[:, None], (1, K)),
            'counts': jnp.full(4, K, jnp.int32),
        }
        p = np.array([1.0, 2.0, 4.0, 8.0]) / 15 * (1 - U) + U / 4
        t, weights = timestep_sampling.draw(jax.random.key(0), history, 200_000)
        t = np.asarray(t)
        frequency = np.bincount(t, minlength=4) / len(t)
        sigma = np.sqrt(p * (1 - p) / len(t))
        self.assertTrue(np.all(np.abs(frequency - p) < 5 * sigma), (frequency, p))
        np.testing.assert_allclose(weights, 1.0 / (4 * p[t]), rtol=1e-6)
        # The weights keep the expectation: E_p[w L] = mean_t L_t.
        losses = np.array([1.0, 2.0, 4.0, 8.0])
        self.assertAlmostEqual(float(np.mean(weights * losses[t])), losses.mean(), delta=0.05)


def _config(**overrides):
    from train_test import tiny_config

    config = tiny_config(num_train_steps=4, batch_size=16)
    config.diffusion.num_timesteps = 4  # every t warm within a few steps of 16 examples
    config.diffusion.loss_type = 'kl'
    config.training.t_sampler = 'loss_second_moment'
    for key, value in overrides.items():
        setattr(config.training, key, value)
    return config


@pytest.mark.slow  # trains three short runs
class TrainStepTest(absltest.TestCase):
    def test_the_history_is_train_state_that_resumes_exactly(self):
        from train_test import straight_and_resumed

        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            straight, resumed = straight_and_resumed(_config, a, b)
            uniform = _config(t_sampler='uniform', num_train_steps=8)
            with self.assertRaisesRegex(config_lib.ConfigError, "t_sampler: checkpoint 'loss_"):
                train.train_and_evaluate(uniform, b)
        history = straight.loss_history
        np.testing.assert_array_equal(history['counts'], [K] * 4)  # 96 examples over T=4
        for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
            np.testing.assert_array_equal(x, y)


_EIGHT_DEVICES = """
import jax, numpy as np, sys
sys.path.insert(0, 'tests')
from timestep_sampling_test import _config
from diffusion_jax import experiment, parallel, train
config = _config()
exp = experiment.build(config)
batch = {'image': np.random.default_rng(0).uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32)}
out = []
for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.create_mesh(devices)
    state = exp.init_state(jax.random.key(0), mesh)
    step = train.make_jit_train_step(config, exp.diffusion, exp.learning_rate_fn, mesh)
    for _ in range(5):
        state, metrics = step(state, jax.device_put(batch, parallel.batch_sharding(mesh)),
                              jax.random.key(1))
    out.append(jax.device_get(state.loss_history))
np.testing.assert_array_equal(out[0]['counts'], out[1]['counts'])
np.testing.assert_allclose(out[0]['losses'], out[1]['losses'], rtol=1e-4, atol=1e-6)
assert (out[0]['counts'] == 10).all()
print('MATCH')
"""


@pytest.mark.slow  # 8 CPU devices need a fresh process
class ShardedTest(absltest.TestCase):
    def test_eight_devices_keep_the_history_of_one(self):
        proc = fast_compile.run_on_devices(_EIGHT_DEVICES, 8)
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertIn('MATCH', proc.stdout)


if __name__ == '__main__':
    absltest.main()
