"""Frechet distance, Inception Score and RunningStats against closed forms and independent NumPy."""

from unittest import mock

import numpy as np
import scipy.linalg
import scipy.stats
from absl.testing import absltest, parameterized

from diffusion_jax.evaluation import fid


def _random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    eigvals, eigvecs = np.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def _fd_by_eigh(mu1, sigma1, mu2, sigma2) -> float:
    """Independent FD: Tr sqrtm(S1 S2) = Tr sqrtm(S1^1/2 S2 S1^1/2), a symmetric PSD matrix."""
    root1 = _sqrt_psd(sigma1)
    eigvals = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    tr_covmean = np.sum(np.sqrt(np.clip(eigvals, 0.0, None)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


class FrechetDistanceTest(parameterized.TestCase):
    @parameterized.parameters(1, 8, 64)
    def test_fd_of_a_gaussian_with_itself_is_zero(self, dim):
        rng = np.random.default_rng(dim)
        mu, sigma = rng.standard_normal(dim), _random_spd(rng, dim)
        self.assertAlmostEqual(fid.frechet_distance(mu, sigma, mu, sigma), 0.0, delta=1e-9)

    def test_fd_is_symmetric(self):
        rng = np.random.default_rng(0)
        mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
        sigma1, sigma2 = _random_spd(rng, 16), _random_spd(rng, 16)
        np.testing.assert_allclose(
            fid.frechet_distance(mu1, sigma1, mu2, sigma2),
            fid.frechet_distance(mu2, sigma2, mu1, sigma1),
            rtol=1e-10,
        )

    @parameterized.parameters(1, 5, 32)
    def test_fd_of_diagonal_gaussians_is_the_closed_form(self, dim):
        rng = np.random.default_rng(dim)
        mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
        a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
        expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
        np.testing.assert_allclose(
            fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), expected, rtol=1e-10
        )

    @parameterized.product(seed=[0, 1, 2], dim=[3, 20, 100])
    def test_fd_matches_an_eigendecomposition_for_random_spd(self, seed, dim):
        rng = np.random.default_rng(seed)
        mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
        sigma1, sigma2 = _random_spd(rng, dim), _random_spd(rng, dim)
        np.testing.assert_allclose(
            fid.frechet_distance(mu1, sigma1, mu2, sigma2),
            _fd_by_eigh(mu1, sigma1, mu2, sigma2),
            rtol=1e-8,
        )

    def test_fd_accepts_float32_inputs_and_returns_a_python_float(self):
        rng = np.random.default_rng(3)
        inputs = [rng.standard_normal(4), _random_spd(rng, 4), np.zeros(4), np.eye(4)]
        inputs32 = [v.astype(np.float32) for v in inputs]
        result = fid.frechet_distance(*inputs32)
        self.assertIsInstance(result, float)
        # Computed in float64 from the float32 values: agrees with float64 math on them.
        expected = _fd_by_eigh(*(v.astype(np.float64) for v in inputs32))
        np.testing.assert_allclose(result, expected, rtol=1e-10)

    def test_singular_product_is_retried_with_the_offset_and_logged(self):
        # sigma1 = 0 makes sigma1 sigma2 = 0; with 1e-6 I added to both, Tr sqrtm becomes
        # sum_i sqrt(eps (lambda_i + eps)) over the eigenvalues lambda_i of sigma2.
        rng = np.random.default_rng(4)
        dim, eps = 6, 1e-6
        mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
        sigma2 = _random_spd(rng, dim)
        lam = np.linalg.eigvalsh(sigma2)
        expected = (
            np.sum((mu1 - mu2) ** 2) + np.trace(sigma2) - 2 * np.sum(np.sqrt(eps * (lam + eps)))
        )
        with self.assertLogs('absl', level='WARNING') as logs:
            result = fid.frechet_distance(mu1, np.zeros((dim, dim)), mu2, sigma2)
        self.assertIn('singular', logs.output[0])
        np.testing.assert_allclose(result, expected, rtol=1e-9)

    def test_tiny_imaginary_part_of_the_root_is_discarded(self):
        rng = np.random.default_rng(5)
        mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
        sigma1, sigma2 = _random_spd(rng, 5), _random_spd(rng, 5)
        real_sqrtm = scipy.linalg.sqrtm
        with mock.patch.object(scipy.linalg, 'sqrtm', lambda m: real_sqrtm(m) + 1e-5j):
            result = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
        np.testing.assert_allclose(result, _fd_by_eigh(mu1, sigma1, mu2, sigma2), rtol=1e-8)

    def test_large_imaginary_part_means_not_psd_and_raises(self):
        # sqrtm(diag(-1, 1)) = diag(i, 1): an imaginary part of 1.
        with self.assertRaisesRegex(ValueError, 'imaginary part'):
            fid.frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))

    @parameterized.named_parameters(
        ('mean_lengths', (3,), (3, 3), (4,), (3, 3)),
        ('mean_not_1d', (3, 1), (3, 3), (3, 1), (3, 3)),
        ('covariance_shape', (3,), (3, 3), (3,), (2, 2)),
    )
    def test_mismatched_shapes_raise(self, mu1_shape, s1_shape, mu2_shape, s2_shape):
        with self.assertRaises(ValueError):
            fid.frechet_distance(
                np.zeros(mu1_shape), np.eye(*s1_shape), np.zeros(mu2_shape), np.eye(*s2_shape)
            )


def _one_hot_logits(labels: np.ndarray, num_classes: int, scale: float) -> np.ndarray:
    return scale * np.eye(num_classes)[labels]


class InceptionScoreTest(parameterized.TestCase):
    @parameterized.parameters(1, 4, 10)
    def test_uniform_logits_score_one(self, splits):
        mean, std = fid.inception_score(np.full((40, 10), 3.0), splits=splits)
        np.testing.assert_allclose(mean, 1.0, rtol=1e-12)
        self.assertAlmostEqual(std, 0.0, delta=1e-12)

    @parameterized.product(k=[1, 2, 5, 10], splits=[1, 2, 3])
    def test_one_hot_logits_over_k_classes_equally_often_score_k(self, k, splits):
        # 6 rounds of the k classes: each of the 1, 2 or 3 splits sees every class equally often.
        labels = np.tile(np.arange(k), 6)
        for logits in (
            _one_hot_logits(labels, 10, 100.0),  # off-class mass e^-100: below float64 resolution
            np.where(np.eye(10, dtype=bool)[labels], 0.0, -np.inf),  # exact zeros
        ):
            mean, std = fid.inception_score(logits, splits=splits)
            np.testing.assert_allclose(mean, k, rtol=1e-12)
            self.assertAlmostEqual(std, 0.0, delta=1e-9)

    def test_score_matches_scipy_kl_per_split(self):
        rng = np.random.default_rng(0)
        n, k, splits = 37, 7, 4
        logits = 2.0 * rng.standard_normal((n, k))
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        scores = []
        for i in range(splits):  # split i holds rows [i N / splits, (i + 1) N / splits)
            part = probs[i * n // splits : (i + 1) * n // splits]
            kl = [scipy.stats.entropy(p, part.mean(axis=0)) for p in part]
            scores.append(np.exp(np.mean(kl)))
        mean, std = fid.inception_score(logits, splits=splits)
        np.testing.assert_allclose(mean, np.mean(scores), rtol=1e-12)
        np.testing.assert_allclose(std, np.std(scores), rtol=1e-9)

    def test_score_ignores_a_per_row_logit_offset(self):
        rng = np.random.default_rng(1)
        logits = rng.standard_normal((50, 10))
        shifted = logits + 1e3 * rng.standard_normal((50, 1))
        np.testing.assert_allclose(
            fid.inception_score(shifted, splits=5), fid.inception_score(logits, splits=5), rtol=1e-9
        )

    @parameterized.named_parameters(
        ('splits_zero', np.zeros((4, 3)), 0),
        ('more_splits_than_rows', np.zeros((4, 3)), 5),
        ('float_splits', np.zeros((4, 3)), 2.0),
        ('logits_1d', np.zeros(4), 1),
        ('nan_logits', np.full((4, 3), np.nan), 1),
        ('plus_inf_logits', np.full((4, 3), np.inf), 1),
    )
    def test_bad_inputs_raise(self, logits, splits):
        with self.assertRaises(ValueError):
            fid.inception_score(logits, splits=splits)


class RunningInceptionScoreTest(parameterized.TestCase):
    @parameterized.parameters(([37],), ([5, 12, 20],), ([1] * 37,), ([30, 7],))
    def test_chunks_in_order_match_scipy_kl_per_split(self, sizes):
        rng = np.random.default_rng(3)
        n, k, splits = 37, 7, 4
        logits = 3.0 * rng.standard_normal((n, k))
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        scores = []
        for i in range(splits):  # split i holds rows [i N / splits, (i + 1) N / splits)
            part = probs[i * n // splits : (i + 1) * n // splits]
            scores.append(np.exp(np.mean([scipy.stats.entropy(p, part.mean(0)) for p in part])))
        running = fid.RunningInceptionScore(n, splits)
        start = 0
        for size in sizes:
            running.update(logits[start : start + size], start)
            start += size
        mean, std = running.result()
        np.testing.assert_allclose(mean, np.mean(scores), rtol=1e-12)
        np.testing.assert_allclose(std, np.std(scores), rtol=1e-9)

    def test_chunk_order_does_not_matter_and_exact_zeros_are_handled(self):
        labels = np.tile(np.arange(5), 6)
        logits = np.where(np.eye(10, dtype=bool)[labels], 0.0, -np.inf)  # p(y|x) one-hot
        running = fid.RunningInceptionScore(30, 3)
        for start in (20, 0, 10):
            running.update(logits[start : start + 10], start)
        np.testing.assert_allclose(running.result(), (5.0, 0.0), atol=1e-12)

    def test_missing_images_or_rows_out_of_range_raise(self):
        running = fid.RunningInceptionScore(10, 2)
        running.update(np.zeros((6, 3)), 0)
        with self.assertRaisesRegex(ValueError, '6 of 10 images'):
            running.result()
        with self.assertRaisesRegex(ValueError, 'do not fit'):
            running.update(np.zeros((6, 3)), 6)
        with self.assertRaisesRegex(ValueError, 'NaN'):
            running.update(np.full((2, 3), np.nan), 6)
        with self.assertRaisesRegex(ValueError, 'splits'):
            fid.RunningInceptionScore(3, 4)


class RunningStatsTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ('one_chunk', [300]),
        ('uneven_chunks', [1, 7, 100, 2, 190]),
        ('with_empty_chunks', [0, 150, 0, 150]),
    )
    def test_chunks_match_numpy_mean_and_cov_of_the_whole_array(self, sizes):
        rng = np.random.default_rng(0)
        features = (rng.standard_normal((300, 5)) @ rng.standard_normal((5, 5)) + 3.0).astype(
            np.float32
        )
        stats = fid.RunningStats()
        for chunk in np.split(features, np.cumsum(sizes)[:-1]):
            stats.update(chunk)
        self.assertEqual(stats.count, 300)
        whole = features.astype(np.float64)
        self.assertEqual(stats.mean.dtype, np.float64)
        np.testing.assert_allclose(stats.mean, np.mean(whole, axis=0), rtol=1e-12)
        np.testing.assert_allclose(stats.covariance, np.cov(whole, rowvar=False), rtol=1e-10)

    def test_large_mean_does_not_cost_covariance_precision(self):
        rng = np.random.default_rng(1)
        features = 1e6 + rng.standard_normal((1000, 3))
        stats = fid.RunningStats()
        for chunk in np.array_split(features, 10):
            stats.update(chunk)
        np.testing.assert_allclose(stats.covariance, np.cov(features, rowvar=False), rtol=1e-8)

    def test_fd_of_streamed_stats_is_invariant_to_sample_order(self):
        rng = np.random.default_rng(2)
        features, reference = rng.standard_normal((200, 4)), rng.standard_normal((100, 4)) + 0.5
        results = []
        for order in (np.arange(200), rng.permutation(200)):
            stats, ref = fid.RunningStats(), fid.RunningStats()
            for chunk in np.array_split(features[order], 7):
                stats.update(chunk)
            ref.update(reference)
            results.append(
                fid.frechet_distance(stats.mean, stats.covariance, ref.mean, ref.covariance)
            )
        np.testing.assert_allclose(results[0], results[1], rtol=1e-10)

    def test_too_few_vectors_or_wrong_shapes_raise(self):
        stats = fid.RunningStats()
        with self.assertRaisesRegex(ValueError, 'at least 1'):
            _ = stats.mean
        stats.update(np.ones((1, 3)))
        with self.assertRaisesRegex(ValueError, 'at least 2'):
            _ = stats.covariance
        with self.assertRaisesRegex(ValueError, r'\[N, D\]'):
            stats.update(np.ones(3))
        with self.assertRaisesRegex(ValueError, 'D=4'):
            stats.update(np.ones((2, 4)))


if __name__ == '__main__':
    absltest.main()
