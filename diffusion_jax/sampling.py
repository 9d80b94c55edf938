"""Sampling: the whole reverse chain as one compiled program.

Ancestral sampling is the paper's Algorithm 2 (Ho et al. 2020); with fewer steps than T it uses
Improved DDPM's respacing (Nichol & Dhariwal 2021, section 4: betas recomputed from alpha_bar on
the kept steps). `ddim` is Song et al. 2021, eq. 12, with noise scale eta
(`diffusion.ddim_step`). Both samplers and the interpolation of Ho et al. 2020, section 6.3 run
the same reverse chain: every step inside one `jax.lax.scan`, so compile time and memory do not
grow with the number of steps.

Class-conditional networks (`model.num_classes` K > 0) draw image i of class `image_labels`: i mod
K (every class in turn) or one chosen class, or the labels a caller passes. With guidance scale
w > 0 every step runs classifier-free guidance (Ho & Salimans 2022): the network sees the batch
twice, with its labels and with the null label K, in one call, and the prediction is
(1 + w) out(x, y) - w out(x, null) (`guide`).

Image i of a call depends only on (rng, first_index + i) and its label: its noise comes from
`fold_in(rng, first_index + i)`, so batch size and device count do not change the images. Any
batch size runs on any number of devices: a `Sampler` over a mesh draws the batch padded up to a
multiple of the device count (the extra rows are images first_index + batch_size, ...) and
drops the padding.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import options, parallel
from diffusion_jax import spacing as spacing_lib

# How many predicted x_0 snapshots `return_trajectory=True` records (the paper's Figure 6).
NUM_TRAJECTORY_FRAMES = 10

# Images [B, H, W, C] in [-1, 1], or (images, trajectory [B, K, H, W, C]).
Samples = jax.Array | tuple[jax.Array, jax.Array]
# What draws them: `sample_fn(params, rng, first_index)`. A `Sampler` is one; so is any wrapper
# with that call.
SampleFn = Callable[[Any, jax.Array, int], Samples]
# One reverse step: (x_t [B, H, W, C], step index i) -> (x_{t-1}, predicted x_0), both [B, H, W, C].
StepFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def spaced_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """`num_steps` evenly spaced timesteps from 0 to T-1 inclusive (`spacing.even_timesteps`)."""
    return spacing_lib.even_timesteps(num_timesteps, num_steps)


def respace(
    d: diffusion_lib.GaussianDiffusion, timesteps: np.ndarray
) -> diffusion_lib.GaussianDiffusion:
    """The diffusion restricted to `timesteps`: beta_i = 1 - abar[tau_i] / abar[tau_{i-1}].

    alpha_bar comes from the float64 betas `d` was built from, not from its float32 tables.
    """
    alpha_bar = np.cumprod(1.0 - d.betas_float64())[timesteps]
    betas = 1.0 - alpha_bar / np.append(1.0, alpha_bar[:-1])
    return diffusion_lib.GaussianDiffusion.create(
        betas, d.model_mean_type, d.model_var_type, d.loss_type
    )


def image_labels(indices: Any, num_classes: int, class_label: int) -> Any:
    """The label of each image index [N] (NumPy or JAX): i mod K for -1, else `class_label`."""
    if class_label < 0:
        return indices % num_classes
    return indices * 0 + class_label


def guide(cond: jax.Array, uncond: jax.Array, guidance_scale: float, channels: int) -> jax.Array:
    """Classifier-free guidance of network outputs [B, H, W, C or 2C].

    The prediction's first `channels` (eps, or x_0 / the mean for such networks: each is affine
    in eps at fixed x_t, so the same combination) become (1 + w) cond - w uncond; a learned
    variance (the other channels) is the conditional branch's.
    """
    mean = (1.0 + guidance_scale) * cond[..., :channels] - guidance_scale * uncond[..., :channels]
    return jnp.concatenate([mean, cond[..., channels:]], axis=-1)


def model_output(
    model: Any,
    params: Any,
    x: jax.Array,
    t: jax.Array,
    labels: jax.Array | None = None,
    guidance_scale: float = 0.0,
) -> jax.Array:
    """The network's prediction at (x [B, H, W, C], t [B]), conditioned and guided.

    A conditional network (`model.num_classes` > 0) given no labels sees the null label
    (unconditional); with `guidance_scale` > 0 both branches run as one call on 2B rows,
    interleaved so that each device keeps its own rows.
    """
    num_classes = getattr(model, 'num_classes', 0)
    if not num_classes:
        return model.apply({'params': params}, x, t, train=False)
    null = jnp.full(x.shape[:1], num_classes, jnp.int32)
    labels = null if labels is None else labels
    if not guidance_scale:
        return model.apply({'params': params}, x, t, labels, train=False)

    def twice(a):  # [B, ...] -> [2B, ...]: rows 2i and 2i + 1 are row i
        return jnp.repeat(a, 2, axis=0)

    both = jnp.stack([labels, null], axis=1).reshape(-1)  # y_0, null, y_1, null, ...
    out = model.apply({'params': params}, twice(x), twice(t), both, train=False)
    out = out.reshape(x.shape[0], 2, *out.shape[1:])
    return guide(out[:, 0], out[:, 1], guidance_scale, x.shape[-1])


def _per_image_keys(rng: jax.Array, first_index: jax.Array, batch_size: int) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(first_index + jnp.arange(batch_size))


def _normal_per_image(keys: jax.Array, step: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape))(keys)


def _denoise_step(
    model: Any,
    params: Any,
    d: diffusion_lib.GaussianDiffusion,
    model_t: np.ndarray,
    noise: Callable[[jax.Array], jax.Array],
    *,
    sampler: str,
    eta: float,
    clip_denoised: bool,
    labels: jax.Array | None = None,
    guidance_scale: float = 0.0,
) -> StepFn:
    """Step i of the chain: the model at timestep `model_t[i]`, then `sampler`'s update.

    `d` is the diffusion whose tables step i indexes (respaced for fewer steps than T) and
    `noise(i)` the z [B, H, W, C] of step i. `labels` [B] and `guidance_scale` condition a
    class-conditional network (`model_output`).
    """
    model_t = jnp.asarray(model_t, jnp.int32)

    def step(x, i):
        batch = x.shape[0]
        t_model = jnp.full((batch,), model_t[i])
        out = model_output(model, params, x, t_model, labels, guidance_scale)
        t = jnp.full((batch,), i, jnp.int32)
        if sampler == 'ancestral':
            return diffusion_lib.p_sample(d, out, x, t, noise(i), clip_denoised=clip_denoised)
        return diffusion_lib.ddim_step(d, out, x, t, noise(i), eta=eta, clip_denoised=clip_denoised)

    return step


def _reverse_chain(
    step: StepFn, x_init: jax.Array, num_steps: int, *, num_frames: int = 0
) -> tuple[jax.Array, jax.Array | None]:
    """Runs `x = step(x, i)[0]` for i = num_steps - 1 down to 0 in one `lax.scan`.

    Args:
      step: one reverse step, see `StepFn`.
      x_init: [B, H, W, C] the start of the chain (x_T, or the noised latents).
      num_steps: the chain's length.
      num_frames: record the predicted x_0 at this many evenly spaced steps; 0 records none.

    Returns:
      (x_0 [B, H, W, C], trajectory [B, num_frames, H, W, C] with the noisiest frame first, or
      None when `num_frames` is 0).
    """
    # Step i (counting down) records frame slot[i] when slot[i] >= 0.
    slot = np.full(num_steps, -1, np.int32)
    if num_frames:
        slot[spaced_timesteps(num_steps, num_frames)[::-1]] = np.arange(num_frames)
    slot = jnp.asarray(slot)

    def body(carry, i):
        x, traj = carry
        x, pred_x0 = step(x, i)
        if num_frames:
            k = slot[i]
            updated = jax.lax.dynamic_update_index_in_dim(traj, pred_x0, jnp.maximum(k, 0), 0)
            traj = jnp.where(k >= 0, updated, traj)
        return (x, traj), None

    traj_init = jnp.zeros((num_frames, *x_init.shape), jnp.float32)
    steps = jnp.arange(num_steps - 1, -1, -1)
    (x, traj), _ = jax.lax.scan(body, (x_init, traj_init), steps)
    return x, (jnp.moveaxis(traj, 0, 1) if num_frames else None)


def _sample_chain(
    params: Any,
    rng: jax.Array,
    first_index: jax.Array,
    labels: jax.Array | None = None,
    *,
    rows: int,
    mesh: Mesh | None,
    image_shape: tuple[int, int, int],
    num_steps: int,
    num_frames: int,
    class_label: int,
    **step_kwargs: Any,
) -> Samples:
    """Images first_index, ..., first_index + rows - 1: [rows, H, W, C] (and the trajectory).

    A conditional network draws the rows of `labels` [n <= rows] with those labels and the
    others with `image_labels`. `step_kwargs` are `_denoise_step`'s model, d, model_t, sampler,
    eta, clip_denoised and guidance_scale.
    """
    keys = _per_image_keys(rng, first_index, rows)
    num_classes = getattr(step_kwargs['model'], 'num_classes', 0)
    y = None
    if num_classes:
        y = image_labels(first_index + jnp.arange(rows), num_classes, class_label)
        if labels is not None:
            y = y.at[: labels.shape[0]].set(labels)
    if mesh is not None:  # every device runs the whole chain on its slice of the batch
        keys = jax.lax.with_sharding_constraint(keys, parallel.batch_sharding(mesh))
        if y is not None:
            y = jax.lax.with_sharding_constraint(y, parallel.batch_sharding(mesh))
    step = _denoise_step(
        params=params,
        noise=lambda i: _normal_per_image(keys, i + 1, image_shape),
        labels=y,
        **step_kwargs,
    )
    x_init = _normal_per_image(keys, 0, image_shape)
    x, traj = _reverse_chain(step, x_init, num_steps, num_frames=num_frames)
    return x if traj is None else (x, traj)


class Sampler:
    """A compiled sampler: `sampler(params, rng, first_index=0, labels=None)` -> images.

    Over a mesh the chain runs on `padded_size` rows, `batch_size` rounded up to a multiple of the
    device count, sharded along the batch; parameters, rng and labels are replicated. Row i is
    image first_index + i whatever the padding, so the padding changes no image.

    Attributes:
      batch_size: images per call.
      padded_size: rows the chain computes per call (`batch_size` without a mesh).
      mesh: the device mesh, or None for default placement.
      num_classes: K of a class-conditional network, else 0.
    """

    def __init__(
        self,
        chain: Callable[..., Any],
        *,
        batch_size: int,
        mesh: Mesh | None,
        num_classes: int = 0,
    ):
        """`chain(params, rng, first_index[, labels], rows=n)` draws images first_index, ..."""
        self.batch_size = batch_size
        self.mesh = mesh
        self.num_classes = num_classes
        devices = 1 if mesh is None else mesh.size
        self.padded_size = -(-batch_size // devices) * devices
        padded = functools.partial(chain, rows=self.padded_size)
        if mesh is None:
            self._padded = self._exact = jax.jit(padded)
            return
        replicated = parallel.replicated(mesh)
        shard = functools.partial(jax.jit, in_shardings=replicated)  # every argument
        self._padded = shard(padded, out_shardings=parallel.batch_sharding(mesh))
        if self.padded_size == batch_size:
            self._exact = self._padded
        else:  # 5 rows cannot be split over 8 devices: the cut batch is replicated

            def cut(*args):
                return jax.tree.map(lambda x: x[:batch_size], padded(*args))

            self._exact = shard(cut, out_shardings=replicated)

    def _labels(self, labels: Any) -> tuple[jax.Array, ...]:
        """() or (labels,): checked caller labels, int [batch_size] in [0, K] (K: the null label).

        Without labels the compiled program takes three arguments, as it always has.
        """
        if labels is None:
            return ()
        if not self.num_classes:
            raise ValueError('labels given to the sampler of an unconditional network')
        if isinstance(labels, np.ndarray | list | tuple):
            values = np.asarray(labels)
            if values.shape != (self.batch_size,) or not np.issubdtype(values.dtype, np.integer):
                raise ValueError(
                    f'labels must be integers [{self.batch_size}] (one per image of the batch), '
                    f'got {values.dtype} {list(values.shape)}'
                )
            if values.size and (values.min() < 0 or values.max() > self.num_classes):
                raise ValueError(
                    f'labels must be in [0, {self.num_classes}] ({self.num_classes}: the null '
                    f'label, unconditional), got {values.min()} to {values.max()}'
                )
        return (jnp.asarray(labels, jnp.int32),)

    def __call__(
        self,
        params: Any,
        rng: jax.Array,
        first_index: int | jax.Array = 0,
        labels: Any = None,
    ) -> Samples:
        """Images first_index, ...: [batch_size, H, W, C] in [-1, 1] (or (images, trajectory)).

        `labels`: int [batch_size], the class of each image of a conditional network (None:
        `image_labels` of the sampler's class_label).
        """
        index = jnp.asarray(first_index, jnp.int32)
        return self._exact(params, rng, index, *self._labels(labels))

    def sample_padded(
        self, params: Any, rng: jax.Array, first_index: int | jax.Array = 0, labels: Any = None
    ) -> tuple[Samples, int]:
        """(images [padded_size, H, W, C] sharded over the mesh, batch_size): real rows first.

        For consumers that keep streaming the batch on the devices; rows from `batch_size` on
        are images first_index + batch_size, ..., valid draws that the caller drops.
        """
        index = jnp.asarray(first_index, jnp.int32)
        return self._padded(params, rng, index, *self._labels(labels)), self.batch_size

    def lower(
        self,
        params: Any,
        rng: jax.Array,
        first_index: int | jax.Array | jax.ShapeDtypeStruct = 0,
        labels: Any = None,
    ) -> Any:
        """Ahead-of-time lowering of `__call__`: `.compile()(params, rng, np.int32(i))` (plus the
        labels when lowered with labels). Abstract arguments (`jax.ShapeDtypeStruct`, e.g. for
        devices this host compiles for but lacks) are passed through as they are."""
        if not isinstance(first_index, jax.ShapeDtypeStruct):
            first_index = jnp.asarray(first_index, jnp.int32)
        return self._exact.lower(params, rng, first_index, *self._labels(labels))


def make_sample_fn(
    model: Any,
    diffusion: diffusion_lib.GaussianDiffusion,
    *,
    batch_size: int,
    image_shape: tuple[int, int, int],
    sampler: str = 'ancestral',
    num_steps: Any = None,
    spacing: str = 'even',
    eta: float = 0.0,
    clip_denoised: bool = True,
    return_trajectory: bool = False,
    mesh: Mesh | None = None,
    class_label: int = -1,
    guidance_scale: float = 0.0,
) -> Sampler:
    """Returns a `Sampler`: `sampler(params, rng, first_index=0, labels=None)`, jitted.

    Args:
      model, diffusion: the network (a linen module) and the diffusion it was trained with.
      batch_size, image_shape: images per call (any number), and (H, W, C).
      sampler: 'ancestral' or 'ddim'.
      num_steps: which timesteps the chain keeps (`spacing.kept_timesteps`): None (all T), an
        int <= T spread by `spacing`, 'ddimN', or Improved DDPM's sections ('10,15,20').
      spacing: how an int `num_steps` is spread: 'even' (the default) or 'iddpm'.
      eta: DDIM noise scale (0 = deterministic); ignored by 'ancestral'.
      clip_denoised: clip the predicted x_0 to [-1, 1] at every step.
      return_trajectory: also return the predicted x_0 [B, K, H, W, C] at K =
        `NUM_TRAJECTORY_FRAMES` evenly spaced steps, the noisiest first.
      mesh: shard the batch over this device mesh (`parallel.create_mesh()`); None: default.
      class_label: a conditional network's default labels (`image_labels`): -1 gives image i
        class i mod K, a class id gives every image that class.
      guidance_scale: classifier-free guidance w (`guide`); 0: plain conditional sampling.

    Returns:
      `sampler(params, rng, first_index=0, labels=None)` -> images [B, H, W, C] in [-1, 1] (or
      `(images, trajectory)`); `first_index` offsets the per-image keys, `labels` [B] overrides
      the default classes. Also `sampler.lower(...)` and `.sample_padded(...)`.
    """
    options.check_choice('sampler', sampler, options.SAMPLERS)
    timesteps = spacing_lib.kept_timesteps(diffusion.num_timesteps, num_steps, spacing)
    num_steps = len(timesteps)
    d = respace(diffusion, timesteps) if num_steps != diffusion.num_timesteps else diffusion
    chain = functools.partial(
        _sample_chain,
        mesh=mesh,
        image_shape=image_shape,
        num_steps=num_steps,
        num_frames=min(NUM_TRAJECTORY_FRAMES, num_steps) if return_trajectory else 0,
        model=model,
        d=d,
        model_t=timesteps,
        sampler=sampler,
        eta=eta,
        clip_denoised=clip_denoised,
        class_label=class_label,
        guidance_scale=guidance_scale,
    )
    classes = getattr(model, 'num_classes', 0)
    return Sampler(chain, batch_size=batch_size, mesh=mesh, num_classes=classes)


def make_ddim_codec(
    model: Any,
    diffusion: diffusion_lib.GaussianDiffusion,
    *,
    num_steps: Any = None,
    spacing: str = 'even',
    clip_denoised: bool = True,
) -> tuple[Callable[[Any, jax.Array], jax.Array], Callable[[Any, jax.Array], jax.Array]]:
    """(encode, decode): deterministic DDIM (eta = 0) between images and latents x_T, jitted.

    `encode(params, x0)` runs `diffusion.ddim_reverse_step` for t = 0, ..., S - 1 and
    `decode(params, x_T)` runs `ddim_step` with eta = 0 for t = S - 1, ..., 0, each one
    `lax.scan`; S steps kept from `num_steps` and `spacing` as `make_sample_fn` keeps them.
    Decoding an encoding recovers the image up to the ODE's discretisation error. Clipping the
    predicted x_0 (the default, as Improved DDPM's `ddim_reverse_sample`) matters: without it
    the last steps of a schedule whose alpha_bar ends near 0 (cosine: 4e-8 at T=250) multiply
    the model's error by 1 / sqrt(alpha_bar).

    Args (of both): params, [B, H, W, C] images in [-1, 1] or latents, and for a conditional
    network optional labels [B] (None: the null label).
    """
    timesteps = spacing_lib.kept_timesteps(diffusion.num_timesteps, num_steps, spacing)
    num_steps = len(timesteps)
    d = respace(diffusion, timesteps) if num_steps != diffusion.num_timesteps else diffusion
    model_t = jnp.asarray(timesteps, jnp.int32)

    def encode(params, x0, labels=None):
        def body(x, i):
            t = jnp.full((x.shape[0],), i, jnp.int32)
            out = model_output(model, params, x, jnp.full_like(t, model_t[i]), labels)
            x = diffusion_lib.ddim_reverse_step(d, out, x, t, clip_denoised=clip_denoised)
            return x, None

        return jax.lax.scan(body, x0, jnp.arange(num_steps))[0]

    def decode(params, x_end, labels=None):
        step = _denoise_step(
            model,
            params,
            d,
            timesteps,
            lambda i: jnp.zeros_like(x_end),  # eta = 0 draws no noise
            sampler='ddim',
            eta=0.0,
            clip_denoised=clip_denoised,
            labels=labels,
        )
        return _reverse_chain(step, x_end, num_steps)[0]

    return jax.jit(encode), jax.jit(decode)


def make_score_fn(model: Any, diffusion: diffusion_lib.GaussianDiffusion) -> Callable:
    """Returns `score_fn(params, x, t, labels=None) = -eps(x, t) / sqrt(1 - alpha_bar_t)`.

    (The Song & Ermon link.) x: [B, H, W, C]; t: [B] int; labels: [B] for a conditional network
    (None: the null label). For x_0- or mean-predicting models eps is derived from the
    predicted x_0 (unclipped).
    """

    def score_fn(params, x, t, labels=None):
        out = model_output(model, params, x, t, labels)
        if diffusion.model_mean_type == 'eps':
            eps = diffusion_lib.split_model_output(diffusion, out)[0]
        else:
            x0 = diffusion_lib.p_mean_variance(diffusion, out, x, t, False)['pred_xstart']
            eps = diffusion_lib.predict_eps_from_xstart(diffusion, x, t, x0)
        return -eps / diffusion.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]

    return score_fn


def make_interpolate_fn(
    model: Any,
    diffusion: diffusion_lib.GaussianDiffusion,
    *,
    image_shape: tuple[int, int, int],
    t: int,
    num_lambdas: int = 11,
    clip_denoised: bool = True,
) -> Callable:
    """Returns a jitted `interpolate_fn(params, x0_a, x0_b, rng)` (Ho et al. 2020, section 6.3).

    Both sources are noised to step `t` with the same noise (the stochastic encoder q(x_t|x_0)),
    the latents are mixed as (1 - lambda) x_t^a + lambda x_t^b for `num_lambdas` values of
    lambda evenly spaced in [0, 1], and each mix is denoised by the ancestral chain from t down
    to 0 (the samplers' chain, one `lax.scan` of t + 1 steps). The reverse noise of step s is
    drawn from `fold_in(split(rng)[1], s)` and shared across lambda, so neighbouring columns
    differ only through lambda. A class-conditional network interpolates with the null label,
    its unconditional branch.

    Args (of `interpolate_fn`):
      x0_a, x0_b: [H, W, C] source images in [-1, 1].
      rng: key for the encoder noise and the reverse chain.

    Returns:
      `interpolate_fn(...) -> [num_lambdas, H, W, C]` in [-1, 1]; the first and last entries are
      reconstructions of x0_a and x0_b from step t.
    """
    if not 0 <= t < diffusion.num_timesteps:
        raise ValueError(f'interpolation step t must be in [0, {diffusion.num_timesteps}), got {t}')
    if num_lambdas < 2:
        raise ValueError(f'num_lambdas must be >= 2, got {num_lambdas}')
    lambdas = jnp.linspace(0.0, 1.0, num_lambdas).reshape(-1, 1, 1, 1)
    shape = (num_lambdas, *image_shape)

    def interpolate_fn(params, x0_a, x0_b, rng):
        enc_rng, dec_rng = jax.random.split(rng)
        noise = jax.random.normal(enc_rng, (1, *image_shape))
        t_enc = jnp.full((1,), t, jnp.int32)
        x_a = diffusion_lib.q_sample(diffusion, x0_a[None], t_enc, noise)
        x_b = diffusion_lib.q_sample(diffusion, x0_b[None], t_enc, noise)
        x_t = (1.0 - lambdas) * x_a + lambdas * x_b

        def shared_noise(i):
            return jnp.broadcast_to(
                jax.random.normal(jax.random.fold_in(dec_rng, i), image_shape), shape
            )

        step = _denoise_step(
            model,
            params,
            diffusion,
            np.arange(t + 1),
            shared_noise,
            sampler='ancestral',
            eta=0.0,
            clip_denoised=clip_denoised,
        )
        return _reverse_chain(step, x_t, t + 1)[0]

    return jax.jit(interpolate_fn)
