"""Building blocks of the DDPM U-Net (Ho et al. 2020, Appendix B; the original `diffusion_tf/nn.py`
and `diffusion_tf/models/unet.py`).

The sinusoidal timestep embedding (Vaswani et al. 2017, as in tensor2tensor), the Wide-ResNet
style residual block with an additive timestep projection, single-head self-attention over all
spatial positions, and the stride-2 down- and nearest-neighbour upsampling layers. Submodule
names mirror the original TensorFlow variable scopes (`norm1`, `conv1`, `temb_proj`, `q`,
`proj_out`, ...) so that original checkpoints can be ported name for name.

Every module takes `dtype` (the compute dtype) and `param_dtype` (the storage dtype of its
parameters) and passes both to its Conv, Dense and GroupNorm layers.
"""

import functools
import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax import options
from diffusion_jax.models import conv, subpixel, winograd

# The original uses tf.contrib.layers.group_norm, whose epsilon is 1e-6 (PyTorch ports use 1e-5).
GROUP_NORM_EPSILON = 1e-6


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """Variance scaling, fan_avg, uniform: the original's initializer for every kernel.

    Args:
        scale: variance scale; 0 stands for 1e-10, the original's near-zero init of the last
            layer of each residual branch and of the output conv.

    Returns:
        A Flax initializer.
    """
    return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, 'fan_avg', 'uniform')


def get_timestep_embedding(
    timesteps: jax.typing.ArrayLike, embedding_dim: int, flavor: str = 'ddpm'
) -> jax.Array:
    """The sinusoidal timestep embedding, in the original's or Improved DDPM's arrangement.

    'ddpm' (the original, after tensor2tensor): [sin(t f_i), cos(t f_i)] with
    f_i = exp(-ln(10000) i / (half - 1)). 'iddpm' (Improved DDPM's `timestep_embedding`):
    [cos(t f_i), sin(t f_i)] with f_i = exp(-ln(10000) i / half). i = 0 .. half - 1.

    Args:
        timesteps: [B] timesteps (0-indexed; float when rescaled).
        embedding_dim: D, the embedding width; an odd D gets a zero last column.
        flavor: 'ddpm' or 'iddpm' (options.TIME_EMBEDDINGS).

    Returns:
        [B, D] float32 embedding.
    """
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim != 1:
        raise ValueError(f'timesteps must have shape [B], got {timesteps.shape}')
    half_dim = embedding_dim // 2
    if half_dim < 2:
        # The frequency spacing divides by half_dim - 1.
        raise ValueError(f'embedding_dim must be at least 4, got {embedding_dim}')
    options.check_choice('timestep embedding', flavor, options.TIME_EMBEDDINGS)
    divisor = half_dim - 1 if flavor == 'ddpm' else half_dim
    freqs = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * -(math.log(10000) / divisor))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    waves = (jnp.sin(args), jnp.cos(args)) if flavor == 'ddpm' else (jnp.cos(args), jnp.sin(args))
    emb = jnp.concatenate(waves, axis=1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def conv3x3(
    features: int,
    *,
    name: str,
    dtype: Any,
    param_dtype: Any,
    init_scale: float = 1.0,
    strides: int = 1,
    padding: str | tuple[tuple[int, int], tuple[int, int]] = 'SAME',
    impl: str = 'xla',
    vjp: str = 'jax',
) -> nn.Module:
    """A 3x3 conv with TF 'SAME' padding (or explicit padding) and the original's initializer.

    Args:
        impl: 'xla' (XLA's convolution), 'im2col' (one matmul over the 9 shifted copies of the
            input, concatenated on the channel axis), 'shifted' (a sum of 9 matmuls, one per
            kernel tap) or 'winograd' (`models.winograd`, for a stride-1 conv padded by 1 on
            every side; XLA's for any other). The same parameters and function whichever it is.
        vjp: the gradients of XLA's convolution: 'jax' (`nn.Conv`) or 'nhwc'
            (`models.conv.conv2d`'s).
    """
    if impl == 'winograd' and not winograd.applies(strides, padding):
        impl = 'xla'
    if impl == 'xla' and vjp == 'jax':
        return nn.Conv(
            features,
            kernel_size=(3, 3),
            strides=(strides, strides),
            padding=padding,
            kernel_init=default_init(init_scale),
            dtype=dtype,
            param_dtype=param_dtype,
            name=name,
        )
    return Conv3x3(
        features,
        strides=strides,
        padding=padding,
        init_scale=init_scale,
        impl=impl,
        vjp=vjp,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def nin(
    features: int,
    *,
    name: str | None,
    dtype: Any,
    param_dtype: Any,
    init_scale: float = 1.0,
    impl: str = 'dense',
    vjp: str = 'jax',
) -> nn.Module:
    """The original's `nin`: a 1x1 layer on the channel axis of [B, H, W, C_in], kernel
    [C_in, C_out] and bias [C_out] with the original's initializer.

    Args:
        impl: 'dense' (`nn.Dense`, a matmul over the channel axis) or 'conv' (`Conv1x1`, XLA's
            1x1 convolution; options.NIN_IMPLS). The same parameters and function either way.
        vjp: the convolution's gradients for impl 'conv' (`models.conv.conv2d`'s vjp).
    """
    options.check_choice('nin impl', impl, options.NIN_METHODS)
    kwargs = {'kernel_init': default_init(init_scale), 'dtype': dtype, 'param_dtype': param_dtype}
    if impl == 'dense':
        return nn.Dense(features, name=name, **kwargs)
    return Conv1x1(features, vjp=vjp, name=name, **kwargs)


class Conv1x1(nn.Module):
    """`nn.Dense` on the channel axis of a [B, H, W, C_in] map, computed as a 1x1 convolution.

    The same parameters as `nn.Dense` (kernel [C_in, C_out], bias [C_out]) and the same function.
    XLA:CPU computes the kernel gradient of a convolution as fast as its 3x3 convs' (about 75
    GFLOP/s on one core of the project's VM), but the dense form's (a matmul contracting the
    [B H W] axis of both operands) at about 25: 1.8 ms of a 52.3 ms digits train step
    (BENCHMARKS.md).

    Attributes:
        features: C_out.
        kernel_init: initializer of the [C_in, C_out] kernel.
        vjp: `models.conv.conv2d`'s vjp.
        dtype: compute dtype.
        param_dtype: parameter storage dtype.
    """

    features: int
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    vjp: str = 'jax'
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C_in] -> [B, H, W, C_out]."""
        chex.assert_rank(x, 4)
        kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features),
                            self.param_dtype)  # fmt: skip
        bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return conv.conv2d(x, kernel[None, None], 1, 'VALID', self.vjp) + bias


class Conv3x3(nn.Module):
    """`nn.Conv`'s 3x3 convolution computed another way: the same params ('kernel' [3, 3, Cin,
    Cout], 'bias' [Cout]), initialisation and function.

    Attributes:
        features: Cout.
        strides: the stride of both spatial axes.
        padding: 'SAME' (TF's) or ((top, bottom), (left, right)).
        init_scale: `default_init`'s scale of the kernel.
        impl: 'im2col' (one [B Ho Wo, 9 Cin] x [9 Cin, Cout] matmul), 'shifted' (nine
            [B Ho Wo, Cin] x [Cin, Cout] matmuls, summed), 'winograd' (16 [B Ho Wo / 4,
            Cin] x [Cin, Cout] matmuls; stride 1 and padding 1 per side only) or 'xla'
            (`models.conv.conv2d`, whose gradients `vjp` chooses).
        vjp: `models.conv.conv2d`'s vjp, for impl 'xla'.
        dtype: compute dtype.
        param_dtype: parameter storage dtype.
    """

    features: int
    strides: int = 1
    padding: Any = 'SAME'
    init_scale: float = 1.0
    impl: str = 'im2col'
    vjp: str = 'jax'
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, Cin] -> [B, Ho, Wo, Cout]."""
        options.check_choice('conv impl', self.impl, ('im2col', 'shifted', 'winograd', 'xla'))
        _, h, w, cin = x.shape
        kernel_init = default_init(self.init_scale)
        kernel = self.param('kernel', kernel_init, (3, 3, cin, self.features), self.param_dtype)
        bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.impl == 'xla':
            return conv.conv2d(x, kernel, self.strides, self.padding, self.vjp) + bias
        if self.impl == 'winograd':
            if not winograd.applies(self.strides, self.padding):
                raise ValueError('Winograd convs take stride 1 and padding 1 per side only')
            return winograd.conv3x3(x, kernel) + bias
        s = self.strides
        (top, bottom), (left, right) = conv.explicit_padding(self.padding, (h, w), (3, 3), s)
        xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
        ho, wo = (h + top + bottom - 3) // s + 1, (w + left + right - 3) // s + 1
        taps = [
            xp[:, dy : dy + s * (ho - 1) + 1 : s, dx : dx + s * (wo - 1) + 1 : s, :]
            for dy in range(3)
            for dx in range(3)
        ]
        if self.impl == 'im2col':
            y = jnp.concatenate(taps, axis=-1) @ kernel.reshape(9 * cin, self.features)
        else:
            y = sum(tap @ kernel[i // 3, i % 3] for i, tap in enumerate(taps))
        return y + bias


def _concatenate(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.concatenate([a, b], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _concat_split_gradients(a: jax.Array, b: jax.Array, split: int) -> jax.Array:
    return jnp.concatenate([a, b], axis=-1)


def _concat_forward(a: jax.Array, b: jax.Array, split: int) -> tuple[jax.Array, None]:
    return _concat_split_gradients(a, b, split), None


def _concat_backward(split: int, _: None, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jax.lax.optimization_barrier((g[..., :split], g[..., split:]))


_concat_split_gradients.defvjp(_concat_forward, _concat_backward)


def concat_channels(a: jax.Array, b: jax.Array) -> jax.Array:
    """concat([a, b]) on the channel axis: [B, H, W, Ca], [B, H, W, Cb] -> [B, H, W, Ca + Cb].

    The same values and gradients as `jnp.concatenate`, but the two gradients leave the
    backward pass as buffers of their own. Otherwise XLA fuses the gradient's slices into their
    consumers, and the skip's slice is consumed only when the backward pass reaches the down
    path: the whole [B, H, W, Ca + Cb] gradient (summed from its two paths, each kept) stays
    alive until then, for every up block. The optimization barrier materialises the slices.
    """
    return _concat_split_gradients(a, b, a.shape[-1])


class ResnetBlock(nn.Module):
    """GroupNorm, swish, conv3x3, + Dense(swish(temb)), GroupNorm, swish, dropout, conv3x3.

    With `scale_shift` (Improved DDPM's `use_scale_shift_norm`) the timestep projection is twice
    as wide, [scale, shift], and modulates the second GroupNorm instead of being added before
    it: GroupNorm(h) * (1 + scale) + shift.

    Attributes:
        out_ch: output channels; None keeps the input's channel count.
        dropout: dropout rate before the second conv.
        num_groups: GroupNorm groups.
        epsilon: GroupNorm epsilon.
        scale_shift: modulate the second GroupNorm by the timestep embedding (see above).
        conv_impl: how the 3x3 convs are computed (`conv3x3`'s `impl`).
        nin_impl: how the 1x1 shortcut is computed (`nin`'s `impl`).
        conv_vjp: the convolutions' gradients (`models.conv.conv2d`'s `vjp`).
        separate_skip_gradients: concatenate a skip with `concat_channels`, whose gradients
            leave the backward pass as buffers of their own (the U-Net sets it with remat, where
            it keeps the peak memory down); else `jnp.concatenate`. The same numbers either way.
        dtype: compute dtype.
        param_dtype: parameter storage dtype.
    """

    out_ch: int | None = None
    dropout: float = 0.0
    num_groups: int = 32
    epsilon: float = GROUP_NORM_EPSILON
    scale_shift: bool = False
    conv_impl: str = 'xla'
    nin_impl: str = 'dense'
    conv_vjp: str = 'jax'
    separate_skip_gradients: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array, train: bool, skip: jax.Array | None = None
    ) -> jax.Array:
        """Applies the block.

        Args:
            x: [B, H, W, C] feature map.
            temb: [B, E] timestep embedding (after the embedding MLP).
            train: enables dropout (rng collection 'dropout'); positional or keyword
                (`RematResnetBlock` needs it positional, as a static argument).
            skip: [B, H, W, C'] skip connection of the U-Net's up path, or None. The block then
                runs on concat([x, skip]) ([B, H, W, C + C']): concatenated here, inside the
                block, so that under remat the block keeps x and the skip (which the network
                keeps anyway) rather than a copy of both.

        Returns:
            [B, H, W, out_ch] feature map.
        """
        if skip is not None:
            concat = concat_channels if self.separate_skip_gradients else _concatenate
            x = concat(x, skip)
        in_ch = x.shape[-1]
        out_ch = in_ch if self.out_ch is None else self.out_ch
        dtypes = {'dtype': self.dtype, 'param_dtype': self.param_dtype}
        norm = {'num_groups': self.num_groups, 'epsilon': self.epsilon, **dtypes}

        h = nn.swish(nn.GroupNorm(name='norm1', **norm)(x))
        convs = {'impl': self.conv_impl, 'vjp': self.conv_vjp, **dtypes}
        h = conv3x3(out_ch, name='conv1', **convs)(h)
        width = 2 * out_ch if self.scale_shift else out_ch
        temb_proj = nn.Dense(width, kernel_init=default_init(), name='temb_proj', **dtypes)
        emb = temb_proj(nn.swish(temb))[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(emb, 2, axis=-1)
            h = nn.GroupNorm(name='norm2', **norm)(h) * (1 + scale) + shift
        else:
            h = nn.GroupNorm(name='norm2', **norm)(h + emb)
        h = nn.swish(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        # Near-zero init makes each fresh block start close to the identity.
        h = conv3x3(out_ch, init_scale=0.0, name='conv2', **convs)(h)

        if in_ch != out_ch:
            x = nin(out_ch, name='nin_shortcut', impl=self.nin_impl, vjp=self.conv_vjp, **dtypes)(x)
        return x + h


def cudnn_max_head_dim(device: Any = None) -> int | None:
    """The widest head cuDNN's fused flash attention takes on this machine, or None if it has none.

    cuDNN's fused attention needs a CUDA GPU of compute capability 8.0 or later and takes heads
    of at most 256 channels on Hopper and later (128 before). The model builder (`get_model`)
    asks once and hands the answer to the attention blocks, which never query the devices.

    Args:
        device: the device to answer for, e.g. a compile-only GPU of a machine without one
            (`benchmarks.gpu_compile`); None: this machine's default backend's first device.

    Returns:
        256 or 128 on a CUDA GPU of compute capability >= 9.0 or 8.x;
        None on other backends, older GPUs and GPUs without a CUDA capability (e.g. ROCm).
    """
    platform = jax.default_backend() if device is None else device.platform
    if platform != 'gpu':
        return None
    device = jax.devices()[0] if device is None else device
    try:
        major = int(device.compute_capability.split('.')[0])
    except (AttributeError, ValueError):  # not a CUDA device (e.g. ROCm): no cuDNN
        return None
    if major < 8:
        return None
    return 256 if major >= 9 else 128


def attention_implementation(dtype: Any, head_dim: int, max_head_dim: int | None) -> str | None:
    """'cudnn' (cuDNN's fused flash attention) where it supports the call, else None (XLA's).

    `jax.nn.dot_product_attention` uses cuDNN only when asked; cuDNN needs 16-bit inputs and a
    head dim that is a multiple of 8 and at most what the GPU takes. Elsewhere XLA's
    implementation is used.

    Args:
        dtype: the dtype of q, k and v.
        head_dim: channels per head.
        max_head_dim: `cudnn_max_head_dim()` of the machine; None: no cuDNN attention.

    Returns:
        The `implementation` argument of `jax.nn.dot_product_attention`.
    """
    if max_head_dim is None or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return None
    return 'cudnn' if head_dim % 8 == 0 and head_dim <= max_head_dim else None


class AttnBlock(nn.Module):
    """Self-attention over all H*W positions, with a residual connection.

    One head by default, as in the original; with several, head n uses channels
    [n C / heads, (n + 1) C / heads) of q, k and v.

    Attributes:
        num_heads: attention heads; must divide the channel count.
        num_groups: GroupNorm groups.
        epsilon: GroupNorm epsilon.
        dtype: compute dtype.
        param_dtype: parameter storage dtype.
        cudnn_max_head_dim: `cudnn_max_head_dim()` of the machine, decided when the model is
            built; None (the default) always uses XLA's attention.
        nin_impl: how q, k, v and proj_out are computed (`nin`'s `impl`).
        conv_vjp: their gradients with nin_impl 'conv' (`models.conv.conv2d`'s `vjp`).
    """

    num_heads: int = 1
    num_groups: int = 32
    epsilon: float = GROUP_NORM_EPSILON
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    cudnn_max_head_dim: int | None = None
    nin_impl: str = 'dense'
    conv_vjp: str = 'jax'

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x + proj_out(softmax(q k^T / sqrt(d)) v) per head of d = C / heads channels, with q, k, v
        1x1 projections of GroupNorm(x).

        Args:
            x: [B, H, W, C] feature map.

        Returns:
            [B, H, W, C] feature map.
        """
        b, height, width, c = x.shape
        dtypes = {'dtype': self.dtype, 'param_dtype': self.param_dtype}
        h = nn.GroupNorm(num_groups=self.num_groups, epsilon=self.epsilon, name='norm', **dtypes)(x)
        nins = {'impl': self.nin_impl, 'vjp': self.conv_vjp, **dtypes}
        q, k, v = (nin(c, name=name, **nins)(h) for name in 'qkv')
        if c % self.num_heads:
            raise ValueError(f'{self.num_heads} attention heads cannot split {c} channels')
        head_dim = c // self.num_heads
        # [B, T, N, d]; the default scale is 1 / sqrt(d), as in the original (one head, d = C).
        q, k, v = (a.reshape(b, height * width, self.num_heads, head_dim) for a in (q, k, v))
        implementation = attention_implementation(q.dtype, head_dim, self.cudnn_max_head_dim)
        h = jax.nn.dot_product_attention(q, k, v, implementation=implementation)
        h = h.reshape(b, height, width, c)
        h = nin(c, init_scale=0.0, name='proj_out', **nins)(h)
        return x + h


class Downsample(nn.Module):
    """Halves H and W: a stride-2 3x3 conv, or 2x2 average pooling.

    TF's 'SAME' padding (which Flax and lax share) pads an even-sized input only at the bottom
    and right for a stride-2 3x3 conv; PyTorch's symmetric padding of 1 (Improved DDPM's) is a
    different function, chosen with `padding='symmetric'`.

    Attributes:
        with_conv: use the conv (else average pooling, which has no parameters).
        padding: the conv's padding: 'same' (the original's) or 'symmetric' (1 on every side).
        conv_impl: how the conv is computed (`conv3x3`'s `impl`).
        conv_vjp: its gradients (`models.conv.conv2d`'s `vjp`).
        dtype: compute dtype.
        param_dtype: parameter storage dtype.
    """

    with_conv: bool = True
    padding: str = 'same'
    conv_impl: str = 'xla'
    conv_vjp: str = 'jax'
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Downsamples x: [B, H, W, C] -> [B, ceil(H / 2), ceil(W / 2), C] (even H, W)."""
        if self.with_conv:
            options.check_choice('downsample padding', self.padding, options.DOWNSAMPLE_PADDINGS)
            return conv3x3(
                x.shape[-1],
                strides=2,
                padding='SAME' if self.padding == 'same' else ((1, 1), (1, 1)),
                impl=self.conv_impl,
                vjp=self.conv_vjp,
                name='conv',
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )(x)
        # TF's avg_pool leaves padded cells out of the mean (matters only for odd sizes).
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding='SAME', count_include_pad=False)


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour x2, then a 3x3 conv.

    The original resizes with align_corners=True; for an exact factor of 2 its nearest source
    index round(i (H - 1) / (2H - 1)) equals i // 2, i.e. each pixel repeated twice.

    Attributes:
        with_conv: apply the 3x3 conv after resizing.
        conv_impl: how the conv is computed (`conv3x3`'s `impl`) when `impl` is 'repeat'.
        impl: 'repeat' (repeat each pixel, then the 3x3 conv: the original's computation) or
            'subpixel' (`models.subpixel`: four 2x2 convs of the input with XLA's convolution,
            2.25x fewer multiplies). The same parameters and function.
        conv_vjp: the convolutions' gradients (`models.conv.conv2d`'s `vjp`).
        dtype: compute dtype.
        param_dtype: parameter storage dtype.
    """

    with_conv: bool = True
    conv_impl: str = 'xla'
    impl: str = 'repeat'
    conv_vjp: str = 'jax'
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Upsamples x: [B, H, W, C] -> [B, 2H, 2W, C]."""
        options.check_choice('upsample impl', self.impl, options.UPSAMPLE_METHODS)
        if self.with_conv and self.impl == 'subpixel':
            up = UpsampleConv3x3(
                x.shape[-1],
                vjp=self.conv_vjp,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name='conv',
            )
            return up(x)
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if self.with_conv:
            x = conv3x3(
                x.shape[-1],
                name='conv',
                impl=self.conv_impl,
                vjp=self.conv_vjp,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )(x)
        return x


class UpsampleConv3x3(nn.Module):
    """Nearest-neighbour x2 and `nn.Conv`'s 3x3 'SAME' conv in one (`models.subpixel`): the
    same params ('kernel' [3, 3, Cin, Cout], 'bias' [Cout]), initialisation and function as
    the repeat followed by `conv3x3`.

    Attributes:
        features: Cout.
        vjp: the four convolutions' gradients (`models.conv.conv2d`'s `vjp`).
        dtype: compute dtype.
        param_dtype: parameter storage dtype.
    """

    features: int
    vjp: str = 'jax'
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, Cin] -> [B, 2H, 2W, Cout]."""
        shape = (3, 3, x.shape[-1], self.features)
        kernel = self.param('kernel', default_init(), shape, self.param_dtype)
        bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return subpixel.upsample_conv3x3(x, kernel, self.vjp) + bias


# The same blocks, recomputed in the backward pass instead of keeping their activations
# (`config.model.remat`): the same parameters and numbers, less memory. In ResnetBlock's call
# `train` (argument 3, counting self) is static: it decides whether dropout runs.
RematResnetBlock = nn.remat(ResnetBlock, static_argnums=(3,))
RematAttnBlock = nn.remat(AttnBlock)
