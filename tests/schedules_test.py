"""Beta schedules against their published formulas, computed independently here.

linear: beta_1 = 1e-4 to beta_T = 0.02, evenly spaced (Ho et al. 2020, section 4). cosine:
alpha_bar_t = f(t) / f(0) with f(t) = cos^2(((t / T + s) / (1 + s)) pi / 2), s = 0.008, and
beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} clipped to 0.999 (Nichol & Dhariwal 2021, eq. 17 and
section 3.2). quad, const and jsd (1 / T, 1 / (T - 1), ..., 1) are the other options of the
authors' released code (`diffusion_tf`'s `get_beta_schedule`).
"""

import math

import numpy as np
from absl.testing import absltest, parameterized

from diffusion_jax import schedules


class ScheduleTest(parameterized.TestCase):
    def test_linear_is_the_papers_1e4_to_002(self):
        betas = schedules.get_beta_schedule('linear', 1000)
        self.assertEqual(betas.dtype, np.float64)
        self.assertEqual(betas.shape, (1000,))
        self.assertEqual(betas[0], 1e-4)
        self.assertAlmostEqual(betas[-1], 0.02, places=15)
        # Evenly spaced: constant first difference (0.02 - 1e-4) / 999.
        np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)

    def test_quad_is_the_square_of_a_linear_ramp_in_sqrt_beta(self):
        betas = schedules.get_beta_schedule('quad', 10)
        roots = [math.sqrt(1e-4) + i * (math.sqrt(0.02) - math.sqrt(1e-4)) / 9 for i in range(10)]
        np.testing.assert_allclose(betas, np.array(roots) ** 2, rtol=1e-12)

    def test_const_repeats_beta_end(self):
        np.testing.assert_array_equal(
            schedules.get_beta_schedule('const', 7, beta_end=0.3), np.full(7, 0.3)
        )

    def test_jsd_is_one_over_t_down_to_one(self):
        betas = schedules.get_beta_schedule('jsd', 5)
        np.testing.assert_allclose(betas, [1 / 5, 1 / 4, 1 / 3, 1 / 2, 1.0], rtol=1e-15)

    def test_cosine_alpha_bar_follows_the_squared_cosine(self):
        num_t, s = 1000, 0.008
        betas = schedules.get_beta_schedule('cosine', num_t)

        def f(t):
            return math.cos((t / num_t + s) / (1 + s) * math.pi / 2) ** 2

        alpha_bar = np.cumprod(1.0 - betas)
        expected = np.array([f(t + 1) / f(0) for t in range(num_t)])
        # Exact wherever the 0.999 clip did not bite (it bites only near t = T).
        unclipped = betas < 0.999
        self.assertGreater(unclipped.sum(), 990)
        first_clip = np.argmin(unclipped) if not unclipped.all() else num_t
        np.testing.assert_allclose(alpha_bar[:first_clip], expected[:first_clip], rtol=1e-10)
        self.assertLessEqual(betas.max(), 0.999)

    @parameterized.parameters(50, 250, 1000, 4000)
    def test_linear_iddpm_scales_both_endpoints_by_1000_over_t(self, num_timesteps):
        # Nichol & Dhariwal 2021's get_named_beta_schedule('linear', T): scale = 1000 / T.
        scale = 1000 / num_timesteps
        want = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps)
        got = schedules.get_beta_schedule('linear_iddpm', num_timesteps)
        np.testing.assert_allclose(got, want, rtol=1e-12)
        # Every T then leaves about as little of x_0 in x_T as the paper's T=1000 does.
        self.assertBetween(schedules.endpoint_signal(got), 0.002, 0.007)

    def test_endpoint_signal_is_sqrt_alpha_bar_t(self):
        betas = np.array([0.5, 0.5, 0.75])
        self.assertAlmostEqual(schedules.endpoint_signal(betas), np.sqrt(0.5 * 0.5 * 0.25))
        linear_250 = schedules.get_beta_schedule('linear', 250)
        self.assertAlmostEqual(schedules.endpoint_signal(linear_250), 0.28, delta=0.005)

    @parameterized.parameters('linear', 'linear_iddpm', 'quad', 'cosine', 'const', 'jsd')
    def test_every_schedule_gives_t_betas_in_0_1(self, name):
        betas = schedules.get_beta_schedule(name, 50)
        self.assertEqual(betas.shape, (50,))
        self.assertEqual(betas.dtype, np.float64)
        self.assertTrue(np.all((betas > 0) & (betas <= 1)))

    def test_unknown_name_lists_the_valid_choices(self):
        with self.assertRaisesRegex(ValueError, r"unknown beta schedule 'lin'.*'cosine'.*'linear'"):
            schedules.get_beta_schedule('lin', 10)

    @parameterized.parameters(0, -5)
    def test_non_positive_num_timesteps_is_refused(self, num_timesteps):
        with self.assertRaisesRegex(ValueError, 'num_timesteps must be a positive int'):
            schedules.get_beta_schedule('linear', num_timesteps)

    def test_endpoints_outside_0_1_are_refused(self):
        with self.assertRaisesRegex(ValueError, 'outside \\(0, 1\\]'):
            schedules.get_beta_schedule('linear', 10, beta_start=0.0)


if __name__ == '__main__':
    absltest.main()
