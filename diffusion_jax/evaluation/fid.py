"""Frechet distance, Inception Score and streaming feature statistics, in float64 NumPy.

FID (Heusel et al. 2017, eq. 6) is the Frechet distance between Gaussians fitted to network
features of two image sets: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)). The matrix square
root follows pytorch-fid / jax-fid: `scipy.linalg.sqrtm` on the host, retried with 1e-6 * I added
to both covariances when the product is singular, and tiny imaginary parts from round-off dropped.
IS (Salimans et al. 2016) is exp(E_x KL(p(y|x) || p(y))), averaged over splits as in the original
improved-gan code; DDPM (Ho et al. 2020, table 1) reports both over 50k samples, IS with 10 splits.

No JAX here: features come in as arrays, and `RunningStats` accumulates them chunk by chunk so
50k images never sit in memory at once.
"""

import warnings

import numpy as np
import scipy.linalg
import scipy.special
from absl import logging

# pytorch-fid's offset for a singular covariance product, and its bound on a discardable imaginary
# part of the square root (larger ones mean the covariances are not PSD).
SINGULAR_OFFSET = 1e-6
MAX_IMAGINARY = 1e-3


def _sqrtm(matrix: np.ndarray) -> tuple[np.ndarray, bool]:
    """Returns (sqrtm(matrix), whether scipy flagged it singular or the result is non-finite)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        root = scipy.linalg.sqrtm(matrix)
    singular = False
    for w in caught:
        # scipy >= 1.16 warns LinAlgWarning('Matrix is singular ...'); pass anything else on.
        if issubclass(w.category, scipy.linalg.LinAlgWarning):
            singular = True
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return root, singular or not np.all(np.isfinite(root))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), in float64.

    Args:
      mu1: [D] mean of the first set of features.
      sigma1: [D, D] covariance of the first set (symmetric PSD).
      mu2: [D] mean of the second set.
      sigma2: [D, D] covariance of the second set.

    Returns:
      The squared Frechet distance (>= 0 up to round-off) between N(mu1, sigma1) and
      N(mu2, sigma2).

    Raises:
      ValueError: for mismatched shapes, a square root that stays non-finite after the offset
        retry, or an imaginary part of the square root above `MAX_IMAGINARY` (not PSD inputs).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f'means must both be [D]; got shapes {mu1.shape} and {mu2.shape}')
    dim = mu1.shape[0]
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f'covariances must both be [{dim}, {dim}] to match the means; '
            f'got shapes {sigma1.shape} and {sigma2.shape}'
        )
    covmean, singular = _sqrtm(sigma1 @ sigma2)
    if singular:
        logging.warning(
            'frechet_distance: sqrtm(sigma1 sigma2) is singular or non-finite; '
            'adding %g * I to both covariances',
            SINGULAR_OFFSET,
        )
        offset = SINGULAR_OFFSET * np.eye(dim)
        covmean, _ = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.all(np.isfinite(covmean)):
            raise ValueError('sqrtm(sigma1 sigma2) is non-finite even with the offset')
    if np.iscomplexobj(covmean):
        max_imag = float(np.max(np.abs(covmean.imag)))
        if max_imag >= MAX_IMAGINARY:
            raise ValueError(
                f'sqrtm(sigma1 sigma2) has an imaginary part of {max_imag:.3g} >= '
                f'{MAX_IMAGINARY}; are both covariances symmetric positive semi-definite?'
            )
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split; returns its mean and standard deviation.

    p(y|x) = softmax(logits) is taken in float64 via log-softmax, and p(y) is its mean over the
    split. Split i holds rows [i * N // splits, (i + 1) * N // splits), as in the original
    improved-gan code, so every row is used; the std is over splits (ddof=0, as there).

    Args:
      logits: [N, K] classifier logits (finite, or -inf for impossible classes).
      splits: number of disjoint splits, 1 <= splits <= N (DDPM: 10 over 50k samples).

    Returns:
      (mean, std) of the per-split scores; each score lies in [1, K].

    Raises:
      ValueError: for logits that are not [N, K], contain NaN or +inf, or a bad `splits`.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f'logits must be [N, K] with N, K >= 1; got shape {logits.shape}')
    if np.any(np.isnan(logits)) or np.any(logits == np.inf):
        raise ValueError('logits contain NaN or +inf')
    n = logits.shape[0]
    if isinstance(splits, bool) or not isinstance(splits, int | np.integer) or not 1 <= splits <= n:
        raise ValueError(f'splits must be an int in [1, N={n}]; got {splits!r}')
    log_p = scipy.special.log_softmax(logits, axis=1)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
        log_py = scipy.special.logsumexp(part, axis=0) - np.log(part.shape[0])  # log mean p(y|x)
        p = np.exp(part)
        # 0 * log 0 = 0: a class with p(y|x) = 0 adds nothing (and would give 0 * -inf = nan).
        with np.errstate(invalid='ignore'):
            kl = np.where(p > 0, p * (part - log_py), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


class RunningStats:
    """Streaming float64 mean and covariance of feature vectors (Chan et al. 1979 merge).

    Each `update` folds a chunk's own mean and centred scatter into the totals, which stays
    accurate when the features have a large mean, unlike accumulating sum(x) and sum(x x^T).
    """

    def __init__(self):
        self._count = 0
        self._mean = None  # [D] float64
        self._scatter = None  # [D, D] float64: sum of (x - mean)(x - mean)^T

    def update(self, features: np.ndarray) -> None:
        """Adds a chunk of features.

        Args:
          features: [N, D] array (any float or int dtype; accumulated in float64). N may be 0.

        Raises:
          ValueError: if `features` is not 2-D, or D differs from earlier chunks.
        """
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f'features must be [N, D]; got shape {x.shape}')
        if self._mean is not None and x.shape[1] != self._mean.shape[0]:
            raise ValueError(f'features have D={x.shape[1]}, earlier chunks {self._mean.shape[0]}')
        m = x.shape[0]
        if m == 0:
            return
        chunk_mean = x.mean(axis=0)
        centred = x - chunk_mean
        chunk_scatter = centred.T @ centred
        if self._mean is None:
            self._count, self._mean, self._scatter = m, chunk_mean, chunk_scatter
            return
        n = self._count
        total = n + m
        delta = chunk_mean - self._mean
        self._scatter = self._scatter + chunk_scatter + np.outer(delta, delta) * (n * m / total)
        self._mean = self._mean + delta * (m / total)
        self._count = total

    @property
    def count(self) -> int:
        """Number of feature vectors seen so far."""
        return self._count

    @property
    def mean(self) -> np.ndarray:
        """[D] float64 mean; needs at least one vector."""
        if self._count < 1:
            raise ValueError('RunningStats.mean needs at least 1 feature vector; call update')
        return self._mean.copy()

    @property
    def covariance(self) -> np.ndarray:
        """[D, D] float64 unbiased covariance (ddof=1, as np.cov); needs at least two vectors."""
        if self._count < 2:
            raise ValueError(
                f'RunningStats.covariance needs at least 2 feature vectors; have {self._count}'
            )
        return self._scatter / (self._count - 1)


class RunningInceptionScore:
    """`inception_score` of N images whose logits arrive in chunks, in index order or any order.

    Per split it keeps the sum of p(y|x) [K], the sum of sum_y p(y|x) log p(y|x) and a count: the
    split's mean KL is E_x[sum_y p log p] - sum_y p(y) log p(y), with p(y) the split's mean of
    p(y|x). Memory is O(splits x K), whatever N. Image i belongs to split s when
    s * N // splits <= i < (s + 1) * N // splits, the rows `inception_score` gives split s.

    Args:
      num_images: N, the number of images that will be added (>= 1).
      splits: number of splits, 1 <= splits <= N.
    """

    def __init__(self, num_images: int, splits: int):
        if not 1 <= splits <= num_images:
            raise ValueError(f'splits must be in [1, N={num_images}]; got {splits}')
        self._bounds = np.arange(splits + 1) * num_images // splits
        self._num_images = num_images
        self._p_sum = None  # [splits, K] float64
        self._p_log_p = np.zeros(splits)
        self._counts = np.zeros(splits, np.int64)

    def update(self, logits: np.ndarray, first_index: int) -> None:
        """Adds the logits [n, K] of images first_index, ..., first_index + n - 1."""
        logits = np.asarray(logits, np.float64)
        n = logits.shape[0] if logits.ndim == 2 else -1
        if n < 0 or first_index < 0 or first_index + n > self._num_images:
            raise ValueError(
                f'logits {logits.shape} at index {first_index} do not fit [N={self._num_images}, K]'
            )
        if np.any(np.isnan(logits)) or np.any(logits == np.inf):
            raise ValueError('logits contain NaN or +inf')
        log_p = scipy.special.log_softmax(logits, axis=1)
        p = np.exp(log_p)
        with np.errstate(invalid='ignore'):
            p_log_p = np.where(p > 0, p * log_p, 0.0).sum(axis=1)
        split = np.searchsorted(self._bounds, first_index + np.arange(n), side='right') - 1
        if self._p_sum is None:
            self._p_sum = np.zeros((len(self._counts), logits.shape[1]))
        np.add.at(self._p_sum, split, p)
        np.add.at(self._p_log_p, split, p_log_p)
        np.add.at(self._counts, split, 1)

    def result(self) -> tuple[float, float]:
        """(mean, std over splits) of the score; every image must have been added once."""
        if not np.array_equal(self._counts, np.diff(self._bounds)):
            raise ValueError(
                f'RunningInceptionScore has {int(self._counts.sum())} of {self._num_images} images'
            )
        p_y = self._p_sum / self._counts[:, None]
        with np.errstate(divide='ignore', invalid='ignore'):
            entropy_term = np.where(p_y > 0, p_y * np.log(p_y), 0.0).sum(axis=1)
        scores = np.exp(self._p_log_p / self._counts - entropy_term)
        return float(np.mean(scores)), float(np.std(scores))
