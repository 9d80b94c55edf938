"""Nearest-neighbour x2 upsampling followed by a 3x3 'SAME' conv, as four 2x2 convs.

After nearest-neighbour doubling, each output pixel's 3x3 window covers only two distinct rows
and two distinct columns of the low-resolution input, so the 3x3 kernel collapses to a 2x2 one
that depends on the output pixel's parity (a, b) (row, column). Along one axis, with k0, k1, k2
the kernel's three taps and i the low-resolution index:
- output 2i (parity 0) reads the doubled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i: taps
  (k0, k1 + k2) on rows (i-1, i);
- output 2i+1 (parity 1) reads the doubled rows 2i, 2i+1, 2i+2 = input rows i, i, i+1: taps
  (k0 + k1, k2) on rows (i, i+1).
The doubled map's zero border is the input's zero border, so parity 0 pads the input by one row
before it, parity 1 by one row after it. The same holds for columns. Each of the four outputs
is a stride-1 2x2 conv of the [B, H, W, Cin] input, and together they interleave into the
[B, 2H, 2W, Cout] result: 4 taps per output pixel instead of 9, 1/2.25 of the multiplies.

The result equals the repeat-then-conv within float32 rounding (only the order of the sums
changes), gradients included, and the parameters are the same 3x3 kernel.
`models.layers.Upsample` uses it where `config.model.upsample_impl` resolves to 'subpixel'
(BENCHMARKS.md, "Why the CPU train step was slow").
"""

import jax
import jax.numpy as jnp

from diffusion_jax.models import conv


def _parity_taps(kernel: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """The 3 taps of `axis` collapsed to 2 for output parity 0 and for parity 1."""
    k0, k1, k2 = jnp.unstack(kernel, axis=axis)
    return jnp.stack([k0, k1 + k2], axis), jnp.stack([k0 + k1, k2], axis)


def upsample_conv3x3(x: jax.Array, kernel: jax.Array, vjp: str = 'jax') -> jax.Array:
    """conv3x3_same(nearest_upsample_x2(x), kernel), computed as four 2x2 convs of x.

    Args:
        x: [B, H, W, Cin].
        kernel: [3, 3, Cin, Cout], of x's dtype.
        vjp: the convolutions' gradients (`models.conv.conv2d`'s `vjp`).

    Returns:
        [B, 2H, 2W, Cout], without bias.
    """
    b, h, w, cin = x.shape
    if kernel.shape[:3] != (3, 3, cin):
        raise ValueError(f'kernel of shape {kernel.shape} for an input of {cin} channels')
    rows = []
    for a, row_kernel in enumerate(_parity_taps(kernel, 0)):
        parities = []
        for c, kernel_ab in enumerate(_parity_taps(row_kernel, 1)):
            padding = ((1 - a, a), (1 - c, c))
            parities.append(conv.conv2d(x, kernel_ab, 1, padding, vjp))
        rows.append(jnp.stack(parities, axis=3))  # [B, H, W, 2 (column parity), Cout]
    y = jnp.stack(rows, axis=2)  # [B, H, 2 (row parity), W, 2, Cout]
    return y.reshape(b, 2 * h, 2 * w, kernel.shape[-1])
