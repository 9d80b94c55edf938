"""A 3x3, stride-1, zero-padded convolution and its gradients, tap by tap in numpy: the
independent reference of the tests of `models.winograd` and `models.subpixel`."""

import numpy as np


def conv3x3(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """y[b, i, j, o] = sum_{dy, dx, c} xpad[b, i + dy, j + dx, c] kernel[dy, dx, c, o].

    x: [B, H, W, Cin]; kernel: [3, 3, Cin, Cout]; returns [B, H, W, Cout].
    """
    _, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(
        np.einsum('bhwc,co->bhwo', xp[:, dy : dy + h, dx : dx + w], kernel[dy, dx])
        for dy in range(3)
        for dx in range(3)
    )


def conv3x3_grads(x: np.ndarray, kernel: np.ndarray, dy: np.ndarray) -> tuple:
    """The gradients (dx, dkernel) of sum(conv3x3(x, kernel) * dy), as sums over the taps (the
    adjoints)."""
    _, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dxp = np.zeros_like(xp)
    dkernel = np.zeros_like(kernel)
    for i in range(3):
        for j in range(3):
            dxp[:, i : i + h, j : j + w] += np.einsum('bhwo,co->bhwc', dy, kernel[i, j])
            dkernel[i, j] = np.einsum('bhwc,bhwo->co', xp[:, i : i + h, j : j + w], dy)
    return dxp[:, 1:-1, 1:-1], dkernel
