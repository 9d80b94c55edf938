"""Gaussian diffusion: the forward process, its posterior, the reverse process and the losses.

Ho et al. 2020 ("DDPM"), sections 2-3 and Algorithms 1-2, with the learned-variance options of
Nichol & Dhariwal 2021 ("Improved DDPM"). A `GaussianDiffusion` pytree holds the precomputed
tables; every function here is pure, takes the diffusion first, and is jit- and vmap-able.

Conventions: images are NHWC floats in [-1, 1]; `t` is an int array of shape [B] and is
0-indexed, so code t=0 is the paper's t=1. Tables are computed in float64 and cast to float32
once. Likelihood terms are in bits per dimension.
"""

from collections.abc import Callable

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import options

# Improved DDPM, section 3.1: L_hybrid = L_simple + lambda * L_vlb with lambda = 0.001.
HYBRID_VB_WEIGHT = 1e-3
# Half-width of one 8-bit bin after scaling [0, 255] to [-1, 1].
_BIN_HALF_WIDTH = 1.0 / 255.0
# Pixels this close to -1 or 1 are the edge bins, which take the whole tail of the Gaussian.
_EDGE = 0.999
_LOG_CLAMP = 1e-12

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


@flax.struct.dataclass
class GaussianDiffusion:
    """Precomputed [T] float32 tables of a diffusion process plus its static options.

    Every table is computed in float64 from the float64 betas and cast to float32 once.
    `betas_residual` is what that cast lost of each beta (beta - float32(beta), in float32), so
    `float64(betas) + float64(betas_residual)` gives the float64 betas back to ~1e-14 relative:
    a respaced process (`sampling.respace`) is derived from them, not from the float32 copy.
    Both are ordinary leaves: one traced program serves every schedule.
    """

    betas: jax.Array
    betas_residual: jax.Array
    alphas_cumprod: jax.Array
    one_minus_alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    alphas_cumprod_next: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    fixedlarge_log_variance: jax.Array
    log_betas: jax.Array
    model_mean_type: str = flax.struct.field(pytree_node=False, default='eps')
    model_var_type: str = flax.struct.field(pytree_node=False, default='fixedlarge')
    loss_type: str = flax.struct.field(pytree_node=False, default='mse')

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @classmethod
    def create(
        cls,
        betas: np.ndarray,
        model_mean_type: str = 'eps',
        model_var_type: str = 'fixedlarge',
        loss_type: str = 'mse',
    ) -> 'GaussianDiffusion':
        """Builds the tables from [T] betas (float64 recommended) and validates the options."""
        options.check_choice('model_mean_type', model_mean_type, options.MODEL_MEAN_TYPES)
        options.check_choice('model_var_type', model_var_type, options.MODEL_VAR_TYPES)
        options.check_choice('loss_type', loss_type, options.LOSS_TYPES)
        if problem := options.loss_and_variance_problem(loss_type, model_var_type):
            raise ValueError('{} ({})'.format(*problem))
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 2:
            raise ValueError(f'betas must be a 1-D array of at least 2 steps, got {betas.shape}')
        if not (np.all(betas > 0) and np.all(betas <= 1)):
            raise ValueError('every beta must lie in (0, 1]')
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at t=0; its log is clipped to the value at t=1.
        posterior_log_variance_clipped = np.log(
            np.append(posterior_variance[1:2], posterior_variance[1:])
        )
        with np.errstate(divide='ignore'):  # jsd has alpha_bar = 0 at the last step
            tables = dict(
                betas=betas,
                betas_residual=betas - betas.astype(np.float32).astype(np.float64),
                alphas_cumprod=alphas_cumprod,
                one_minus_alphas_cumprod=1.0 - alphas_cumprod,
                alphas_cumprod_prev=alphas_cumprod_prev,
                alphas_cumprod_next=np.append(alphas_cumprod[1:], 0.0),
                sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
                sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
                log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
                sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
                sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
                posterior_variance=posterior_variance,
                posterior_log_variance_clipped=posterior_log_variance_clipped,
                posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
                posterior_mean_coef2=(
                    (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)
                ),
                # fixedlarge (sigma^2 = beta) takes the posterior variance at t=0 (decoder).
                fixedlarge_log_variance=np.log(np.append(posterior_variance[1:2], betas[1:])),
                log_betas=np.log(betas),
            )
        return cls(
            **{k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()},
            model_mean_type=model_mean_type,
            model_var_type=model_var_type,
            loss_type=loss_type,
        )

    def betas_float64(self) -> np.ndarray:
        """[T] float64: the betas this diffusion was built from (to ~1e-14 relative)."""
        return np.asarray(self.betas, np.float64) + np.asarray(self.betas_residual, np.float64)


def _extract(table: jax.Array, t: jax.Array, x_shape: tuple[int, ...]) -> jax.Array:
    """table[t] reshaped to [B, 1, 1, ...] so it broadcasts against an x of shape `x_shape`."""
    chex.assert_shape(t, (x_shape[0],))
    return table[t].reshape((x_shape[0],) + (1,) * (len(x_shape) - 1))


def meanflat(x: jax.Array) -> jax.Array:
    """Mean over every axis but the first: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# Forward process and its posterior.


def q_mean_variance(
    d: GaussianDiffusion, x_start: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).

    Args:
      d: the diffusion.
      x_start: [B, H, W, C] clean data in [-1, 1].
      t: [B] int timesteps.

    Returns:
      (mean [B, H, W, C], variance [B, 1, 1, 1], log_variance [B, 1, 1, 1]).
    """
    mean = _extract(d.sqrt_alphas_cumprod, t, x_start.shape) * x_start
    variance = _extract(d.one_minus_alphas_cumprod, t, x_start.shape)  # float64, then cast
    log_variance = _extract(d.log_one_minus_alphas_cumprod, t, x_start.shape)
    return mean, variance, log_variance


def q_sample(d: GaussianDiffusion, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise, a draw from q(x_t | x_0).

    Args:
      d: the diffusion.
      x_start: [B, H, W, C] clean data.
      t: [B] int timesteps (t=0 is one step of noise).
      noise: [B, H, W, C] standard normal noise.

    Returns:
      [B, H, W, C] noised data.
    """
    chex.assert_equal_shape([x_start, noise])
    return (
        _extract(d.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        + _extract(d.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
    )


def q_posterior_mean_variance(
    d: GaussianDiffusion, x_start: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t I).

    Args:
      d: the diffusion.
      x_start: [B, H, W, C] x_0.
      x_t: [B, H, W, C] x_t.
      t: [B] int timesteps.

    Returns:
      (mean [B, H, W, C], variance [B, 1, 1, 1], log_variance_clipped [B, 1, 1, 1]).
    """
    chex.assert_equal_shape([x_start, x_t])
    mean = (
        _extract(d.posterior_mean_coef1, t, x_t.shape) * x_start
        + _extract(d.posterior_mean_coef2, t, x_t.shape) * x_t
    )
    variance = _extract(d.posterior_variance, t, x_t.shape)
    log_variance_clipped = _extract(d.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance_clipped


def predict_xstart_from_eps(
    d: GaussianDiffusion, x_t: jax.Array, t: jax.Array, eps: jax.Array
) -> jax.Array:
    """x_0 = sqrt(1 / alpha_bar_t) x_t - sqrt(1 / alpha_bar_t - 1) eps, all [B, H, W, C]."""
    chex.assert_equal_shape([x_t, eps])
    return (
        _extract(d.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
        - _extract(d.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
    )


def predict_eps_from_xstart(
    d: GaussianDiffusion, x_t: jax.Array, t: jax.Array, pred_xstart: jax.Array
) -> jax.Array:
    """The inverse of `predict_xstart_from_eps`, all [B, H, W, C]."""
    chex.assert_equal_shape([x_t, pred_xstart])
    return (_extract(d.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart) / _extract(
        d.sqrt_recipm1_alphas_cumprod, t, x_t.shape
    )


def _predict_xstart_from_xprev(
    d: GaussianDiffusion, x_t: jax.Array, t: jax.Array, xprev: jax.Array
) -> jax.Array:
    """x_0 = (mu - coef2 x_t) / coef1: inverts the posterior mean."""
    coef1 = _extract(d.posterior_mean_coef1, t, x_t.shape)
    coef2 = _extract(d.posterior_mean_coef2, t, x_t.shape)
    return (xprev - coef2 * x_t) / coef1


# Reverse process.


def split_model_output(
    d: GaussianDiffusion, model_output: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Splits [B, H, W, 2C] into (mean part, variance part) for learned variances.

    For fixed variances the output is the mean part and the variance part is None.
    """
    if d.model_var_type in options.LEARNED_VAR_TYPES:
        return jnp.split(model_output, 2, axis=-1)
    return model_output, None


def p_mean_variance(
    d: GaussianDiffusion,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    clip_denoised: bool = True,
) -> dict[str, jax.Array]:
    """Interprets a model output as p(x_{t-1} | x_t) = N(mean, variance).

    Args:
      d: the diffusion.
      model_output: [B, H, W, C] (fixed variances) or [B, H, W, 2C] (learned variances: the
        second half is log sigma^2 for `learned`, v in [-1, 1] for `learned_range`).
      x_t: [B, H, W, C].
      t: [B] int timesteps.
      clip_denoised: clip the predicted x_0 to [-1, 1] before forming the mean (sampling).

    Returns:
      dict with `mean`, `variance`, `log_variance` and `pred_xstart`, each [B, H, W, C].
    """
    out, var_out = split_model_output(d, model_output)
    chex.assert_equal_shape([out, x_t])
    ones = jnp.ones_like(x_t)
    if d.model_var_type == 'learned':
        log_variance = var_out
    elif d.model_var_type == 'learned_range':
        min_log = _extract(d.posterior_log_variance_clipped, t, x_t.shape)
        max_log = _extract(d.log_betas, t, x_t.shape)
        frac = (var_out + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
    elif d.model_var_type == 'fixedlarge':
        log_variance = _extract(d.fixedlarge_log_variance, t, x_t.shape) * ones
    else:  # fixedsmall
        log_variance = _extract(d.posterior_log_variance_clipped, t, x_t.shape) * ones

    def maybe_clip(x):
        return jnp.clip(x, -1.0, 1.0) if clip_denoised else x

    if d.model_mean_type == 'xprev':
        pred_xstart = maybe_clip(_predict_xstart_from_xprev(d, x_t, t, out))
        mean = out
    else:
        if d.model_mean_type == 'xstart':
            pred_xstart = maybe_clip(out)
        else:  # eps
            pred_xstart = maybe_clip(predict_xstart_from_eps(d, x_t, t, out))
        mean, _, _ = q_posterior_mean_variance(d, pred_xstart, x_t, t)
    return {
        'mean': mean,
        'variance': jnp.exp(log_variance),
        'log_variance': log_variance,
        'pred_xstart': pred_xstart,
    }


def p_sample(
    d: GaussianDiffusion,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    clip_denoised: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """One ancestral step (Algorithm 2): x_{t-1} = mean + sigma_t z, with z = 0 at t = 0.

    Args:
      d: the diffusion.
      model_output: the model's output at (x_t, t), see `p_mean_variance`.
      x_t: [B, H, W, C].
      t: [B] int timesteps.
      noise: [B, H, W, C] standard normal z.
      clip_denoised: clip the predicted x_0 to [-1, 1].

    Returns:
      (x_{t-1} [B, H, W, C], pred_xstart [B, H, W, C]).
    """
    out = p_mean_variance(d, model_output, x_t, t, clip_denoised=clip_denoised)
    nonzero = (t != 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
    sample = out['mean'] + nonzero * jnp.exp(0.5 * out['log_variance']) * noise
    return sample, out['pred_xstart']


def ddim_step(
    d: GaussianDiffusion,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    eta: float,
    clip_denoised: bool,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM step (Song et al. 2021, eq. 12) from x_t to x_{t-1} of the tables of `d`.

    x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1} - sigma^2) eps + sigma z, where x0 is the
    model's prediction, eps the noise it implies, and sigma = eta sqrt(beta_tilde_t) (eq. 16;
    eta = 1 is the DDPM posterior's variance, eta = 0 a deterministic step). `t` indexes the
    tables of `d`, which for fewer sampling steps is the respaced diffusion; at t = 0,
    abar_{t-1} = 1 and the step returns x0.

    Args:
      d: the diffusion (possibly respaced).
      model_output: the model's output at (x_t, t), see `p_mean_variance`.
      x_t: [B, H, W, C].
      t: [B] int indices into the tables of `d`.
      noise: [B, H, W, C] standard normal z.
      eta: the noise scale, usually in [0, 1].
      clip_denoised: clip the predicted x_0 to [-1, 1].

    Returns:
      (x_{t-1} [B, H, W, C], pred_xstart [B, H, W, C]).
    """
    pred_xstart = p_mean_variance(d, model_output, x_t, t, clip_denoised)['pred_xstart']
    eps = predict_eps_from_xstart(d, x_t, t, pred_xstart)
    abar = _extract(d.alphas_cumprod, t, x_t.shape)
    abar_prev = _extract(d.alphas_cumprod_prev, t, x_t.shape)
    sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    mean = jnp.sqrt(abar_prev) * pred_xstart + jnp.sqrt(1 - abar_prev - sigma**2) * eps
    return mean + sigma * noise, pred_xstart


def ddim_reverse_step(
    d: GaussianDiffusion,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    clip_denoised: bool,
) -> jax.Array:
    """One deterministic DDIM encoding step (eta = 0, Song et al. 2021 section 4.3): x_t to x_{t+1}.

    x_{t+1} = sqrt(abar_{t+1}) x0 + sqrt(1 - abar_{t+1}) eps with x0 and eps as in `ddim_step`:
    the DDIM ODE integrated the other way, so that decoding with `ddim_step` (eta = 0) retraces
    it. At t = T - 1, abar_T is taken as 0 and the step returns eps (Improved DDPM's
    `ddim_reverse_sample`).

    Args:
      d: the diffusion (possibly respaced).
      model_output: the model's output at (x_t, t), see `p_mean_variance`.
      x_t: [B, H, W, C]; x_0 itself at t = 0.
      t: [B] int indices into the tables of `d`.
      clip_denoised: clip the predicted x_0 to [-1, 1].

    Returns:
      x_{t+1} [B, H, W, C].
    """
    pred_xstart = p_mean_variance(d, model_output, x_t, t, clip_denoised)['pred_xstart']
    eps = predict_eps_from_xstart(d, x_t, t, pred_xstart)
    abar_next = _extract(d.alphas_cumprod_next, t, x_t.shape)
    return jnp.sqrt(abar_next) * pred_xstart + jnp.sqrt(1 - abar_next) * eps


# Likelihood terms.


def normal_kl(
    mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array
) -> jax.Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats, elementwise (broadcasts)."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """Phi(x) ~ 0.5 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), the original's approximation."""
    return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: jax.Array, *, means: jax.Array, log_scales: jax.Array
) -> jax.Array:
    """log p(x) of 8-bit data under a Gaussian discretized to 256 bins on [-1, 1].

    Args:
      x: [B, H, W, C] data, integers in [0, 255] rescaled to [-1, 1].
      means: [B, H, W, C] Gaussian means.
      log_scales: [B, H, W, C] log standard deviations.

    Returns:
      [B, H, W, C] log probabilities in nats; the 256 bins of a pixel sum to probability 1.
    """
    chex.assert_equal_shape([x, means, log_scales])
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + _BIN_HALF_WIDTH))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - _BIN_HALF_WIDTH))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, _LOG_CLAMP))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, _LOG_CLAMP))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, _LOG_CLAMP))
    return jnp.where(
        x < -_EDGE, log_cdf_plus, jnp.where(x > _EDGE, log_one_minus_cdf_min, log_cdf_delta)
    )


def vb_terms_bpd(
    d: GaussianDiffusion,
    model_output: jax.Array,
    x_start: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    clip_denoised: bool = False,
) -> dict[str, jax.Array]:
    """One term L_t of the variational bound, in bits per dimension.

    L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the decoder's
    -log p(x_0 | x_1) for t = 0 (code index 0).

    Args:
      d: the diffusion.
      model_output: the model's output at (x_t, t).
      x_start: [B, H, W, C] x_0.
      x_t: [B, H, W, C] x_t.
      t: [B] int timesteps.
      clip_denoised: clip the predicted x_0 (the likelihood evaluation does; training does not).

    Returns:
      dict with `output` [B] (bits/dim) and `pred_xstart` [B, H, W, C].
    """
    true_mean, _, true_log_variance = q_posterior_mean_variance(d, x_start, x_t, t)
    out = p_mean_variance(d, model_output, x_t, t, clip_denoised=clip_denoised)
    kl = meanflat(normal_kl(true_mean, true_log_variance, out['mean'], out['log_variance']))
    decoder_nll = -meanflat(
        discretized_gaussian_log_likelihood(
            x_start, means=out['mean'], log_scales=0.5 * out['log_variance']
        )
    )
    output = jnp.where(t == 0, decoder_nll, kl) / np.log(2.0)
    return {'output': output, 'pred_xstart': out['pred_xstart']}


def training_losses(
    d: GaussianDiffusion,
    model_fn: ModelFn,
    x_start: jax.Array,
    t: jax.Array,
    noise: jax.Array,
) -> dict[str, jax.Array]:
    """Per-example training losses for `d.loss_type`.

    `mse` is L_simple (the paper's eq. 14 generalised to the three mean types); `kl` the true
    bound term L_t in bits/dim; `rescaled_kl` is T * kl; `hybrid` is Improved DDPM's
    mse + 0.001 * T * L_t with the mean frozen inside L_t, so L_t trains only the variance, and
    `hybrid_unscaled` the same with mse + L_t (their `rescale_learned_sigmas=False`).

    Args:
      d: the diffusion.
      model_fn: (x_t [B, H, W, C], t [B]) -> model output.
      x_start: [B, H, W, C] clean data in [-1, 1].
      t: [B] int timesteps, usually uniform on {0, ..., T-1}.
      noise: [B, H, W, C] standard normal noise.

    Returns:
      dict of [B] arrays: `loss` (what to minimise), `mse` (the unweighted MSE of the mean
      prediction) and `vb` (L_t in bits/dim, for monitoring when it is not part of the loss).
    """
    x_t = q_sample(d, x_start, t, noise)
    model_output = model_fn(x_t, t)
    mean_out, var_out = split_model_output(d, model_output)
    if d.model_mean_type == 'eps':
        target = noise
    elif d.model_mean_type == 'xstart':
        target = x_start
    else:  # xprev
        target, _, _ = q_posterior_mean_variance(d, x_start, x_t, t)
    chex.assert_equal_shape([mean_out, target])
    mse = meanflat(jnp.square(target - mean_out))
    if d.loss_type in options.HYBRID_LOSS_TYPES:
        # The bound only trains the variance: the mean gets its gradient from the MSE alone.
        frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_out], axis=-1)
        vb = vb_terms_bpd(d, frozen, x_start, x_t, t)['output']
        scale = HYBRID_VB_WEIGHT * d.num_timesteps if d.loss_type == 'hybrid' else 1.0
        loss = mse + scale * vb
    else:
        vb = vb_terms_bpd(d, model_output, x_start, x_t, t)['output']
        loss = {'mse': mse, 'kl': vb, 'rescaled_kl': vb * d.num_timesteps}[d.loss_type]
    return {'loss': loss, 'mse': mse, 'vb': vb}


def prior_bpd(d: GaussianDiffusion, x_start: jax.Array) -> jax.Array:
    """KL(q(x_T | x_0) || N(0, I)) in bits/dim: [B, H, W, C] -> [B].

    Not optimised (it has no parameters), but part of the bound.
    """
    t = jnp.full((x_start.shape[0],), d.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = q_mean_variance(d, x_start, t)
    return meanflat(normal_kl(mean, log_variance, 0.0, 0.0)) / np.log(2.0)


def calc_bpd_loop(
    d: GaussianDiffusion,
    model_fn: ModelFn,
    x_start: jax.Array,
    rng: jax.Array,
    clip_denoised: bool = True,
) -> dict[str, jax.Array]:
    """The full variational bound: every one of the T terms for every image.

    All T terms run inside one `lax.scan`, so this is a single compiled program whose size does
    not grow with T. The noise of term t is drawn from `fold_in(rng, t)`.

    Args:
      d: the diffusion.
      model_fn: (x_t [B, H, W, C], t [B]) -> model output.
      x_start: [B, H, W, C] clean data in [-1, 1].
      rng: a PRNG key.
      clip_denoised: clip the predicted x_0 (the original evaluation does).

    Returns:
      dict with `total_bpd` [B] (= sum of `vb` over t + `prior_bpd`), `prior_bpd` [B],
      `vb` [B, T] (L_t in bits/dim), `xstart_mse` [B, T] and `mse` [B, T] (the eps MSE).
    """
    batch = x_start.shape[0]

    def term(carry, t_scalar):
        t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x_start.shape, x_start.dtype)
        x_t = q_sample(d, x_start, t, noise)
        vb = vb_terms_bpd(d, model_fn(x_t, t), x_start, x_t, t, clip_denoised=clip_denoised)
        eps = predict_eps_from_xstart(d, x_t, t, vb['pred_xstart'])
        return carry, (
            vb['output'],
            meanflat(jnp.square(vb['pred_xstart'] - x_start)),
            meanflat(jnp.square(eps - noise)),
        )

    ts = jnp.arange(d.num_timesteps, dtype=jnp.int32)
    _, (vb_tb, xstart_mse_tb, mse_tb) = jax.lax.scan(term, None, ts)
    prior = prior_bpd(d, x_start)
    vb_bt = vb_tb.T
    return {
        'total_bpd': jnp.sum(vb_bt, axis=1) + prior,
        'prior_bpd': prior,
        'vb': vb_bt,
        'xstart_mse': xstart_mse_tb.T,
        'mse': mse_tb.T,
    }
