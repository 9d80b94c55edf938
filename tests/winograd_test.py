"""models.winograd against a direct convolution computed tap by tap in float64 numpy."""

import flax.linen as nn
import jax
import numpy as np
from absl.testing import absltest, parameterized

from diffusion_jax.models import layers, winograd


def _np_conv(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """y[b, i, j, o] = sum_{dy, dx, c} xpad[b, i + dy, j + dx, c] kernel[dy, dx, c, o]."""
    _, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(
        np.einsum('bhwc,co->bhwo', xp[:, dy : dy + h, dx : dx + w], kernel[dy, dx])
        for dy in range(3)
        for dx in range(3)
    )


def _np_conv_grads(x: np.ndarray, kernel: np.ndarray, dy: np.ndarray) -> tuple:
    """The gradients of sum(_np_conv(x, kernel) * dy), as sums over the taps (the adjoints)."""
    _, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dxp = np.zeros_like(xp)
    dkernel = np.zeros_like(kernel)
    for i in range(3):
        for j in range(3):
            dxp[:, i : i + h, j : j + w] += np.einsum('bhwo,co->bhwc', dy, kernel[i, j])
            dkernel[i, j] = np.einsum('bhwc,bhwo->co', xp[:, i : i + h, j : j + w], dy)
    return dxp[:, 1:-1, 1:-1], dkernel


class WinogradTest(parameterized.TestCase):
    @parameterized.parameters(
        (2, 8, 8, 3, 5),  # the digits network's map
        (4, 4, 4, 16, 8),  # 2 x 2 tiles
        (3, 6, 10, 7, 2),  # not square
        (2, 5, 7, 3, 4),  # odd sizes: padded to even, cropped back
        (1, 1, 1, 2, 2),  # one pixel
    )
    def test_conv_and_its_gradients_match_a_direct_convolution(self, b, h, w, cin, cout):
        rng = np.random.default_rng(h * w + cin)
        x = rng.standard_normal((b, h, w, cin))
        kernel = rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)
        dy = rng.standard_normal((b, h, w, cout))
        f32 = [a.astype(np.float32) for a in (x, kernel, dy)]
        y, vjp = jax.vjp(winograd.conv3x3, f32[0], f32[1])
        dx, dkernel = vjp(f32[2])
        self.assertEqual(y.shape, (b, h, w, cout))
        # Float32 rounding of sums of up to 9 Cin terms of order 1 (measured: 2e-6 at most).
        np.testing.assert_allclose(y, _np_conv(x, kernel), rtol=1e-5, atol=1e-5)
        expected_dx, expected_dkernel = _np_conv_grads(x, kernel, dy)
        np.testing.assert_allclose(dx, expected_dx, rtol=1e-5, atol=1e-5)
        # The kernel gradient sums B H W terms of order 1.
        np.testing.assert_allclose(dkernel, expected_dkernel, rtol=1e-5, atol=1e-4)

    def test_a_strided_winograd_module_is_refused_and_conv3x3_falls_back_to_xla(self):
        x = np.zeros((1, 4, 4, 2), np.float32)
        module = layers.MatmulConv3x3(3, strides=2, impl='winograd')
        with self.assertRaisesRegex(ValueError, 'stride 1 and padding 1'):
            module.init(jax.random.key(0), x)
        fallback = layers.conv3x3(3, name='conv', strides=2, impl='winograd', dtype=np.float32,
                                  param_dtype=np.float32)  # fmt: skip
        self.assertIsInstance(fallback, nn.Conv)

    def test_a_kernel_for_other_channels_is_refused(self):
        with self.assertRaisesRegex(ValueError, 'kernel of shape'):
            winograd.conv3x3(np.zeros((1, 4, 4, 3), np.float32), np.zeros((3, 3, 2, 1), np.float32))


if __name__ == '__main__':
    absltest.main()
