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
from diffusion_jax import parallel, sampling, schedules

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


def _scan_lengths(jaxpr) -> list[int]:
    """The `length` of every scan in a jaxpr, nested ones included (pjit bodies, scan bodies)."""
    lengths = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'scan':
            lengths.append(eqn.params['length'])
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, 'jaxpr', sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, 'eqns'):
                    lengths.extend(_scan_lengths(inner))
    return lengths


class AncestralTest(parameterized.TestCase):
    def test_ancestral_matches_a_numpy_loop_of_algorithm_2(self):
        num_t, batch = 40, 3
        d = _diffusion(num_t)
        ab = _alpha_bar(num_t)
        betas = np.linspace(1e-4, 0.2, num_t)
        sample_fn = sampling.make_sample_fn(
            ScaleModel(), d, batch_size=batch, image_shape=SHAPE, clip_denoised=False
        )
        rng = jax.random.key(7)
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
        np.testing.assert_allclose(sample_fn({}, jax.random.key(0)), 0.42, atol=1e-4)

    def test_image_i_depends_only_on_the_key_and_its_index(self):
        d = _diffusion(10)
        params = {'w': jnp.float32(0.3)}
        rng = jax.random.key(3)
        big = sampling.make_sample_fn(ScaleModel(), d, batch_size=6, image_shape=SHAPE)
        small = sampling.make_sample_fn(ScaleModel(), d, batch_size=3, image_shape=SHAPE)
        all_six = big(params, rng)
        np.testing.assert_array_equal(small(params, rng, 0), all_six[:3])
        np.testing.assert_array_equal(small(params, rng, 3), all_six[3:])
        self.assertFalse(np.allclose(small(params, jax.random.key(4)), all_six[:3]))

    def test_sampler_compiles_once_and_its_program_does_not_grow_with_t(self):
        sizes = []
        for num_t in (10, 200):
            d = _diffusion(num_t)
            sample_fn = sampling.make_sample_fn(ScaleModel(), d, batch_size=2, image_shape=SHAPE)
            jaxpr = jax.make_jaxpr(sample_fn)({'w': jnp.float32(0.3)}, jax.random.key(0))
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
        sample_fn({}, jax.random.key(0)).block_until_ready()
        sample_fn({}, jax.random.key(1)).block_until_ready()  # no second trace

    def test_ddim_with_eta_0_is_a_deterministic_map_of_x_t(self):
        # DDIM eq. 12 with sigma = 0, in NumPy float64 on the kept steps: only x_T is random.
        num_t, num_steps, batch = 40, 8, 2
        d = _diffusion(num_t)
        ab = _alpha_bar(num_t)
        ts = sampling.spaced_timesteps(num_t, num_steps)
        sample_fn = sampling.make_sample_fn(
            ScaleModel(),
            d,
            batch_size=batch,
            image_shape=SHAPE,
            sampler='ddim',
            num_steps=num_steps,
            eta=0.0,
            clip_denoised=False,
        )
        rng = jax.random.key(11)
        params = {'w': jnp.float32(0.3)}
        got = np.asarray(sample_fn(params, rng))
        np.testing.assert_array_equal(got, sample_fn(params, rng))
        for i in range(batch):
            x = _keys_noise(rng, i, 0)
            for k in reversed(range(num_steps)):
                a, a_prev = ab[ts[k]], (ab[ts[k - 1]] if k > 0 else 1.0)
                eps = 0.3 * x
                x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
                x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
            np.testing.assert_allclose(got[i], x, rtol=1e-4, atol=1e-4)

    def test_ddim_with_eta_1_over_all_steps_is_ancestral_sampling_with_the_posterior_variance(
        self,
    ):
        # Song et al. 2021: eta = 1 makes DDIM's update the DDPM posterior step with
        # sigma^2 = beta_tilde. Both samplers draw z from the same keys, so they agree path by
        # path, not only in distribution.
        d_small = _diffusion(40, var_type='fixedsmall')
        model = ScaleModel()
        kwargs = dict(batch_size=64, image_shape=SHAPE)
        ddim = sampling.make_sample_fn(model, d_small, sampler='ddim', eta=1.0, **kwargs)
        ancestral = sampling.make_sample_fn(model, d_small, sampler='ancestral', **kwargs)
        params, rng = {'w': jnp.float32(0.3)}, jax.random.key(2)
        a, b = np.asarray(ancestral(params, rng)), np.asarray(ddim(params, rng))
        np.testing.assert_allclose(b, a, atol=1e-4)
        # And in distribution over fresh noise: equal mean and spread across 64 x 16 pixels.
        c = np.asarray(ddim(params, jax.random.key(3)))
        self.assertLess(abs(c.mean() - a.mean()), 4 * a.std() / math.sqrt(a.size))
        self.assertLess(abs(c.std() / a.std() - 1), 0.1)

    @parameterized.parameters(('ancestral', None, 40), ('ancestral', 7, 7), ('ddim', 10, 10))
    def test_the_program_is_one_scan_over_all_steps(self, sampler, num_steps, length):
        sample_fn = sampling.make_sample_fn(
            ScaleModel(),
            _diffusion(40),
            batch_size=2,
            image_shape=SHAPE,
            sampler=sampler,
            num_steps=num_steps,
        )
        jaxpr = jax.make_jaxpr(sample_fn)({'w': jnp.float32(0.3)}, jax.random.key(0))
        scans = _scan_lengths(jaxpr.jaxpr)
        self.assertEqual(scans, [length])  # one scan, no Python loop unrolled around it

    def test_trajectory_ends_at_the_returned_images(self):
        d = _diffusion(30)
        model = OracleModel(tuple(_alpha_bar(30)), -0.3)
        sample_fn = sampling.make_sample_fn(
            model, d, batch_size=2, image_shape=SHAPE, return_trajectory=True
        )
        images, trajectory = sample_fn({}, jax.random.key(0))
        self.assertEqual(trajectory.shape, (2, sampling.NUM_TRAJECTORY_FRAMES, *SHAPE))
        np.testing.assert_allclose(trajectory[:, -1], images, atol=1e-6)
        self.assertTrue(bool(jnp.all(jnp.abs(trajectory) <= 1.0)))

    def test_unknown_sampler_names_the_choices(self):
        with self.assertRaisesRegex(ValueError, r"unknown sampler 'euler'.*'ancestral', 'ddim'"):
            sampling.make_sample_fn(
                ScaleModel(), _diffusion(10), batch_size=1, image_shape=SHAPE, sampler='euler'
            )


class SamplerTest(parameterized.TestCase):
    def test_compiled_ahead_of_time_and_padded_it_draws_the_same_images(self):
        params, rng = {'w': jnp.float32(0.3)}, jax.random.key(6)
        sampler = sampling.make_sample_fn(
            ScaleModel(),
            _diffusion(10),
            batch_size=3,
            image_shape=SHAPE,
            mesh=parallel.create_mesh(),
        )
        images = sampler(params, rng, 2)
        self.assertEqual(images.shape, (3, *SHAPE))
        compiled = sampler.lower(params, rng, 2).compile()
        np.testing.assert_array_equal(compiled(params, rng, np.int32(2)), images)
        # Abstract arguments, as for a device this host lacks (benchmarks.gpu_compile).
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, rng))
        index = jax.ShapeDtypeStruct((), jnp.int32)
        compiled = sampler.lower(*abstract, index).compile()
        np.testing.assert_array_equal(compiled(params, rng, np.int32(2)), images)
        padded, real = sampler.sample_padded(params, rng, 2)
        devices = jax.device_count()
        self.assertEqual(real, 3)
        self.assertEqual(padded.shape, (-(-3 // devices) * devices, *SHAPE))
        self.assertEqual(padded.sharding, parallel.batch_sharding(sampler.mesh))
        np.testing.assert_array_equal(padded[:3], images)


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

    @parameterized.parameters('cosine', 'linear')
    def test_respacing_starts_from_the_float64_betas(self, schedule):
        # Improved DDPM's cosine at T=4000: alpha_bar from float32-rounded betas drifts by
        # ~1e-5 relative over the chain; from the float64 betas only the final cast remains.
        betas = schedules.get_beta_schedule(schedule, 4000)
        d = diffusion_lib.GaussianDiffusion.create(betas)
        ts = sampling.spaced_timesteps(4000, 100)
        want = np.cumprod(1.0 - betas)[ts]  # float64, independent of the tables
        got = np.asarray(sampling.respace(d, ts).alphas_cumprod, np.float64)
        np.testing.assert_allclose(got, want, rtol=2e-7)  # float32's half ulp is 6e-8

    def test_section_strings_respace_by_improved_ddpms_rule(self):
        d, params, rng = _diffusion(50), {'w': jnp.float32(0.3)}, jax.random.key(1)

        def draw(**kwargs):
            fn = sampling.make_sample_fn(ScaleModel(), d, batch_size=2, image_shape=SHAPE, **kwargs)
            return np.asarray(fn(params, rng))

        as_string = draw(num_steps='25')
        np.testing.assert_array_equal(as_string, draw(num_steps=25, spacing='iddpm'))
        np.testing.assert_array_equal(as_string, draw(num_steps=(25,)))
        # The two rules keep different steps (24 or 25) for T=50: the chains differ.
        self.assertGreater(np.abs(as_string - draw(num_steps=25)).max(), 1e-6)
        # For T=50 and 10 steps they keep the same ones: the same chain.
        np.testing.assert_array_equal(draw(num_steps='10'), draw(num_steps=10))
        self.assertEqual(draw(num_steps='ddim5', sampler='ddim').shape, (2, *SHAPE))

    def test_num_steps_beyond_t_is_refused(self):
        with self.assertRaisesRegex(ValueError, r'num_steps must be in \[1, 10\]'):
            sampling.make_sample_fn(
                ScaleModel(), _diffusion(10), batch_size=1, image_shape=SHAPE, num_steps=11
            )


class InterpolationTest(parameterized.TestCase):
    def test_interpolation_matches_a_numpy_loop_of_section_6_3(self):
        num_t, t_start, num_lambdas = 40, 25, 5
        d = _diffusion(num_t)
        ab = _alpha_bar(num_t)
        betas = np.linspace(1e-4, 0.2, num_t)
        interpolate_fn = sampling.make_interpolate_fn(
            ScaleModel(),
            d,
            image_shape=SHAPE,
            t=t_start,
            num_lambdas=num_lambdas,
            clip_denoised=False,
        )
        gen = np.random.default_rng(0)
        a, b = (gen.uniform(-1, 1, SHAPE).astype(np.float32) for _ in range(2))
        rng = jax.random.key(3)
        got = np.asarray(interpolate_fn({'w': jnp.float32(0.3)}, a, b, rng))
        self.assertEqual(got.shape, (num_lambdas, *SHAPE))
        # The documented draws: the encoder noise from split(rng)[0], shared by both sources;
        # the reverse noise of step t from fold_in(split(rng)[1], t), shared across lambda.
        enc_rng, dec_rng = jax.random.split(rng)
        noise = np.asarray(jax.random.normal(enc_rng, (1, *SHAPE)), np.float64)[0]
        s_ab, s_1mab = math.sqrt(ab[t_start]), math.sqrt(1 - ab[t_start])
        for j, lam in enumerate(np.linspace(0, 1, num_lambdas)):
            x_a, x_b = s_ab * a + s_1mab * noise, s_ab * b + s_1mab * noise
            x = (1 - lam) * x_a + lam * x_b
            for t in reversed(range(t_start + 1)):
                eps = 0.3 * x
                mean = (x - betas[t] / math.sqrt(1 - ab[t]) * eps) / math.sqrt(1 - betas[t])
                z = np.asarray(jax.random.normal(jax.random.fold_in(dec_rng, t), SHAPE))
                x = mean + (math.sqrt(betas[t]) if t > 0 else 0.0) * z
            np.testing.assert_allclose(got[j], x, rtol=1e-4, atol=1e-4)

    def test_an_oracle_model_reconstructs_both_ends(self):
        # With every training image equal to c, the chain returns c whatever it starts from.
        d = _diffusion(40)
        model = OracleModel(tuple(_alpha_bar(40)), -0.25)
        interpolate_fn = sampling.make_interpolate_fn(model, d, image_shape=SHAPE, t=30)
        out = interpolate_fn({}, jnp.full(SHAPE, -0.25), jnp.full(SHAPE, 0.9), jax.random.key(0))
        np.testing.assert_allclose(out, -0.25, atol=1e-4)

    def test_a_step_outside_the_chain_is_refused(self):
        with self.assertRaisesRegex(ValueError, r'interpolation step t must be in \[0, 10\)'):
            sampling.make_interpolate_fn(ScaleModel(), _diffusion(10), image_shape=SHAPE, t=10)


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
