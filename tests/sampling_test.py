"""Samplers against independent references: a NumPy loop of Algorithm 2, oracle models whose
exact answer is known, and Tweedie's formula for the score."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import sampling, schedules

SHAPE = (4, 4, 1)


def _diffusion(num_timesteps=40, mean_type='eps', var_type='fixedlarge'):
    betas = schedules.get_beta_schedule('linear', num_timesteps, beta_end=0.2)
    loss = 'hybrid' if var_type.startswith('learned') else 'mse'
    return diffusion_lib.GaussianDiffusion.create(betas, mean_type, var_type, loss)


def _alpha_bar(num_timesteps=40):
    return np.cumprod(1 - np.linspace(1e-4, 0.2, num_timesteps))


class ScaleModel(nn.Module):
    """eps = w * x: one parameter, deliberately not a good model."""

    @nn.compact
    def __call__(self, x, t, *, train):
        del t, train
        return x * self.param('w', nn.initializers.constant(0.3), ())


class OracleModel(nn.Module):
    """The exact eps for data that is a single point c: eps = (x_t - sqrt(ab) c) / sqrt(1 - ab)."""

    alpha_bar: tuple
    point: float

    @nn.compact
    def __call__(self, x, t, *, train):
        del train
        ab = jnp.asarray(self.alpha_bar, jnp.float32)[t][:, None, None, None]
        return (x - jnp.sqrt(ab) * self.point) / jnp.sqrt(1 - ab)


def _keys_noise(rng, index, step):
    """The documented key scheme: image i, step s draws from fold_in(fold_in(rng, i), s)."""
    k = jax.random.fold_in(jax.random.fold_in(rng, index), step)
    return np.asarray(jax.random.normal(k, SHAPE), np.float64)


class AncestralTest(parameterized.TestCase):
    def test_ancestral_matches_a_numpy_loop_of_algorithm_2(self):
        num_t, batch = 40, 3
        d = _diffusion(num_t)
        ab = _alpha_bar(num_t)
        betas = np.linspace(1e-4, 0.2, num_t)
        sample_fn = sampling.make_sample_fn(
            ScaleModel(), d, batch_size=batch, image_shape=SHAPE, clip_denoised=False
        )
        rng = jax.random.PRNGKey(7)
        got = np.asarray(sample_fn({'w': jnp.float32(0.3)}, rng))
        for i in range(batch):
            x = _keys_noise(rng, i, 0)
            for t in reversed(range(num_t)):
                eps = 0.3 * x
                alpha = 1 - betas[t]
                mean = (x - betas[t] / math.sqrt(1 - ab[t]) * eps) / math.sqrt(alpha)
                sigma = math.sqrt(betas[t]) if t > 0 else 0.0  # fixedlarge; no noise at t=0
                x = mean + sigma * _keys_noise(rng, i, t + 1)
            np.testing.assert_allclose(got[i], x, rtol=1e-4, atol=1e-4)

    @parameterized.parameters(
        ('ancestral', None, 0.0), ('ancestral', 7, 0.0), ('ddim', 10, 0.0), ('ddim', 10, 1.0)
    )
    def test_an_oracle_model_recovers_the_single_data_point(self, sampler, num_steps, eta):
        d = _diffusion(40)
        model = OracleModel(tuple(_alpha_bar(40)), 0.42)
        sample_fn = sampling.make_sample_fn(
            model,
            d,
            batch_size=2,
            image_shape=SHAPE,
            sampler=sampler,
            num_steps=num_steps,
            eta=eta,
        )
        np.testing.assert_allclose(sample_fn({}, jax.random.PRNGKey(0)), 0.42, atol=1e-4)

    def test_image_i_depends_only_on_the_key_and_its_index(self):
        d = _diffusion(10)
        params = {'w': jnp.float32(0.3)}
        rng = jax.random.PRNGKey(3)
        big = sampling.make_sample_fn(ScaleModel(), d, batch_size=6, image_shape=SHAPE)
        small = sampling.make_sample_fn(ScaleModel(), d, batch_size=3, image_shape=SHAPE)
        all_six = big(params, rng)
        np.testing.assert_array_equal(small(params, rng, 0), all_six[:3])
        np.testing.assert_array_equal(small(params, rng, 3), all_six[3:])
        self.assertFalse(np.allclose(small(params, jax.random.PRNGKey(4)), all_six[:3]))

    def test_sampler_compiles_once_and_its_program_does_not_grow_with_t(self):
        sizes = []
        for num_t in (10, 200):
            d = _diffusion(num_t)
            sample_fn = sampling.make_sample_fn(ScaleModel(), d, batch_size=2, image_shape=SHAPE)
            jaxpr = jax.make_jaxpr(sample_fn)({'w': jnp.float32(0.3)}, jax.random.PRNGKey(0))
            sizes.append(len(str(jaxpr)))
            self.assertIn('scan', str(jaxpr))
        # Only the embedded schedule constants differ in length, not the number of steps traced.
        self.assertLess(abs(sizes[1] - sizes[0]) / sizes[0], 0.05)

        d = _diffusion(10)
        traced = chex.assert_max_traces(n=1)(
            lambda x, t: ScaleModel().apply({'params': {'w': 0.3}}, x, t, train=False)
        )

        class Counted(nn.Module):
            @nn.compact
            def __call__(self, x, t, *, train):
                return traced(x, t)

        sample_fn = sampling.make_sample_fn(Counted(), d, batch_size=2, image_shape=SHAPE)
        sample_fn({}, jax.random.PRNGKey(0)).block_until_ready()
        sample_fn({}, jax.random.PRNGKey(1)).block_until_ready()  # no second trace

    def test_trajectory_ends_at_the_returned_images(self):
        d = _diffusion(30)
        model = OracleModel(tuple(_alpha_bar(30)), -0.3)
        sample_fn = sampling.make_sample_fn(
            model, d, batch_size=2, image_shape=SHAPE, return_trajectory=True
        )
        images, trajectory = sample_fn({}, jax.random.PRNGKey(0))
        self.assertEqual(trajectory.shape, (2, sampling.NUM_TRAJECTORY_FRAMES, *SHAPE))
        np.testing.assert_allclose(trajectory[:, -1], images, atol=1e-6)
        self.assertTrue(bool(jnp.all(jnp.abs(trajectory) <= 1.0)))

    def test_unknown_sampler_names_the_choices(self):
        with self.assertRaisesRegex(ValueError, r"unknown sampler 'euler'.*'ancestral', 'ddim'"):
            sampling.make_sample_fn(
                ScaleModel(), _diffusion(10), batch_size=1, image_shape=SHAPE, sampler='euler'
            )


class RespacingTest(parameterized.TestCase):
    def test_spaced_timesteps_span_0_to_t_minus_1_without_repeats(self):
        for n in (1, 2, 7, 50, 1000):
            ts = sampling.spaced_timesteps(1000, n)
            self.assertLen(np.unique(ts), n)
            self.assertEqual(ts[-1], 999)
            if n > 1:
                self.assertEqual(ts[0], 0)

    def test_respaced_alpha_bar_equals_the_original_on_the_kept_steps(self):
        d = _diffusion(100)
        ts = sampling.spaced_timesteps(100, 9)
        respaced = sampling.respace(d, ts)
        np.testing.assert_allclose(respaced.alphas_cumprod, _alpha_bar(100)[ts], rtol=1e-5)

    def test_num_steps_beyond_t_is_refused(self):
        with self.assertRaisesRegex(ValueError, r'num_steps must be in \[1, 10\]'):
            sampling.make_sample_fn(
                ScaleModel(), _diffusion(10), batch_size=1, image_shape=SHAPE, num_steps=11
            )


class ScoreTest(parameterized.TestCase):
    @parameterized.parameters('eps', 'xstart')
    def test_score_of_gaussian_data_matches_the_analytic_score(self, mean_type):
        # Data ~ N(0, s^2): q(x_t) = N(0, ab s^2 + 1 - ab), so the score is -x / (ab s^2 + 1 - ab).
        s2 = 0.25
        ab_table = _alpha_bar(40)

        class Optimal(nn.Module):
            @nn.compact
            def __call__(self, x, t, *, train):
                ab = jnp.asarray(ab_table, jnp.float32)[t][:, None, None, None]
                var = ab * s2 + 1 - ab
                if mean_type == 'eps':
                    return jnp.sqrt(1 - ab) * x / var
                return jnp.sqrt(ab) * s2 * x / var  # Tweedie: E[x_0 | x_t]

        d = _diffusion(40, mean_type=mean_type)
        score_fn = sampling.make_score_fn(Optimal(), d)
        x = jnp.asarray(np.random.default_rng(0).normal(size=(3, *SHAPE)), jnp.float32)
        # eps from x_0 at t=0 subtracts two nearly equal numbers (ab = 0.9999): float32 keeps
        # only ~3 digits there, so the x_0 parameterisation is checked from t=3 on.
        steps = np.array([0, 17, 39]) if mean_type == 'eps' else np.array([3, 17, 39])
        t = jnp.asarray(steps)
        ab = ab_table[steps][:, None, None, None]
        expected = -np.asarray(x) / (ab * s2 + 1 - ab)
        np.testing.assert_allclose(score_fn({}, x, t), expected, rtol=1e-4, atol=1e-5)


if __name__ == '__main__':
    absltest.main()
