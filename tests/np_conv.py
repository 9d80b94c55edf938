"""A zero-padded, strided 2-D convolution and its gradients, tap by tap in numpy: the
independent reference of the tests of `models.conv`, `models.winograd` and `models.subpixel`."""

import numpy as np

Pads = tuple[tuple[int, int], tuple[int, int]]
_SAME_3X3 = ((1, 1), (1, 1))


def _taps(xp: np.ndarray, kernel_shape: tuple[int, ...], strides: int, out: tuple[int, int]):
    """(i, j, the [B, Ho, Wo, Cin] view of the padded input that tap (i, j) reads)."""
    ho, wo = out
    for i in range(kernel_shape[0]):
        for j in range(kernel_shape[1]):
            rows = slice(i, i + strides * (ho - 1) + 1, strides)
            cols = slice(j, j + strides * (wo - 1) + 1, strides)
            yield i, j, (slice(None), rows, cols)


def _out_size(x: np.ndarray, kernel: np.ndarray, strides: int, pads: Pads) -> tuple[int, int]:
    return tuple((x.shape[1 + a] + sum(pads[a]) - kernel.shape[a]) // strides + 1 for a in range(2))


def conv(x: np.ndarray, kernel: np.ndarray, strides: int = 1, pads: Pads = _SAME_3X3):
    """y[b, i, j, o] = sum_{dy, dx, c} xpad[b, s i + dy, s j + dx, c] kernel[dy, dx, c, o].

    x: [B, H, W, Cin]; kernel: [KH, KW, Cin, Cout]; pads: ((top, bottom), (left, right));
    returns [B, Ho, Wo, Cout].
    """
    xp = np.pad(x, ((0, 0), *pads, (0, 0)))
    out = _out_size(x, kernel, strides, pads)
    return sum(
        np.einsum('bhwc,co->bhwo', xp[view], kernel[i, j])
        for i, j, view in _taps(xp, kernel.shape, strides, out)
    )


def conv_grads(
    x: np.ndarray, kernel: np.ndarray, dy: np.ndarray, strides: int = 1, pads: Pads = _SAME_3X3
) -> tuple:
    """The gradients (dx, dkernel) of sum(conv(x, kernel, strides, pads) * dy), as sums over the
    taps (the adjoints)."""
    xp = np.pad(x, ((0, 0), *pads, (0, 0)))
    dxp = np.zeros_like(xp)
    dkernel = np.zeros_like(kernel)
    for i, j, view in _taps(xp, kernel.shape, strides, dy.shape[1:3]):
        dxp[view] += np.einsum('bhwo,co->bhwc', dy, kernel[i, j])
        dkernel[i, j] = np.einsum('bhwc,bhwo->co', xp[view], dy)
    (top, _), (left, _) = pads
    return dxp[:, top : top + x.shape[1], left : left + x.shape[2]], dkernel


def conv3x3(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """`conv` of a 3x3 kernel, stride 1, padded by 1 on every side: [B, H, W, Cout]."""
    return conv(x, kernel)


def conv3x3_grads(x: np.ndarray, kernel: np.ndarray, dy: np.ndarray) -> tuple:
    """`conv_grads` of `conv3x3`."""
    return conv_grads(x, kernel, dy)
