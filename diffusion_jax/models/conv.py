"""A 2-D convolution whose gradients are forward convolutions in NHWC/HWIO (`conv2d`).

XLA:CPU runs a convolution as an Eigen convolution only in its canonical form: input [B, H, W,
C], kernel [KH, KW, C_in, C_out], output [B, H, W, C], kernel not reversed. JAX's transpose rules
write the input gradient with a reversed kernel and the kernel gradient as a convolution over
the batch axis (`dim_labels=f01b_i01o->01bf`). Outside a loop body XLA rewrites both into the
canonical form; inside one (`lax.scan`, `lax.while_loop`: microbatches, several steps per call)
it does not, and they run as a generic loop nest: 1,073 ms against about 3 ms for one kernel
gradient of the digits network (BENCHMARKS.md).

`conv2d` computes the same function with a custom VJP whose three convolutions are already
canonical: the input gradient with the kernel reversed and transposed explicitly, the kernel
gradient as a convolution of the input transposed to [C_in, H, W, B] with the output gradient
[Ho, Wo, B, C_out] as its kernel. Outside loops XLA:CPU compiles both forms to the same
convolutions (equal bit for bit); inside loops this one keeps them fast. `config.model.conv_vjp`
chooses it ('auto': on the CPU only; other backends keep JAX's rules, which their compilers
pattern-match to their own backward convolutions).
"""

import functools

import jax
import jax.numpy as jnp

from diffusion_jax import options

DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')

Padding = tuple[tuple[int, int], tuple[int, int]]


def explicit_padding(
    padding: str | Padding, in_size: tuple[int, int], kernel_size: tuple[int, int], strides: int
) -> Padding:
    """((top, bottom), (left, right)) of `padding`: 'SAME' (TF's), 'VALID' or explicit pairs."""
    if isinstance(padding, str):
        pads = jax.lax.padtype_to_pads(in_size, kernel_size, (strides, strides), padding)
        return tuple(tuple(p) for p in pads)
    return tuple(tuple(int(v) for v in p) for p in padding)


def _conv(x: jax.Array, kernel: jax.Array, strides: int, padding: Padding) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (strides, strides), padding, dimension_numbers=DIMENSION_NUMBERS
    )


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: int = 1,
    padding: str | Padding = 'SAME',
    vjp: str = 'jax',
) -> jax.Array:
    """`lax.conv_general_dilated(x, kernel, (strides, strides), padding)` in NHWC/HWIO.

    Args:
        x: [B, H, W, C_in].
        kernel: [KH, KW, C_in, C_out], of x's dtype.
        strides: the stride of both spatial axes.
        padding: 'SAME' (TF's), 'VALID' or ((top, bottom), (left, right)).
        vjp: 'jax' (JAX's gradients) or 'nhwc' (gradients that are canonical NHWC/HWIO
            convolutions: the module docstring); options.CONV_VJP_METHODS.

    Returns:
        [B, Ho, Wo, C_out].
    """
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
        raise ValueError(f'conv2d takes [B, H, W, C] and [KH, KW, C, C_out], got {x.shape} '
                         f'and {kernel.shape}')  # fmt: skip
    options.check_choice('conv vjp', vjp, options.CONV_VJP_METHODS)
    pads = explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
    if vjp == 'jax':
        return _conv(x, kernel, strides, pads)
    return _canonical_conv(x, kernel, strides, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _canonical_conv(x: jax.Array, kernel: jax.Array, strides: int, pads: Padding) -> jax.Array:
    return _conv(x, kernel, strides, pads)


def _forward(
    x: jax.Array, kernel: jax.Array, strides: int, pads: Padding
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _conv(x, kernel, strides, pads), (x, kernel)


def _backward(
    strides: int, pads: Padding, residuals: tuple[jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """d/dx and d/dkernel of <g, conv(x, kernel)>, g: [B, Ho, Wo, C_out]."""
    x, kernel = residuals
    s = strides
    k = kernel.shape[:2]
    n = x.shape[1:3]
    o = g.shape[1:3]
    # d/dx: g dilated by the stride, correlated with the kernel reversed in space and with its
    # channel axes swapped, padded so the result has x's size.
    flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
    dx_pads = tuple(
        (k[i] - 1 - pads[i][0], n[i] - 1 - (o[i] - 1) * s + pads[i][0]) for i in range(2)
    )
    dx = jax.lax.conv_general_dilated(
        g, flipped, (1, 1), dx_pads, lhs_dilation=(s, s), dimension_numbers=DIMENSION_NUMBERS
    )
    # d/dkernel[a, b, i, j] = sum over (B, Ho, Wo) of x_padded[B, a + s Ho, b + s Wo, i] g[B, Ho,
    # Wo, j]: the batch axis becomes the contracted channel axis, C_in the batch axis, and g
    # (dilated by the stride) the kernel. The result is at least KH x KW: keep that corner.
    dk = jax.lax.conv_general_dilated(
        jnp.transpose(x, (3, 1, 2, 0)),  # [C_in, H, W, B]
        jnp.transpose(g, (1, 2, 0, 3)),  # [Ho, Wo, B, C_out]
        (1, 1),
        pads,
        rhs_dilation=(s, s),
        dimension_numbers=DIMENSION_NUMBERS,
    )  # [C_in, >= KH, >= KW, C_out]
    dk = jnp.transpose(dk[:, : k[0], : k[1], :], (1, 2, 0, 3))
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_canonical_conv.defvjp(_forward, _backward)
