"""A 3x3, stride-1, 'SAME' convolution by Winograd's minimal filtering F(2x2, 3x3).

Lavin and Gray (2016), "Fast Algorithms for Convolutional Neural Networks": each 2x2 tile of
the output is A^T [(G g G^T) * (B^T d B)] A, with d the 4x4 input tile around it and g the 3x3
kernel. Over a whole layer the elementwise product becomes 16 matmuls, one per position of the
4x4 transformed tile, [N, Cin] x [Cin, Cout] with N = B H W / 4 tiles: 16 / 36 = 1/2.25 of a
direct convolution's multiplies. The transforms add and subtract only (and halve, in G), so
the result equals the direct convolution within float32 rounding.

The backward pass is written by hand (`jax.custom_vjp`) as two more Winograd products:
- the input gradient is the same convolution of the output gradient with the kernel rotated
  by 180 degrees and its channel axes swapped (stride 1, padding 1 on every side);
- the kernel gradient is G^T [sum over tiles of V^T (A dY A^T)] G, reusing the forward pass's
  transformed input V.
Autodiff of the forward pass would instead scatter the input gradient back through the four
overlapping strided slices, which XLA:CPU ran about twice as slow as a forward pass (an 8x8,
64-channel map at batch 64: 8.1 against 4.0 ms).

`models.layers.conv3x3(impl='winograd')` uses it for its stride-1 convs and XLA's convolution
for the others (the stride-2 downsampling); `config.model.conv_impl` chooses (BENCHMARKS.md).
"""

import jax
import jax.numpy as jnp

# The transformed tile has 4 x 4 positions; each output tile is 2 x 2.
TILE = 4
OUT_TILE = 2
# The paddings of a 3x3 conv that pad by 1 on every side, as `nn.Conv` spells them.
_PADDINGS = ('SAME', ((1, 1), (1, 1)))


def applies(strides: int, padding: object) -> bool:
    """Whether `conv3x3` computes a 3x3 conv of this stride and `nn.Conv`-style padding."""
    return strides == 1 and padding in _PADDINGS


def _input_transform_1d(d: jax.Array, axis: int) -> jax.Array:
    """B^T along `axis` over the overlapping 4-wide windows at stride 2.

    d has 2n + 2 entries on `axis`; returns [4, ...] with `axis` now n long (tile index).
    """
    n = (d.shape[axis] - 2) // 2
    d0, d1, d2, d3 = (
        jax.lax.slice_in_dim(d, k, k + 2 * n - 1, stride=2, axis=axis) for k in range(TILE)
    )
    return jnp.stack([d0 - d2, d1 + d2, d2 - d1, d1 - d3])


def _kernel_transform_1d(g: jax.Array, axis: int) -> jax.Array:
    """G along `axis` (3 taps) -> a new leading axis of 4, `axis` removed."""
    g0, g1, g2 = jnp.unstack(g, axis=axis)
    return jnp.stack([g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2])


def _kernel_transform_1d_t(u: jax.Array, axis: int) -> jax.Array:
    """G^T along `axis` (4 positions) -> a new leading axis of 3 taps, `axis` removed."""
    u0, u1, u2, u3 = jnp.unstack(u, axis=axis)
    return jnp.stack([u0 + 0.5 * (u1 + u2), 0.5 * (u1 - u2), 0.5 * (u1 + u2) + u3])


def _output_transform_1d(m: jax.Array, axis: int) -> jax.Array:
    """A^T along `axis` (4 positions) -> a new leading axis of 2 outputs, `axis` removed."""
    m0, m1, m2, m3 = jnp.unstack(m, axis=axis)
    return jnp.stack([m0 + m1 + m2, m1 - m2 - m3])


def _output_transform_1d_t(y: jax.Array, axis: int) -> jax.Array:
    """A along `axis` (2 outputs) -> a new leading axis of 4 positions, `axis` removed."""
    y0, y1 = jnp.unstack(y, axis=axis)
    return jnp.stack([y0, y0 + y1, y0 - y1, -y1])


def _transform_input(x: jax.Array) -> jax.Array:
    """[B, H, W, C] (H, W even) -> V [16, B H W / 4, C], positions ordered (column, row)."""
    b, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    v = _input_transform_1d(_input_transform_1d(padded, 1), 3)  # [4c, 4r, B, H/2, W/2, C]
    return v.reshape(TILE * TILE, b * (h // 2) * (w // 2), c)


def _transform_kernel(kernel: jax.Array) -> jax.Array:
    """[3, 3, Cin, Cout] -> U [16, Cin, Cout], positions ordered (column, row) as V's."""
    u = _kernel_transform_1d(_kernel_transform_1d(kernel, 0), 1)  # [4c, 4r, Cin, Cout]
    return u.reshape(TILE * TILE, *kernel.shape[2:])


def _untransform_output(m: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """M [16, B H W / 4, Cout] -> [B, H, W, Cout]."""
    b, h, w, cout = shape
    m = m.reshape(TILE, TILE, b, h // 2, w // 2, cout)  # [4c, 4r, ...]
    y = _output_transform_1d(_output_transform_1d(m, 0), 1)  # [2r, 2c, B, H/2, W/2, Cout]
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(shape)


def _transform_output_gradient(dy: jax.Array) -> jax.Array:
    """[B, H, W, Cout] -> dM [16, B H W / 4, Cout]: the transpose of `_untransform_output`."""
    b, h, w, cout = dy.shape
    d = dy.reshape(b, h // 2, OUT_TILE, w // 2, OUT_TILE, cout)
    d = _output_transform_1d_t(_output_transform_1d_t(d, 4), 3)  # [4r, 4c, B, H/2, W/2, Cout]
    return jnp.swapaxes(d, 0, 1).reshape(TILE * TILE, b * (h // 2) * (w // 2), cout)


def _batched_matmul(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    return jax.lax.dot_general(a, b, ((contract[:1], contract[1:]), ((0,), (0,))))


def _forward(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    v = _transform_input(x)
    m = _batched_matmul(v, _transform_kernel(kernel), (2, 1))  # [16, N, Cout]
    return _untransform_output(m, (*x.shape[:3], kernel.shape[-1])), v


@jax.custom_vjp
def _conv_even(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _forward(x, kernel)[0]


def _conv_even_fwd(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple]:
    y, v = _forward(x, kernel)
    return y, (v, kernel)


def _conv_even_bwd(residuals: tuple, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    v, kernel = residuals
    du = _batched_matmul(v, _transform_output_gradient(dy), (1, 1))  # [16, Cin, Cout]
    du = du.reshape(TILE, TILE, *du.shape[1:])  # [4c, 4r, Cin, Cout]
    dkernel = _kernel_transform_1d_t(_kernel_transform_1d_t(du, 1), 1)  # [3c, 3r, Cin, Cout]
    dkernel = jnp.swapaxes(dkernel, 0, 1)
    dx = _conv_even(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
    return dx, dkernel


_conv_even.defvjp(_conv_even_fwd, _conv_even_bwd)


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The 3x3 convolution (cross-correlation) of x with kernel, stride 1, padding 1 per side.

    Equal to `lax.conv_general_dilated(x, kernel, (1, 1), 'SAME')` within float32 rounding,
    gradients included.

    Args:
        x: [B, H, W, Cin]; odd H or W are padded by a zero row or column at the bottom or
            right, whose outputs are dropped.
        kernel: [3, 3, Cin, Cout], of x's dtype.

    Returns:
        [B, H, W, Cout].
    """
    _, h, w, cin = x.shape
    if kernel.shape[:3] != (3, 3, cin):
        raise ValueError(f'kernel of shape {kernel.shape} for an input of {cin} channels')
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    return _conv_even(x, kernel)[:, :h, :w]
