"""The choices each option takes and the rules that tie options together, defined once.

Imported by the configs, by `config_lib`'s validation and by the code that acts on the options
(`diffusion`, `schedules`, `models`, `sampling`, `train_state`), so a new choice or rule is added
in one place. Pure Python: no JAX, so validating a config stays instant.
"""

from collections.abc import Sequence

MODELS = ('ddpm_unet',)
DTYPES = ('float32', 'bfloat16', 'float16')
# The sinusoidal timestep embedding: the original's [sin, cos] or Improved DDPM's [cos, sin]
# (whose frequencies also differ slightly); see models.layers.get_timestep_embedding.
TIME_EMBEDDINGS = ('ddpm', 'iddpm')
# How the 3x3 convolutions are computed (models.layers.conv3x3): XLA's convolution, one im2col
# matmul, nine shifted matmuls or Winograd's F(2x2, 3x3) (stride-1 convs; models.winograd);
# 'auto' takes AUTO_CONV_IMPL of the backend: XLA's everywhere, the fastest measured for the
# digits network on a CPU too (BENCHMARKS.md). The same parameters and function whichever is used.
CONV_IMPLS = ('auto', 'im2col', 'shifted', 'winograd', 'xla')
AUTO_CONV_IMPL = {'cpu': 'xla', 'gpu': 'xla', 'tpu': 'xla'}
# How Upsample's nearest-neighbour x2 and 3x3 conv are computed: 'repeat' (the original's) or
# 'subpixel' (four 2x2 convs, models.subpixel). 'auto' takes AUTO_UPSAMPLE_IMPL of the backend:
# 'subpixel' where it was measured faster (the CPU, BENCHMARKS.md), 'repeat' where it was not
# measured. The same parameters and function whichever is used.
UPSAMPLE_METHODS = ('repeat', 'subpixel')  # what 'auto' resolves to: layers.Upsample's impl
UPSAMPLE_IMPLS = ('auto', *UPSAMPLE_METHODS)
AUTO_UPSAMPLE_IMPL = {'cpu': 'subpixel', 'gpu': 'repeat', 'tpu': 'repeat'}
# How the 1x1 layers (the original's `nin`: residual shortcuts, attention's q, k, v and proj_out)
# are computed: 'dense' (a matmul over the channel axis, the original's) or 'conv' (XLA's 1x1
# convolution, whose kernel gradient XLA:CPU computes as fast as its 3x3 convs' where the dense
# form's is a slow transposed matmul). 'auto' takes AUTO_NIN_IMPL of the backend: 'conv' where it
# was measured faster (the CPU, BENCHMARKS.md), 'dense' where it was not measured. The same
# parameters ([C_in, C_out] kernels) and function whichever is used.
NIN_METHODS = ('conv', 'dense')  # what 'auto' resolves to: layers.nin's impl
NIN_IMPLS = ('auto', *NIN_METHODS)
AUTO_NIN_IMPL = {'cpu': 'conv', 'gpu': 'dense', 'tpu': 'dense'}
# How the convolutions' gradients are computed (models.conv.conv2d): 'jax' (JAX's transpose
# rules) or 'nhwc' (both written as forward NHWC/HWIO convolutions, which XLA:CPU runs as Eigen
# convolutions inside loop bodies too, where it leaves JAX's as slow generic loops: lax.scan,
# microbatches). 'auto' takes AUTO_CONV_VJP of the backend: 'nhwc' on the CPU (equal bit for bit
# to 'jax' outside loops; BENCHMARKS.md), 'jax' where it was not measured. The same function.
CONV_VJP_METHODS = ('jax', 'nhwc')  # what 'auto' resolves to: models.conv.conv2d's vjp
CONV_VJPS = ('auto', *CONV_VJP_METHODS)
AUTO_CONV_VJP = {'cpu': 'nhwc', 'gpu': 'jax', 'tpu': 'jax'}
# The stride-2 downsampling conv's padding: TF 'SAME' (the original's) or PyTorch's 1 per side.
DOWNSAMPLE_PADDINGS = ('same', 'symmetric')
BETA_SCHEDULES = ('const', 'cosine', 'jsd', 'linear', 'linear_iddpm', 'quad')
MODEL_MEAN_TYPES = ('eps', 'xprev', 'xstart')
MODEL_VAR_TYPES = ('fixedlarge', 'fixedsmall', 'learned', 'learned_range')
# These variance types make the network predict log-variance coefficients next to the mean.
LEARNED_VAR_TYPES = ('learned', 'learned_range')
# 'hybrid' is Improved DDPM's default (rescale_learned_sigmas=True): mse + 0.001 T L_vlb;
# 'hybrid_unscaled' its rescale_learned_sigmas=False: mse + L_vlb.
LOSS_TYPES = ('hybrid', 'hybrid_unscaled', 'kl', 'mse', 'rescaled_kl')
HYBRID_LOSS_TYPES = ('hybrid', 'hybrid_unscaled')
OPTIMIZERS = ('adam', 'adamw')
SAMPLERS = ('ancestral', 'ddim')
# How training draws t: uniformly (the paper) or by Improved DDPM's loss-second-moment rule.
T_SAMPLERS = ('loss_second_moment', 'uniform')
LOADERS = ('auto', 'grain', 'tfdata')
# What training may keep its best checkpoint by ('' keeps none): Inception's FID and IS, or the
# digits classifier's FD and IS (digits only).
BEST_METRICS = ('', 'digits_fd', 'digits_is', 'fid', 'inception_score')


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raises ValueError naming the choices unless `value` is one of them."""
    if value not in choices:
        raise ValueError(f'unknown {name} {value!r}; choose one of {sorted(choices)}')


def loss_and_variance_problem(loss_type: str, model_var_type: str) -> tuple[str, str] | None:
    """(what is wrong, the fix) when `loss_type` cannot train `model_var_type`, else None.

    Only a variational term trains a learned variance: L_simple ('mse') leaves it untrained, and
    'hybrid' = L_simple + lambda L_vlb (and 'hybrid_unscaled', lambda = 1 / T) exists to train one
    (Nichol & Dhariwal 2021, section 3.1).
    """
    learned = model_var_type in LEARNED_VAR_TYPES
    if loss_type == 'mse' and learned:
        return (
            f"'mse' never trains diffusion.model_var_type {model_var_type!r}",
            "use model_var_type 'fixedlarge' or 'fixedsmall', or loss_type 'hybrid'",
        )
    if loss_type in HYBRID_LOSS_TYPES and not learned:
        return (
            f'{loss_type!r} trains a learned variance, but diffusion.model_var_type is '
            f'{model_var_type!r}',
            "set model_var_type to 'learned' or 'learned_range', or use loss_type 'mse'",
        )
    return None


def downsampling_factor(ch_mult: Sequence[int]) -> int:
    """How much the U-Net shrinks the image: it halves it once between consecutive levels."""
    return 2 ** (len(ch_mult) - 1)


def unet_resolutions(image_size: int, ch_mult: Sequence[int]) -> list[int]:
    """The feature-map sizes the U-Net sees, largest first (attention must use one of them)."""
    return [image_size // 2**i for i in range(len(ch_mult))]
