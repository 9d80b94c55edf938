"""The diffusion math of Ho et al. 2020, with the learned variances of Nichol & Dhariwal 2021.

What is checked, by the equation it comes from:

- forward process: q(x_t | x_{t-1}) (Ho et al. eq. 2) and its closed form q(x_t | x_0) =
  N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (eq. 4);
- posterior q(x_{t-1} | x_t, x_0) = N(mu_tilde_t, beta_tilde_t I) with its coefficients
  (eqs. 6-7);
- reverse process: the eps-parameterised mean (eq. 11), the x_0 and x_{t-1} parameterisations
  and the fixed variances sigma_t^2 = beta_t or beta_tilde_t (section 3.2), the learned
  log-variance interpolation exp(v log beta_t + (1 - v) log beta_tilde_t) (Nichol & Dhariwal
  eq. 15), and the sampling step x_{t-1} = mu + sigma_t z with no noise at the last step
  (Algorithm 2);
- the bound: Gaussian KLs of L_{t-1} and the prior term L_T (eq. 5), the discretized decoder
  p(x_0 | x_1) (eq. 13), and bits per dimension as their sum;
- losses: the unweighted noise MSE L_simple (eq. 14, Algorithm 1) and its x_0 / x_{t-1}
  analogues, the KL and its T-times rescaling (eq. 5's sum over t), and the hybrid loss
  L_simple + lambda L_vlb with lambda = 0.001 and no gradient from L_vlb to the mean (Nichol &
  Dhariwal eq. 16 and section 3.1).

Every check compares with an independent computation: float64 NumPy written from the paper's
equations in a different form (Bayes' rule in precision form, the paper's eq. 11 for the eps
mean, recursions instead of products), SciPy integration, or a property (bins sum to one, a
perfect model has zero KL). Tolerances reflect float32 tables against float64 references.
"""

import functools
import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from scipy import integrate, stats

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import schedules

T = 1000
TS = np.array([0, 1, 37, 500, 999])
RTOL, ATOL = 2e-4, 2e-5  # float32 tables vs float64 references
MEAN_TYPES = ('eps', 'xstart', 'xprev')
VAR_TYPES = ('fixedlarge', 'fixedsmall', 'learned', 'learned_range')


def _loss_for(var_type):
    return 'hybrid' if var_type.startswith('learned') else 'mse'


def _make(mean_type='eps', var_type='fixedlarge', loss_type=None, num_timesteps=T):
    betas = schedules.get_beta_schedule('linear', num_timesteps)
    return diffusion_lib.GaussianDiffusion.create(
        betas, mean_type, var_type, loss_type or _loss_for(var_type)
    )


class Reference:
    """Independent float64 quantities for the linear schedule, written from the paper."""

    def __init__(self, num_timesteps=T):
        self.betas = np.linspace(1e-4, 0.02, num_timesteps)
        self.alphas = 1.0 - self.betas
        # alpha_bar by a running product (a loop, not np.cumprod).
        self.alpha_bar = np.empty(num_timesteps)
        running = 1.0
        for i, a in enumerate(self.alphas):
            running *= a
            self.alpha_bar[i] = running
        self.alpha_bar_prev = np.concatenate([[1.0], self.alpha_bar[:-1]])

    def posterior(self, x0, xt, t):
        """Bayes' rule in precision form: prior N(sqrt(ab_prev) x0, 1 - ab_prev) times the
        likelihood N(x_t; sqrt(alpha_t) x_{t-1}, beta_t). At t=0 the posterior is x_0 itself."""
        if t == 0:
            return x0, 0.0
        prior_var = 1.0 - self.alpha_bar_prev[t]
        precision = self.alphas[t] / self.betas[t] + 1.0 / prior_var
        var = 1.0 / precision
        mean = var * (
            math.sqrt(self.alphas[t]) / self.betas[t] * xt
            + math.sqrt(self.alpha_bar_prev[t]) / prior_var * x0
        )
        return mean, var

    def posterior_var_clipped(self, t):
        return self.posterior(0.0, 0.0, max(t, 1))[1]


REF = Reference()


def _rand(seed, shape, low=-1.0, high=1.0):
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


class TablesTest(parameterized.TestCase):
    def test_tables_match_the_independent_reference(self):
        d = _make()
        np.testing.assert_allclose(d.alphas_cumprod, REF.alpha_bar, rtol=1e-5)
        for t in TS:
            self.assertAlmostEqual(
                float(d.posterior_variance[t]), REF.posterior(0.0, 0.0, t)[1], delta=1e-9
            )

    @parameterized.parameters('cosine', 'linear')
    def test_forward_variance_is_one_minus_alpha_bar_computed_in_float64(self, schedule):
        # At t=0, 1 - alpha_bar is beta_0 (1e-4 linear, 4e-5 cosine): subtracting a float32
        # alpha_bar from 1 leaves only a few significant bits of it.
        betas = schedules.get_beta_schedule(schedule, 1000)
        d = diffusion_lib.GaussianDiffusion.create(betas)
        t = jnp.asarray([0, 1, 10, 999])
        _, variance, _ = diffusion_lib.q_mean_variance(d, jnp.zeros((4, 2, 2, 1)), t)
        want = 1.0 - np.cumprod(1.0 - betas)[np.asarray(t)]  # float64
        np.testing.assert_allclose(np.asarray(variance).reshape(-1), want, rtol=2e-7)

    def test_posterior_variance_is_zero_at_t0_and_its_log_is_clipped_to_t1(self):
        d = _make()
        self.assertEqual(float(d.posterior_variance[0]), 0.0)
        np.testing.assert_allclose(
            d.posterior_log_variance_clipped[:2], np.log(REF.posterior_var_clipped(1)), rtol=1e-6
        )

    @parameterized.parameters(*TS)
    def test_posterior_mean_coefficients_match_bayes_rule(self, t):
        d = _make()
        # coef1 and coef2 are the posterior mean's weights on x_0 and x_t.
        coef1 = REF.posterior(1.0, 0.0, t)[0]
        coef2 = REF.posterior(0.0, 1.0, t)[0]
        np.testing.assert_allclose(d.posterior_mean_coef1[t], coef1, rtol=1e-5)
        np.testing.assert_allclose(d.posterior_mean_coef2[t], coef2, rtol=1e-5, atol=1e-7)

    def test_q_mean_variance_matches_the_composed_one_step_chain(self):
        d = _make()
        x0 = _rand(0, (len(TS), 2, 2, 1))
        mean, var, log_var = diffusion_lib.q_mean_variance(d, x0, jnp.asarray(TS))
        # Compose q(x_t | x_{t-1}) step by step: m <- sqrt(a) m, v <- a v + beta.
        m_scale, v = 1.0, 0.0
        scales, variances = [], []
        for t in range(T):
            m_scale *= math.sqrt(REF.alphas[t])
            v = REF.alphas[t] * v + REF.betas[t]
            scales.append(m_scale)
            variances.append(v)
        for i, t in enumerate(TS):
            np.testing.assert_allclose(mean[i], scales[t] * x0[i], rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(var[i].squeeze(), variances[t], rtol=RTOL)
            np.testing.assert_allclose(log_var[i].squeeze(), math.log(variances[t]), rtol=RTOL)

    def test_q_sample_has_the_right_mean_and_variance_empirically(self):
        d = _make()
        n = 200_000
        t = jnp.full((n,), 300)
        x0 = jnp.full((n, 1, 1, 1), 0.7)
        noise = jax.random.normal(jax.random.key(0), x0.shape)
        xt = np.asarray(diffusion_lib.q_sample(d, x0, t, noise), np.float64).ravel()
        mean, var = math.sqrt(REF.alpha_bar[300]) * 0.7, 1.0 - REF.alpha_bar[300]
        # Five standard errors of the sample mean and of the sample variance.
        self.assertLess(abs(xt.mean() - mean), 5 * math.sqrt(var / n))
        self.assertLess(abs(xt.var() - var), 5 * var * math.sqrt(2.0 / n))

    @parameterized.parameters(1, 10, 500, 999)
    def test_posterior_equals_bayes_rule_on_a_grid(self, t):
        d = _make()
        x0, xt = 0.3, -0.4
        # Unnormalised p(x_{t-1} | x_0) q(x_t | x_{t-1}) on a fine grid around the posterior.
        centre, var = REF.posterior(x0, xt, t)
        grid = np.linspace(centre - 12 * math.sqrt(var), centre + 12 * math.sqrt(var), 200_001)
        log_p = stats.norm.logpdf(
            grid, math.sqrt(REF.alpha_bar_prev[t]) * x0, math.sqrt(1 - REF.alpha_bar_prev[t])
        ) + stats.norm.logpdf(xt, math.sqrt(REF.alphas[t]) * grid, math.sqrt(REF.betas[t]))
        w = np.exp(log_p - log_p.max())
        w /= w.sum()
        grid_mean = (w * grid).sum()
        grid_var = (w * (grid - grid_mean) ** 2).sum()
        mean, variance, _ = diffusion_lib.q_posterior_mean_variance(
            d, jnp.full((1, 1, 1, 1), x0), jnp.full((1, 1, 1, 1), xt), jnp.array([t])
        )
        np.testing.assert_allclose(float(mean.squeeze()), grid_mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(float(variance.squeeze()), grid_var, rtol=1e-4)


class ReverseProcessTest(parameterized.TestCase):
    def _inputs(self, var_type, seed=0):
        b = len(TS)
        channels = 2 if var_type.startswith('learned') else 1
        xt = _rand(seed, (b, 3, 3, 1), -2, 2)
        out = _rand(seed + 1, (b, 3, 3, channels), -1, 1)
        return xt, out

    def _reference(self, mean_type, var_type, xt, out, i, t):
        """Independent mean, log variance and x_0 for example i at time t (no clipping)."""
        o = out[i, ..., 0].astype(np.float64)
        x = xt[i, ..., 0].astype(np.float64)
        ab, a, b = REF.alpha_bar[t], REF.alphas[t], REF.betas[t]
        if mean_type == 'eps':
            mean = (x - b / math.sqrt(1 - ab) * o) / math.sqrt(a)  # the paper's eq. 11
            x0 = (x - math.sqrt(1 - ab) * o) / math.sqrt(ab)
        elif mean_type == 'xstart':
            x0, mean = o, REF.posterior(o, x, t)[0]
        else:
            c1, c2 = REF.posterior(1.0, 0.0, t)[0], REF.posterior(0.0, 1.0, t)[0]
            x0, mean = (o - c2 * x) / c1, o
        small = math.log(REF.posterior_var_clipped(t))
        if var_type == 'fixedlarge':
            log_var = math.log(b) if t > 0 else small
        elif var_type == 'fixedsmall':
            log_var = small
        elif var_type == 'learned':
            log_var = out[i, ..., 1].astype(np.float64)
        else:
            frac = (out[i, ..., 1].astype(np.float64) + 1) / 2
            log_var = frac * math.log(b) + (1 - frac) * small
        return mean, np.broadcast_to(log_var, mean.shape), x0

    @parameterized.parameters(*itertools.product(MEAN_TYPES, VAR_TYPES))
    def test_p_mean_variance_matches_the_papers_formulas(self, mean_type, var_type):
        d = _make(mean_type, var_type)
        xt, out = self._inputs(var_type)
        got = diffusion_lib.p_mean_variance(d, out, xt, jnp.asarray(TS), clip_denoised=False)
        for i, t in enumerate(TS):
            mean, log_var, x0 = self._reference(mean_type, var_type, xt, out, i, t)
            # x_0 from eps at t=999 divides by sqrt(alpha_bar) ~ 6e-3: float32 error grows.
            np.testing.assert_allclose(got['pred_xstart'][i, ..., 0], x0, rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(got['mean'][i, ..., 0], mean, rtol=RTOL, atol=1e-4)
            np.testing.assert_allclose(got['log_variance'][i, ..., 0], log_var, rtol=RTOL)
            np.testing.assert_allclose(
                got['variance'][i, ..., 0], np.exp(log_var), rtol=RTOL, atol=1e-9
            )

    @parameterized.parameters(*MEAN_TYPES)
    def test_clip_denoised_clips_x0_before_forming_the_mean(self, mean_type):
        d = _make(mean_type, 'fixedsmall')
        xt, out = self._inputs('fixedsmall', seed=3)
        out = out * 5  # push the predicted x_0 outside [-1, 1]
        got = diffusion_lib.p_mean_variance(d, out, xt, jnp.asarray(TS), clip_denoised=True)
        self.assertLessEqual(float(jnp.abs(got['pred_xstart']).max()), 1.0)
        if mean_type == 'xprev':
            # The model gives the mean itself; only the reported x_0 is clipped.
            np.testing.assert_array_equal(got['mean'], out)
            return
        for i, t in enumerate(TS):
            _, _, x0 = self._reference(mean_type, 'fixedsmall', xt, out, i, t)
            mean = REF.posterior(np.clip(x0, -1, 1), xt[i, ..., 0].astype(np.float64), t)[0]
            np.testing.assert_allclose(got['mean'][i, ..., 0], mean, rtol=RTOL, atol=1e-4)

    def test_p_sample_adds_sigma_z_except_at_t0(self):
        d = _make('eps', 'fixedlarge')
        xt, out = self._inputs('fixedlarge', seed=5)
        z = _rand(6, xt.shape)
        sample, _ = diffusion_lib.p_sample(d, out, xt, jnp.asarray(TS), z, clip_denoised=False)
        for i, t in enumerate(TS):
            mean, log_var, _ = self._reference('eps', 'fixedlarge', xt, out, i, t)
            sigma = 0.0 if t == 0 else np.exp(0.5 * log_var)
            expected = mean + sigma * z[i, ..., 0]
            np.testing.assert_allclose(sample[i, ..., 0], expected, rtol=RTOL, atol=1e-4)


class LikelihoodTest(parameterized.TestCase):
    @parameterized.parameters(
        (0.0, 0.0, 0.0, 0.0), (0.5, -1.0, -0.3, 0.7), (2.0, 1.5, 0.0, -2.0), (-1.0, -4.0, 1.0, -3.0)
    )
    def test_normal_kl_matches_numerical_integration(self, m1, lv1, m2, lv2):
        p, q = stats.norm(m1, math.exp(0.5 * lv1)), stats.norm(m2, math.exp(0.5 * lv2))
        lo, hi = m1 - 15 * p.std(), m1 + 15 * p.std()
        expected, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), lo, hi)
        got = diffusion_lib.normal_kl(m1, lv1, m2, lv2)
        np.testing.assert_allclose(float(got), expected, rtol=1e-5, atol=1e-7)

    @parameterized.parameters((0.0, -3.0), (0.93, -5.0), (-1.0, -1.0), (0.2, 0.5), (1.4, -6.0))
    def test_the_256_bin_probabilities_of_a_pixel_sum_to_one(self, mean, log_scale):
        x = np.linspace(-1.0, 1.0, 256, dtype=np.float32).reshape(256, 1, 1, 1)
        logp = diffusion_lib.discretized_gaussian_log_likelihood(
            x, means=np.full_like(x, mean), log_scales=np.full_like(x, log_scale)
        )
        # Bins telescope to exactly 1; float32 rounding of 256 cdf differences stays < 1e-5.
        self.assertAlmostEqual(float(jnp.exp(logp).sum()), 1.0, delta=1e-5)

    @parameterized.parameters((0.1, -3.0), (-0.6, -1.5), (0.9, -4.0))
    def test_bin_probabilities_match_the_exact_normal_cdf(self, mean, log_scale):
        x = np.linspace(-1.0, 1.0, 256).reshape(256, 1, 1, 1)
        logp = diffusion_lib.discretized_gaussian_log_likelihood(
            x.astype(np.float32),
            means=np.full(x.shape, mean, np.float32),
            log_scales=np.full(x.shape, log_scale, np.float32),
        )
        s = math.exp(log_scale)
        upper = np.where(x > 0.999, np.inf, x + 1 / 255)
        lower = np.where(x < -0.999, -np.inf, x - 1 / 255)
        exact = stats.norm.cdf(upper, mean, s) - stats.norm.cdf(lower, mean, s)
        # The tanh approximation of Phi is off by at most 1.8e-4 at each bin edge.
        np.testing.assert_allclose(np.exp(logp), exact, atol=4e-4)


class LossesTest(parameterized.TestCase):
    def _batch(self, seed=0, shape=(TS.size, 4, 4, 1)):
        x0 = np.round(_rand(seed, shape) * 127.5) / 127.5  # 8-bit-like data
        noise = np.random.default_rng(seed + 1).standard_normal(shape).astype(np.float32)
        return x0.astype(np.float32), noise, jnp.asarray(TS)

    @parameterized.parameters(*MEAN_TYPES)
    def test_mse_targets_noise_x0_or_the_posterior_mean(self, mean_type):
        d = _make(mean_type, 'fixedlarge', 'mse')
        x0, noise, t = self._batch()
        out = _rand(9, x0.shape)
        losses = diffusion_lib.training_losses(d, lambda xt, tt: out, x0, t, noise)
        for i, ti in enumerate(TS):
            if mean_type == 'eps':
                target = noise[i]
            elif mean_type == 'xstart':
                target = x0[i]
            else:
                xt = (
                    math.sqrt(REF.alpha_bar[ti]) * x0[i]
                    + math.sqrt(1 - REF.alpha_bar[ti]) * noise[i]
                )
                target = REF.posterior(x0[i].astype(np.float64), xt, ti)[0]
            expected = np.mean((target - out[i]) ** 2)
            np.testing.assert_allclose(losses['loss'][i], expected, rtol=1e-4)
            np.testing.assert_allclose(losses['mse'][i], expected, rtol=1e-4)

    def _true_noise_losses(self, var_type):
        d = _make('eps', var_type, 'kl')
        x0, noise, t = self._batch(seed=4)
        return d, diffusion_lib.training_losses(d, lambda xt, tt: noise, x0, t, noise)

    def test_a_model_that_outputs_the_true_noise_has_zero_kl_with_fixedsmall(self):
        _, losses = self._true_noise_losses('fixedsmall')
        np.testing.assert_allclose(losses['loss'][1:], 0.0, atol=1e-5)
        # t=0 is the decoder's -log p(x_0 | x_1), positive for 8-bit data.
        self.assertGreater(float(losses['loss'][0]), 0.0)

    def test_with_fixedlarge_the_true_noise_kl_is_the_variance_mismatch(self):
        _, losses = self._true_noise_losses('fixedlarge')
        for i, t in enumerate(TS[1:], start=1):
            small, large = REF.posterior_var_clipped(t), REF.betas[t]
            expected = 0.5 * (-1 + math.log(large / small) + small / large) / math.log(2)
            np.testing.assert_allclose(losses['loss'][i], expected, rtol=1e-3, atol=1e-7)

    def test_the_decoder_nll_matches_a_numpy_discretized_gaussian(self):
        _, losses = self._true_noise_losses('fixedsmall')
        x0, _, _ = self._batch(seed=4)
        sigma = math.sqrt(REF.posterior_var_clipped(0))

        def phi(v):
            return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))

        x = x0[0].astype(np.float64)  # a perfect model's decoder mean is x_0 itself
        plus, minus = phi((1 / 255) / sigma), phi((-1 / 255) / sigma)
        p = np.where(x < -0.999, plus, np.where(x > 0.999, 1 - minus, plus - minus))
        expected = -np.mean(np.log(p)) / math.log(2)
        np.testing.assert_allclose(losses['loss'][0], expected, rtol=1e-4)

    def test_rescaled_kl_is_t_times_kl(self):
        x0, noise, t = self._batch(seed=7)
        out = _rand(8, x0.shape)
        kl = diffusion_lib.training_losses(
            _make('eps', 'fixedsmall', 'kl'), lambda *a: out, x0, t, noise
        )
        rescaled = diffusion_lib.training_losses(
            _make('eps', 'fixedsmall', 'rescaled_kl'), lambda *a: out, x0, t, noise
        )
        np.testing.assert_allclose(rescaled['loss'], kl['loss'] * T, rtol=1e-6)

    @parameterized.parameters('learned', 'learned_range')
    def test_hybrid_trains_the_mean_by_mse_and_the_variance_by_the_bound(self, var_type):
        d = _make('eps', var_type, 'hybrid')
        x0, noise, t = self._batch(seed=11)
        theta = jnp.asarray(np.concatenate([_rand(12, x0.shape), _rand(13, x0.shape)], -1))

        def parts(theta):
            losses = diffusion_lib.training_losses(d, lambda xt, tt: theta, x0, t, noise)
            return losses['loss'].sum(), losses

        grads, losses = jax.grad(parts, has_aux=True)(theta)
        np.testing.assert_allclose(
            losses['loss'], losses['mse'] + 1e-3 * T * losses['vb'], rtol=1e-6
        )
        # d(mse)/d(mean output) = 2 (out - noise) / n: the bound adds nothing to the mean.
        n = np.prod(x0.shape[1:])
        np.testing.assert_allclose(grads[..., :1], 2 * (theta[..., :1] - noise) / n, rtol=1e-5)
        self.assertGreater(float(jnp.abs(grads[..., 1:]).sum()), 0.0)

    def test_unscaled_hybrid_adds_the_bound_once_and_leaves_the_mean_to_the_mse(self):
        x0, noise, t = self._batch(seed=5)
        theta = jnp.asarray(np.concatenate([_rand(14, x0.shape), _rand(15, x0.shape)], -1))

        def parts(theta, loss_type):
            d = _make('eps', 'learned_range', loss_type)
            losses = diffusion_lib.training_losses(d, lambda xt, tt: theta, x0, t, noise)
            return losses['loss'].sum(), losses

        grads, unscaled = jax.grad(parts, has_aux=True)(theta, 'hybrid_unscaled')
        _, scaled = parts(theta, 'hybrid')
        np.testing.assert_allclose(unscaled['loss'], unscaled['mse'] + unscaled['vb'], rtol=1e-6)
        np.testing.assert_allclose(unscaled['vb'], scaled['vb'], rtol=1e-6)  # the same L_t
        n = np.prod(x0.shape[1:])
        np.testing.assert_allclose(grads[..., :1], 2 * (theta[..., :1] - noise) / n, rtol=1e-5)

    def test_create_refuses_mse_with_a_learned_variance_and_hybrid_with_a_fixed_one(self):
        betas = schedules.get_beta_schedule('linear', 10)
        with self.assertRaisesRegex(ValueError, "'mse' never trains"):
            diffusion_lib.GaussianDiffusion.create(betas, 'eps', 'learned', 'mse')
        with self.assertRaisesRegex(ValueError, "'hybrid' trains a learned variance"):
            diffusion_lib.GaussianDiffusion.create(betas, 'eps', 'fixedlarge', 'hybrid')

    @parameterized.parameters(
        ('model_mean_type', ('v', 'fixedlarge', 'mse'), "'eps', 'xprev', 'xstart'"),
        ('model_var_type', ('eps', 'large', 'mse'), "'fixedlarge', 'fixedsmall'"),
        ('loss_type', ('eps', 'fixedlarge', 'l2'), "'hybrid', 'hybrid_unscaled', 'kl', 'mse'"),
    )
    def test_create_names_the_valid_choices(self, name, options, choices):
        with self.assertRaisesRegex(ValueError, f'unknown {name}.*{choices}'):
            diffusion_lib.GaussianDiffusion.create(np.full(10, 0.01), *options)


def _oracle_model_fn(d, x_start):
    """A perfect eps model: it knows x_0, so eps = (x_t - sqrt(ab) x_0) / sqrt(1 - ab)."""

    def model_fn(xt, t):
        ab = d.alphas_cumprod[t][:, None, None, None]
        return (xt - jnp.sqrt(ab) * x_start) / jnp.sqrt(1 - ab)

    return model_fn


class BpdTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.num_timesteps = 50
        self.x0 = jnp.asarray(np.round(_rand(0, (3, 4, 4, 2)) * 127.5) / 127.5)

    def test_calc_bpd_loop_parts_add_up_to_the_total(self):
        d = _make('eps', 'fixedlarge', num_timesteps=self.num_timesteps)
        traces = []

        def model_fn(xt, t):  # a tiny parametric model, deliberately imperfect
            traces.append(1)
            return 0.5 * xt * d.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]

        out = jax.jit(functools.partial(diffusion_lib.calc_bpd_loop, d, model_fn))(
            self.x0, jax.random.key(0)
        )
        self.assertEqual(out['vb'].shape, (3, self.num_timesteps))
        self.assertEqual(out['mse'].shape, (3, self.num_timesteps))
        self.assertEqual(out['xstart_mse'].shape, (3, self.num_timesteps))
        for v in out.values():
            self.assertTrue(bool(jnp.all(jnp.isfinite(v))))
        np.testing.assert_allclose(
            out['total_bpd'], out['vb'].sum(axis=1) + out['prior_bpd'], rtol=1e-6
        )
        # One lax.scan: the model is traced once, not once per timestep.
        self.assertLen(traces, 1)

    def test_prior_bpd_is_the_closed_form_kl_to_a_standard_normal(self):
        d = _make(num_timesteps=self.num_timesteps)
        ref = Reference(self.num_timesteps)
        ab = ref.alpha_bar[-1]
        x = np.asarray(self.x0, np.float64)
        kl = 0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * x**2)
        expected = kl.reshape(3, -1).mean(axis=1) / math.log(2)
        np.testing.assert_allclose(diffusion_lib.prior_bpd(d, self.x0), expected, rtol=1e-5)

    def test_a_perfect_model_pays_only_the_decoder_and_the_prior(self):
        d = _make('eps', 'fixedsmall', 'kl', num_timesteps=self.num_timesteps)
        out = diffusion_lib.calc_bpd_loop(
            d, _oracle_model_fn(d, self.x0), self.x0, jax.random.key(1)
        )
        np.testing.assert_allclose(out['vb'][:, 1:], 0.0, atol=1e-4)
        np.testing.assert_allclose(out['xstart_mse'], 0.0, atol=1e-8)
        np.testing.assert_allclose(out['mse'], 0.0, atol=1e-5)
        self.assertTrue(bool(jnp.all(out['vb'][:, 0] > 0)))


class TransformTest(parameterized.TestCase):
    def test_functions_jit_with_the_diffusion_as_an_argument(self):
        # The diffusion is a pytree argument, not a constant baked into the program: one trace
        # serves two schedules, and each gives its own paper value.
        x0, noise = _rand(0, (5, 2, 2, 3)), _rand(1, (5, 2, 2, 3))
        t = jnp.asarray(TS)
        q_sample = jax.jit(chex.assert_max_traces(diffusion_lib.q_sample, n=1))
        for betas in (np.linspace(1e-4, 0.02, T), np.linspace(1e-3, 0.05, T)):
            d = diffusion_lib.GaussianDiffusion.create(betas, 'eps', 'fixedlarge', 'mse')
            ab = np.cumprod(1.0 - betas)[TS][:, None, None, None]
            expected = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
            np.testing.assert_allclose(q_sample(d, x0, t, noise), expected, rtol=1e-5, atol=1e-6)

    def test_functions_vmap_over_examples(self):
        d = _make('xstart', 'fixedsmall')
        x0, xt = _rand(0, (5, 2, 2, 3)), _rand(1, (5, 2, 2, 3))
        t = jnp.asarray(TS)

        def one(x0_i, xt_i, t_i):
            out = diffusion_lib.p_mean_variance(d, x0_i[None], xt_i[None], t_i[None])
            return out['mean'][0]

        batched = diffusion_lib.p_mean_variance(d, x0, xt, t)['mean']
        np.testing.assert_allclose(jax.vmap(one)(x0, xt, t), batched, rtol=1e-6)

    def test_t_must_have_one_entry_per_example(self):
        d = _make()
        x = np.zeros((2, 2, 2, 1), np.float32)
        with self.assertRaises(AssertionError):
            diffusion_lib.q_sample(d, x, jnp.array([1, 2, 3]), x)

    def test_fewer_than_two_steps_is_refused(self):
        with self.assertRaisesRegex(ValueError, 'at least 2 steps'):
            diffusion_lib.GaussianDiffusion.create(np.array([0.1]))


class DdimStepTest(parameterized.TestCase):
    """One DDIM step against Song et al. 2021, eq. 12, written out in float64 NumPy."""

    @parameterized.product(eta=(0.0, 1.0), clip=(False, True))
    def test_ddim_step_matches_eq_12(self, eta, clip):
        d = _make('eps', 'fixedlarge')
        shape = (len(TS), 2, 2, 1)
        x_t, eps_out, z = _rand(0, shape, -2.0, 2.0), _rand(1, shape), _rand(2, shape)
        got_x, got_x0 = diffusion_lib.ddim_step(
            d, eps_out, x_t, jnp.asarray(TS), z, eta=eta, clip_denoised=clip
        )
        for i, t in enumerate(TS):
            ab, ab_prev = REF.alpha_bar[t], REF.alpha_bar_prev[t]
            x_t64, eps64 = x_t[i].astype(np.float64), eps_out[i].astype(np.float64)
            # Eq. 12's "predicted x_0", and the noise direction that the (clipped) x_0 implies.
            x0 = (x_t64 - math.sqrt(1 - ab) * eps64) / math.sqrt(ab)
            if clip:
                x0 = np.clip(x0, -1.0, 1.0)
            eps = (x_t64 - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
            # eta = 1: sigma_t^2 is the DDPM posterior variance beta_tilde_t (Ho et al. eq. 7,
            # here by Bayes' rule; 0 at t = 0). eta = 0: no noise, a deterministic step.
            sigma2 = REF.posterior(0.0, 0.0, t)[1] if eta == 1.0 else 0.0
            expected = (
                math.sqrt(ab_prev) * x0
                + math.sqrt(1 - ab_prev - sigma2) * eps
                + math.sqrt(sigma2) * z[i]
            )
            np.testing.assert_allclose(got_x0[i], x0, rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(got_x[i], expected, rtol=RTOL, atol=ATOL)

    def test_the_last_step_returns_the_predicted_x0(self):
        # At code t = 0, alpha_bar_{t-1} = 1: x_{-1} is the prediction itself, whatever eta.
        d = _make('xstart', 'fixedsmall')
        x0_out, x_t, z = _rand(0, (3, 2, 2, 1)), _rand(1, (3, 2, 2, 1)), _rand(2, (3, 2, 2, 1))
        for eta in (0.0, 1.0):
            x, _ = diffusion_lib.ddim_step(
                d, x0_out, x_t, jnp.zeros(3, jnp.int32), z, eta=eta, clip_denoised=False
            )
            np.testing.assert_allclose(x, x0_out, rtol=1e-6, atol=1e-6)

    @parameterized.parameters(False, True)
    def test_the_reverse_step_goes_to_the_next_noise_level_along_eq_12(self, clip):
        # Encoding (eta = 0) moves x_t to alpha_bar_{t+1} along the same x_0 and eps; at the
        # last step alpha_bar_T = 0 and the result is eps.
        d = _make('eps', 'fixedlarge')
        ts = [*TS, T - 1]
        shape = (len(ts), 2, 2, 1)
        x_t, eps_out = _rand(0, shape, -2.0, 2.0), _rand(1, shape)
        got = diffusion_lib.ddim_reverse_step(d, eps_out, x_t, jnp.asarray(ts), clip_denoised=clip)
        for i, t in enumerate(ts):
            ab = REF.alpha_bar[t]
            ab_next = REF.alpha_bar[t + 1] if t + 1 < T else 0.0
            x_t64, eps64 = x_t[i].astype(np.float64), eps_out[i].astype(np.float64)
            x0 = (x_t64 - math.sqrt(1 - ab) * eps64) / math.sqrt(ab)
            if clip:
                x0 = np.clip(x0, -1.0, 1.0)
            eps = (x_t64 - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
            expected = math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next) * eps
            np.testing.assert_allclose(got[i], expected, rtol=RTOL, atol=ATOL)


if __name__ == '__main__':
    absltest.main()
